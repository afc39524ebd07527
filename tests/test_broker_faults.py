"""The real RabbitMQ stopped and started, and its connections dropped, under load; and
stopped for longer than the heartbeat timeout while tasks run.

RabbitMQ is restarted with `rabbitmqctl stop_app` / `start_app` (the node stays up, every
connection drops and the queues recover from disk), so these tests need rabbitmqctl and
run alone on the broker: nothing else may be using it while it restarts.
"""

import asyncio
import sqlite3
import subprocess
import time
from datetime import UTC, datetime

import pytest

from conveyor import Client, PublishFailed
from conveyor.services.settings import load

from .deployment import Deployment, eventually, noted, records_once_completed
from .test_health import healthy


def rabbitmqctl(*args: str) -> str:
    """What the command printed."""
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


@pytest.fixture
def rabbit_deployment(rabbit_url, tmp_path):
    deployment = Deployment(rabbit_url, tmp_path)
    # Longer than RabbitMQ takes to restart: the worker keeps its task through the outage.
    deployment.overrides = {"CONVEYOR_HEARTBEAT_TIMEOUT": "30"}
    deployment.start("control-plane", "orchestrator", "echo", "stepper")
    yield deployment
    deployment.stop()


async def restart_rabbitmq(deployment: Deployment, client: Client) -> str:
    """Stop RabbitMQ for a few seconds; a task started meanwhile waits for it, or fails
    loudly when its publish timeout is shorter than the outage. Returns that task's id."""
    impatient = Client(settings=load(broker_url=deployment.broker_url,
                                     namespace=deployment.namespace, publish_timeout=2))
    await impatient.start()
    try:
        rabbitmqctl("stop_app")
        print("injected: RabbitMQ stopped (stop_app), started again (start_app) 4 s later")
        during = asyncio.ensure_future(client.run_nowait("echo", n=300))
        with pytest.raises(PublishFailed) as refused:
            await impatient.run_nowait("echo", n=-1)
        print(f"found: with a 2 s publish timeout, {refused.value}")
        await asyncio.sleep(2)
        assert not during.done()  # still trying: it is sent once RabbitMQ is back
    finally:
        rabbitmqctl("start_app")
        await impatient.close()
    return await during


async def drop_connections(deployment: Deployment, client: Client) -> str:
    rabbitmqctl("close_all_connections", "dropped by a test")
    print("injected: every connection to RabbitMQ closed (close_all_connections)")
    return await client.run_nowait("echo", n=300)


@pytest.mark.parametrize("fault", [restart_rabbitmq, drop_connections])
async def test_rabbitmq_going_away_under_load_loses_nothing(rabbit_deployment, tmp_path, fault):
    deployment = rabbit_deployment
    await deployment.ready("echo", "stepper")
    log = tmp_path / "steps.log"
    async with deployment.client() as client:
        long = await client.run_nowait("stepper", log=str(log), seconds=8)
        ids = [await client.run_nowait("echo", n=n) for n in range(300)]
        waits = [asyncio.ensure_future(client.wait(i, timeout=180)) for i in [long, *ids]]
        await eventually(lambda: noted(log, "two"), timeout=60)

        async def some_in() -> bool:
            return sum(w.done() for w in waits) >= 30

        await eventually(some_in, timeout=60)  # the fault comes while outcomes flow
        print(f"{sum(w.done() for w in waits)} of {len(waits)} outcomes in, "
              "a three-step task in step two")
        late = await fault(deployment, client)
        waits.append(asyncio.ensure_future(client.wait(late, timeout=120)))
        await asyncio.wait(waits, timeout=120)
        lost = [t for t, w in zip([long, *ids, late], waits, strict=True) if not w.done()]
        if lost:
            print(f"found: {len(lost)} outcomes never came, e.g.", await client.get_task(lost[0]))
        outcomes = [w.result() for w in waits]
        recorded = await records_once_completed(client, None, [long, *ids, late])
    steps = log.read_text().split()
    print(f"found: {sum(o.status == 'completed' for o in outcomes)} of {len(outcomes)} "
          f"completed; steps run {steps}")
    assert outcomes[0].result == {"blob": 0}
    assert steps == ["one", "two", "three"]  # the running step went on through the outage
    assert [o.result for o in outcomes[1:]] == [{"echo": {"n": n}} for n in range(301)]
    assert all(recorded.get(i, {}).get("status") == "completed" for i in [long, *ids, late])
    assert all(recorded[i]["attempts"] == 1 for i in [long, *ids, late])


