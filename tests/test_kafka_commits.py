"""A Kafka consumer group's offsets, committed in the background (services/kafka_commits.py),
on the real (tansu) broker: never past a message still being handled, and everything handled
is committed once the subscriber stops."""

import asyncio
import uuid
from types import SimpleNamespace

from aiokafka import AIOKafkaConsumer, TopicPartition

from conveyor.services import bus, kafka_bus, kafka_commits
from conveyor.services.settings import load

from .deployment import eventually


async def committed(kafka_url: str, topic: str, group: str) -> int:
    """The offsets the group has committed on the topic, summed over its partitions."""
    reader = AIOKafkaConsumer(bootstrap_servers=kafka_url.removeprefix("kafka://"),
                              group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        partitions = reader.partitions_for_topic(topic) or set()
        found = [await reader.committed(TopicPartition(topic, p)) for p in partitions]
        return sum(offset or 0 for offset in found)
    finally:
        await reader.stop()


def work_topic(kafka_url: str):
    """Settings for a namespace of the test's own, its topic and a group reading it."""
    settings = load(broker_url=kafka_url, namespace=f"kc{uuid.uuid4().hex[:8]}")
    return settings, f"{settings.namespace}.work", f"{settings.namespace}.work.part"


def keep_handled(broker, settings, topic: str, group: str) -> list[bytes]:
    """Subscribes the group to the topic; returns the list each message handled goes to."""
    handled: list[bytes] = []

    @bus.subscribe(broker, settings, topic, group)
    async def handler(body: bytes) -> None:
        handled.append(body)

    return handled


def commits_put_off(monkeypatch, busy_gap: float) -> None:
    """Messages handled within `busy_gap` of each other count as quick (0: none), and the
    commit of the offsets noted for later is put off long past the test."""
    monkeypatch.setattr(kafka_commits, "BUSY_GAP", busy_gap)
    monkeypatch.setattr(kafka_commits, "COMMIT_EVERY", 120.0)


async def publish_ten(broker, topic: str) -> None:
    """Messages 0 to 9 with one key: one partition, read in order."""
    await asyncio.gather(*(broker.publish(str(n).encode(), topic, key=b"one task")
                           for n in range(10)))


async def test_a_kafka_group_never_commits_past_a_message_still_being_handled(kafka_url):
    settings, topic, group = work_topic(kafka_url)
    broker = bus.create_broker(settings, "test")
    release, all_handled, handled = asyncio.Event(), asyncio.Event(), []

    @bus.subscribe(broker, settings, topic, group)
    async def handler(body: bytes) -> None:
        if body == b"5":
            await release.wait()
        handled.append(body)
        if len(handled) == 10:
            all_handled.set()

    await broker.start()
    try:
        for n in range(10):  # one key: one partition, read in order
            await broker.publish(str(n).encode(), topic, key=b"one task")

        async def five_handled() -> bool:
            return len(handled) == 5

        await eventually(five_handled)
        await asyncio.sleep(0.2)  # long past the commit of what was handled
        while_blocked = await committed(kafka_url, topic, group)
        release.set()
        await asyncio.wait_for(all_handled.wait(), 15)
    finally:
        await broker.stop()  # at once: commits what was handled since the last batch
    after_stop = await committed(kafka_url, topic, group)
    print(f"found: committed {while_blocked} while message 5 was being handled, "
          f"{after_stop} after the stop")
    assert while_blocked == 5  # messages 0 to 4: delivered again after a crash, 5 with them
    assert after_stop == 10


async def test_what_a_kafka_member_has_handled_is_committed_before_its_partitions_move(
        kafka_url, monkeypatch):
    # Messages that come quickly only have their offsets noted, for a later commit; here
    # every message after the first counts as quick, and their commit is put off long past
    # the test, so that only the rebalance can commit them.
    commits_put_off(monkeypatch, busy_gap=120.0)
    settings, topic, group = work_topic(kafka_url)
    broker = bus.create_broker(settings, "test")
    handled = keep_handled(broker, settings, topic, group)
    newcomer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_url.removeprefix("kafka://"),
                                group_id=group, enable_auto_commit=False)
    await broker.start()
    try:
        await publish_ten(broker, topic)

        async def all_handled() -> bool:
            return len(handled) == 10

        await eventually(all_handled)
        before = await committed(kafka_url, topic, group)
        await newcomer.start()  # joins the group: the partitions are dealt again

        async def dealt() -> bool:
            return bool(newcomer.assignment())

        await eventually(dealt, timeout=30)
        after = await committed(kafka_url, topic, group)
    finally:
        await newcomer.stop()
        await broker.stop()
    print(f"found: committed {before} once all 10 were handled, {after} once another "
          f"member had joined")
    # At most the first, committed at once if it was fetched alone; the others waited.
    assert before <= 1
    assert after == 10


async def test_a_kafka_group_behind_on_its_partition_commits_what_it_works_off_together(
        kafka_url, monkeypatch):
    # Ten messages wait in the log before the consumer starts: each one handled is behind
    # the partition's end as its fetch saw it, and has its offset noted for one commit later,
    # however far apart the messages are handled (here no gap counts as quick, and that
    # commit is put off past the test). Before, each was committed alone, waited for.
    commits_put_off(monkeypatch, busy_gap=0.0)
    settings, topic, group = work_topic(kafka_url)
    publisher = bus.create_broker(settings, "test")
    await publisher.start()
    try:
        await publish_ten(publisher, topic)
    finally:
        await publisher.stop()
    broker = bus.create_broker(settings, "test")
    handled = keep_handled(broker, settings, topic, group)
    await broker.start()
    try:
        async def all_handled() -> bool:
            return len(handled) == 10

        await eventually(all_handled, timeout=30)
        await asyncio.sleep(0.2)
        while_running = await committed(kafka_url, topic, group)
    finally:
        await broker.stop()
    after_stop = await committed(kafka_url, topic, group)
    print(f"found: committed {while_running} once all 10 were handled, {after_stop} after "
          f"the stop")
    assert handled == [str(n).encode() for n in range(10)]
    assert while_running == 0
    assert after_stop == 10



