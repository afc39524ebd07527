"""slow: waits `seconds` (default 0.02) before answering, like a step that calls an API."""

import asyncio

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class SlowWorkflow(Workflow):
    @step
    async def wait(self, ev: StartEvent) -> StopEvent:
        seconds = float(ev.get("seconds", 0.02))
        await asyncio.sleep(seconds)
        return StopEvent(result={"waited": seconds})


workflow = SlowWorkflow(timeout=3600)
