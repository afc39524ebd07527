"""How services/bus.py sets up FastStream's Kafka consumers from the settings (no broker:
a subscription is configured before its consumer connects), and what it tries again."""

import pytest

from conveyor.services import bus
from conveyor.services.settings import Settings, load


def consumer_settings(wait_ms: int | None, group: str | None) -> dict:
    overrides = {} if wait_ms is None else {"kafka_fetch_wait_ms": wait_ms}
    settings = load(Settings, broker_url="kafka://127.0.0.1:9", **overrides)
    broker = bus.create_broker(settings, "test")

    @bus.subscribe(broker, settings, "ns.topic", group)
    async def handler(body: bytes) -> None:  # never called: nothing is consumed here
        raise AssertionError(body)

    [subscriber] = broker.subscribers
    return subscriber._connection_args  # what FastStream hands AIOKafkaConsumer


def test_every_kafka_consumer_fetches_with_the_configured_wait():
    assert consumer_settings(None, "ns.topic.part")["fetch_max_wait_ms"] == 10
    assert consumer_settings(500, "ns.topic.part")["fetch_max_wait_ms"] == 500
    assert consumer_settings(2, None)["fetch_max_wait_ms"] == 2  # a private reply topic


def test_kafka_consumers_never_commit_on_a_timer_and_read_from_the_earliest_offset():
    found = consumer_settings(None, "ns.topic.part")
    assert found["enable_auto_commit"] is False
    assert found["auto_offset_reset"] == "earliest"


async def test_through_outages_tries_again_while_unreachable_but_not_after_a_publish_gave_up():
    """No broker needed: what is retried is decided by the exceptions alone."""
    settings = load(broker_url="amqp://guest:guest@127.0.0.1:5672/", publish_timeout=5)
    tries = []

    async def flaky() -> str:
        tries.append("flaky")
        if len(tries) < 3:
            raise ConnectionResetError("connection dropped (injected)")
        return "sent"

    async def gave_up() -> str:
        tries.append("gave_up")
        raise bus.PublishFailed("the broker was unreachable for 30 s (injected)")

    assert await bus.through_outages(settings, "a test message", flaky) == "sent"
    with pytest.raises(bus.PublishFailed):
        await bus.through_outages(settings, "a test message", gave_up)
    assert tries == ["flaky", "flaky", "flaky", "gave_up"]  # a publish's timeout not doubled
