"""Group commit: the items that come while a batch of them is being written are written
together, as the next batch.

A part that writes each item in a transaction of its own, and holds that transaction open
across a wait (a worker's outcome is marked ended in the transaction that spans its
publish, until the broker confirms it), pays that wait once per item, one item after
another: on SQLite, whose one write lock every part shares, the other parts wait too.
Written in groups, a batch pays it once. Alone, an item is written at once, as before:
nothing waits for company (aiomisc's `aggregate` waits a fixed leeway for it).

Each item keeps the context it was submitted in (its task's trace, its log lines' task
id), for the work done for it alone: see `Item.start`.
"""

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Item(Generic[T]):
    value: T
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    result: Any = None  # what the write gives back for this item, if anything

    def start(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """`work` for this item, run in the context it was submitted in."""
        return asyncio.get_running_loop().create_task(work, context=self.context.copy())


class GroupCommit(Generic[T]):
    """`await group(value)` returns once `write` has written the batch `value` went in,
    with what the write set as the item's `result`. A batch whose write fails is written
    again one item at a time, so that an item fails for its own fault alone (one whose
    state cannot be stored, say), with what its write raised, and does not take the others
    down with it every time it comes again. Errors of the kinds in `not_theirs` (the broker
    stayed unreachable, say) fail the whole batch.

    `key` orders each batch (by task id, say): on PostgreSQL, where each item's write locks
    its rows, two batches that write the same rows then take them in the same order, and
    never wait for each other in a circle.
    """

    def __init__(self, write: Callable[[list[Item[T]]], Awaitable[None]], *,
                 not_theirs: tuple[type[Exception], ...] = (),
                 key: Callable[[T], Any] | None = None) -> None:
        self._write = write
        self._not_theirs = not_theirs
        self._key = key
        self._next: list[tuple[Item[T], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def __call__(self, value: T) -> Any:
        written = asyncio.get_running_loop().create_future()
        written.add_done_callback(_retrieved)  # if its caller stopped waiting for it
        self._next.append((item := Item(value), written))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches())
        # A caller that stops waiting leaves its item in the batch: it is written anyway.
        await asyncio.shield(written)
        return item.result

    async def _write_batches(self) -> None:
        try:
            while self._next:
                batch, self._next = self._next, []
                if self._key is not None:
                    batch.sort(key=lambda entry: self._key(entry[0].value))
                try:
                    await self._write_all_or_each(batch)
                except asyncio.CancelledError:
                    self._next[:0] = [(item, written) for item, written in batch
                                      if not written.done()]  # cancelled below
                    raise
        finally:
            self._writer = None
            for _, written in self._next:  # stopped (the part is stopping) before these
                written.cancel()
            self._next = []

    async def _write_all_or_each(self, batch: list[tuple[Item[T], asyncio.Future]]) -> None:
        try:
            await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, self._not_theirs):
                for _, written in batch:
                    _settle(written, exc)
                return
            for one in batch:
                await self._write_all_or_each([one])
            return
        for _, written in batch:
            _settle(written)


async def all_ended(started: list[asyncio.Task]) -> None:
    """Wait until all the work started for a batch's items has ended (each publish confirmed
    or failed, say, before the batch's transaction ends), then raise the first error, if
    any."""
    for ended in await asyncio.gather(*started, return_exceptions=True):
        if isinstance(ended, BaseException):
            raise ended


def _settle(written: asyncio.Future, error: Exception | None = None) -> None:
    if written.done():
        return
    if error is None:
        written.set_result(None)
    else:
        written.set_exception(error)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
