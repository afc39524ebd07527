"""Kafka's side of the bus (see bus.py): its broker, subscribers and publish.

Imported only by a process whose CONVEYOR_BROKER_URL is kafka://, so that a part on
RabbitMQ loads no Kafka client (aiokafka and FastStream's Kafka broker: about 5 MB of each
part's memory there).
"""

import asyncio
import logging
from typing import Any

from aiokafka import TopicPartition as Partition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
)
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition
from faststream.kafka.schemas import Topic
from faststream.kafka.subscriber.usecase import DefaultSubscriber

from conveyor.contracts import MAX_MESSAGE_BYTES

from .kafka_commits import CommitsInBatches
from .settings import Settings

log = logging.getLogger("conveyor.bus")

# What a lost or not yet restored connection raises, besides ConnectionError; and what a
# broker answers while a partition has no leader, or after it held a request past its
# timeout (tansu, now and then under load, for 10 s): another try goes through.
UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, LeaderNotAvailableError,
               NotLeaderForPartitionError, RequestTimedOutError)

# The fetch wait of a quiet topic's consumers (bus.QUIET_TOPICS, a service's broadcast):
# tansu answers a fetch only at its wait's end, not when data comes, so each idle consumer
# costs a fetch per wait, in its process and in the broker. (Apache Kafka answers as data
# comes.)
QUIET_FETCH_WAIT_MS = 100


