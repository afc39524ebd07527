"""A Kafka consumer group's offsets, committed in the background (services/kafka_commits.py),
on the real (tansu) broker: never past a message still being handled, and everything handled
is committed once the subscriber stops."""

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition

from conveyor.services import bus, kafka_commits
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


async def test_a_kafka_group_never_commits_past_a_message_still_being_handled(kafka_url):
    settings = load(broker_url=kafka_url, namespace=f"kc{uuid.uuid4().hex[:8]}")
    topic, group = f"{settings.namespace}.work", f"{settings.namespace}.work.part"
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
    monkeypatch.setattr(kafka_commits, "BUSY_GAP", 120.0)
    monkeypatch.setattr(kafka_commits, "COMMIT_EVERY", 120.0)
    settings = load(broker_url=kafka_url, namespace=f"kc{uuid.uuid4().hex[:8]}")
    topic, group = f"{settings.namespace}.work", f"{settings.namespace}.work.part"
    broker = bus.create_broker(settings, "test")
    handled = []

    @bus.subscribe(broker, settings, topic, group)
    async def handler(body: bytes) -> None:
        handled.append(body)

    newcomer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_url.removeprefix("kafka://"),
                                group_id=group, enable_auto_commit=False)
    await broker.start()
    try:
        await asyncio.gather(*(broker.publish(str(n).encode(), topic, key=b"one task")
                               for n in range(10)))

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
    assert before == 1  # the first, committed at once; the others waited for their commit
    assert after == 10
