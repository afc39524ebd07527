"""One key's messages handled one at a time, in the order they arrived; other keys' beside them.

The control plane and the orchestrator take several messages of their queue at once on
RabbitMQ (a prefetch above 1: each message no longer waits for the round trip that
acknowledges the one before). A task's own messages (its NEW_TASK, events, outcome, the
queries about it) must still be handled in the order the queue holds them, as by one
consumer taking one message at a time: a get_task sent after the outcome is answered
after the outcome is recorded.

Handlers enter in the order the broker delivered their messages: aio-pika starts a
handler task per delivery, in order, and FastStream reaches the handler without waiting
on anything first, so the first `async with` on the key, before any await of the handler's
own, queues it in delivery order.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator


class InOrderPerKey:
    """Blocks entered with the same key run one after another, in the order entered."""

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future] = {}  # key -> the end of its latest block

    @contextlib.asynccontextmanager
    async def turn(self, key: str | None) -> AsyncIterator[None]:
        if key is None:  # not about one task: nothing to keep in order with
            yield
            return
        before = self._last.get(key)
        mine = asyncio.get_running_loop().create_future()
        self._last[key] = mine
        try:
            if before is not None:
                await asyncio.shield(before)
            yield
        finally:
            if before is None or before.done():
                self._end(key, mine)
            else:  # cancelled while waiting: the next one still waits for the one before
                before.add_done_callback(lambda _: self._end(key, mine))

    def _end(self, key: str, block: asyncio.Future) -> None:
        block.set_result(None)
        if self._last.get(key) is block:
            del self._last[key]
