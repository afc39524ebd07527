"""Human-in-the-loop: asks for a name (InputRequiredEvent) and waits for the answer.

    conveyor serve conveyor.services.examples.greeter:workflow --name greeter

    async with conveyor.Client() as client:
        task_id = await client.run_nowait("greeter", greeting="hello")
        async for item in client.stream(task_id):       # the question comes first
            await client.send_event(task_id, HumanResponseEvent(response="Ada"))
            break
        print(await client.result(task_id))             # "hello, Ada"
"""

from workflows import Context, Workflow, step
from workflows.events import HumanResponseEvent, InputRequiredEvent, StartEvent, StopEvent


class Greeter(Workflow):
    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> StopEvent:
        answer = await ctx.wait_for_event(
            HumanResponseEvent, waiter_event=InputRequiredEvent(prefix="What is your name?")
        )
        greeting = ev.get("greeting", "hello")
        return StopEvent(result=f"{greeting}, {answer.response}")


workflow = Greeter(timeout=None)
