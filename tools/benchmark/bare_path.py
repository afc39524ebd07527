"""A task's path built bare: the client, a relay and a worker, each a process of its own,
passing one message at a time with FastStream alone and the same durability as Conveyor's
(durable topic exchange and queues, persistent messages with publisher confirms, or
acks=all; acknowledged or committed after the handler). The relay stands for the
orchestrator, the worker runs the echo workflow; nothing else is done.

The formula of (a) times its hops back to back in one process, where the code and the
broker's path stay in the CPU's caches. A sequential task wakes each part once per task;
this measures what the same three hops and run cost then, on the same machine, so that
Conveyor's own work shows apart from what any design of separate processes pays.

Many requests in flight through it give the throughput floor of (c): what the same
processes and broker pass with FastStream's work per message and the workflow's per run
alone, nothing recorded.

Run as `python -m benchmark.bare_path relay|worker BROKER_URL NAMESPACE`: a part prints
"ready" once it consumes.
"""

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psutil
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

from .brokers import KAFKA_GROUP, LOGGING, create_topic, kafka_servers, raw_body


@dataclass
class BarePath:
    send: Callable[..., Awaitable[float]]  # one request through it; returns its ms
    processes: dict[str, psutil.Process]  # the relay's and the worker's


def _names(namespace: str) -> dict[str, str]:
    return {part: f"{namespace}.bare-{part}" for part in ("relay", "worker", "reply")}


class _Wire:
    """One broker, Conveyor's options: subscribe to a topic, publish durably to one."""

    def __init__(self, broker_url: str, namespace: str) -> None:
        self.rabbit = broker_url.startswith("amqp")
        if self.rabbit:
            self.broker = RabbitBroker(broker_url, **LOGGING)
            self.exchange = RabbitExchange(f"{namespace}.bare", type=ExchangeType.TOPIC,
                                           durable=True)
        else:
            self.broker = KafkaBroker(kafka_servers(broker_url), acks="all", **LOGGING)

    def subscribe(self, topic: str, handler) -> None:
        if self.rabbit:
            queue = RabbitQueue(topic, durable=True, routing_key=topic)
            self.broker.subscriber(queue, self.exchange, ack_policy=AckPolicy.ACK,
                                   decoder=raw_body)(handler)
        else:
            self.broker.subscriber(topic, group_id=f"{topic}.group", decoder=raw_body,
                                   **KAFKA_GROUP)(handler)

    async def publish(self, body: bytes, topic: str) -> None:
        if self.rabbit:
            await self.broker.publish(body, routing_key=topic, exchange=self.exchange,
                                      persist=True)
        else:
            await self.broker.publish(body, topic=topic)


async def _serve(part: str, broker_url: str, namespace: str) -> None:
    names = _names(namespace)
    wire = _Wire(broker_url, namespace)
    if part == "relay":
        async def relay(body: bytes) -> None:
            await wire.publish(body, names["worker"])

        wire.subscribe(names["relay"], relay)
    else:
        from conveyor.services.examples.echo import workflow

        async def work(body: bytes) -> None:
            request = json.loads(body)
            result = await workflow.run(message=request["message"])
            await wire.publish(json.dumps({"id": request["id"], "result": str(result)}).encode(),
                               names["reply"])

        wire.subscribe(names["worker"], work)
    await wire.broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


@asynccontextmanager
async def bare_path(broker_url: str, namespace: str, python: str = sys.executable,
                    env: dict[str, str] | None = None) -> AsyncIterator[BarePath]:
    """Starts the relay and the worker; yields them, with `send`, which sends one request
    through them and returns its milliseconds."""
    names = _names(namespace)
    wire = _Wire(broker_url, namespace)
    if not wire.rabbit:
        for topic in names.values():
            await create_topic(broker_url, topic)
    waiting: dict[str, asyncio.Future] = {}

    async def on_reply(body: bytes) -> None:
        future = waiting.pop(json.loads(body)["id"], None)
        if future is not None and not future.done():
            future.set_result(None)

    wire.subscribe(names["reply"], on_reply)
    parts = []
    try:
        for part in ("relay", "worker"):
            parts.append(process := await asyncio.create_subprocess_exec(
                python, "-m", "benchmark.bare_path", part, broker_url, namespace,
                stdout=subprocess.PIPE, env=env))
            async with asyncio.timeout(60):
                await process.stdout.readline()
        await wire.broker.start()

        async def go(timeout: float = 30.0) -> float:
            request_id = uuid.uuid4().hex
            waiting[request_id] = future = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            await wire.publish(json.dumps({"id": request_id, "message": "hello"}).encode(),
                               names["relay"])
            await asyncio.wait_for(future, timeout)
            return (time.perf_counter() - started) * 1000

        await go(timeout=60)  # the first waits for Kafka's consumer groups to form
        for _ in range(5):
            await go()
        yield BarePath(go, {f"bare {part}": psutil.Process(process.pid)
                            for part, process in zip(("relay", "worker"), parts, strict=True)})
    finally:
        for process in parts:
            process.kill()
            await process.wait()
        await wire.broker.stop()
        if wire.rabbit:
            await _forget(broker_url, namespace)


async def _forget(broker_url: str, namespace: str) -> None:
    import aio_pika

    async with await aio_pika.connect(broker_url, timeout=5) as connection:
        channel = await connection.channel()
        for queue in _names(namespace).values():
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{namespace}.bare")


if __name__ == "__main__":
    import uvloop  # as Conveyor's parts run

    uvloop.run(_serve(*sys.argv[1:4]))
