"""A poison message (one that keeps crashing its handler) is delivered again a few times,
then dead-lettered with the reason, and the messages behind it still flow: on the real
brokers, through the subscription every Conveyor part uses."""

import asyncio
import json
import uuid

from conveyor.contracts import topic
from conveyor.contracts.topics import DEAD_LETTER
from conveyor.services.bus import (
    POISON_AFTER,
    RabbitBroker,
    create_broker,
    exchange,
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
        if isinstance(broker, RabbitBroker):
            await broker.publish(body, routing_key=work, exchange=exchange(settings),
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
