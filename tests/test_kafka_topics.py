"""Kafka topics get the partitions CONVEYOR_KAFKA_PARTITIONS asks for, whoever publishes to
them first; a topic made before with fewer is named in a warning. Over the real tansu, which
makes a topic on its first publish (or metadata request) with 4 partitions, as Apache Kafka
does with 1 under auto.create.topics.enable."""

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from conveyor import Client
from conveyor.contracts.topics import CONTROL_PLANE, topic
from conveyor.services.settings import load

from .deployment import Deployment, eventually


async def partitions_of(kafka_url: str, name: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_url.removeprefix("kafka://"))
    await admin.start()
    try:
        [described] = await admin.describe_topics([name])
        return len(described["partitions"])
    finally:
        await admin.close()


async def test_a_client_that_publishes_before_any_part_starts_makes_the_front_door_as_configured(
    kafka_url, tmp_path,
):
    deployment = Deployment(kafka_url, tmp_path, overrides={"CONVEYOR_KAFKA_PARTITIONS": "8"})
    settings = load(broker_url=kafka_url, namespace=deployment.namespace, kafka_partitions=8)
    try:
        async with Client(settings=settings) as client:
            early = await client.run_nowait("echo", n=1)  # no part is running yet
            front_door = await partitions_of(kafka_url, topic(deployment.namespace, CONTROL_PLANE))
            print(f"found: the front door made with {front_door} partitions")
            deployment.start("control-plane", "orchestrator", "echo")
            # Not lost: run, or failed at once if the orchestrator read it before it heard of
            # echo (a task for a service not registered fails rather than waits).
            first = await client.wait(early, timeout=90)
            await deployment.ready("echo")
            later = await client.run("echo", n=2, timeout=60)
    finally:
        deployment.stop()
    print(f"found: the early task {first.status} ({first.error}), the later one {later}")
    assert front_door == 8  # tansu's own choice would have been 4
    assert first.status == "completed" or first.error.type == "UnknownService"
    assert later == {"echo": {"n": 2}}


async def test_a_part_names_a_topic_made_before_with_fewer_partitions(kafka_url, tmp_path):
    deployment = Deployment(kafka_url, tmp_path, overrides={"CONVEYOR_KAFKA_PARTITIONS": "8"})
    front_door = topic(deployment.namespace, CONTROL_PLANE)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_url.removeprefix("kafka://"))
    await producer.start()
    try:  # another system's publish, before any part: the broker makes the topic its way
        await producer.send_and_wait(front_door, b'{"not": "a message"}')
    finally:
        await producer.stop()
    try:
        deployment.start("control-plane")
        warning = f"topic {front_door} has 4 partitions, not the 8 of CONVEYOR_KAFKA_PARTITIONS"

        async def warned() -> bool:
            return warning in (tmp_path / "control-plane.log").read_text()  # noqa: ASYNC240

        await eventually(warned, timeout=60)
    finally:
        deployment.stop()
    print(f"found in the control plane's log: {warning}")