async def committed_while_held(kafka_url: str, broker, topic: str, group: str, held,
                               release: asyncio.Event, done) -> tuple[int, int]:
    """Starts the broker and publishes messages 0 to 9; once `held()` is true, what the group
    has committed; then sets `release`, waits for `done()` and stops the broker: and what
    the group has committed after the stop."""
    await broker.start()
    try:
        await publish_ten(broker, topic)
        await eventually(held, timeout=30)
        await asyncio.sleep(0.2)  # long past the commit of what was handled
        while_held = await committed(kafka_url, topic, group)
        release.set()
        await eventually(done)
    finally:
        await broker.stop()
    return while_held, await committed(kafka_url, topic, group)


async def test_a_kafka_group_handling_several_at_once_commits_only_before_a_message_in_hand(
        kafka_url):
    # Four at once from one partition: messages after 3 are handled while 3 is still in
    # hand, and none of them is committed until it is.
    settings, topic, group = work_topic(kafka_url)
    broker = bus.create_broker(settings, "test")
    release, entered, handled = asyncio.Event(), [], []

    @bus.subscribe(broker, settings, topic, group, concurrency=4)
    async def handler(body: bytes) -> None:
        entered.append(body)  # before any await: the order the handlers were started in
        if body == b"3":
            await release.wait()
        handled.append(body)

    async def all_but_three_handled() -> bool:
        return len(handled) == 9

    async def all_handled() -> bool:
        return len(handled) == 10

    while_held, after_stop = await committed_while_held(
        kafka_url, broker, topic, group, all_but_three_handled, release, all_handled)
    print(f"found: handled {handled} ({entered} entered); committed {while_held} while "
          f"message 3 was in hand, {after_stop} after the stop")
    assert entered == [str(n).encode() for n in range(10)]
    assert handled.index(b"3") == 9  # 4 to 9 were handled beside it
    assert while_held == 3  # messages 0 to 2; 3 to 9 come again after a crash
    assert after_stop == 10


async def test_a_kafka_group_handling_several_at_once_never_commits_past_a_failed_message(
        kafka_url):
    # Message 2 fails once: it is handed back (the consumer rewinds to it) while 3 to 9 are
    # handled beside it. When it comes again it is held, and nothing from it on is committed
    # meanwhile, though 3 to 9 were handled.
    settings, topic, group = work_topic(kafka_url)
    broker = bus.create_broker(settings, "test")
    release, deliveries, handled = asyncio.Event(), [], []

    @bus.subscribe(broker, settings, topic, group, concurrency=4)
    async def handler(body: bytes) -> None:
        deliveries.append(body)
        if body == b"2":
            if deliveries.count(b"2") == 1:
                raise RuntimeError("the first delivery of message 2 fails")
            await release.wait()
        handled.append(body)

    async def two_again_and_the_rest_handled() -> bool:
        return deliveries.count(b"2") == 2 and set(handled) >= {
            str(n).encode() for n in range(10) if n != 2}

    async def two_handled() -> bool:
        return b"2" in handled

    while_held, after_stop = await committed_while_held(
        kafka_url, broker, topic, group, two_again_and_the_rest_handled, release, two_handled)
    print(f"found: deliveries {deliveries}; committed {while_held} while message 2 was held "
          f"on its second delivery, {after_stop} after the stop")
    assert while_held == 2
    assert after_stop == 10


class HoleOnce:
    """A real consumer whose fetches lose `offset` (of its one partition) the first `times`
    times it comes: the stand-in for tansu answering a fetch with a record before the one
    ahead of it is readable, which cannot be brought about on demand."""

    def __init__(self, consumer: AIOKafkaConsumer, offset: int, times: int) -> None:
        self.consumer, self.offset, self.times = consumer, offset, times

    async def getone(self):
        record = await self.consumer.getone()
        if record.offset == self.offset and self.times:
            self.times -= 1
            record = await self.consumer.getone()
        return record

    def seek(self, partition, offset: int) -> None:
        self.consumer.seek(partition, offset)


async def offsets_taken(kafka_url: str, hole_at: int, times: int) -> list[int]:
    """The offsets a subscriber takes of ten messages on one partition, through a consumer
    whose fetches lose `hole_at` the first `times` times."""
    settings, topic, _ = work_topic(kafka_url)
    servers = kafka_url.removeprefix("kafka://")
    broker = bus.create_broker(settings, "test")
    await broker.start()
    try:
        for n in range(10):
            await broker.publish(str(n).encode(), topic, partition=0)
    finally:
        await broker.stop()
    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        subscriber = SimpleNamespace(holes=kafka_bus.Holes())
        fetching = HoleOnce(consumer, hole_at, times)
        async with asyncio.timeout(10):  # a hole skipped leaves one record short
            return [(await kafka_bus.WithoutHoles.get_msg(subscriber, fetching)).offset
                    for _ in range(10 - (times > 1))]
    finally:
        await consumer.stop()


async def test_a_hole_in_a_partitions_offsets_is_fetched_again_on_a_stand_in_fault(kafka_url):
    assert await offsets_taken(kafka_url, hole_at=4, times=1) == list(range(10))


async def test_a_hole_still_there_when_fetched_again_is_taken_as_real_on_a_stand_in_fault(
        kafka_url):
    assert await offsets_taken(kafka_url, hole_at=4, times=2) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
