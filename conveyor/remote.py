"""Nested workflows: a step awaits another workflow service's run, through the broker.

    async def run_step(self, ev: StartEvent,
                       inner: Annotated[RemoteWorkflow, Resource(remote_workflow("inner"))]
                       ) -> StopEvent:
        return StopEvent(result=await inner.run(arg1=ev.arg1))

Awaiting `inner.run(...)` publishes a NEW_TASK for the service "inner" with the calling task
as its parent and waits for its outcome: the inner task's result, or TaskFailed carrying its
error. Cancelling the calling task cancels the inner one.
"""

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.contracts import NewTask, check_name

if TYPE_CHECKING:
    from .client import Client


@dataclass
class Caller:
    """The task a workflow service is running, and the client it calls other services with."""

    client: "Client"
    task: NewTask


# Set by the workflow service around each task it runs; the steps' asyncio tasks inherit it.
current_caller: ContextVar[Caller | None] = ContextVar("conveyor_current_caller", default=None)


class RemoteWorkflow:
    """Stands in for a workflow deployed as the service `service`: `await run(**input)`."""

    def __init__(self, service: str) -> None:
        self.service = check_name(service, "service name")

    async def run(self, **input: Any) -> Any:
        # llama-index-workflows makes one product per workflow instance and shares it across
        # runs, so the calling task is looked up now, not when this object was made.
        caller = current_caller.get()
        if caller is None:
            raise RuntimeError(
                f"remote_workflow({self.service!r}).run() must be awaited in a step of a "
                "workflow that Conveyor runs as a service"
            )
        task_id = await caller.client.run_nowait(
            self.service, parent_task_id=caller.task.task_id, **input
        )
        try:
            return await caller.client.result(task_id)
        except asyncio.CancelledError:
            reason = f"its outer task {caller.task.task_id} was cancelled"
            await asyncio.shield(caller.client.cancel(task_id, reason=reason))
            raise

    def __repr__(self) -> str:
        return f"RemoteWorkflow({self.service!r})"


def remote_workflow(service: str) -> Callable[[], RemoteWorkflow]:
    """A resource factory (for `Resource(...)`) of the workflow served as `service`."""
    check_name(service, "service name")

    def make() -> RemoteWorkflow:
        return RemoteWorkflow(service)

    # Resources are cached by the factory's qualified name: one name per service, so that
    # two remote workflows in one step are two products.
    make.__name__ = make.__qualname__ = f"remote_workflow[{service}]"
    return make
