"""Real processes killed for real: what was acknowledged is never lost."""

import asyncio
import contextlib
import os
import signal
import time
from datetime import UTC, datetime

import pytest

from conveyor.contracts import DispatchTask, DispatchTaskMessage, NewTask, service_topic
from conveyor.services import database
from conveyor.services.bus import publish
from conveyor.services.orchestrator.state import first_dispatch

from .deployment import Deployment, eventually, noted, records_once_completed, registered
from .otlp_receiver import Receiver, spans_of_logged_traces, traced, untagged


@pytest.mark.parametrize("part", ["control-plane", "orchestrator"])
async def test_kill9_of_a_core_part_mid_load_loses_nothing(fresh_deployment, part):
    deployment = fresh_deployment
    deployment.start("control-plane", "orchestrator", "echo")
    await deployment.ready("echo")
    async with deployment.client() as client:
        ids = [await client.run_nowait("echo", n=n) for n in range(200)]
        waits = [asyncio.ensure_future(client.wait(i, timeout=120)) for i in ids]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        deployment.kill(part)
        print(f"injected: kill -9 of the {part} after {len(done)} of 200 outcomes")
        await asyncio.sleep(1.0)
        deployment.start(part)
        outcomes = await asyncio.gather(*waits)
        recorded = await records_once_completed(client, "echo", ids)
    print(f"found: {sum(o.status == 'completed' for o in outcomes)} outcomes completed, "
          f"{sum(r['status'] == 'completed' for r in recorded.values())} records completed")
    assert [o.result for o in outcomes] == [{"echo": {"n": n}} for n in range(200)]
    assert all(recorded.get(i, {}).get("status") == "completed" for i in ids)


async def test_kill9_of_a_worker_mid_task_resumes_it_from_its_checkpoint(fresh_deployment,
                                                                         tmp_path):
    deployment = fresh_deployment
    deployment.start("control-plane", "orchestrator", "stepper")
    await deployment.ready("stepper")
    log = tmp_path / "steps.log"
    async with deployment.client() as client:
        # 1.5 MB of Context state: more than a broker message may hold, checkpointed anyway.
        task_id = await client.run_nowait("stepper", log=str(log), seconds=3, blob=1_500_000)
        await eventually(lambda: noted(log, "two"), timeout=60)
        # Step one's checkpoint is written while step two runs: a kill before it is durable
        # would run step one again (each step runs at least once), so wait for it.
        await eventually(lambda: client.checkpoint(task_id), timeout=30)
        deployment.kill("stepper")
        print("injected: kill -9 of the stepper service during step two of three")
        deployment.start("stepper")
        result = await client.result(task_id, timeout=120)
        events = [item.index async for item in client.stream(task_id)]
        record = await client.get_task(task_id)
    steps = log.read_text().split()
    print(f"found: steps run {steps}, result {result}, events {events}, "
          f"attempt {record['attempts']}")
    assert result == {"blob": 1_500_000}
    assert steps == ["one", "two", "two", "three"]  # step one was not run again
    assert events == [0, 1]
    assert record["status"] == "completed"


async def test_a_silent_worker_loses_its_task_to_another_replica_and_its_late_reports_are_rejected(
    fresh_deployment, tmp_path,
):
    deployment = fresh_deployment
    log = tmp_path / "steps.log"
    async with two_steppers(deployment) as client:
        task_id, pid = await in_step_two(client, log, seconds=10)
        os.kill(pid, signal.SIGSTOP)
        print(f"injected: SIGSTOP of the stepper replica {pid} during step two")
        try:
            result = await client.result(task_id, timeout=120)
        finally:
            os.kill(pid, signal.SIGCONT)
        record = await client.get_task(task_id)

        async def rejected() -> dict | None:
            found = await client.counters()
            return found if found.get("stale_attempts_rejected") else None

        counted = await eventually(rejected, timeout=30)
    steps = log.read_text().split()
    print(f"found: result {result} from attempt {record['attempts']}, steps run {steps}, "
          f"counters {counted}")
    assert result == {"blob": 0}
    assert record["attempts"] == 2
    assert counted["tasks_recovered"] >= 1
    # Attempt 2 resumed after step one. The late attempt may finish the step it was in (and
    # the next, which it starts before its checkpoint is refused): its reports count for
    # nothing.
    assert steps.count("one") == 1 and steps[:3] == ["one", "two", "two"]


