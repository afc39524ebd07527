"""A task's attempts, on both brokers: retries with backoff, timeouts, pause and resume, and
what a user inspects about a run (its errors, its metrics, pending work, its owner)."""

import asyncio
import uuid
from pathlib import Path

import pytest
from workflows.events import HumanResponseEvent

from conveyor import Client, TaskFailed

from .deployment import Deployment, eventually, noted, serving

RETRYING = {
    "CONVEYOR_MAX_RETRIES": "3",
    "CONVEYOR_RETRY_BACKOFF": "0.2",
    "CONVEYOR_NOT_RETRIED": "ValueError",
    "CONVEYOR_STEP_TIMEOUT": "2",
    "CONVEYOR_TTL_CANCELLED": "1",
    "CONVEYOR_CLEANUP_INTERVAL": "0.5",
}


@pytest.fixture(scope="module")
def attempts_deployment(broker_url, tmp_path_factory):
    deployment = Deployment(broker_url, tmp_path_factory.mktemp("attempts"), overrides=RETRYING)
    with serving(deployment, "flaky", "stepper", "greeter") as running:
        yield running


@pytest.fixture
def log(tmp_path) -> Path:
    return tmp_path / f"{uuid.uuid4().hex[:6]}.log"


async def test_a_failing_step_is_retried_until_it_passes_and_every_error_is_kept(
    attempts_deployment, log,
):
    async with attempts_deployment.client() as client:
        task_id = await client.run_nowait("flaky", log=str(log), failures=2)
        assert await client.result(task_id, timeout=60) == {"runs": 3}
        errors = await client.errors(task_id)
        metrics = await client.metrics(task_id)
    assert [(e["attempt"], e["type"], e["message"]) for e in errors] == [
        (1, "Flake", "failure 1"), (2, "Flake", "failure 2"),
    ]
    assert metrics["attempts"] == 3
    assert list(metrics["steps"]) == ["work"] and len(metrics["steps"]["work"]) == 1


async def test_retries_end_after_max_retries_and_the_error_says_why(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("flaky", log=str(log), failures=10, timeout=60)
        errors = await client.errors(failed.value.task_id)
    assert failed.value.error.type == "Flake"
    assert failed.value.error.message == "failure 4 (gave up after 4 attempts)"
    assert [e["attempt"] for e in errors] == [1, 2, 3, 4]


async def test_a_task_can_ask_for_no_retries(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("flaky", log=str(log), failures=1, max_retries=0, timeout=60)
    assert failed.value.error.message == "failure 1 (retries are off)"
    assert log.read_text().split() == ["run"]


async def test_an_exception_type_named_not_retried_fails_at_once(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("flaky", log=str(log), failures=1, raises="ValueError", timeout=60)
    assert failed.value.error.type == "ValueError"
    assert failed.value.error.message == "failure 1 (ValueError is not retried)"
    assert log.read_text().split() == ["run"]


async def test_a_step_over_the_step_timeout_ends_its_attempt(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("flaky", log=str(log), hang=30, max_retries=1, timeout=60)
    assert failed.value.error.type == "StepTimeout"
    assert "step 'work' ran longer than the step timeout of 2.0 s" in failed.value.error.message
    assert log.read_text().split() == ["run", "run"]  # retried once, then given up


async def test_an_attempt_over_its_task_timeout_ends(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("flaky", log=str(log), hang=30, max_retries=0,
                             attempt_timeout=0.5, timeout=60)
    assert failed.value.error.type == "TaskTimeout"


async def test_a_paused_task_lets_go_of_its_worker_and_resumes_from_its_checkpoint(
    attempts_deployment, log,
):
    async with attempts_deployment.client() as client:
        task_id = await client.run_nowait("stepper", log=str(log), seconds=1.5)
        await eventually(lambda: noted(log, "two"), timeout=30)
        await eventually(lambda: client.checkpoint(task_id), timeout=30)
        assert await client.pause(task_id) is True
        assert await client.pause(task_id) is False  # paused already
        await eventually(lambda: status_is(client, task_id, "paused"))
        assert (await client.pending_work())["stepper"] == {"paused": 1}
        await asyncio.sleep(2.5)  # step two would have ended by now, were it still running
        assert log.read_text().split() == ["one", "two"]
        assert await client.resume(task_id) is True
        assert await client.result(task_id, timeout=60) == {"blob": 0}
        assert await client.resume(task_id) is False  # it has ended
    assert log.read_text().split() == ["one", "two", "two", "three"]


async def test_an_event_sent_while_a_task_is_paused_is_delivered_when_it_resumes(
    attempts_deployment,
):
    async with attempts_deployment.client() as client:
        task_id = await client.run_nowait("greeter")
        stream = client.stream(task_id)
        await anext(stream)  # the question: it waits for an answer
        await stream.aclose()
        assert await client.pause(task_id) is True
        await eventually(lambda: status_is(client, task_id, "paused"))
        assert await client.send_event(task_id, HumanResponseEvent(response="Gus")) == 1
        await asyncio.sleep(1)
        assert await client.status(task_id) == "paused"  # kept, not delivered
        assert await client.resume(task_id) is True
        assert await client.result(task_id, timeout=60) == "hello, Gus"


async def test_a_finished_task_is_removed_after_the_ttl_of_its_status(attempts_deployment, log):
    async with attempts_deployment.client() as client:
        kept = await client.run_nowait("flaky", log=str(log))
        await client.result(kept, timeout=60)
        gone = await client.run_nowait("stepper", log=str(log), seconds=30)
        await eventually(lambda: noted(log, "two"), timeout=30)
        assert await client.cancel(gone) is True

        async def removed() -> bool:
            return await client.get_task(gone) is None

        await eventually(removed, timeout=30)  # cancelled tasks are kept 1 s here
        assert await client.checkpoint(gone) is None
        assert (await client.get_task(kept))["status"] == "completed"  # kept 7 days


async def test_tasks_are_listed_by_their_owner(attempts_deployment, log):
    owner = f"billing-{uuid.uuid4().hex[:6]}"
    async with Client(attempts_deployment.broker_url, attempts_deployment.namespace,
                      publisher_id=owner) as billing:
        mine = await billing.run_nowait("flaky", log=str(log))
        await billing.result(mine, timeout=60)
        listed = await billing.list_tasks(owner=owner)
    assert [t["task_id"] for t in listed] == [mine]
    assert listed[0]["publisher_id"] == owner


async def status_is(client, task_id: str, status: str) -> bool:
    return await client.status(task_id) == status
