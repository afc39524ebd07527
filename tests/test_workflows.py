"""Workflows as llama_deploy promised them, on both brokers: streaming, human-in-the-loop,
sessions. Real processes, real brokers, real llama-index-workflows workflows."""

import asyncio
import json
import subprocess
import uuid

import pytest
from workflows.events import HumanResponseEvent

from conveyor import QueryFailed, TaskCancelled, TaskFailed

from .deployment import Deployment, eventually, registered, serving
from .test_other_systems import new_task, raw_publisher

SERVICES = ("echo", "counter", "greeter", "outer")


@pytest.fixture(scope="module")
def workflows_deployment(broker_url, tmp_path_factory):
    with serving(Deployment(broker_url, tmp_path_factory.mktemp("workflows")),
                 *SERVICES) as deployment:
        yield deployment


def new_id() -> str:
    return uuid.uuid4().hex


# Streaming


async def test_streamed_events_arrive_in_order_with_gap_free_indexes(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("echo", events=5)
        seen = [item async for item in client.stream(task_id)]
        assert [item.index for item in seen] == [0, 1, 2, 3, 4]
        assert [item.event.value["step"] for item in seen] == [1, 2, 3, 4, 5]
        first = seen[0].event
        assert first.type == "Progress"
        assert first.qualified_name == "conveyor.services.examples.echo.Progress"
        assert "Event" in first.types
        assert (await client.result(task_id))["echo"]["events"] == 5


async def test_a_late_reader_gets_everything_after_the_index_it_names(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("echo", events=6)
        await client.result(task_id)
    async with workflows_deployment.client() as late:
        tail = [item async for item in late.stream(task_id, after=3)]
        assert [item.index for item in tail] == [4, 5]
        assert [item.event.value["step"] for item in tail] == [5, 6]


async def test_a_reader_that_joins_mid_run_sees_the_replay_then_the_live_events(
    workflows_deployment,
):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("echo", events=8, pause=0.15)
        stream = client.stream(task_id)
        first = await anext(stream)
        await stream.aclose()
        assert first.index == 0
        await asyncio.sleep(0.5)
        async with workflows_deployment.client() as other:
            rest = [item.index async for item in other.stream(task_id, after=first.index)]
        assert rest == [1, 2, 3, 4, 5, 6, 7]


async def test_streaming_an_unknown_task_says_so(workflows_deployment):
    async with workflows_deployment.client() as client:
        with pytest.raises(QueryFailed, match="no task"):
            [item async for item in client.stream("no-such-task")]


async def test_a_raw_new_task_with_stream_gets_its_events_on_reply_to_before_the_outcome(
    workflows_deployment,
):
    reply_to = f"{workflows_deployment.namespace}.replies.{new_id()[:8]}"
    task_id = new_id()
    async with raw_publisher(workflows_deployment, reply_to) as (send, received):
        body = json.loads(new_task("echo", reply_to, task_id=task_id, events=3))
        body["data"]["stream"] = True
        await send(json.dumps(body).encode())
        arrived = await until_outcome(received)
    assert [m["action"] for m in arrived] == ["task_stream"] * 3 + ["completed_task"]
    assert [m["data"]["index"] for m in arrived[:3]] == [0, 1, 2]
    assert [m["data"]["event"]["value"]["step"] for m in arrived[:3]] == [1, 2, 3]
    assert {m["data"]["task_id"] for m in arrived} == {task_id}
    assert arrived[3]["data"]["result"] == {"echo": {"events": 3}}


async def test_a_raw_send_event_answers_a_waiting_task(workflows_deployment):
    reply_to = f"{workflows_deployment.namespace}.replies.{new_id()[:8]}"
    task_id = new_id()
    async with raw_publisher(workflows_deployment, reply_to) as (send, received):
        body = json.loads(new_task("greeter", reply_to, task_id=task_id))
        body["data"]["stream"] = True
        await send(json.dumps(body).encode())
        question = await asyncio.wait_for(received.get(), 30)
        assert question["data"]["event"]["type"] == "InputRequiredEvent"
        answer = {"id": new_id(), "type": "control_plane", "action": "send_event",
                  "publisher_id": "ui",
                  "data": {"task_id": task_id, "reply_to": reply_to,
                           "event": {"type": "HumanResponseEvent",
                                     "value": {"response": "Ed"}}}}
        await send(json.dumps(answer).encode())
        arrived = await until_outcome(received)
    assert arrived[0]["action"] == "query_result"
    assert arrived[0]["data"]["request_id"] == answer["id"]
    assert arrived[0]["data"]["result"] == {"task_id": task_id, "seq": 1}
    assert arrived[-1]["data"]["result"] == "hello, Ed"


async def until_outcome(received: asyncio.Queue, timeout: float = 30) -> list[dict]:
    """Everything that arrives on a reply topic, up to and including a completed_task."""
    arrived = []
    async with asyncio.timeout(timeout):
        while not arrived or arrived[-1]["action"] != "completed_task":
            arrived.append(await received.get())
    return arrived


# Sessions


async def test_tasks_of_one_session_share_state_and_a_new_session_starts_fresh(
    workflows_deployment,
):
    async with workflows_deployment.client() as client:
        session = await client.create_session()
        first = await client.run("counter", session_id=session["session_id"])
        second = await client.run("counter", session_id=session["session_id"])
        other = await client.run("counter", session_id=new_id())
        assert (first, second, other) == (1, 2, 1)


async def test_tasks_started_together_in_one_session_run_one_after_another(
    workflows_deployment,
):
    async with workflows_deployment.client() as client:
        session_id = (await client.create_session())["session_id"]
        # Published at once; each starts from the state the one before it left (in the order
        # published on RabbitMQ; on Kafka, tasks on different partitions may swap places).
        ids = [await client.run_nowait("counter", session_id=session_id) for _ in range(5)]
        results = [await client.result(task_id, timeout=60) for task_id in ids]
        assert sorted(results) == [1, 2, 3, 4, 5]
        if workflows_deployment.broker_url.startswith("amqp"):
            assert results == [1, 2, 3, 4, 5]
        assert await client.session_state(session_id) == {"count": 5}


async def test_session_state_is_readable_and_writable_from_the_client(workflows_deployment):
    async with workflows_deployment.client() as client:
        session_id = (await client.create_session())["session_id"]
        await client.run("counter", session_id=session_id)
        assert await client.session_state(session_id) == {"count": 1}
        await client.set_session_state(session_id, {"count": 41, "note": "set by hand"})
        assert await client.run("counter", session_id=session_id) == 42
        assert await client.session_state(session_id) == {"count": 42, "note": "set by hand"}


async def test_sessions_are_listed_and_deleted(workflows_deployment):
    async with workflows_deployment.client() as client:
        made = (await client.create_session())["session_id"]
        assert made in [s["session_id"] for s in await client.list_sessions()]
        assert await client.delete_session(made) is True
        assert await client.get_session(made) is None
        assert await client.delete_session(made) is False


# Human in the loop


async def test_a_waiting_workflow_receives_the_answer_sent_by_the_client(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("greeter", greeting="hi")
        async for item in client.stream(task_id):
            assert item.event.type == "InputRequiredEvent"
            assert item.event.value["_data"]["prefix"] == "What is your name?"
            await client.send_event(task_id, HumanResponseEvent(response="Ada"))
        assert await client.result(task_id, timeout=30) == "hi, Ada"


async def test_an_answer_sent_before_the_question_is_kept_until_the_workflow_waits(
    workflows_deployment,
):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("greeter")
        # Sent at once, possibly before the step waits: held, then delivered when it does.
        while True:
            try:
                await client.send_event(task_id, HumanResponseEvent(response="Bo"))
                break
            except QueryFailed as exc:
                assert "no task" in str(exc)  # not recorded yet
                await asyncio.sleep(0.05)
        assert await client.result(task_id, timeout=30) == "hello, Bo"


async def test_tasks_waiting_together_on_one_replica_are_each_shown_running(
    workflows_deployment,
):
    # The replica's heartbeats name every task it holds: the control plane marks each one
    # running, and the registry counts them (a heartbeat naming two once failed there).
    async with workflows_deployment.client() as client:
        ids = [await client.run_nowait("greeter", greeting=f"hi {n}") for n in range(3)]

        async def all_running() -> bool:
            statuses = [(await client.get_task(task_id))["status"] for task_id in ids]
            return statuses == ["running"] * len(ids)

        async def holding() -> list[int]:
            found = {s["name"]: s for s in await client.list_services()}["greeter"]
            return [i["running"] for i in found["instances"] if i["alive"]]

        try:
            await eventually(all_running)
            assert await eventually(holding) == [3]
        finally:
            for task_id in ids:
                await client.send_event(task_id, HumanResponseEvent(response="Cy"))
        assert [await client.result(task_id, timeout=30) for task_id in ids] == \
            [f"hi {n}, Cy" for n in range(3)]


async def test_an_event_sent_while_no_instance_holds_the_task_is_kept_until_one_does(
    fresh_deployment,
):
    deployment = fresh_deployment
    deployment.start("control-plane", "orchestrator", "greeter")
    await deployment.ready("greeter")
    deployment.stop_part("greeter")
    async with deployment.client() as client:
        task_id = await client.run_nowait("greeter")
        assert await client.send_event(task_id, HumanResponseEvent(response="Flo")) == 1
        deployment.start("greeter")
        assert await client.result(task_id, timeout=60) == "hello, Flo"


async def test_an_event_type_the_workflow_does_not_take_is_refused_and_it_keeps_waiting(
    workflows_deployment,
):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("greeter")
        stream = client.stream(task_id)
        await anext(stream)
        await stream.aclose()
        with pytest.raises(QueryFailed, match="not one that service 'greeter' accepts"):
            await client.send_event(task_id, {"type": "Bogus", "value": {"x": 1}})
        assert await client.status(task_id) in ("queued", "running")
        await client.send_event(task_id, {"type": "HumanResponseEvent",
                                          "value": {"response": "Cy"}})
        assert await client.result(task_id, timeout=30) == "hello, Cy"


# Nested workflows


async def test_an_outer_step_runs_the_inner_workflow_on_its_own_service(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("outer", message="hi")
        result = await client.result(task_id, timeout=30)
        assert result == {"outer": "done", "inner": {"echo": {"message": "hi"}}}

        async def completed_children() -> list[dict]:
            # The outer task had the inner outcome before the control plane stored it.
            inner = await client.list_tasks(service="echo", limit=1000)
            return [t for t in inner
                    if t["parent_task_id"] == task_id and t["status"] == "completed"]

        children = await eventually(completed_children)
        assert len(children) == 1
        assert children[0]["status"] == "completed"
        assert children[0]["result"] == {"echo": {"message": "hi"}}


def test_on_rabbitmq_a_service_subscribes_to_its_replies_on_its_first_call_to_another(
    rabbit_url, tmp_path,
):
    def reply_queues(namespace: str) -> set[str]:
        listed = subprocess.run(["rabbitmqctl", "list_queues", "name", "-q",
                                 "--no-table-headers"], check=True, capture_output=True,
                                text=True, timeout=120).stdout.split()
        return {name for name in listed if name.startswith(f"{namespace}.reply.")}

    async def run(deployment: Deployment) -> tuple[set[str], set[str]]:
        await deployment.ready("echo")  # "outer" only registered: it has called nothing yet
        async with deployment.client() as client:
            await eventually(lambda: registered(client, "outer"), 90)
            before_a_call = reply_queues(deployment.namespace)  # the clients' of this test
            result = await client.run("outer", timeout=30, message="hi")
            assert result == {"outer": "done", "inner": {"echo": {"message": "hi"}}}
            return before_a_call, reply_queues(deployment.namespace)

    deployment = Deployment(rabbit_url, tmp_path)
    deployment.start("control-plane", "orchestrator", "echo", "outer")
    try:
        before_a_call, after = asyncio.run(run(deployment))
    finally:
        deployment.stop()
    assert len(after - before_a_call) == 1  # the outer service's, for the inner outcome


async def test_an_inner_failure_fails_the_outer_task_with_the_inner_error(workflows_deployment):
    async with workflows_deployment.client() as client:
        with pytest.raises(TaskFailed) as failed:
            await client.run("outer", fail="inner trouble", timeout=30)
        assert failed.value.error.type == "TaskFailed"
        assert "EchoFailed: inner trouble" in failed.value.error.message


# Cancelling


async def test_cancelling_a_running_task_stops_it_promptly(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("echo", events=100, pause=0.3)
        stream = client.stream(task_id)
        await anext(stream)  # it is running
        await stream.aclose()
        assert await client.cancel(task_id) is True
        with pytest.raises(TaskCancelled):
            await client.result(task_id, timeout=10)
        assert await client.cancel(task_id) is False  # it has ended already
        assert await stopped_streaming(client, task_id)


async def stopped_streaming(client, task_id: str) -> bool:
    """No event is stored for the task any more (it streamed one every 0.3 s)."""
    before = [item.index async for item in client.stream(task_id)]
    await asyncio.sleep(1.5)
    after = [item.index async for item in client.stream(task_id)]
    return after == before


async def test_cancelling_the_outer_task_cancels_the_inner_one(workflows_deployment):
    async with workflows_deployment.client() as client:
        task_id = await client.run_nowait("outer", events=100, pause=0.3)

        async def inner_task():
            found = [t for t in await client.list_tasks(service="echo", limit=1000)
                     if t["parent_task_id"] == task_id]
            return found[0]["task_id"] if found else None

        inner_id = await eventually(inner_task)
        assert await client.cancel(task_id) is True
        outcome = await client.wait(inner_id, timeout=15)
        assert outcome.status == "cancelled"
        assert task_id in outcome.error.message
        assert await stopped_streaming(client, inner_id)


async def test_a_cancelled_task_waiting_in_the_queue_never_starts(fresh_deployment, tmp_path):
    deployment = fresh_deployment
    deployment.start("control-plane", "orchestrator", "recorded")
    await deployment.ready("recorded")
    deployment.stop_part("recorded")  # its tasks now wait on the service's queue
    runs = tmp_path / "runs.log"
    async with deployment.client() as client:
        task_id = await client.run_nowait("recorded", log=str(runs), tag="cancelled")
        await eventually(lambda: client.status(task_id))
        assert await client.cancel(task_id) is True
        deployment.start("recorded")
        await client.run("recorded", log=str(runs), tag="after", timeout=60)
        assert (await client.wait(task_id)).status == "cancelled"
    assert runs.read_text() == "after\n"


# The same from the shell


def test_cli_publish_stream_prints_each_event_then_the_result(workflows_deployment):
    done = workflows_deployment.cli("publish", "echo", "--input", '{"events": 2}', "--stream",
                                    "--timeout", "30")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    events = [json.loads(line) for line in lines[:2]]
    assert [e["index"] for e in events] == [0, 1]
    assert [e["event"]["value"]["step"] for e in events] == [1, 2]
    assert json.loads("\n".join(lines[2:])) == {"echo": {"events": 2}}


async def test_cli_answers_cancels_and_replays_a_waiting_task(workflows_deployment):
    async with workflows_deployment.client() as client:
        asked = await client.run_nowait("greeter")
        stream = client.stream(asked)
        await anext(stream)
        await stream.aclose()
        done = await asyncio.to_thread(
            workflows_deployment.cli, "tasks", "send-event", asked, "HumanResponseEvent",
            "--value", '{"response": "Di"}')
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"sent as event 1 of task {asked}\n"
        assert await client.result(asked, timeout=30) == "hello, Di"

        waiting = await client.run_nowait("greeter")
        done = await asyncio.to_thread(workflows_deployment.cli, "tasks", "delete", waiting)
        assert done.returncode == 1
        assert "TaskNotEnded" in done.stderr and "cancel it" in done.stderr
        done = await asyncio.to_thread(workflows_deployment.cli, "tasks", "cancel", waiting)
        assert done.stdout == f"cancelled {waiting}\n"
        assert (await client.wait(waiting, timeout=10)).status == "cancelled"
        for action, answer in [("pause", "had ended or was paused already"),
                               ("resume", "was not paused")]:
            done = await asyncio.to_thread(workflows_deployment.cli, "tasks", action, waiting)
            assert done.stdout == f"{waiting} {answer}\n"
        done = await asyncio.to_thread(workflows_deployment.cli, "tasks", "delete", waiting)
        assert done.stdout == f"deleted {waiting}\n"
        assert await client.get_task(waiting) is None
        done = await asyncio.to_thread(workflows_deployment.cli, "tasks", "delete", waiting)
        assert (done.returncode, done.stderr) == (1, f"conveyor: no task {waiting!r}\n")

    done = await asyncio.to_thread(workflows_deployment.cli, "tasks", "events", asked)
    assert done.returncode == 0, done.stderr
    [question] = [json.loads(line) for line in done.stdout.splitlines()]
    assert question["event"]["type"] == "InputRequiredEvent"


def test_cli_send_event_to_an_unknown_task_fails_with_the_reason(workflows_deployment):
    done = workflows_deployment.cli("tasks", "send-event", "no-such-task", "Bogus")
    assert done.returncode == 1
    assert done.stderr.strip() == "conveyor: QueryFailed: EventRefused: no task 'no-such-task'"
