"""One task running under llama-index-workflows: its stream, its inbox, its session state,
its checkpoints.

After every step that does not end the run, the Context (`ctx.to_dict()`) is handed to
`on_checkpoint`; a run given a checkpoint resumes from it (`Context.from_dict`): steps that
had finished are not run again, the step that was in progress runs again.

Events sent into the task (human-in-the-loop) arrive numbered by the control plane's inbox.
llama-index-workflows drops an event that no step or waiter takes yet (it reports an
UnhandledEvent), so such an event is held back and sent again each time the workflow
goes idle waiting for input (WorkflowIdleEvent): an answer that comes early is not lost.
"""

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from workflows import Context, Workflow
from workflows.events import (
    Event,
    HumanResponseEvent,
    InternalDispatchEvent,
    StartEvent,
    StepState,
    StepStateChanged,
    StopEvent,
    UnhandledEvent,
    WorkflowIdleEvent,
)

from conveyor.contracts import EventEnvelope, NewTask

from .worker import envelope, jsonable

log = logging.getLogger("conveyor.runtime")


class StepTimeout(TimeoutError):
    """A step ran longer than the service's step timeout; the attempt ends."""


class TaskTimeout(TimeoutError):
    """An attempt ran longer than its task timeout; the attempt ends."""


class EventNotAccepted(ValueError):
    """An event sent into a task that its workflow does not take, or that does not validate."""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def accepted_events(workflow: Workflow) -> dict[str, type[Event]]:
    """The event types that may be sent into a run of `workflow`, by qualified name.

    Those its steps take or emit, those defined beside the workflow (the types its steps
    wait for with ctx.wait_for_event), and HumanResponseEvent; never start or stop events.
    """
    found: list[type[Event]] = [*workflow.events, HumanResponseEvent]
    module = sys.modules.get(type(workflow).__module__)
    if module is not None:
        found += [value for _, value in inspect.getmembers(module, inspect.isclass)
                  if issubclass(value, Event) and value.__module__ == module.__name__]
    return {
        qualified_name(cls): cls
        for cls in found
        if not issubclass(cls, StartEvent | StopEvent | InternalDispatchEvent)
    }


def to_event(accepted: dict[str, type[Event]], sent: EventEnvelope) -> Event:
    cls = accepted.get(sent.qualified_name or "")
    if cls is None:
        by_name = [c for c in accepted.values() if c.__name__ == sent.type]
        cls = by_name[0] if len(by_name) == 1 else None
    if cls is None:
        raise EventNotAccepted(
            f"event type {sent.qualified_name or sent.type!r} is not one this workflow takes"
        )
    try:
        return cls.model_validate(sent.value)
    except ValidationError as exc:
        raise EventNotAccepted(f"event {cls.__name__} does not validate: {exc}") from None


class TaskRun:
    """Runs one task to its result, streaming its events and taking events sent into it."""

    def __init__(
        self,
        workflow: Workflow,
        task: NewTask,
        on_event: Callable[[EventEnvelope], Awaitable[None]],
        *,
        accepted: dict[str, type[Event]] | None = None,
        state: dict[str, Any] | None = None,
        resume_from: dict[str, Any] | None = None,
        taken_before: int = 0,
        on_checkpoint: Callable[[dict[str, Any], int], Awaitable[None]] | None = None,
        step_timeout: float | None = None,
        task_timeout: float | None = None,
    ) -> None:
        self.workflow = workflow
        self.task = task
        self.on_event = on_event
        self.accepted = accepted if accepted is not None else accepted_events(workflow)
        self.state = state
        self.resume_from = resume_from
        self.on_checkpoint = on_checkpoint
        self.streamed = 0
        self.steps: dict[str, list[float]] = {}  # seconds each run of each step took
        self.step_timeout = step_timeout
        self.task_timeout = task_timeout
        self._started: dict[tuple[str, str], float] = {}
        self._overdue_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._overdue: StepTimeout | None = None
        self._running: asyncio.Task | None = None
        self._taken_before = taken_before  # inbox events its checkpoint had taken
        self._stop_name = str(workflow.stop_event_class)
        self._handler = None
        self._seen: set[int] = set()
        self._held: list[tuple[int, Event, str | None]] = []
        self._sent: list[tuple[int, Event, str | None]] = []

    def deliver(self, seq: int, sent: EventEnvelope, step: str | None = None) -> None:
        """Hand an event from the inbox to the run; each inbox position is taken once."""
        if seq in self._seen:
            return
        event = to_event(self.accepted, sent)
        self._seen.add(seq)
        if self._handler is None:
            self._held.append((seq, event, step))
        else:
            self._send(seq, event, step)

    @property
    def inbox_seq(self) -> int:
        """The inbox position up to which every sent event is in the context's hands."""
        if self._held:
            return min(seq for seq, _, _ in self._held) - 1
        return max(self._seen, default=self._taken_before)

    def _send(self, seq: int, event: Event, step: str | None) -> None:
        self._sent.append((seq, event, step))
        self._handler.ctx.send_event(event, step=step)

    def _on_internal(self, event: InternalDispatchEvent) -> None:
        if isinstance(event, UnhandledEvent):
            for i, (_, sent, _) in enumerate(self._sent):
                if qualified_name(type(sent)) == event.qualified_name:
                    self._held.append(self._sent.pop(i))
                    break
        elif isinstance(event, WorkflowIdleEvent):
            # Everything sent before going idle was taken or reported unhandled by now.
            self._sent.clear()
            held, self._held = self._held, []
            for item in held:
                self._send(*item)

    async def run(self) -> Any:
        """The workflow's result; raises what the workflow raised, or a timeout."""
        self._running = asyncio.current_task()
        try:
            async with asyncio.timeout(self.task_timeout) as limit:
                return await self._run()
        except asyncio.CancelledError:
            if self._overdue is not None:
                self._running.uncancel()
                raise self._overdue from None
            raise
        except TimeoutError:
            if limit.expired():
                raise TaskTimeout(
                    f"the attempt ran longer than the task timeout of {self.task_timeout} s"
                ) from None
            raise
        finally:
            for timer in self._overdue_timers.values():
                timer.cancel()

    async def _run(self) -> Any:
        if self.resume_from is not None and self.resume_from.get("is_running"):
            ctx = Context.from_dict(self.workflow, self.resume_from)
            self._handler = handler = self.workflow.run(ctx=ctx)
        else:  # a context kept before its run began holds no start event: begun afresh
            kept = self.resume_from or ({"state": self.state} if self.state else None)
            ctx = Context.from_dict(self.workflow, kept) if kept else None
            # The start event is built here, so that input fields named like run()'s own
            # arguments (ctx, start_event, run_id) reach the workflow as fields.
            start = self.workflow.start_event_class(**self.task.input)
            self._handler = handler = self.workflow.run(ctx=ctx, start_event=start)
        held, self._held = self._held, []
        for item in held:
            self._send(*item)
        try:
            async for event in handler.stream_events(expose_internal=True):
                if isinstance(event, StepStateChanged):
                    await self._after_step(event)
                elif isinstance(event, InternalDispatchEvent):
                    self._on_internal(event)
                elif not isinstance(event, StopEvent):
                    await self.on_event(envelope(event))
                    self.streamed += 1
            return jsonable(await handler)
        finally:
            if not handler.is_done():
                await handler.cancel_run()

    async def _after_step(self, event: StepStateChanged) -> None:
        key = (event.name, event.worker_id)
        if event.step_state == StepState.RUNNING:
            self._started[key] = time.monotonic()
            if self.step_timeout:
                self._overdue_timers[key] = asyncio.get_running_loop().call_later(
                    self.step_timeout, self._step_overdue, event.name)
            return
        if event.step_state != StepState.NOT_RUNNING:
            return
        if key in self._started:
            self.steps.setdefault(event.name, []).append(
                round(time.monotonic() - self._started.pop(key), 6))
        if (timer := self._overdue_timers.pop(key, None)) is not None:
            timer.cancel()
        # A step that returned nothing may have failed: the checkpoint before it stands.
        if event.output_event_name not in (None, self._stop_name):
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Hand the run's Context, as it is now, to on_checkpoint: only while the run is
        under way. A context taken before its run began (a stop or a pause just after the
        start) holds no start event, and one taken once it ended holds no work: resumed,
        either would run the workflow again from an empty StartEvent."""
        if self.on_checkpoint is None or self._handler is None:
            return
        context = self._handler.ctx.to_dict()
        if context.get("is_running"):
            await self.on_checkpoint(context, self.inbox_seq)

    def _step_overdue(self, step: str) -> None:
        self._overdue = StepTimeout(
            f"step {step!r} ran longer than the step timeout of {self.step_timeout} s")
        if self._running is not None:
            self._running.cancel()

    def context_state(self) -> dict[str, Any] | None:
        """The run's state store, serialized, for the next task of its session."""
        if self._handler is None or self._handler.ctx is None:
            return None
        return self._handler.ctx.to_dict()["state"]


async def run_task(
    workflow: Workflow, task: NewTask, on_event: Callable[[EventEnvelope], Awaitable[None]]
) -> Any:
    """Run one task to its result, handing each streamed event to `on_event` in order."""
    return await TaskRun(workflow, task, on_event).run()