async def test_a_part_is_unhealthy_while_rabbitmq_is_away_and_healthy_once_it_is_back(
    rabbit_url, tmp_path,
):
    deployment = Deployment(rabbit_url, tmp_path)
    health_file = tmp_path / "echo.healthy"
    deployment.overrides = {"CONVEYOR_HEALTH_FILE": str(health_file),
                            "CONVEYOR_HEARTBEAT_INTERVAL": "0.5"}
    deployment.start("echo")

    async def check(expected: bool) -> bool:
        return await asyncio.to_thread(healthy, health_file) == expected

    try:
        await eventually(lambda: check(True), timeout=60)
        rabbitmqctl("stop_app")
        print("injected: RabbitMQ stopped (stop_app) until the echo service reads unhealthy")
        try:
            # The healthcheck wants the file touched within 10 s; a part touches it only
            # while its broker answers a ping.
            await eventually(lambda: check(False), timeout=30)
        finally:
            rabbitmqctl("start_app")
        await eventually(lambda: check(True), timeout=60)
        print("found: unhealthy while RabbitMQ was away, healthy again once it was back")
        assert deployment.processes["echo"].poll() is None  # it waited, it did not exit
    finally:
        deployment.stop()


def lease_age(state_db, task_id: str) -> float | None:
    """Seconds since the worker holding the task last renewed its lease, read off the state
    store (SQLite lets a reader in beside its writer)."""
    with sqlite3.connect(state_db) as db:
        row = db.execute("SELECT heartbeat_at FROM dispatches WHERE task_id = ?",
                         (task_id,)).fetchone()
    if row is None or row[0] is None:
        return None
    renewed = datetime.fromisoformat(row[0]).replace(tzinfo=UTC)
    return (datetime.now(UTC) - renewed).total_seconds()


async def test_rabbitmq_away_longer_than_the_heartbeat_timeout_reruns_no_running_task(
    rabbit_url, tmp_path,
):
    """Workers keep renewing their leases in the state store while RabbitMQ is away (the
    store is still there), and one that ends a task meanwhile waits to report it without
    holding SQLite's write lock, which every lease renewal needs: the tasks that run through
    an outage longer than the heartbeat timeout run once, on their worker."""
    deployment = Deployment(rabbit_url, tmp_path)
    deployment.overrides = {"CONVEYOR_HEARTBEAT_TIMEOUT": "3",
                            "CONVEYOR_HEARTBEAT_INTERVAL": "0.5"}
    deployment.start("control-plane", "orchestrator", "stepper", "flaky")
    steps, runs = tmp_path / "steps.log", tmp_path / "runs.log"
    try:
        await deployment.ready("stepper", "flaky")
        async with deployment.client() as client:
            long = await client.run_nowait("stepper", log=str(steps), seconds=12)
            await eventually(lambda: noted(steps, "two"), timeout=60)
            ends_meanwhile = await client.run_nowait("flaky", log=str(runs), hang=3)
            await eventually(lambda: noted(runs, "run"), timeout=60)
            ages = []
            rabbitmqctl("stop_app")
            print("injected: RabbitMQ stopped for 8 s while one task runs and another ends")
            try:
                until = time.monotonic() + 8
                while time.monotonic() < until:
                    ages.append(lease_age(tmp_path / "state.db", long))
                    await asyncio.sleep(0.25)
            finally:
                rabbitmqctl("start_app")
            outcomes = [await client.wait(t, timeout=120) for t in (long, ends_meanwhile)]
            recorded = await records_once_completed(client, None, [long, ends_meanwhile])
        print(f"found: the running task's lease at most {max(ages):.1f} s old during the "
              f"outage; attempts {[recorded[t]['attempts'] for t in (long, ends_meanwhile)]}; "
              f"steps run {steps.read_text().split()}")
        assert max(ages) < 3  # renewed all along: the orchestrator never found it expired
        assert [o.status for o in outcomes] == ["completed", "completed"]
        assert steps.read_text().split() == ["one", "two", "three"]
        assert runs.read_text().split() == ["run"]
        assert [recorded[t]["attempts"] for t in (long, ends_meanwhile)] == [1, 1]
    finally:
        deployment.stop()