async def test_kill9_of_the_replica_holding_a_task_moves_it_to_the_other_within_its_lease(
    fresh_deployment, tmp_path,
):
    """The next attempt reaches the surviving replica once the dead one's lease has run out.
    On Kafka it used to go, by the task's key, to a partition the dead replica read, and wait
    there until the consumer group moved that partition (the 6 s session timeout and about
    5 s more); a copy now goes to every partition, and the attempt still runs once."""
    await kill9_the_holder_and_see_it_resume(fresh_deployment, tmp_path / "steps.log")


async def test_a_late_dispatch_of_a_replaced_attempt_amid_copies_of_the_next_runs_it_once(
    fresh_deployment, tmp_path,
):
    """The orchestrator's sweep has moved a task on to attempt 2 and sent its dispatch (to
    every partition, on Kafka). A replica gets a copy of it, then attempt 1's own dispatch,
    come late, then another copy of attempt 2's, all at once: attempt 2 runs once. (No
    orchestrator runs: the test records attempt 2 as the sweep does, and sends the three.)"""
    deployment = fresh_deployment
    deployment.start("control-plane", "work")
    runs = tmp_path / "runs.log"
    async with deployment.client() as client:
        await eventually(lambda: registered(client, "work"), timeout=60)
        task_id = await client.run_nowait("work", n=7, seconds=1, log=str(runs))
        task = NewTask(task_id=task_id, service="work",
                       input={"n": 7, "seconds": 1, "log": str(runs)})
        engine = await database.connect(deployment.env["CONVEYOR_STATE_URL"],
                                        deployment.namespace)
        async with engine.begin() as conn:
            row = first_dispatch(task_id, "work", None, None, task.model_dump(mode="json"), None)
            await conn.execute(database.dispatches.insert(), {**row, "attempt": 2})
        await engine.dispose()
        to = service_topic(deployment.namespace, "work")
        for attempt in (2, 1, 2):
            await publish(client._broker, client.settings, DispatchTaskMessage(
                type="work", publisher_id="sweep", data=DispatchTask(task=task, attempt=attempt)),
                to, key=task_id)
        print("injected: dispatches of attempts 2, 1 and 2 of one task, back to back")
        outcome = await client.wait(task_id, timeout=60)
        await asyncio.sleep(2)  # a second run of it would have ended by now
    ran = runs.read_text().splitlines()
    print(f"found: {outcome.status}, run {len(ran)} times")
    assert outcome.status == "completed" and outcome.result["n"] == 7
    assert len(ran) == 1


async def test_on_kafka_recovery_survives_a_topic_with_fewer_partitions_than_configured(
    kafka_url, tmp_path,
):
    """The orchestrator believes in 8 partitions; the service's topic was made with 4 by its
    replicas: the copies for the missing ones are refused, and the task resumes anyway."""
    deployment = Deployment(kafka_url, tmp_path)
    try:
        await kill9_the_holder_and_see_it_resume(
            deployment, tmp_path / "steps.log", orchestrator={"CONVEYOR_KAFKA_PARTITIONS": "8"})
    finally:
        deployment.stop()


async def kill9_the_holder_and_see_it_resume(deployment, log, **options) -> None:
    async with two_steppers(deployment, CONVEYOR_HEARTBEAT_INTERVAL="0.5", **options) as client:
        task_id, pid = await in_step_two(client, log, seconds=30)
        holder = next(part for part, p in deployment.processes.items() if p.pid == pid)
        deployment.kill(holder)
        killed = time.monotonic()
        print(f"injected: kill -9 of {holder} (pid {pid}) during step two")

        async def step_two_again() -> bool:
            return log.read_text().split().count("two") == 2  # noqa: ASYNC240

        await eventually(step_two_again, timeout=60)
        resumed_after = time.monotonic() - killed
        await client.cancel(task_id)
    await asyncio.sleep(1.0)  # a second run of the attempt would note its step by now
    steps = log.read_text().split()
    print(f"found: step two again {resumed_after:.1f} s after the kill, steps noted {steps}")
    assert steps == ["one", "two", "two"]  # resumed from its checkpoint, once
    # The lease (3 s) and a sweep (0.5 s) bound it; Kafka's group would have taken 11 s.
    assert resumed_after < 8


