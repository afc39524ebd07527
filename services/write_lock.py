"""Whether the running code holds the SQLite state store's write lock.

SQLite has one writer at a time for every part on the machine. A transaction that waited out
a broker outage while holding the lock would lock out every other part's writes for as long,
the workers' lease renewals among them, and a lease that runs out has the orchestrator run
its task again elsewhere. So a publish made while the lock is held tries once (bus.publish):
the transaction around it rolls back, and is tried again without the lock (a handler's
message comes again; the worker's reports go through bus.through_outages).
"""

import contextlib
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


class holding:
    """The block holds the write lock: `held()` is true in it (and in tasks started from it,
    until it ends)."""

    __slots__ = ("held", "_token")

    def __enter__(self) -> None:
        self.held = True
        self._token = _current.set(self)

    def __exit__(self, *_: object) -> None:
        self.held = False
        with contextlib.suppress(ValueError):  # ended in another context than it began
            _current.reset(self._token)


# A task started inside a transaction copies this; the hold it sees ends with the transaction.
_current: ContextVar[holding | None] = ContextVar("conveyor_write_lock", default=None)


def held() -> bool:
    hold = _current.get()
    return hold is not None and hold.held


async def within(held_by_caller: bool, work: Awaitable[T]) -> T:
    """`work`, run in a task of its own for a transaction another task runs: counted as
    holding the write lock when that transaction holds it (`held()` there)."""
    if not held_by_caller:
        return await work
    with holding():
        return await work
