"""What the benchmark's own FastStream brokers share: a quiet logger (per-message logging
would be measured too), the raw body, and Kafka topics of one partition made up front."""

import logging
from contextlib import suppress

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream import AckPolicy
from faststream.message import StreamMessage

quiet = logging.getLogger("benchmark.broker")
quiet.setLevel(logging.WARNING)
LOGGING = {"logger": quiet, "log_level": logging.DEBUG}
# A Kafka group subscriber's options, as Conveyor's own subscriptions have them (services/bus.py).
KAFKA_GROUP = {"ack_policy": AckPolicy.ACK, "auto_offset_reset": "earliest",
               "fetch_max_wait_ms": 10, "session_timeout_ms": 6_000,
               "heartbeat_interval_ms": 1_000}


async def raw_body(message: StreamMessage) -> bytes:
    return message.body


def kafka_servers(broker_url: str) -> list[str]:
    return broker_url.removeprefix("kafka://").split(",")


async def create_topic(broker_url: str, name: str) -> None:
    """One partition, read whole by one consumer (a subscriber would otherwise find the
    topic auto-created with several)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_servers(broker_url))
    await admin.start()
    try:
        with suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
