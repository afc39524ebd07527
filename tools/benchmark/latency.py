"""Sequential latency of a one-step task: through conveyor.Client, and through a publisher
that only speaks the wire contract (raw JSON in, the outcome on its own reply_to)."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

from conveyor import Client

from .brokers import LOGGING, create_topic, kafka_servers, raw_body
from .stats import Tally

Run = Callable[[], Awaitable[float]]


async def via_client(client: Client, count: int, tally: Tally) -> list[float]:
    """Milliseconds of `count` echo tasks run one after another with Client.run."""
    times = []
    for n in range(count):
        tally.submitted += 1
        started = time.perf_counter()
        try:
            await client.run("echo", timeout=60, n=n)
        except Exception:  # a lost or failed task is counted, not timed
            continue
        times.append((time.perf_counter() - started) * 1000)
        tally.completed += 1
    return times


async def via_raw_json(run: Run, count: int, tally: Tally) -> list[float]:
    times = []
    for _ in range(count):
        tally.submitted += 1
        try:
            times.append(await run())
        except Exception:
            continue
        tally.completed += 1
    return times


@asynccontextmanager
async def raw_publisher(broker_url: str, namespace: str) -> AsyncIterator[Run]:
    """FastStream alone: publish a NEW_TASK as JSON to `<ns>.control_plane` and wait for its
    completed_task on a private reply_to; yields a function that does so and returns ms."""
    reply_to = f"{namespace}.replies.bench-{uuid.uuid4().hex[:8]}"
    front_door = f"{namespace}.control_plane"
    waiting: dict[str, asyncio.Future] = {}

    async def on_reply(body: bytes) -> None:
        message = json.loads(body)
        if message.get("action") != "completed_task":
            return
        future = waiting.pop(message["data"]["task_id"], None)
        if future is not None and not future.done():
            future.set_result(message["data"])

    if broker_url.startswith("amqp"):
        broker = RabbitBroker(broker_url, **LOGGING)
        exchange = RabbitExchange(namespace, type=ExchangeType.TOPIC, durable=True)
        queue = RabbitQueue(reply_to, routing_key=reply_to, auto_delete=True)
        broker.subscriber(queue, exchange, ack_policy=AckPolicy.ACK,
                          decoder=raw_body)(on_reply)

        async def send(body: bytes, task_id: str) -> None:
            await broker.publish(body, routing_key=front_door, exchange=exchange, persist=True,
                                 content_type="application/json")
    else:
        await create_topic(broker_url, reply_to)
        broker = KafkaBroker(kafka_servers(broker_url), acks="all", **LOGGING)
        broker.subscriber(partitions=[TopicPartition(reply_to, 0)], auto_offset_reset="earliest",
                          fetch_max_wait_ms=10, decoder=raw_body)(on_reply)

        async def send(body: bytes, task_id: str) -> None:
            await broker.publish(body, topic=front_door, key=task_id.encode(),
                                 headers={"content-type": "application/json"})

    async def run(timeout: float = 60.0) -> float:
        task_id = f"raw-{uuid.uuid4().hex}"
        body = json.dumps({
            "id": uuid.uuid4().hex, "type": "control_plane", "action": "new_task",
            "publisher_id": "bench-raw-json",
            "data": {"task_id": task_id, "session_id": None, "service": "echo",
                     "input": {"message": "hello"}, "reply_to": reply_to, "stream": False},
        }).encode()
        future = asyncio.get_running_loop().create_future()
        waiting[task_id] = future
        started = time.perf_counter()
        await send(body, task_id)
        outcome = await asyncio.wait_for(future, timeout)
        if outcome["status"] != "completed":
            raise RuntimeError(f"raw task {task_id} ended {outcome['status']}")
        return (time.perf_counter() - started) * 1000

    await broker.start()
    try:
        yield run
    finally:
        await broker.stop()

