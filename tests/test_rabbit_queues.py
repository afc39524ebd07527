"""RabbitMQ's queues: quorum queues (a one-node cluster makes them too), and what each
shared queue is handed."""

import asyncio
import signal
import subprocess

import pytest

from conveyor.contracts.topics import CONTROL_PLANE, QUERY
from conveyor.services.bus import group_name
from conveyor.services.settings import load

from .deployment import Deployment, eventually, records_once_completed


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
    types = {name: kind for name, kind in (await listed_queues("type")).items()
             if name.startswith(f"{deployment.namespace}.")}
    shared = {name: kind for name, kind in types.items() if name.count(".") == 2
              or name == f"{deployment.namespace}.echo"}
    print(f"found: {shared}")
    assert f"{deployment.namespace}.control_plane.recorder" in shared
    assert f"{deployment.namespace}.echo" in shared
    assert set(shared.values()) == {"quorum"}


async def test_what_a_workflow_service_reports_is_not_handed_to_the_orchestrator(
        rabbit_url, tmp_path):
    """A task's streamed events and outcome go to the control plane's recorder alone: with
    the orchestrator stopped (SIGSTOP) while a task runs, once it has acknowledged the
    task's NEW_TASK, the task ends, its record is complete, and nothing has queued up for
    the orchestrator meanwhile."""
    deployment = Deployment(rabbit_url, tmp_path)
    deployment.start("control-plane", "orchestrator", "work")
    orchestrator = deployment.processes["orchestrator"]
    queue = group_name(load(broker_url=rabbit_url, namespace=deployment.namespace),
                       CONTROL_PLANE, "orchestrator")
    try:
        await deployment.ready("work")
        async with deployment.client() as client:
            task_id = await client.run_nowait("work", n=1, seconds=4, events=0)

            async def running() -> bool:
                return (await client.get_task(task_id))["status"] == "running"

            async def orchestrator_done() -> bool:
                # The queue takes what the front door does, get_task queries included (they
                # follow the task's own messages there): its NEW_TASK, acknowledged once the
                # dispatch is recorded, and the last poll of running() may still be in hand.
                return await queued_for(queue) == 0

            await eventually(running)
            await eventually(orchestrator_done)
            orchestrator.send_signal(signal.SIGSTOP)
            try:
                # Asked on the query topic, which the orchestrator's queue does not take.
                [stopped_while] = [task["status"] for task in await client.list_tasks(
                    service="work") if task["task_id"] == task_id]
                outcome = await client.wait(task_id, timeout=30)
                record = await records_once_completed(client, "work", [task_id])
                waiting = await queued_for(queue)
            finally:
                orchestrator.send_signal(signal.SIGCONT)
        print(f"found: {stopped_while} when the orchestrator stopped, then {outcome.status}; "
              f"{waiting} messages queued for the orchestrator")
        assert stopped_while == "running"  # its outcome came while the orchestrator slept
        assert outcome.status == "completed"
        assert record[task_id]["result"]["n"] == 1
        assert waiting == 0
    finally:
        deployment.stop()


async def test_the_front_door_is_taken_several_messages_at_a_time_and_nothing_is_missed(
        rabbit_url, tmp_path):
    """The control plane and the orchestrator each take CONVEYOR_PREFETCH messages of
    the front door at once (the control plane as many queries); 300 tasks started at once
    all run, and a get_task sent right behind its NEW_TASK finds the task every time. (That
    one task's messages are handled in the order they came is tested on its own, in
    test_ordering.py.)"""
    deployment = Deployment(rabbit_url, tmp_path, overrides={"CONVEYOR_PREFETCH": "5"})
    deployment.start("control-plane", "orchestrator", "echo")
    settings = load(broker_url=rabbit_url, namespace=deployment.namespace)
    try:
        await deployment.ready("echo")
        async with deployment.client() as client:

            async def started_then_read(n: int) -> tuple[str, str | None]:
                task_id = await client.run_nowait("echo", n=n)
                return task_id, await client.status(task_id)

            ids, read = zip(*await asyncio.gather(*(started_then_read(n) for n in range(300))),
                            strict=True)
            ends = await asyncio.gather(*(client.wait(i, timeout=60) for i in ids))
        prefetch = await listed_consumers("prefetch_count")
    finally:
        deployment.stop()
    front_door = {part: prefetch[group_name(settings, CONTROL_PLANE, part)]
                  for part in ("recorder", "orchestrator")}
    front_door["queries"] = prefetch[group_name(settings, QUERY, "control_plane")]
    completed = sum(end.status == "completed" for end in ends)
    print(f"found: prefetch {front_door}; {read.count(None)} of 300 tasks not found; "
          f"{completed} completed")
    assert front_door == {"recorder": "5", "orchestrator": "5", "queries": "5"}
    assert None not in read
    assert completed == 300
    assert set(read) <= {"queued", "running", "completed"}


async def listed_consumers(column: str) -> dict[str, str]:
    """Each consumed queue's name and one column of `rabbitmqctl list_consumers`."""
    return await rabbitmqctl("list_consumers", "queue_name", column)


async def queued_for(queue: str) -> int:
    """How many messages a queue holds, ready or delivered and not acknowledged yet."""
    return int((await listed_queues("messages"))[queue])


async def listed_queues(column: str) -> dict[str, str]:
    """Each queue's name and one column of `rabbitmqctl list_queues`."""
    return await rabbitmqctl("list_queues", "name", column)


async def rabbitmqctl(*listing: str) -> dict[str, str]:
    """A two-column listing of rabbitmqctl, as a dict."""
    listed = (await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", *listing],
        capture_output=True, text=True, check=True, timeout=60)).stdout
    return dict(line.split("\t") for line in listed.splitlines())
