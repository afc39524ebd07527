"""RabbitMQ: a group queue's deliveries acknowledged each only once handled, many in one
basic.ack when their handlers finish together.

FastStream acknowledges every message alone once its handler has finished: a frame per
message, which the broker handles apart (measured here on persistent messages with a
prefetch of 64: RabbitMQ spent 90 us of CPU per message delivered and acknowledged one by
one, 45 us with one basic.ack for 32; the consumer 200 us and 140). Under load a part's
handlers finish in batches (their records are written in one group commit), so here a
handled delivery is acknowledged at the loop's next turn together with every other one of
its channel handled meanwhile: those that came before every delivery still in hand in one
basic.ack with `multiple`, any other alone (a long handler holds up no acknowledgement but
its own). A negative acknowledgement goes at once, alone. Nothing is acknowledged before
its handler has finished, so a crash loses nothing: what was not acknowledged is delivered
again, and every handler takes a duplicate as one.
"""

import asyncio
import logging
import weakref
from typing import Any

from aio_pika import IncomingMessage
from faststream.message import StreamMessage
from faststream.rabbit.message import RabbitMessage

log = logging.getLogger("conveyor.bus")


class _InHand:
    """One channel's deliveries not yet acknowledged, in the order they came (their delivery
    tags rise): None while its handler has it, the message once handled."""

    def __init__(self) -> None:
        self.messages: dict[int, IncomingMessage | None] = {}
        self.next: asyncio.Task | None = None  # the flush that takes what is handled now
        self.last: asyncio.Task | None = None  # the latest flush: they run one at a time

    async def handled(self, message: IncomingMessage) -> None:
        self.messages[message.delivery_tag] = message
        if self.next is None:
            self.next = self.last = asyncio.ensure_future(self._flush(self.last))
        await asyncio.shield(self.next)

    async def _flush(self, before: asyncio.Task | None) -> None:
        # The flush before has written its frames: a basic.ack `multiple` must never reach
        # the broker ahead of one for a delivery it covers.
        if before is not None and not before.done():
            await asyncio.wait({before})
        self.next = None  # what is handled from here on goes in the next flush
        together: list[IncomingMessage] = []  # those before every delivery still in hand
        alone: list[IncomingMessage] = []
        blocked = False
        for message in self.messages.values():
            if message is None:
                blocked = True
            else:
                (alone if blocked else together).append(message)
        for message in (*together, *alone):
            del self.messages[message.delivery_tag]
        try:
            if together:
                await together[-1].ack(multiple=True)
            for message in alone:
                await message.ack()
        except Exception as exc:  # the channel closed: those messages come again
            log.info("acknowledgements not sent (%s: %s); their messages will be delivered "
                     "again", type(exc).__name__, exc)

    async def refused(self, message: IncomingMessage, requeue: bool, *, reject: bool) -> None:
        """A negative acknowledgement, alone. Its delivery counts as in hand until the frame
        is written, so that no basic.ack `multiple` covers it meanwhile."""
        try:
            if reject:
                await message.reject(requeue=requeue)
            else:
                await message.nack(requeue=requeue)
        finally:
            self.messages.pop(message.delivery_tag, None)


class AcksInBatches:
    """The acknowledgements of a process's group queues; `parser` is given to each group
    subscriber."""

    def __init__(self) -> None:
        # by channel: one that closed is forgotten (a reconnection opens another, whose
        # delivery tags start again)
        self._channels: weakref.WeakKeyDictionary[Any, _InHand] = weakref.WeakKeyDictionary()

    async def parser(self, message: IncomingMessage, parse) -> "AckedInBatches":
        parsed = await parse(message)
        in_hand = self._channels.get(message.channel)
        if in_hand is None:
            in_hand = self._channels[message.channel] = _InHand()
        in_hand.messages[message.delivery_tag] = None
        batched = AckedInBatches.__new__(AckedInBatches)  # the same message, as FastStream
        batched.__dict__.update(parsed.__dict__)  # copies one (StreamMessage.__copy__)
        batched.in_hand = in_hand
        return batched


class AckedInBatches(RabbitMessage):
    """FastStream's message, its acknowledgements sent through its channel's _InHand. Each
    is taken once, as FastStream's are (the first of ack, nack and reject counts)."""

    in_hand: _InHand

    async def ack(self, multiple: bool = False) -> None:
        if self._first():
            await StreamMessage.ack(self)
            await self.in_hand.handled(self.raw_message)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        if self._first():
            await StreamMessage.nack(self)
            await self.in_hand.refused(self.raw_message, requeue, reject=False)

    async def reject(self, requeue: bool = False) -> None:
        if self._first():
            await StreamMessage.reject(self)
            await self.in_hand.refused(self.raw_message, requeue, reject=True)

    def _first(self) -> bool:
        return self.committed is None and not self.raw_message.locked
