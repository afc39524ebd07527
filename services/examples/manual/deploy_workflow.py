"""Deploy two workflows as services: `my_workflow`, and `streaming_workflow`, which streams."""

import asyncio

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent

from conveyor import deploy_workflow


class MyWorkflow(Workflow):
    @step
    async def run_step(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=str(ev.get("arg1", "")) + "_result")


class ProgressEvent(Event):
    progress: str


class StreamingWorkflow(Workflow):
    @step
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for i in range(3):
            ctx.write_event_to_stream(ProgressEvent(progress=f"progress {i}"))
        return StopEvent(result=str(ev.get("arg1", "")) + "_streamed")


async def main() -> None:
    await asyncio.gather(
        deploy_workflow(MyWorkflow(timeout=60), name="my_workflow"),
        deploy_workflow(StreamingWorkflow(timeout=60), name="streaming_workflow"),
    )


if __name__ == "__main__":
    asyncio.run(main())