class ConveyorKafkaBroker(KafkaBroker):
    """FastStream's KafkaBroker, but its subscribers join their consumer groups at once
    (FastStream starts them one after another, and a join waits out the group's rebalance
    delay, about 3 s: a part with four subscriptions took over 12 s to start), and its
    groups commit their offsets in batches (see kafka_commits)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits = CommitsInBatches()

    async def start(self) -> None:
        await self.connect()
        await asyncio.gather(*(subscriber.start() for subscriber in self.subscribers))
        for publisher in self.publishers:
            await publisher.start()
        self.running = True
        await self.check_partitions()

    async def check_partitions(self) -> None:
        """Warn of each topic a group of this part reads that has fewer partitions than it
        was to be made with: made before, with another CONVEYOR_KAFKA_PARTITIONS or by the
        broker on a publish, it feeds no more consumers of a group than it has partitions,
        and the part's further replicas stay idle. (tansu cannot add partitions to a topic;
        Apache Kafka can: kafka-topics.sh --alter.)"""
        wanted = {topic.name: topic.num_partitions for subscriber in self.subscribers
                  if subscriber.group_id for topic in subscriber.topics if topic.declare}
        if not wanted:
            return
        try:  # only topics that exist: describing a missing one makes it on some brokers
            described = await self.config.admin_client.describe_topics(sorted(wanted))
        except Exception as exc:  # the check is advice: the part runs without it
            log.warning("could not count the partitions of %s: %s", ", ".join(wanted), exc)
            return
        for topic in described:
            have, name = len(topic["partitions"]), topic["topic"]
            if 0 < have < wanted.get(name, 0):
                log.warning(
                    "topic %s has %d partitions, not the %d of CONVEYOR_KAFKA_PARTITIONS: it "
                    "was made before, with fewer, so no more than %d consumers of a group read "
                    "it and further replicas stay idle. Add partitions to it (Apache Kafka: "
                    "kafka-topics.sh --alter --partitions %d), or delete it while nothing "
                    "uses it", name, have, wanted[name], have, wanted[name])

    async def stop(self, *args: Any) -> None:
        await self.commits.flush()
        await super().stop(*args)


def create(settings: Settings, url: str, common: dict[str, Any]) -> ConveyorKafkaBroker:
    """`url` is CONVEYOR_BROKER_URL; the broker takes its servers from the settings."""
    return ConveyorKafkaBroker(
        settings.kafka_servers,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        max_request_size=MAX_MESSAGE_BYTES + 64 * 1024,
        request_timeout_ms=10_000,
        **common,
    )


def subscriber(broker: ConveyorKafkaBroker, settings: Settings, topic: str, group: str | None,
               concurrency: int, quiet: bool, decoder: Any) -> Any:
    """See bus.subscribe."""
    wait_ms = settings.kafka_fetch_wait_ms
    options: dict[str, Any] = {
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": max(QUIET_FETCH_WAIT_MS, wait_ms) if quiet else wait_ms,
        "decoder": decoder,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES + 64 * 1024,
    }
    holes = Holes()
    if group is None:
        subscriber = broker.subscriber(
            partitions=[TopicPartition(topic, 0)], ack_policy=AckPolicy.ACK_FIRST, **options
        )
        WithoutHoles.take(subscriber, holes)
        return subscriber
    subscriber = broker.subscriber(
        Topic(topic, num_partitions=settings.kafka_partitions),
        group_id=group,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        parser=broker.commits.parser,
        listener=broker.commits.listener(on_revoked=holes.forget),
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
        **options,
    )
    if concurrency > 1:
        SeveralAtOnce.take(subscriber, holes, concurrency, broker.commits)
    else:
        WithoutHoles.take(subscriber, holes)
    return subscriber


class Holes:
    """The next offset a consumer expects of each partition it reads, to find a hole.

    aiokafka takes a record past a hole in a partition's offsets for a compacted topic's,
    and goes on from it. tansu, appending to a partition for several producers at once,
    now and then answers a fetch with a record before the one ahead of it is readable (seen
    in the scale-out test: an orchestrator took offsets 747 and 749 of a partition in one
    fetch, the control plane 747, 748 and 749 a few ms later): the message in the hole was
    never handled, and committed past. So a hole is fetched again, once; one that is there
    again is taken as real.
    """

    def __init__(self) -> None:
        self.expected: dict[tuple[str, int], int] = {}
        self.refetched: dict[tuple[str, int], int] = {}  # the hole fetched again, by partition

    def forget(self, partitions: set[Partition]) -> None:
        """The partitions moved (a rebalance): each starts again where the group left it."""
        for partition in partitions:
            self.expected.pop((partition.topic, partition.partition), None)

    def past_a_hole(self, consumer: Any, record: Any) -> bool:
        """Whether `record` comes past a hole: the consumer then fetches from the hole
        again, and `record` comes again after it."""
        key = (record.topic, record.partition)
        expected = self.expected.get(key)
        if (expected is not None and record.offset > expected
                and self.refetched.get(key) != expected):
            self.refetched[key] = expected
            log.warning("offset %d of %s[%d] came before offset %d: fetching from %d again",
                        record.offset, record.topic, record.partition, expected, expected)
            consumer.seek(Partition(*key), expected)
            return True
        self.refetched.pop(key, None)
        self.expected[key] = record.offset + 1  # or lower: handed back (a rewind), or moved
        return False


class WithoutHoles(DefaultSubscriber):
    """FastStream's Kafka subscriber, fetching again from a hole in a partition's offsets
    rather than skipping it (see Holes)."""

    holes: Holes

    @classmethod
    def take(cls, subscriber: DefaultSubscriber, holes: Holes) -> None:
        """Make a subscriber FastStream built into one of these (it has no option for it)."""
        subscriber.__class__ = cls
        subscriber.holes = holes

    async def get_msg(self, consumer: Any) -> Any:
        while True:
            record = await consumer.getone()
            if not self.holes.past_a_hole(consumer, record):
                return record


class SeveralAtOnce(WithoutHoles):
    """FastStream's Kafka group subscriber, handling up to `places` messages of its consumer
    at once: each in a task of its own, started in the order they were fetched (as aio-pika
    starts a RabbitMQ consumer's, so that services/ordering keeps a task's messages in
    order), the next fetched only while a place is free. The offsets are committed in order
    per partition (kafka_commits). FastStream's own way to handle several at once with
    commits after processing (`max_workers`) is a consumer per worker, each joining the
    group and fetching on its own, with no more at once than partitions (4 here): on tansu
    every idle consumer costs a fetch each wait (four for the front door in the control
    plane and the orchestrator: at rest 13 and 9 % of a core, against 7 to 9 and 5 to 6)."""

    places: asyncio.Semaphore
    commits: CommitsInBatches
    in_hand: set[asyncio.Task]

    @classmethod
    def take(cls, subscriber: DefaultSubscriber, holes: Holes, places: int,
             commits: CommitsInBatches) -> None:
        super().take(subscriber, holes)
        subscriber.places = asyncio.Semaphore(places)
        subscriber.commits = commits
        subscriber.in_hand = set()

    async def consume_one(self, msg: Any) -> None:
        await self.places.acquire()
        self.commits.fetched(self.consumer, msg)
        task = asyncio.create_task(self.consume(msg))
        self.in_hand.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.in_hand.discard(task)
        self.places.release()


async def create_topics(broker: ConveyorKafkaBroker, settings: Settings,
                        names: list[str]) -> None:
    """Create these topics with CONVEYOR_KAFKA_PARTITIONS partitions where they do not exist
    yet (see bus.declare_system_topics). A topic the broker refuses to make is logged: a
    publish to it will say more."""
    topics = [Topic(name, num_partitions=settings.kafka_partitions) for name in names]
    for result in await broker.config.admin.create_topics(topics):
        if result.error is not None:
            log.warning("could not create topic %s: %s", result.topic, result.error)


async def send(broker: ConveyorKafkaBroker, settings: Settings, body: bytes, message_id: str,
               topic: str, key: str | None, partition: int | None,
               copy_to: tuple[str, ...]) -> None:
    """See bus.publish; the message id travels in the body."""
    sends = [broker.publish(body, topic=to, key=key.encode() if key else None,
                            partition=partition if to == topic else None,
                            headers={"content-type": "application/json"})
             for to in dict.fromkeys((topic, *copy_to))]  # a copy to the topic itself: none
    await asyncio.gather(*sends)
