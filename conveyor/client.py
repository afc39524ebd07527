"""conveyor.Client: start tasks and follow them over the broker, with no HTTP in between.

One private reply topic per client carries every outcome and query answer meant for it;
each waiting call holds a future that the reply handler resolves, so nothing polls.
"""

import asyncio
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import BaseModel
from workflows.events import Event

from conveyor.contracts import (
    FINAL_STATUSES,
    TASK_QUERIES,
    CancelTask,
    CancelTaskMessage,
    CompletedTaskMessage,
    EventEnvelope,
    InvalidMessage,
    NewTask,
    NewTaskMessage,
    PauseTaskMessage,
    Query,
    QueryMessage,
    QueryResultMessage,
    ResumeTaskMessage,
    SendEvent,
    SendEventMessage,
    TaskControl,
    TaskError,
    TaskStream,
    TaskStreamMessage,
    new_id,
    parse_message,
    reply_topic,
    topic,
)
from conveyor.contracts.topics import CONTROL_PLANE, QUERY
from conveyor.services.bus import Broker, create_broker, declare_system_topics, publish, subscribe
from conveyor.services.runtime.worker import envelope
from conveyor.services.settings import Settings, load

KEPT_OUTCOMES = 10_000


class TaskOutcome(BaseModel):
    task_id: str
    session_id: str | None = None
    service: str = ""
    status: str
    result: Any = None
    error: TaskError | None = None


class TaskFailed(RuntimeError):
    """The task ended failed; `error` has the exception type and message from the workflow."""

    def __init__(self, outcome: TaskOutcome) -> None:
        self.outcome = outcome
        self.task_id = outcome.task_id
        self.error = outcome.error
        detail = f"{outcome.error.type}: {outcome.error.message}" if outcome.error else "failed"
        super().__init__(f"task {outcome.task_id} {outcome.status}: {detail}")


class TaskCancelled(TaskFailed):
    """The task was cancelled before it finished."""


class QueryFailed(RuntimeError):
    """The control plane could not answer a query."""


class _Follower:
    """One stream() call: puts the task's events in index order and knows when they end."""

    def __init__(self, after: int) -> None:
        self.next_index = after + 1
        self.end: int | None = None
        self.buffer: dict[int, TaskStream] = {}
        self.changed = asyncio.Event()

    def add(self, event: TaskStream) -> None:
        if event.index >= self.next_index:
            self.buffer[event.index] = event
            self.changed.set()

    def finish(self, events: int) -> None:
        self.end = events
        self.changed.set()

    def missing(self) -> bool:
        """The end is known but an event before it never came (a live send was lost)."""
        return self.end is not None and self.next_index < self.end and not self.buffer_ready()

    def buffer_ready(self) -> bool:
        return self.next_index in self.buffer

    def take(self) -> TaskStream:
        event = self.buffer.pop(self.next_index)
        self.next_index += 1
        return event

    def done(self) -> bool:
        return self.end is not None and self.next_index >= self.end


