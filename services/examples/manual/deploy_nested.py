"""Deploy nested workflows: `outer_workflow` runs `inner_workflow`, each on its own service."""

import asyncio
from typing import Annotated

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent
from workflows.resource import Resource

from conveyor import RemoteWorkflow, deploy_workflow, remote_workflow


class InnerWorkflow(Workflow):
    @step
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_inner")


class OuterWorkflow(Workflow):
    @step
    async def run_step(
        self,
        ev: StartEvent,
        inner: Annotated[RemoteWorkflow, Resource(remote_workflow("inner_workflow"))],
    ) -> StopEvent:
        inner_result = await inner.run(arg1=ev.get("arg1", ""))
        return StopEvent(result=inner_result + "_outer")


async def main() -> None:
    await asyncio.gather(
        deploy_workflow(InnerWorkflow(timeout=60), name="inner_workflow"),
        deploy_workflow(OuterWorkflow(timeout=60), name="outer_workflow"),
    )


if __name__ == "__main__":
    asyncio.run(main())
