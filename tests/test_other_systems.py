"""Other systems talk to Conveyor with plain JSON on the broker: no Conveyor code on their side.

The publishers here use aio-pika and aiokafka directly and build every message by hand,
exactly as INTERFACE.md's wire contract describes it.
"""

import asyncio
import json
import uuid
from contextlib import asynccontextmanager

import aio_pika
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .deployment import eventually


@asynccontextmanager
async def raw_rabbit(url: str, namespace: str, reply_to: str):
    """Publish raw JSON to the front door; collect whatever arrives on reply_to."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(namespace, aio_pika.ExchangeType.TOPIC,
                                              durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key=reply_to)
    received: asyncio.Queue = asyncio.Queue()

    async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            await received.put(json.loads(message.body))

    await queue.consume(collect)

    async def send(body: bytes) -> None:
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             content_type="application/json"),
            routing_key=f"{namespace}.control_plane",
        )

    try:
        yield send, received
    finally:
        await connection.close()


@asynccontextmanager
async def raw_kafka(url: str, namespace: str, reply_to: str):
    servers = url.removeprefix("kafka://")
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    await admin.create_topics([NewTopic(reply_to, num_partitions=1, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all",
                                max_request_size=3_000_000)
    consumer = AIOKafkaConsumer(reply_to, bootstrap_servers=servers,
                                auto_offset_reset="earliest", fetch_max_wait_ms=20)
    await producer.start()
    await consumer.start()
    received: asyncio.Queue = asyncio.Queue()

    async def collect() -> None:
        async for record in consumer:
            await received.put(json.loads(record.value))

    collector = asyncio.create_task(collect())

    async def send(body: bytes) -> None:
        await producer.send_and_wait(f"{namespace}.control_plane", body, key=b"raw")

    try:
        yield send, received
    finally:
        collector.cancel()
        await consumer.stop()
        await producer.stop()


def raw_publisher(deployment, reply_to: str):
    kind = raw_rabbit if deployment.broker_url.startswith("amqp") else raw_kafka
    return kind(deployment.broker_url, deployment.namespace, reply_to)


def new_task(service: str, reply_to: str, task_id: str | None = None, stream: bool = False,
             **input) -> bytes:
    message = {
        "id": uuid.uuid4().hex, "type": "control_plane", "action": "new_task",
        "publisher_id": "billing-system",
        "data": {"task_id": task_id, "service": service, "input": input,
                 "reply_to": reply_to, "stream": stream},
    }
    if task_id is None:
        del message["data"]["task_id"]
    return json.dumps(message).encode()


async def outcome_of(received: asyncio.Queue, task_id: str | None = None, timeout: float = 30):
    async with asyncio.timeout(timeout):
        while True:
            message = await received.get()
            if message["action"] == "completed_task" and (
                task_id is None or message["data"]["task_id"] == task_id
            ):
                return message


async def test_a_raw_json_new_task_gets_its_outcome_on_reply_to(deployment):
    reply_to = f"{deployment.namespace}.replies.billing"
    async with raw_publisher(deployment, reply_to) as (send, received):
        await send(new_task("echo", reply_to, task_id="invoice-1", arg1="hello"))
        outcome = await outcome_of(received, "invoice-1")
    assert outcome["type"] and outcome["action"] == "completed_task"
    assert outcome["data"]["status"] == "completed"
    assert outcome["data"]["service"] == "echo"
    assert outcome["data"]["result"] == {"echo": {"arg1": "hello"}}
    assert outcome["data"]["error"] is None


async def test_the_outcome_reaches_reply_to_once_and_is_on_record_when_it_does(deployment):
    """A plain task's worker sends its outcome to reply_to in the publish that takes it to
    the control plane; a streaming task's events and outcome come through the control plane,
    events first. Either way the requester gets one outcome, and a query sent once it has
    it finds the task recorded as completed."""
    reply_to = f"{deployment.namespace}.replies.once"
    async with raw_publisher(deployment, reply_to) as (send, received), \
            deployment.client() as client:
        await send(new_task("echo", reply_to, task_id=f"plain-{uuid.uuid4().hex[:8]}"))
        plain = await outcome_of(received)
        record = await client.get_task(plain["data"]["task_id"])
        await send(new_task("echo", reply_to, task_id=f"streamed-{uuid.uuid4().hex[:8]}",
                            stream=True, events=3))
        streamed = []
        while not streamed or streamed[-1]["action"] != "completed_task":
            streamed.append(await asyncio.wait_for(received.get(), 30))
        await asyncio.sleep(1.0)
        extra = _drain(received)
    assert plain["data"]["replied"] is True  # from the worker, one hop sooner
    assert record["status"] == "completed"
    assert [m["action"] for m in streamed] == ["task_stream"] * 3 + ["completed_task"]
    assert [m["data"]["index"] for m in streamed[:3]] == [0, 1, 2]
    assert streamed[-1]["data"]["replied"] is False  # through the control plane, in order
    assert extra == []


async def test_the_same_task_id_published_twice_runs_once(deployment, tmp_path):
    reply_to = f"{deployment.namespace}.replies.twice"
    runs = tmp_path / "runs.log"
    task_id = f"once-{uuid.uuid4().hex[:8]}"
    async with raw_publisher(deployment, reply_to) as (send, received):
        await send(new_task("recorded", reply_to, task_id=task_id, log=str(runs), tag="a"))
        await send(new_task("recorded", reply_to, task_id=task_id, log=str(runs), tag="a"))
        first = await outcome_of(received, task_id)
        # A later task on the same path: once it is done, the duplicate has been seen too.
        await send(new_task("recorded", reply_to, task_id="after", log=str(tmp_path / "x")))
        await outcome_of(received, "after")
        await asyncio.sleep(1.0)
        extra = [m for m in _drain(received) if m["data"].get("task_id") == task_id]
    assert first["data"]["status"] == "completed"
    assert runs.read_text().splitlines() == ["a"]
    assert extra == []


def _drain(received: asyncio.Queue) -> list[dict]:
    found = []
    while not received.empty():
        found.append(received.get_nowait())
    return found


async def test_bad_messages_are_answered_dead_lettered_and_the_services_keep_serving(
    deployment,
):
    reply_to = f"{deployment.namespace}.replies.bad"
    ns = deployment.namespace
    wrong_type = json.dumps({"type": "control_plane", "action": "new_task",
                             "data": {"task_id": "bad-input", "service": "echo",
                                      "input": "not an object", "reply_to": reply_to}})
    unknown_action = json.dumps({"type": "control_plane", "action": "launch_rocket",
                                 "data": {"task_id": "bad-action", "reply_to": reply_to}})
    oversized = json.dumps({"type": "control_plane", "action": "new_task",
                            "data": {"task_id": "too-big", "service": "echo",
                                     "input": {"blob": "x" * 1_100_000},
                                     "reply_to": reply_to}})
    async with raw_publisher(deployment, reply_to) as (send, received):
        await send(b"{this is not json")
        await send(wrong_type.encode())
        await send(unknown_action.encode())
        await send(oversized.encode())
        print("injected: malformed JSON, a wrong type, an unknown action, 1.1 MB")
        answers = {}
        for _ in range(3):
            message = await outcome_of(received)
            answers[message["data"]["task_id"]] = message["data"]
        await send(new_task("echo", reply_to, task_id="still-serving", ok=True))
        healthy = await outcome_of(received, "still-serving")

    assert answers["bad-input"]["status"] == "failed"
    assert answers["bad-input"]["error"]["type"] == "InvalidMessage"
    assert "data.input" in answers["bad-input"]["error"]["message"]
    assert "launch_rocket" in answers["bad-action"]["error"]["message"]
    assert answers["too-big"]["error"]["type"] == "MessageTooLarge"
    assert healthy["data"]["result"] == {"echo": {"ok": True}}

    async with deployment.client() as client:
        async def all_four_kept():
            letters = [letter for letter in await client.dead_letters()
                       if letter["topic"] == f"{ns}.control_plane"]
            return letters if len(letters) >= 4 else None

        letters = await eventually(all_four_kept)
    reasons = " | ".join(letter["reason"] for letter in letters)
    print(f"found: {len(letters)} dead letters ({reasons}); a good task still served")
    assert "malformed JSON" in reasons
    assert "launch_rocket" in reasons
    assert {"InvalidMessage", "MessageTooLarge"} <= {x["error_type"] for x in letters}
