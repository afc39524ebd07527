"""InOrderPerKey: one task's (one session's) messages handled one at a time, in the order
they came."""

import asyncio

from conveyor.services.ordering import InOrderPerKey


async def handled(in_order: InOrderPerKey, log: list, key: str | tuple | None, name: str,
                  seconds: float) -> None:
    async with in_order.turn(*(key if isinstance(key, tuple) else (key,))):
        log.append(f"{name} starts")
        await asyncio.sleep(seconds)
        log.append(f"{name} ends")


async def test_one_keys_blocks_run_in_the_order_entered_even_when_the_first_is_slowest():
    in_order, log = InOrderPerKey(), []
    await asyncio.gather(handled(in_order, log, "t1", "first", 0.05),
                         handled(in_order, log, "t1", "second", 0.0),
                         handled(in_order, log, "t1", "third", 0.01))
    assert log == ["first starts", "first ends", "second starts", "second ends",
                   "third starts", "third ends"]


async def test_other_keys_and_no_key_run_beside_a_slow_block():
    in_order, log = InOrderPerKey(), []
    await asyncio.gather(handled(in_order, log, "t1", "slow", 0.05),
                         handled(in_order, log, "t2", "other task", 0.0),
                         handled(in_order, log, None, "list query", 0.0))
    assert log.index("other task ends") < log.index("slow ends")
    assert log.index("list query ends") < log.index("slow ends")


async def test_a_block_cancelled_while_waiting_does_not_let_the_next_one_jump_ahead():
    in_order, log = InOrderPerKey(), []
    first = asyncio.create_task(handled(in_order, log, "t1", "first", 0.05))
    cancelled = asyncio.create_task(handled(in_order, log, "t1", "cancelled", 0.0))
    third = asyncio.create_task(handled(in_order, log, "t1", "third", 0.0))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(first, cancelled, third, return_exceptions=True)
    assert log == ["first starts", "first ends", "third starts", "third ends"]
    assert in_order._last == {}  # nothing kept once every block has ended


async def test_tasks_of_one_session_wait_for_each_other_and_for_their_own_earlier_messages():
    in_order, log = InOrderPerKey(), []
    await asyncio.gather(handled(in_order, log, ("t1", "session s"), "t1 new task", 0.05),
                         handled(in_order, log, ("t2", "session s"), "t2 new task", 0.0),
                         handled(in_order, log, ("t3", None), "t3 new task", 0.0),
                         handled(in_order, log, ("t2", None), "t2 cancel", 0.0))
    assert log.index("t1 new task ends") < log.index("t2 new task starts")
    assert log.index("t2 new task ends") < log.index("t2 cancel starts")
    assert log.index("t3 new task ends") < log.index("t1 new task ends")  # another session
    assert in_order._last == {}
