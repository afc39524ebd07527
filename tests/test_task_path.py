"""A task's whole path on the real brokers: client, control plane, orchestrator, service."""

import asyncio
import json
import subprocess
import sys

import pytest

from conveyor import BlockingClient, MessageTooLarge, TaskFailed

from .deployment import eventually


async def test_client_run_returns_the_workflows_result(deployment):
    async with deployment.client() as client:
        result = await client.run("echo", timeout=30, message="hello", n=3)
        assert result == {"echo": {"message": "hello", "n": 3}}


async def test_run_nowait_then_status_and_wait(deployment):
    async with deployment.client() as client:
        task_id = await client.run_nowait("echo", message="later")
        outcome = await client.wait(task_id, timeout=30)
        record = await client.get_task(task_id)
    assert outcome.status == "completed"
    assert outcome.result == {"echo": {"message": "later"}}
    assert record["status"] == "completed"
    assert record["service"] == "echo"
    assert record["attempts"] == 1
    assert record["result"] == {"echo": {"message": "later"}}
    assert record["finished_at"] is not None


async def test_a_task_whose_outcome_a_client_holds_never_reads_running_mocked_lagging_record(
        deployment, monkeypatch):
    """On Kafka the outcome reaches the requester beside, not after, the control plane's
    copy: a get_task sent at once may be answered from the record before it is stored
    (rare; a stand-in answer plays that record here, the outcome is real)."""
    async with deployment.client() as client:
        task_id = await client.run_nowait("echo", message="raced")
        await client.wait(task_id, timeout=30)
        stored = await client.get_task(task_id)
        lagging = {**stored, "status": "running", "result": None}

        async def answer_from_the_lagging_record(query, timeout=None):
            return dict(lagging)

        monkeypatch.setattr(client, "_ask", answer_from_the_lagging_record)
        record = await client.get_task(task_id)
    assert record["status"] == "completed"
    assert record["result"] == {"echo": {"message": "raced"}}
    assert record["attempts"] == stored["attempts"]


async def test_another_client_waits_for_a_task_it_did_not_start(deployment):
    async with deployment.client() as starter, deployment.client() as watcher:
        slow_id = await starter.run_nowait("echo", message="watched")
        outcome = await watcher.wait(slow_id, timeout=30)
        finished_id = await starter.run_nowait("echo", message="done already")
        await starter.wait(finished_id, timeout=30)
        late = await watcher.wait(finished_id, timeout=30)
    assert outcome.status == "completed" and outcome.result == {"echo": {"message": "watched"}}
    assert late.status == "completed" and late.result == {"echo": {"message": "done already"}}


def test_blocking_client_runs_a_task(deployment):
    with BlockingClient(deployment.broker_url, deployment.namespace) as client:
        assert client.run("echo", timeout=30, message="sync") == {"echo": {"message": "sync"}}


async def test_a_step_that_raises_fails_the_task_with_its_error(deployment):
    async with deployment.client() as client:
        with pytest.raises(TaskFailed) as raised:
            await client.run("echo", timeout=30, fail="the disk is full")
        record = await client.get_task(raised.value.task_id)
    assert raised.value.error.type == "EchoFailed"
    assert raised.value.error.message == "the disk is full"
    assert record["status"] == "failed"
    assert record["result"] is None
    assert record["error"] == {"type": "EchoFailed", "message": "the disk is full"}


async def test_unknown_service_fails_with_a_clear_error_and_a_dead_letter(deployment):
    async with deployment.client() as client:
        with pytest.raises(TaskFailed) as raised:
            await client.run("no_such_service", timeout=30)

        async def dead_lettered():
            return [letter for letter in await client.dead_letters()
                    if letter["task_id"] == raised.value.task_id]

        letters = await eventually(dead_lettered)
    assert raised.value.error.type == "UnknownService"
    assert "no_such_service" in raised.value.error.message
    assert letters[0]["error_type"] == "UnknownService"
    assert "no_such_service" in letters[0]["reason"]