async def test_a_silent_worker_that_wakes_leaves_its_session_state_alone(fresh_deployment,
                                                                        tmp_path):
    """Its attempt was replaced, and the session's next task has run meanwhile: when the
    late attempt ends, it must not roll the session's state back to what it counted."""
    deployment = fresh_deployment
    deployment.overrides = {"CONVEYOR_HEARTBEAT_TIMEOUT": "3",
                            "CONVEYOR_MAX_CONCURRENT_TASKS": "1"}
    deployment.start("control-plane", "orchestrator", "slow_counter", "slow_counter-b")
    await deployment.ready("slow_counter")
    log = tmp_path / "counts.log"
    async with deployment.client() as client:
        await eventually(lambda: both_alive(client, "slow_counter"), timeout=60)
        session_id = (await client.create_session())["session_id"]
        first = await client.run_nowait("slow_counter", session_id=session_id, log=str(log),
                                        seconds=8)
        await eventually(lambda: noted(log, "count-1"), timeout=60)
        counting = datetime.now(UTC)
        pid = await eventually(lambda: busy_replica(client, "slow_counter", counting),
                               timeout=30)
        os.kill(pid, signal.SIGSTOP)
        try:
            counted = [await client.result(first, timeout=60),
                       await client.run("slow_counter", session_id=session_id, log=str(log),
                                        timeout=60)]
        finally:
            os.kill(pid, signal.SIGCONT)
        print(f"injected: SIGSTOP of replica {pid} in the session's first task, SIGCONT "
              f"once the session's second task had run")

        async def rejected() -> bool:
            return bool((await client.counters()).get("stale_attempts_rejected"))

        await eventually(rejected, timeout=30)  # the woken attempt has reported, for nothing
        counted.append(await client.run("slow_counter", session_id=session_id, log=str(log),
                                        timeout=60))
        state = await client.session_state(session_id)
    print(f"found: counts {counted}, session state {state}")
    assert counted == [1, 2, 3]
    assert state == {"count": 3}


@contextlib.asynccontextmanager
async def two_steppers(deployment, orchestrator: dict[str, str] | None = None,
                       **overrides: str):
    """Two replicas of the stepper, one task at a time each, leases of 3 s; a client.
    `orchestrator`: settings for the orchestrator alone (started after the replicas)."""
    deployment.overrides = {"CONVEYOR_HEARTBEAT_TIMEOUT": "3",
                            "CONVEYOR_MAX_CONCURRENT_TASKS": "1", **overrides}
    deployment.start("control-plane", "stepper", "stepper-b")
    deployment.overrides = {**deployment.overrides, **(orchestrator or {})}
    deployment.start("orchestrator")
    await deployment.ready("stepper")
    async with deployment.client() as client:
        # Both replicas listed first, so that finding the one holding the task is quick.
        await eventually(lambda: both_alive(client), timeout=60)
        yield client


async def in_step_two(client, log, seconds: float) -> tuple[str, int]:
    """Start a stepper task; once it is in step two with step one checkpointed: its id and
    the pid of the replica running it."""
    task_id = await client.run_nowait("stepper", log=str(log), seconds=seconds)
    await eventually(lambda: noted(log, "two"), timeout=60)
    stepping = datetime.now(UTC)
    pid = await eventually(lambda: busy_replica(client, "stepper", stepping), timeout=30)
    await eventually(lambda: client.checkpoint(task_id), timeout=30)
    return task_id, pid


async def busy_replica(client, service: str, since: datetime) -> int | None:
    """The pid of the replica of `service` that reports a task running in a heartbeat sent
    after `since` (the registry is read by its own consumer group: it may lag the task a
    little). One sent before may still show the other replica running the task that checked
    the deployment was ready: a test that stopped that idle replica saw the next task
    delivered to it, and waited for it in vain."""
    found = {s["name"]: s for s in await client.list_services()}.get(service)
    busy = [i["pid"] for i in (found or {}).get("instances", []) if i["alive"] and i["running"]
            and datetime.fromisoformat(i["last_heartbeat"]) > since]
    return busy[0] if busy else None


