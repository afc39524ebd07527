"""The floor under a task, on the same broker in the same run: one bare FastStream hop
(durable publish, consume, ack after the handler) and one in-process run of the same
one-step workflow. A task through Conveyor cannot be faster than its hops plus its run.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aio_pika
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.rabbit import RabbitBroker, RabbitQueue

from conveyor.services.examples.echo import workflow

from .brokers import KAFKA_GROUP, LOGGING, create_topic, kafka_servers, raw_body

# Conveyor's critical path ("How a task travels"): client -> <ns>.control_plane (the
# orchestrator's group), orchestrator -> <ns>.echo (a replica), worker -> reply_to, in the
# same publish as to <ns>.control_plane (the recorder's group). The control plane records
# the NEW_TASK beside the dispatch and the outcome beside the reply, and heartbeats are off
# the path: three hops.
HOPS = 3
HOPS_WHY = ("client -> control_plane topic -> orchestrator -> service topic -> worker -> "
            "reply_to: 3 hops (the control plane records the NEW_TASK beside the dispatch "
            "and the outcome beside the reply, off the path)")

Hop = Callable[[], Awaitable[float]]


@asynccontextmanager
async def bare_hop(broker_url: str, namespace: str) -> AsyncIterator[Hop]:
    """A publisher and a subscriber in this process on a throwaway queue or topic; yields a
    function that makes one hop and returns its milliseconds."""
    arrived: dict[bytes, asyncio.Future] = {}
    name = f"{namespace}.bench-hop"

    async def on_message(body: bytes) -> None:
        future = arrived.pop(body, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    if broker_url.startswith("amqp"):
        broker = RabbitBroker(broker_url, **LOGGING)
        queue = RabbitQueue(name, durable=True)
        broker.subscriber(queue, ack_policy=AckPolicy.ACK, decoder=raw_body)(on_message)

        async def send(token: bytes) -> None:
            # FastStream's RabbitBroker waits for the publisher confirm.
            await broker.publish(token, queue=queue, persist=True)
    else:
        await create_topic(broker_url, name)
        broker = KafkaBroker(kafka_servers(broker_url), acks="all", **LOGGING)
        broker.subscriber(name, group_id=f"{name}.group", decoder=raw_body,
                          **KAFKA_GROUP)(on_message)

        async def send(token: bytes) -> None:
            await broker.publish(token, topic=name, key=token)

    async def hop(timeout: float = 30.0) -> float:
        token = uuid.uuid4().hex.encode()
        future = asyncio.get_running_loop().create_future()
        arrived[token] = future
        started = time.perf_counter()
        await send(token)
        await asyncio.wait_for(future, timeout)
        return (time.perf_counter() - started) * 1000

    await broker.start()
    try:
        await hop(timeout=60)  # the first one waits for the consumer group to form
        for _ in range(5):
            await hop()
        yield hop
    finally:
        await broker.stop()
        if isinstance(broker, RabbitBroker):
            await _delete_queue(broker_url, name)


async def _delete_queue(broker_url: str, name: str) -> None:
    async with await aio_pika.connect(broker_url, timeout=5) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def workflow_run() -> float:
    """Milliseconds of one in-process run of the echo workflow the deployment serves."""
    started = time.perf_counter()
    await workflow.run(message="hello")
    return (time.perf_counter() - started) * 1000
