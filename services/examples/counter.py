"""Sessions: counts the runs of one session in the workflow Context's state.

    conveyor serve conveyor.services.examples.counter:workflow --name counter
    conveyor publish counter --session s1 --wait    # 1
    conveyor publish counter --session s1 --wait    # 2
    conveyor publish counter --session s2 --wait    # 1
"""

from workflows import Context, Workflow, step
from workflows.events import StartEvent, StopEvent


class Counter(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = await ctx.store.get("count", default=0) + 1
        await ctx.store.set("count", count)
        return StopEvent(result=count)


workflow = Counter(timeout=60)