async def both_alive(client, service: str = "stepper") -> bool:
    found = {s["name"]: s for s in await client.list_services()}.get(service)
    return bool(found) and sum(i["alive"] for i in found["instances"]) == 2


async def sigterm_the_holder(deployment, client, task_id: str, log, grace: str,
                             ) -> tuple[float, float]:
    """SIGTERM the replica running the task once it is in step two; when (monotonic), and
    seconds it took to exit."""
    await eventually(lambda: both_alive(client), timeout=60)
    await eventually(lambda: noted(log, "two"), timeout=60)
    in_step_two = datetime.now(UTC)
    await eventually(lambda: client.checkpoint(task_id), timeout=30)
    pids = {p.pid: part for part, p in deployment.processes.items()}

    async def holder() -> str | None:
        # Only heartbeats sent during step two count: one sent before may still show the
        # other replica running the task that checked the deployment was ready.
        found = {s["name"]: s for s in await client.list_services()}["stepper"]
        busy = [pids[i["pid"]] for i in found["instances"] if i["alive"] and i["running"]
                and datetime.fromisoformat(i["last_heartbeat"]) > in_step_two]
        return busy[0] if busy else None

    part = await eventually(holder, timeout=30)
    started = time.monotonic()
    # It may take its whole grace period (and then some) to exit.
    await asyncio.to_thread(deployment.stop_part, part, float(grace) + 15)
    print(f"injected: SIGTERM of the stepper replica {part!r} during step two")
    return started, time.monotonic() - started


async def second_start(log, step: str) -> float | None:
    """When (monotonic) `step` is found in the log a second time, else None."""
    # A tiny file another process writes: nothing to wait on but the file itself.
    return time.monotonic() if log.read_text().split().count(step) == 2 else None  # noqa: ASYNC240


@pytest.mark.parametrize(("grace", "seconds", "steps"), [
    # Step two lasts long enough for the test to find the replica holding the task.
    ("30", 15, ["one", "two", "three"]),  # it finishes within the grace period
    ("1", 20, ["one", "two", "two", "three"]),  # handed back, resumed on the other replica
], ids=["finishes", "hands-back"])
async def test_a_replica_stopped_with_sigterm_finishes_or_hands_back_its_task(
    fresh_deployment, tmp_path, grace, seconds, steps,
):
    deployment = fresh_deployment
    parts = ("control-plane", "orchestrator", "stepper", "stepper-b")
    with Receiver() as receiver:  # traced, so that its log lines can name the task's trace
        deployment.overrides = {**traced(receiver), "CONVEYOR_GRACE_PERIOD": grace,
                                "CONVEYOR_MAX_CONCURRENT_TASKS": "1"}
        deployment.start(*parts)
        await deployment.ready("stepper")
        log = tmp_path / "steps.log"
        async with deployment.client() as client:
            task_id = await client.run_nowait("stepper", log=str(log), seconds=seconds)
            stopped, took = await sigterm_the_holder(deployment, client, task_id, log, grace)
            # Handed back, step two starts again on the other replica (on Kafka the dispatch
            # goes to every partition: on the stopping replica's it would wait for the group).
            again = await eventually(lambda: second_start(log, "two"), timeout=60) if (
                steps.count("two") == 2) else None
            result = await client.result(task_id, timeout=120)
            record = await client.get_task(task_id)
        await spans_of_logged_traces(deployment, receiver.spans, parts, task_id)
    resumed = f"; step two again {again - stopped:.1f} s after the SIGTERM" if again else ""
    print(f"found: the replica exited in {took:.1f} s; steps run {log.read_text().split()}, "
          f"attempt {record['attempts']}{resumed}")
    assert result == {"blob": 0}
    assert log.read_text().split() == steps
    assert took < float(grace) + 10
    if again:
        assert again - stopped < float(grace) + 3
    # The stopping replica's lines about the task (handed back or not) name it and its trace.
    assert not untagged(deployment, receiver.spans, task_id, *parts)
    handed_back = [r for r in deployment.lines_about(task_id, *parts) if "stopping" in r["message"]]
    # Only a replica that hands the task back says so (step two then runs again elsewhere).
    assert bool(handed_back) == (steps.count("two") == 2)
