"""RabbitMQ's side of the bus (see bus.py): its broker, queues, subscribers and publish.

Imported only by a process whose CONVEYOR_BROKER_URL is amqp://, so that a part on Kafka
loads no AMQP client (aio-pika, aiormq, pamqp: about 3.5 MB of each part's memory there).
"""

import uuid
from typing import Any

from aiormq.exceptions import ChannelInvalidStateError
from faststream import AckPolicy
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas import Channel
from faststream.rabbit.schemas.queue import QueueType

from .rabbit_acks import AcksInBatches
from .settings import Settings

# What a lost or not yet restored connection raises, besides ConnectionError.
UNREACHABLE = (ChannelInvalidStateError,)

_acks = AcksInBatches()  # a group queue's acknowledgements, several in one when they can be


def create(settings: Settings, url: str, common: dict[str, Any]) -> RabbitBroker:
    return RabbitBroker(url, reconnect_interval=1.0, **common)


def exchange(settings: Settings) -> RabbitExchange:
    return RabbitExchange(settings.namespace, type=ExchangeType.TOPIC, durable=True)


def group_queue(settings: Settings, name: str, routing_key: str = "") -> RabbitQueue:
    """The durable queue a group's replicas share; a quorum queue (replicated across a
    RabbitMQ cluster) with CONVEYOR_RABBIT_QUEUE_TYPE=quorum."""
    return RabbitQueue(name, durable=True, routing_key=routing_key,
                       queue_type=QueueType(settings.rabbit_queue_type))


async def declare_group_queues(broker: RabbitBroker, settings: Settings,
                               bindings: dict[str, tuple[str, ...]]) -> None:
    """Each group's durable queue (`bindings` maps its name to its routing keys), bound."""
    declared = await broker.declare_exchange(exchange(settings))
    for name, routing_keys in bindings.items():
        queue = await broker.declare_queue(group_queue(settings, name))
        for routing_key in routing_keys:
            await queue.bind(declared, routing_key=routing_key)


def subscriber(broker: RabbitBroker, settings: Settings, topic: str, group: str | None,
               concurrency: int, quiet: bool, decoder: Any) -> Any:
    """See bus.subscribe; `quiet` changes nothing on RabbitMQ, whose consumers are pushed
    their messages."""
    if group is None:
        # Named apart per process: every instance of a service hears its broadcast topic.
        # Durable, and removed by RabbitMQ once unused for a while rather than when the
        # connection drops: what is published to it while the process reconnects (or
        # while RabbitMQ restarts) waits for it.
        queue = RabbitQueue(f"{topic}.{uuid.uuid4().hex[:8]}", routing_key=topic,
                            durable=True, arguments={"x-expires": _expiry_ms(settings)})
        return broker.subscriber(
            queue, exchange(settings), channel=Channel(prefetch_count=concurrency),
            # Acknowledged once handled, even if the handler failed (its next delivery
            # would fail alike); one whose handler was cancelled by a dropped connection
            # comes again.
            ack_policy=AckPolicy.ACK, decoder=decoder,
        )
    return broker.subscriber(  # bound with bus.ALSO_BOUND's keys by declare_group_queues
        group_queue(settings, group, routing_key=topic),
        exchange(settings),
        channel=Channel(prefetch_count=concurrency),  # a channel of its own: see rabbit_acks
        ack_policy=AckPolicy.NACK_ON_ERROR,
        parser=_acks.parser,
        decoder=decoder,
    )


async def send(broker: RabbitBroker, settings: Settings, body: bytes, message_id: str,
               topic: str, key: str | None, partition: int | None,
               copy_to: tuple[str, ...]) -> None:
    """See bus.publish; a queue keeps its messages in order whatever their key, and has no
    partitions."""
    await broker.publish(
        body,
        routing_key=topic,
        exchange=exchange(settings),
        persist=True,
        message_id=message_id,
        content_type="application/json",
        mandatory=False,
        # Sender-selected distribution: also routed with these keys, in one publish.
        headers={"CC": list(copy_to)} if copy_to else None,
    )


def _expiry_ms(settings: Settings) -> int:
    """How long a private queue outlives its last consumer: longer than any outage a
    publish rides out, so that a reply retried through one still finds its queue."""
    return int(max(60.0, 2 * settings.publish_timeout) * 1000)