class Client:
    """Async client: `async with Client(broker_url=..., namespace=...) as client:`."""

    def __init__(
        self,
        broker_url: str | None = None,
        namespace: str | None = None,
        *,
        publisher_id: str | None = None,
        query_timeout: float = 30.0,
        settings: Settings | None = None,
        broker: Broker | None = None,
        middlewares: tuple = (),
        part: str = "client",
    ) -> None:
        """With `broker`, the client rides on a broker connection its owner starts and stops
        (a workflow service's, for nested workflows); otherwise it makes its own, with
        `middlewares` (FastStream broker middlewares) added. A process that exports spans
        names them after its first broker's `part` unless OTEL_SERVICE_NAME is set: "client",
        or "gateway" for the gateway's."""
        overrides = {"broker_url": broker_url, "namespace": namespace}
        self.settings: Settings = settings or load(
            **{k: v for k, v in overrides.items() if v is not None}
        )
        self.publisher_id = publisher_id or f"client@{socket.gethostname()}:{os.getpid()}"
        self.query_timeout = query_timeout
        self._id = new_id()[:12]
        self._reply_to = reply_topic(self.settings.namespace, self._id)
        self._owns_broker = broker is None
        self._broker = broker or create_broker(self.settings, part, always_trace=True,
                                               middlewares=middlewares)
        self._waiting: dict[str, asyncio.Future] = {}
        self._outcomes: OrderedDict[str, TaskOutcome] = OrderedDict()
        self._answers: dict[str, asyncio.Future] = {}
        self._followers: dict[str, list[_Follower]] = {}
        # On its own broker the client hears its replies from the start. On a broker it
        # rides on (a workflow service's), from its first request: most services never
        # call another, and an idle consumer still costs its process and the broker.
        self._replies: Any = None
        self._subscribing = asyncio.Lock()
        if self._owns_broker:
            self._replies = subscribe(self._broker, self.settings, self._reply_to, None)
            self._replies(self._on_reply)

    async def __aenter__(self) -> "Client":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._owns_broker:
            await self._broker.start()
            await declare_system_topics(self._broker, self.settings)

    async def close(self) -> None:
        if self._owns_broker:
            await self._broker.stop()

    async def _listening(self) -> None:
        """Until the reply topic is consumed (see __init__)."""
        if self._replies is not None:
            return
        async with self._subscribing:
            if self._replies is None:
                replies = subscribe(self._broker, self.settings, self._reply_to, None)
                replies(self._on_reply)
                await replies.start()  # the owner's broker is running: it stops it too
                self._replies = replies

    async def _on_reply(self, body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage:
            return
        match message:
            case TaskStreamMessage(data=event):
                for follower in self._followers.get(event.task_id, ()):
                    follower.add(event)
            case CompletedTaskMessage(data=done):
                for follower in self._followers.get(done.task_id, ()):
                    follower.finish(done.events)
                outcome = TaskOutcome.model_validate(done.model_dump())
                self._outcomes[outcome.task_id] = outcome
                while len(self._outcomes) > KEPT_OUTCOMES:
                    self._outcomes.popitem(last=False)
                future = self._waiting.pop(outcome.task_id, None)
                if future is not None and not future.done():
                    future.set_result(outcome)
            case QueryResultMessage(data=answer):
                future = self._answers.pop(answer.request_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)

    # Starting tasks

    async def run_nowait(
        self,
        service: str,
        /,
        *,
        session_id: str | None = None,
        task_id: str | None = None,
        parent_task_id: str | None = None,
        max_retries: int | None = None,
        attempt_timeout: float | None = None,
        **input: Any,
    ) -> str:
        """Publish a NEW_TASK and return its task id.

        `max_retries` and `attempt_timeout` override the service's retry and timeout
        settings for this task; every other keyword is the workflow's input.
        """
        task = NewTask(
            service=service, session_id=session_id, input=input, reply_to=self._reply_to,
            parent_task_id=parent_task_id, max_retries=max_retries, timeout=attempt_timeout,
            **({"task_id": task_id} if task_id else {}),
        )
        await self._listening()
        self._waiting.setdefault(task.task_id, asyncio.get_running_loop().create_future())
        message = NewTaskMessage(type=CONTROL_PLANE, publisher_id=self.publisher_id, data=task)
        try:
            await publish(self._broker, self.settings, message,
                          topic(self.settings.namespace, CONTROL_PLANE), key=task.task_id)
        except Exception:  # not sent (too large, or the broker stayed away): nothing to wait for
            self._waiting.pop(task.task_id, None)
            raise
        return task.task_id

    async def run(
        self,
        service: str,
        /,
        *,
        session_id: str | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        attempt_timeout: float | None = None,
        **input: Any,
    ) -> Any:
        """Run a task to its end and return the workflow's result; raises TaskFailed.

        `timeout` bounds the wait here; `attempt_timeout` bounds each attempt's run.
        """
        task_id = await self.run_nowait(service, session_id=session_id, task_id=task_id,
                                        max_retries=max_retries,
                                        attempt_timeout=attempt_timeout, **input)
        return await self.result(task_id, timeout=timeout)

    # Following tasks

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskOutcome:
        """Wait for a task to finish, whoever started it; returns its outcome."""
        if task_id in self._outcomes:
            return self._outcomes[task_id]
        mine = self._waiting.get(task_id)
        if mine is not None:
            return await asyncio.wait_for(asyncio.shield(mine), timeout)
        view = await self._ask(Query(kind="watch_task", task_id=task_id, reply_to=self._reply_to),
                               timeout=timeout)
        return TaskOutcome.model_validate(view)

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        outcome = await self.wait(task_id, timeout)
        if outcome.status == "cancelled":
            raise TaskCancelled(outcome)
        if outcome.status != "completed":
            raise TaskFailed(outcome)
        return outcome.result

    async def stream(self, task_id: str, after: int = -1) -> AsyncIterator[TaskStream]:
        """The events a task streams, in order, from index `after + 1` until it ends.

        Events already stored are replayed from the control plane's durable log, so a late
        or reconnecting reader misses nothing; each has its gap-free `index`.
        """
        follower = _Follower(after)
        self._followers.setdefault(task_id, []).append(follower)
        asked_after = None
        try:
            await self._ask(self._stream_query(task_id, after))
            while True:
                if follower.buffer_ready():
                    yield follower.take()
                    continue
                if follower.done():
                    return
                if follower.missing() and asked_after != follower.next_index - 1:
                    asked_after = follower.next_index - 1
                    await self._ask(self._stream_query(task_id, asked_after))
                    continue
                follower.changed.clear()
                await follower.changed.wait()
        finally:
            self._followers[task_id].remove(follower)
            if not self._followers[task_id]:
                del self._followers[task_id]

    def _stream_query(self, task_id: str, after: int) -> Query:
        return Query(kind="stream_task", task_id=task_id, after=after, reply_to=self._reply_to)

    async def send_event(
        self, task_id: str, event: Event | EventEnvelope | dict[str, Any], *,
        step: str | None = None,
    ) -> int:
        """Send an event into a running task (human-in-the-loop); returns its inbox position.

        `event` is a workflows Event, or its envelope {"type", "qualified_name", "value"}.
        Raises QueryFailed when the task has ended or its workflow does not take that type.
        """
        if isinstance(event, Event):
            event = envelope(event)
        sent = SendEvent(task_id=task_id, event=EventEnvelope.model_validate(event), step=step,
                         reply_to=self._reply_to)
        message = SendEventMessage(type=CONTROL_PLANE, publisher_id=self.publisher_id, data=sent)
        answer = await self._request(message, topic(self.settings.namespace, CONTROL_PLANE),
                                     "send_event", key=task_id)
        return answer["seq"]

    # Sessions: tasks run in one session share their workflow's Context state

    async def create_session(self, session_id: str | None = None) -> dict[str, Any]:
        return await self._ask(Query(kind="create_session", session_id=session_id,
                                     reply_to=self._reply_to))

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        return await self._ask(Query(kind="get_session", session_id=session_id,
                                     reply_to=self._reply_to))

    async def list_sessions(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self._ask(Query(kind="list_sessions", limit=limit, reply_to=self._reply_to))

    async def delete_session(self, session_id: str) -> bool:
        return await self._ask(Query(kind="delete_session", session_id=session_id,
                                     reply_to=self._reply_to))

    async def session_state(self, session_id: str) -> dict[str, Any]:
        session = await self.get_session(session_id)
        if session is None:
            raise QueryFailed(f"UnknownSession: no session {session_id!r}")
        return session["state"]

    async def set_session_state(self, session_id: str, state: dict[str, Any]) -> dict[str, Any]:
        return await self._ask(Query(kind="set_session_state", session_id=session_id,
                                     state=state, reply_to=self._reply_to))

    async def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a task and its inner tasks; False if it had already ended."""
        cancel = CancelTask(task_id=task_id, reason=reason, reply_to=self._reply_to)
        return await self._steer(CancelTaskMessage, cancel)

    async def pause(self, task_id: str) -> bool:
        """Pause a task: its worker checkpoints and lets go of it; nothing runs it until
        resume(). False if it had ended or was paused already."""
        return await self._steer(PauseTaskMessage, TaskControl(task_id=task_id,
                                                               reply_to=self._reply_to))

    async def resume(self, task_id: str) -> bool:
        """Resume a paused task from its last checkpoint; False if it was not paused."""
        return await self._steer(ResumeTaskMessage, TaskControl(task_id=task_id,
                                                                reply_to=self._reply_to))

    async def _steer(self, kind: type, control: TaskControl) -> bool:
        message = kind(type=CONTROL_PLANE, publisher_id=self.publisher_id, data=control)
        answer = await self._request(message, topic(self.settings.namespace, CONTROL_PLANE),
                                     message.action.value, key=control.task_id)
        return answer["done"]

    async def errors(self, task_id: str) -> list[dict[str, Any]]:
        """The error of every failed attempt of a task, in order."""
        record = await self.get_task(task_id)
        if record is None:
            raise QueryFailed(f"UnknownTask: no task {task_id!r}")
        return record["errors"]

    async def metrics(self, task_id: str) -> dict[str, Any]:
        """A task's attempts, streamed events and the seconds each run of each step took."""
        record = await self.get_task(task_id)
        if record is None:
            raise QueryFailed(f"UnknownTask: no task {task_id!r}")
        return {key: record[key] for key in ("attempts", "events", "steps")}

    async def pending_work(self) -> dict[str, dict[str, int]]:
        """Per service, how many tasks are queued, running, retrying or paused."""
        return await self._ask(Query(kind="pending_work", reply_to=self._reply_to))

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        """The control plane's record of a task, or None if it has none (asked after the
        task's NEW_TASK, so a task just started is found). A task whose outcome this client
        has read is never read as unfinished: on Kafka the outcome that came straight from
        its worker may reach the control plane a moment later (the two are sent at once),
        and a question sent meanwhile be answered first."""
        record = await self._ask(Query(kind="get_task", task_id=task_id,
                                       reply_to=self._reply_to))
        known = self._outcomes.get(task_id)
        if record is not None and known is not None and record["status"] not in FINAL_STATUSES:
            record |= known.model_dump(include={"status", "result", "error"}, mode="json")
        return record

    async def delete_task(self, task_id: str) -> bool:
        """Delete an ended task's record, event log, inbox and checkpoint now rather than at
        its TTL; False if there was no record. A task that has not ended is refused
        (QueryFailed "TaskNotEnded"): cancel it and wait for it first."""
        deleted = await self._ask(
            Query(kind="delete_task", task_id=task_id, reply_to=self._reply_to))
        self._outcomes.pop(task_id, None)  # the id may be used again
        return deleted

    async def status(self, task_id: str) -> str | None:
        record = await self.get_task(task_id)
        return record["status"] if record else None

    async def list_tasks(
        self,
        *,
        service: str | None = None,
        status: str | None = None,
        session_id: str | None = None,
        owner: str | None = None,
        search: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Tasks, newest first; `owner` is the publisher_id that started them, `search` a
        piece of their id or service name (any case)."""
        query = Query(kind="list_tasks", service=service, status=status, session_id=session_id,
                      owner=owner, search=search, limit=limit, reply_to=self._reply_to)
        return await self._ask(query)

    async def event_log(self, task_id: str, after: int = -1,
                        limit: int = 1000) -> list[dict[str, Any]]:
        """The events a task has streamed so far, after index `after`, read once from the
        durable log with when each was stored: [{"index", "event", "at"}]. (stream()
        follows them live.)"""
        return await self._ask(Query(kind="list_events", task_id=task_id, after=after,
                                     limit=limit, reply_to=self._reply_to))

    async def list_services(self) -> list[dict[str, Any]]:
        return await self._ask(Query(kind="list_services", reply_to=self._reply_to))

    async def checkpoint(self, task_id: str) -> dict[str, Any] | None:
        """The task's last checkpoint: attempt, steps taken, size, when; None if none yet."""
        return await self._ask(Query(kind="get_checkpoint", task_id=task_id,
                                     reply_to=self._reply_to))

    async def deployment_metrics(self) -> dict[str, Any]:
        """Deployment-wide figures: tasks by service and status, retries, task durations
        (histogram buckets) and the counters; what the gateway's /metrics serves."""
        return await self._ask(Query(kind="get_metrics", reply_to=self._reply_to))

    async def throughput(self, minutes: int = 60) -> list[dict[str, Any]]:
        """Tasks that ended in each of the last `minutes` minutes, oldest first:
        [{"minute" (its start, ISO 8601 UTC), "completed", "failed", "cancelled"}]."""
        return await self._ask(Query(kind="get_throughput", minutes=minutes,
                                     reply_to=self._reply_to))

    async def counters(self) -> dict[str, int]:
        """Deployment-wide counts: stale attempts rejected, tasks recovered, ..."""
        return await self._ask(Query(kind="get_counters", reply_to=self._reply_to))

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self._ask(Query(kind="list_dead_letters", limit=limit,
                                     reply_to=self._reply_to))

    async def _ask(self, query: Query, timeout: float | None = -1.0) -> Any:
        message = QueryMessage(type=QUERY, publisher_id=self.publisher_id, data=query)
        if query.kind in TASK_QUERIES:
            return await self._request(
                message, topic(self.settings.namespace, CONTROL_PLANE), query.kind,
                key=query.task_id, timeout=timeout,
            )
        return await self._request(message, topic(self.settings.namespace, QUERY), query.kind,
                                   timeout=timeout)

    async def _request(self, message, to: str, what: str, *, key: str | None = None,
                       timeout: float | None = -1.0) -> Any:
        """Publish a message and wait for the control plane's answer to it."""
        await self._listening()
        future = asyncio.get_running_loop().create_future()
        self._answers[message.id] = future
        try:
            await publish(self._broker, self.settings, message, to, key=key)
            wait_for = self.query_timeout if timeout == -1.0 else timeout
            try:
                answer = await asyncio.wait_for(future, wait_for)
            except TimeoutError:
                raise TimeoutError(
                    f"no answer to {what} within {wait_for} s: is the control plane up?"
                ) from None
        finally:
            self._answers.pop(message.id, None)
        if answer.error:
            raise QueryFailed(f"{answer.error.type}: {answer.error.message}")
        return answer.result


class BlockingClient:
    """The blocking twin of Client: the same methods, called without await."""

    def __init__(self, broker_url: str | None = None, namespace: str | None = None,
                 **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="conveyor-client")
        self._thread.start()
        self._client = self._call(self._make(broker_url, namespace, options))
        self._call(self._client.start())

    @staticmethod
    async def _make(broker_url, namespace, options) -> Client:
        return Client(broker_url, namespace, **options)

    def _call(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(method):
            return method
        return lambda *args, **kwargs: self._call(method(*args, **kwargs))

    def stream(self, task_id: str, after: int = -1) -> Iterator[TaskStream]:
        events = self._client.stream(task_id, after)
        try:
            while True:
                try:
                    yield self._call(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(events.aclose())

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
