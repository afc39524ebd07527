"""A RabbitMQ group queue's acknowledgements, several in one frame (services/rabbit_acks.py),
on the real broker: a delivery is acknowledged only once handled, whatever its neighbours
do; one handed back comes again alone; and after a dropped connection exactly what was not
handled comes again."""

import asyncio
import uuid
from collections import Counter

import aio_pika
import pytest
from aio_pika import IncomingMessage

from conveyor.services import bus
from conveyor.services.settings import load

from .deployment import eventually
from .test_broker_faults import rabbitmqctl


async def unacknowledged(queue: str) -> int:
    """What RabbitMQ holds as delivered and not yet acknowledged on the queue."""
    found = await asyncio.to_thread(rabbitmqctl, "list_queues", "-q", "--no-table-headers",
                                    "name", "messages_unacknowledged")
    counts = dict(line.split("\t") for line in found.splitlines() if "\t" in line)
    return int(counts[queue])


@pytest.fixture
def sent_acks(monkeypatch):
    """Every basic.ack the process sends, as (delivery tag, multiple)."""
    sent: list[tuple[int, bool]] = []
    ack = IncomingMessage.ack

    async def spied(self, multiple: bool = False) -> None:
        sent.append((self.delivery_tag, multiple))
        await ack(self, multiple)

    monkeypatch.setattr(IncomingMessage, "ack", spied)
    return sent


@pytest.fixture
def group(rabbit_url: str):
    """A namespace of its own, and a broker of it; its queue and exchange removed after."""
    settings = load(broker_url=rabbit_url, namespace=f"ra{uuid.uuid4().hex[:8]}")
    topic = f"{settings.namespace}.work"
    yield settings, topic, f"{topic}.part", bus.create_broker(settings, "test")
    asyncio.run(_remove(rabbit_url, settings.namespace, f"{topic}.part"))


async def _remove(rabbit_url: str, exchange: str, queue: str) -> None:
    async with await aio_pika.connect(rabbit_url, timeout=5) as connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)


def covered(acks: list[tuple[int, bool]], tags: range) -> set[int]:
    """The channel's delivery tags (of `tags`) that these basic.acks acknowledged."""
    done: set[int] = set()
    for tag, multiple in acks:
        done |= {t for t in tags if t <= tag} if multiple else {tag}
    return done


async def test_a_rabbit_group_acknowledges_what_is_handled_in_few_frames_and_never_more(
        group, sent_acks):
    settings, topic, queue, broker = group
    go, release = asyncio.Event(), asyncio.Event()
    delivered: Counter[bytes] = Counter()
    handled: list[bytes] = []

    @bus.subscribe(broker, settings, topic, queue, concurrency=32)
    async def handler(body: bytes) -> None:
        delivered[body] += 1
        await (release if body == b"held" else go).wait()
        handled.append(body)

    await broker.start()
    try:
        # Delivery tags 1 to 10, the held one 11, then 12 to 16.
        bodies = [f"{n}".encode() for n in range(10)] + [b"held"] + [
            f"{n}".encode() for n in range(10, 15)]
        for body in bodies:
            await broker.publish(body, queue=queue)

        async def all_delivered() -> bool:
            return sum(delivered.values()) == 16

        await eventually(all_delivered)
        go.set()  # fifteen handlers finish together

        async def fifteen_handled() -> bool:
            return len(handled) == 15 and await unacknowledged(queue) == 1

        await eventually(fifteen_handled)
        before_release = list(sent_acks)
        print(f"found: 15 handled, acknowledged in {len(before_release)} frames: "
              f"{before_release}; 1 unacknowledged")
        # Not one frame covers the delivery still in hand.
        assert covered(before_release, range(1, 17)) == (
            set(range(1, 17)) - {11})
        assert len(before_release) < 15  # those before it went together

        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "dropped by a test")
        print("injected: every connection to RabbitMQ closed (close_all_connections)")

        async def held_again() -> bool:
            return delivered[b"held"] == 2

        await eventually(held_again)  # it alone comes again
        release.set()

        async def all_acknowledged() -> bool:
            return len(handled) >= 16 and await unacknowledged(queue) == 0

        await eventually(all_acknowledged)
    finally:
        release.set()
        await broker.stop()
    assert {body: count for body, count in delivered.items() if count != 1} == {b"held": 2}


async def test_a_rabbit_delivery_handed_back_amid_others_comes_again_and_they_do_not(group):
    settings, topic, queue, broker = group
    go = asyncio.Event()
    delivered: Counter[bytes] = Counter()

    @bus.subscribe(broker, settings, topic, queue, concurrency=32)
    async def handler(body: bytes) -> None:
        delivered[body] += 1
        await go.wait()
        if body == b"back" and delivered[body] == 1:
            raise bus.Redeliver("back")  # negatively acknowledged amid the others' acks

    await broker.start()
    try:
        for body in [b"0", b"1", b"2", b"back", b"3", b"4", b"5"]:
            await broker.publish(body, queue=queue)

        async def all_delivered() -> bool:
            return sum(delivered.values()) == 7

        await eventually(all_delivered)
        go.set()

        async def back_again_and_done() -> bool:
            return delivered[b"back"] == 2 and await unacknowledged(queue) == 0

        await eventually(back_again_and_done)
        await asyncio.sleep(0.5)  # a channel closed by a wrong frame would deliver them again
    finally:
        await broker.stop()
    print(f"found: delivered {dict(delivered)}")
    assert delivered == {b"0": 1, b"1": 1, b"2": 1, b"back": 2, b"3": 1, b"4": 1, b"5": 1}
