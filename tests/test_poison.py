"""A poison message (one that keeps crashing its handler) is delivered again a few times,
then dead-lettered with the reason, and the messages behind it still flow: on the real
brokers, through the subscription every Conveyor part uses."""

import asyncio
import json
import uuid

from conveyor.contracts import topic
from conveyor.contracts.topics import DEAD_LETTER
from conveyor.services import rabbit_bus
from conveyor.services.bus import (
    POISON_AFTER,
    PublishFailed,
    create_broker,
    group_name,
    subscribe,
)
from conveyor.services.settings import load


async def test_a_message_that_keeps_crashing_its_handler_is_dead_lettered(broker_url):
    settings = load(broker_url=broker_url, namespace=f"p{uuid.uuid4().hex[:10]}")
    broker = create_broker(settings, "test")
    work = topic(settings.namespace, "work")
    handled: list[bytes] = []
    letters: asyncio.Queue = asyncio.Queue()
    fine = asyncio.Event()

    @subscribe(broker, settings, work, group_name(settings, "work", "test"))
    async def digest(body: bytes) -> None:
        handled.append(body)
        if body == b"fine":
            fine.set()
        if body == b"poison":
            raise RuntimeError("cannot digest this")

    @subscribe(broker, settings, topic(settings.namespace, DEAD_LETTER), None)
    async def dead(body: bytes) -> None:
        await letters.put(json.loads(body))

    async def send(body: bytes) -> None:
        if settings.broker_kind == "rabbit":
            await broker.publish(body, routing_key=work, exchange=rabbit_bus.exchange(settings),
                                 persist=True)
        else:
            await broker.publish(body, topic=work, key=b"same-partition")

    await broker.start()
    try:
        await send(b"poison")
        await send(b"fine")
        letter = await asyncio.wait_for(letters.get(), 60)
        await asyncio.wait_for(fine.wait(), 30)
    finally:
        await broker.stop()
    print(f"injected: one message whose handler always raises; found: it was handled "
          f"{handled.count(b'poison')} times, then dead-lettered: {letter['data']['reason']}")
    assert handled.count(b"poison") == POISON_AFTER
    assert letter["data"]["error_type"] == "PoisonMessage"
    assert letter["data"]["topic"] == work
    assert letter["data"]["body"] == "poison"
    assert "RuntimeError: cannot digest this" in letter["data"]["reason"]


async def test_a_handler_that_finds_the_broker_unreachable_is_not_poisoned(broker_url):
    """A handler whose publish found the broker unreachable (its transaction rolled back)
    has its message come again, as often as it takes, never dead-lettered for it."""
    settings = load(broker_url=broker_url, namespace=f"p{uuid.uuid4().hex[:10]}")
    broker = create_broker(settings, "test")
    work = topic(settings.namespace, "work")
    tries = 0
    done = asyncio.Event()
    letters: list[dict] = []

    @subscribe(broker, settings, work, group_name(settings, "work", "test"))
    async def forward(body: bytes) -> None:
        nonlocal tries
        tries += 1
        if tries <= POISON_AFTER + 1:
            raise PublishFailed("the broker was unreachable (injected)")
        done.set()

    @subscribe(broker, settings, topic(settings.namespace, DEAD_LETTER), None)
    async def dead(body: bytes) -> None:
        letters.append(json.loads(body))

    await broker.start()
    try:
        if settings.broker_kind == "rabbit":
            await broker.publish(b"work", routing_key=work, exchange=rabbit_bus.exchange(settings),
                                 persist=True)
        else:
            await broker.publish(b"work", topic=work, key=b"k")
        await asyncio.wait_for(done.wait(), 60)
        await asyncio.sleep(0.5)  # a dead letter, had there been one, would be in by now
    finally:
        await broker.stop()
    print(f"injected: {POISON_AFTER + 1} unreachable brokers in a row; found: handled on "
          f"try {tries}, {len(letters)} dead letters")
    assert tries == POISON_AFTER + 2
    assert letters == []
