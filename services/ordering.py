"""A task's messages handled one at a time, in the order they arrived; other tasks' beside them.

The control plane and the orchestrator take several messages of their queue at once
(CONVEYOR_PREFETCH: on RabbitMQ a prefetch above 1, on Kafka as many in hand from the
consumer's partitions; each message no longer waits for the round trip that acknowledges or
commits the one before). Messages that concern one thing must still be handled in the
order the queue holds them, as by one consumer taking one message at a time: a task's
NEW_TASK, events, outcome and the queries about it (a get_task sent after the outcome is
answered after the outcome is recorded), and the tasks of one session (the orchestrator
decides in the order they came which one runs and which ones wait).

Handlers enter in the order the broker delivered their messages: aio-pika starts a
handler task per delivery, in order (kafka_bus.SeveralAtOnce one per message fetched), and
FastStream reaches the handler without waiting on anything first, so the first
`async with`, before any await of the handler's own, queues it in delivery order.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator


class InOrderPerKey:
    """Blocks that share a key run one after another, in the order they were entered.

    A block may have several keys (a task and its session): it waits for the blocks entered
    before it under any of them. Waits only ever go to blocks entered earlier, so none can
    wait for another in a circle.
    """

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future] = {}  # key -> the end of its latest block

    @contextlib.asynccontextmanager
    async def turn(self, *keys: str | None) -> AsyncIterator[None]:
        keys = tuple(dict.fromkeys(key for key in keys if key is not None))
        before = [self._last[key] for key in keys if key in self._last]
        mine = asyncio.get_running_loop().create_future()
        for key in keys:
            self._last[key] = mine
        try:
            for earlier in before:
                await asyncio.shield(earlier)
            yield
        finally:
            waiting = [earlier for earlier in before if not earlier.done()]
            if not waiting:
                self._end(keys, mine)
            else:  # cancelled while waiting: the next ones still wait for those before
                gathered = asyncio.gather(*waiting, return_exceptions=True)
                gathered.add_done_callback(lambda _: self._end(keys, mine))

    def _end(self, keys: tuple[str, ...], block: asyncio.Future) -> None:
        block.set_result(None)
        for key in keys:
            if self._last.get(key) is block:
                del self._last[key]


def task_and_session(data: object) -> tuple[str | None, str | None]:
    """The keys a message about a task is kept in order under: its task, and its session."""
    session_id = getattr(data, "session_id", None)
    return getattr(data, "task_id", None), f"session {session_id}" if session_id else None
