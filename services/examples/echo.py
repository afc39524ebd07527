"""echo: returns its input; with `fail` set it raises, with `events` it streams that many
(`pause` seconds apart).
"""

import asyncio

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent


class Progress(Event):
    step: int
    of: int


class EchoFailed(RuntimeError):
    """Raised on request, so that a failing task can be seen end to end."""


class EchoWorkflow(Workflow):
    @step
    async def echo(self, ctx: Context, ev: StartEvent) -> StopEvent:
        arguments = dict(ev.items())
        if arguments.get("fail"):
            raise EchoFailed(str(arguments["fail"]))
        count = int(arguments.get("events") or 0)
        for n in range(count):
            await asyncio.sleep(float(arguments.get("pause") or 0))
            ctx.write_event_to_stream(Progress(step=n + 1, of=count))
        return StopEvent(result={"echo": arguments})


workflow = EchoWorkflow(timeout=60)
