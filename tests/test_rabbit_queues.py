"""Quorum queues on the real RabbitMQ (a one-node cluster makes them too)."""

import asyncio
import subprocess

import pytest

from .deployment import Deployment


@pytest.fixture
def quorum_deployment(rabbit_url, tmp_path):
    deployment = Deployment(rabbit_url, tmp_path, overrides={
        "CONVEYOR_RABBIT_QUEUE_TYPE": "quorum"})
    deployment.start("control-plane", "orchestrator", "echo")
    yield deployment
    deployment.stop()


async def test_with_quorum_queues_every_shared_queue_is_one_and_tasks_run(quorum_deployment):
    deployment = quorum_deployment
    await deployment.ready("echo")
    async with deployment.client() as client:
        assert await client.run("echo", timeout=30, n=1) == {"echo": {"n": 1}}
    listed = (await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", "list_queues", "name", "type"],
        capture_output=True, text=True, check=True, timeout=60)).stdout
    types = dict(line.split("\t") for line in listed.splitlines()
                 if line.startswith(f"{deployment.namespace}."))
    shared = {name: kind for name, kind in types.items() if name.count(".") == 2
              or name == f"{deployment.namespace}.echo"}
    print(f"found: {shared}")
    assert f"{deployment.namespace}.control_plane.recorder" in shared
    assert f"{deployment.namespace}.echo" in shared
    assert set(shared.values()) == {"quorum"}
