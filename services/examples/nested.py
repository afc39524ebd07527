"""Nested workflows: `outer` hands its input to the `echo` service and wraps the answer.

Both run as services of their own; the inner run is a task of its own, with the outer
task as its parent, and travels through the broker like any other:

    conveyor serve conveyor.services.examples.echo:workflow --name echo
    conveyor serve conveyor.services.examples.nested:workflow --name outer
    conveyor publish outer --input '{"message": "hi"}' --wait
"""

from typing import Annotated

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent
from workflows.resource import Resource

from conveyor import RemoteWorkflow, remote_workflow


class Outer(Workflow):
    @step
    async def delegate(
        self,
        ev: StartEvent,
        echo: Annotated[RemoteWorkflow, Resource(remote_workflow("echo"))],
    ) -> StopEvent:
        answer = await echo.run(**dict(ev.items()))
        return StopEvent(result={"outer": "done", "inner": answer})


workflow = Outer(timeout=None)
