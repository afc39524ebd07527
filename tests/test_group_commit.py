"""GroupCommit: what comes while a batch is being written is written together, next; alone,
an item is written at once; an item fails for its own fault alone; each item keeps its own
context."""

import asyncio
import contextvars

import pytest

from conveyor.services.group_commit import GroupCommit, Item, all_ended

whose = contextvars.ContextVar("whose", default="nobody")


class Writes:
    """A write that takes `seconds` and keeps what each batch held."""

    def __init__(self, seconds: float = 0.02, fail_on: str | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list[str]] = []

    async def __call__(self, batch: list[Item[str]]) -> None:
        self.batches.append([item.value for item in batch])
        await asyncio.sleep(self.seconds)
        if self.fail_on in self.batches[-1]:
            raise RuntimeError(f"disk full while writing {self.fail_on}")


async def test_one_item_alone_is_written_at_once_in_a_batch_of_its_own():
    writes = Writes(seconds=0)
    group = GroupCommit(writes)
    await group("a")
    await group("b")
    assert writes.batches == [["a"], ["b"]]


async def test_items_that_come_while_a_batch_is_written_go_together_in_the_next():
    writes = Writes()
    group = GroupCommit(writes)
    first = asyncio.create_task(group("first"))
    await asyncio.sleep(0.005)  # the first batch is being written
    await asyncio.gather(first, *(group(name) for name in ("b", "c", "d")))
    assert writes.batches == [["first"], ["b", "c", "d"]]


async def test_an_item_whose_batch_fails_is_written_again_alone_and_fails_for_its_own_fault():
    writes = Writes(fail_on="bad")
    group = GroupCommit(writes)
    first = asyncio.create_task(group("first"))
    await asyncio.sleep(0.005)
    together = [asyncio.create_task(group(name)) for name in ("bad", "innocent")]
    await first
    with pytest.raises(RuntimeError, match="disk full while writing bad"):
        await together[0]
    await together[1]  # written on its own after the batch failed
    await group("later")
    assert writes.batches == [["first"], ["bad", "innocent"], ["bad"], ["innocent"], ["later"]]


async def test_an_item_whose_caller_stops_waiting_is_written_all_the_same():
    writes = Writes()
    group = GroupCommit(writes)
    impatient = asyncio.create_task(group("impatient"))
    await asyncio.sleep(0.005)
    impatient.cancel()
    await asyncio.gather(impatient, return_exceptions=True)
    await group("patient")
    assert writes.batches == [["impatient"], ["patient"]]


async def test_each_item_runs_its_own_work_in_the_context_it_was_submitted_in():
    seen: dict[str, str] = {}

    async def write(batch: list[Item[str]]) -> None:
        async def note(value: str) -> None:
            seen[value] = whose.get()

        await asyncio.gather(*(item.start(note(item.value)) for item in batch))

    group = GroupCommit(write)

    async def submit(value: str) -> None:
        whose.set(f"task {value}")  # as a task's trace and log context are set
        await group(value)

    await asyncio.gather(*(submit(value) for value in ("a", "b", "c")))
    assert seen == {"a": "task a", "b": "task b", "c": "task c"}


async def test_a_failure_that_is_no_items_fault_fails_the_batch_without_writing_each_again():
    class Unreachable(ConnectionError):
        pass

    attempts: list[list[str]] = []

    async def write(batch: list[Item[str]]) -> None:
        attempts.append([item.value for item in batch])
        await asyncio.sleep(0.01)
        raise Unreachable("the broker stayed away")

    group = GroupCommit(write, not_theirs=(Unreachable,))
    first = asyncio.create_task(group("first"))
    await asyncio.sleep(0.005)
    together = [asyncio.create_task(group(name)) for name in ("b", "c")]
    for waiting in (first, *together):
        with pytest.raises(Unreachable):
            await waiting
    assert attempts == [["first"], ["b", "c"]]


async def test_each_caller_gets_back_what_the_write_gave_its_own_item():
    async def write(batch: list[Item[str]]) -> None:
        await asyncio.sleep(0.01)
        for item in batch:
            item.result = f"claimed {item.value} in a batch of {len(batch)}"

    group = GroupCommit(write)
    first = asyncio.create_task(group("t1"))
    await asyncio.sleep(0.005)
    assert await asyncio.gather(first, group("t2"), group("t3")) == [
        "claimed t1 in a batch of 1", "claimed t2 in a batch of 2", "claimed t3 in a batch of 2"]


async def test_a_batch_is_written_in_the_order_its_key_gives():
    writes = Writes()
    group = GroupCommit(writes, key=str.lower)
    first = asyncio.create_task(group("first"))
    await asyncio.sleep(0.005)
    await asyncio.gather(first, *(group(name) for name in ("t3", "T1", "t2")))
    assert writes.batches == [["first"], ["T1", "t2", "t3"]]


async def test_all_ended_lets_every_work_end_then_raises_the_first_error():
    ended = []

    async def work(name: str, seconds: float, error: Exception | None = None) -> None:
        await asyncio.sleep(seconds)
        ended.append(name)
        if error is not None:
            raise error

    started = [asyncio.create_task(work("slow", 0.05)),
               asyncio.create_task(work("failed", 0.01, RuntimeError("broker said no"))),
               asyncio.create_task(work("failed later", 0.02, ValueError("too big")))]
    with pytest.raises(RuntimeError, match="broker said no"):
        await all_ended(started)
    assert sorted(ended) == ["failed", "failed later", "slow"]
