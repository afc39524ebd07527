"""Start a task, print each event it streams as it comes, then its result."""

import asyncio

from conveyor import Client


async def main() -> None:
    async with Client() as client:
        task_id = await client.run_nowait("streaming_workflow", arg1="hello_world")
        async for item in client.stream(task_id):
            print(item.index, item.event.type, item.event.value["progress"])
        print(await client.result(task_id))


if __name__ == "__main__":
    asyncio.run(main())