async def test_unserializable_result_fails_the_task_and_the_service_keeps_serving(
    deployment,
):
    deployment.start("unserializable")
    await deployment.ready("unserializable")
    async with deployment.client() as client:
        with pytest.raises(TaskFailed) as raised:
            await client.run("unserializable", timeout=30)
        assert raised.value.error.type == "ResultNotSerializable"
        with pytest.raises(TaskFailed) as raised:
            await client.run("unserializable", in_event=True, timeout=30)
        assert raised.value.error.type == "ResultNotSerializable"
        assert "event Opaque cannot be sent as JSON" in raised.value.error.message
        assert await client.run("echo", timeout=30, after="it") == {"echo": {"after": "it"}}
        again = await client.wait(await client.run_nowait("unserializable"), timeout=30)
        assert again.error.type == "ResultNotSerializable"  # the service itself still serves
        with pytest.raises(TaskFailed) as raised:
            await client.run("unserializable", size=1_200_000, timeout=30)
        assert raised.value.error.type == "MessageTooLarge"
        assert "outcome could not be sent" in raised.value.error.message
        assert "over the limit of 1000000 bytes" in raised.value.error.message


async def test_an_input_over_the_message_limit_is_refused_before_it_is_sent(deployment):
    async with deployment.client() as client:
        with pytest.raises(MessageTooLarge, match=r"new_task of \d+ bytes is over the limit"):
            await client.run_nowait("echo", task_id="too-big", text="x" * 1_000_000)
        assert await client.get_task("too-big") is None  # nothing reached the broker


async def test_services_lists_registered_instances(deployment):
    async with deployment.client() as client:
        found = {service["name"]: service for service in await client.list_services()}
    assert {"echo", "recorded"} <= set(found)
    assert any(instance["alive"] for instance in found["echo"]["instances"])


async def test_a_service_registers_its_event_schemas_and_graph(deployment):
    async with deployment.client() as client:
        echo = {service["name"]: service for service in await client.list_services()}["echo"]
    assert echo["start_schema"]["title"] == "StartEvent"
    assert echo["stop_schema"]["title"] == "StopEvent"
    assert {"StartEvent", "StopEvent"} <= {s["title"] for s in echo["event_schemas"]}
    assert {n["id"] for n in echo["graph"]["nodes"] if n["node_type"] == "step"} == {"echo"}


def test_cli_publish_wait_prints_the_result(deployment):
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "publish", "echo", "--input", '{"from": "shell"}',
         "--wait", "--timeout", "30"],
        env=deployment.env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"echo": {"from": "shell"}}


def test_cli_publish_of_a_failing_task_exits_nonzero_with_the_error(deployment):
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "publish", "echo", "--input", '{"fail": "nope"}',
         "--wait", "--timeout", "30"],
        env=deployment.env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "EchoFailed: nope" in done.stderr


def test_cli_services_and_tasks_show_what_ran(deployment):
    def conveyor(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "conveyor", *args], env=deployment.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "echo" in conveyor("services")
    assert "completed" in conveyor("tasks", "list", "--service", "echo")


async def test_many_tasks_in_flight_all_complete(deployment):
    async with deployment.client() as client:
        ids = [await client.run_nowait("echo", n=n) for n in range(100)]
        outcomes = await asyncio.gather(*(client.wait(i, timeout=60) for i in ids))
    assert [o.result for o in outcomes] == [{"echo": {"n": n}} for n in range(100)]


async def test_parts_run_under_faststream_run_too(broker_url, tmp_path):
    from .deployment import Deployment

    deployment = Deployment(broker_url, tmp_path)
    deployment.via_faststream = True
    deployment.overrides = {"CONVEYOR_LOG_FORMAT": "json"}  # configured as `conveyor` does
    parts = ("control-plane", "orchestrator", "echo")
    deployment.start(*parts)
    try:
        await deployment.ready("echo")
        async with deployment.client() as client:
            assert await client.run("echo", timeout=30, via="faststream") == {
                "echo": {"via": "faststream"}
            }
    finally:
        deployment.stop()
    for part in parts:  # every line JSON, FastStream's own "started" line too
        records = deployment.records(part)
        assert any("started" in r["message"] for r in records), f"{part}: {records}"
