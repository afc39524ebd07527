"""Kafka: a consumer group's offsets committed each only once its message is handled, one
commit for many messages when they come quickly.

FastStream commits after every message it handles (AckPolicy.ACK), and waits for it: a round
trip to the broker per message, which caps a consumer near 1,150 messages/s and costs the
broker about as much CPU as the messages themselves. Here a message that comes after a pause
is committed as FastStream does (at once, waited for: a commit in the background was
measured to slow a sequential task by 0.3 to 2 ms), while one handled when the consumer is
busy only has its offset noted: one commit, COMMIT_EVERY later (or after the commit under
way), takes every offset noted meanwhile. A consumer is busy when its message came within
BUSY_GAP of the one before, when it has other messages in hand, or when its partition held
more messages at the last fetch (the consumer is behind): a loaded path may pass fewer
than one message per BUSY_GAP, and then each was committed alone, a request the broker
answered before the consumer took the next (on tansu, 300 tasks in flight: 0.95 commits
per task in each part before, 0.5 after). One commit at a time, so that a partition's
committed offset only moves forward. What is committed is the offset after the last message
handled on each partition (after the last one before a message still in hand, below), never
the consumer's position (which may be past a message still being handled), so a crash or a
rebalance loses nothing: the messages handled since the last commit are delivered again, and
every handler takes a duplicate as one (on message and task id). A stopping part commits
what it has handled before it leaves, and a consumer whose partitions are about to move to
another member (one joined or left) before they move, so that the member taking them starts
after what this one has handled.

A consumer that handles several messages at once (kafka_bus.subscriber with a concurrency)
may finish them out of order: its partition's offset is committed only up to the first
message fetched and not yet handled, so a message still in hand (or handed back with a
rewind, to come again) is never committed past.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition

log = logging.getLogger("conveyor.bus")

BUSY_GAP = 0.003  # seconds between two messages under which a consumer counts as busy
COMMIT_EVERY = 0.01  # seconds a busy consumer's handled messages wait for their commit
# Seconds a rebalance waits for the commit of what was handled (the broker may be away):
# past that the partitions move, and those messages are delivered again.
REVOKE_WAIT = 5.0


class _Pending:
    """The handled, uncommitted offsets of one consumer, and its commit under way."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.offsets: dict[TopicPartition, int] = {}  # to commit, by the next commit
        self.committing: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_handled = float("-inf")  # on the loop's clock
        # A consumer that handles several at once: by partition, the offsets fetched and not
        # handled yet, those handed back to be fetched again, and the offset after the last
        # one handled (what is committed once nothing before it is in hand).
        self.several = False
        self.unhandled: dict[TopicPartition, set[int]] = {}
        self.rewound: dict[TopicPartition, set[int]] = {}
        self.handled_to: dict[TopicPartition, int] = {}
        self.noted: dict[TopicPartition, int] = {}  # the last offset to commit noted

    def fetched(self, record: ConsumerRecord) -> None:
        partition = TopicPartition(record.topic, record.partition)
        self.several = True
        if rewound := self.rewound.get(partition):
            rewound.discard(record.offset)
        self.unhandled.setdefault(partition, set()).add(record.offset)

    def rewind(self, partition: TopicPartition, offset: int) -> None:
        """The message at `offset` was handed back: it is fetched again, and nothing from it
        on is committed until it is handled."""
        if self.several:
            self.unhandled.get(partition, set()).discard(offset)
            self.rewound.setdefault(partition, set()).add(offset)
        self.consumer.seek(partition, offset)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """The partitions moved (a rebalance): a message of theirs still in hand is not
        committed when it ends; the member that has them now takes it again."""
        for state in (self.unhandled, self.rewound, self.handled_to, self.noted):
            for partition in partitions:
                state.pop(partition, None)

    def _commit_to(self, partition: TopicPartition, offset: int) -> int | None:
        """For a consumer handling several at once: the offset its partition can now be
        committed to, once the message at `offset` is handled; None if it cannot move."""
        unhandled = self.unhandled.get(partition)
        if unhandled is None or offset not in unhandled:
            return None  # fetched before its partition moved, or handled already
        unhandled.discard(offset)
        self.handled_to[partition] = upto = max(self.handled_to.get(partition, 0), offset + 1)
        commit_to = min((*unhandled, *self.rewound.get(partition, ())), default=upto)
        if commit_to <= self.noted.get(partition, -1):
            return None  # a message before it is still in hand
        self.noted[partition] = commit_to
        return commit_to

    async def handled(self, record: ConsumerRecord) -> None:
        partition = TopicPartition(record.topic, record.partition)
        if not self.several:
            self.offsets[partition] = record.offset + 1
        elif (commit_to := self._commit_to(partition, record.offset)) is not None:
            self.offsets[partition] = commit_to
        else:
            return  # the commit of the message before it in hand takes it
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = (now - self.last_handled < BUSY_GAP or self._behind(partition, record.offset + 1)
                or any(self.unhandled.values()))
        self.last_handled = now
        if self.timer is not None or (self.committing and not self.committing.done()):
            return  # the commit under way (or the next one) takes it
        if busy:
            self.timer = loop.call_later(COMMIT_EVERY, self._start)
            return
        self._start()
        await self.committing

    def _behind(self, partition: TopicPartition, next_offset: int) -> bool:
        """Whether the partition held messages from `next_offset` on at the consumer's last
        fetch from it (its high watermark, as the broker reported it then)."""
        try:
            highwater = self.consumer.highwater(partition)
        except (AssertionError, AttributeError):  # no longer assigned to this consumer
            return False
        return highwater is not None and next_offset < highwater

    def _start(self) -> None:
        self.timer = None
        if self.committing is None or self.committing.done():
            self.committing = asyncio.create_task(self._commit_all())

    async def _commit_all(self) -> None:
        while self.offsets:  # what was handled while the last commit was under way
            offsets, self.offsets = self.offsets, {}
            try:
                await self.consumer.commit(offsets)
            except Exception as exc:  # a partition moved to another member, or the consumer
                # stopped: those messages are delivered again from the last commit
                log.info("offsets %s not committed (%s: %s); their messages will be "
                         "delivered again", offsets, type(exc).__name__, exc)

    async def flush(self) -> None:
        """Until everything handled is committed; still one commit at a time, so that a
        partition's committed offset only moves forward."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while True:
            if self.committing is not None and not self.committing.done():
                await self.committing
            elif self.offsets:
                self.committing = asyncio.create_task(self._commit_all())
            else:
                return


class _Acknowledger:
    """What FastStream's message calls to commit (and to rewind on a failure), for one
    message: its offset is noted with the others of its consumer."""

    def __init__(self, batches: "CommitsInBatches", consumer: Any, record: ConsumerRecord):
        self._batches, self._consumer, self._record = batches, consumer, record

    async def commit(self) -> None:
        await self._batches.handled(self._consumer, self._record)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._batches.pending(self._consumer).rewind(partition, offset)


class CommitsInBatches:
    """The commits of one broker's consumer groups; `parser` is given to each group
    subscriber, `flush` is awaited before the subscribers stop."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._stopping = False  # each message is committed as it is handled, and waited for

    async def parser(self, record: ConsumerRecord, parse) -> Any:
        message = await parse(record)
        message.consumer = _Acknowledger(self, message.consumer, record)
        return message

    def pending(self, consumer: Any) -> _Pending:
        pending = self._pending.get(id(consumer))
        if pending is None or pending.consumer is not consumer:
            pending = self._pending[id(consumer)] = _Pending(consumer)
        return pending

    def fetched(self, consumer: Any, record: ConsumerRecord) -> None:
        """For a consumer that handles several messages at once: `record` is in hand, in the
        order the consumer fetched it."""
        self.pending(consumer).fetched(record)

    async def handled(self, consumer: Any, record: ConsumerRecord) -> None:
        pending = self.pending(consumer)
        await pending.handled(record)
        if self._stopping:
            await pending.flush()

    async def flush(self) -> None:
        """Commit what is handled, and from now on wait for each message's commit (the
        subscribers are about to stop, after the messages in hand)."""
        self._stopping = True
        await self.commit_handled()

    async def commit_handled(self) -> None:
        await asyncio.gather(*(pending.flush() for pending in self._pending.values()))

    def forget(self, partitions: set[TopicPartition]) -> None:
        for pending in self._pending.values():
            pending.forget(partitions)

    def listener(self, on_revoked: Callable[[set[TopicPartition]], None] | None = None,
                 ) -> ConsumerRebalanceListener:
        """For a group subscriber: what is handled is committed before its partitions move
        (and `on_revoked` is told they moved)."""
        return _CommitBeforeRevoke(self, on_revoked)


class _CommitBeforeRevoke(ConsumerRebalanceListener):
    def __init__(self, batches: CommitsInBatches,
                 on_revoked: Callable[[set[TopicPartition]], None] | None) -> None:
        self._batches = batches
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        committing = asyncio.ensure_future(self._batches.commit_handled())
        await asyncio.wait({committing}, timeout=REVOKE_WAIT)  # not cancelled past it
        self._batches.forget(revoked)
        if self._on_revoked is not None:
            self._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass
