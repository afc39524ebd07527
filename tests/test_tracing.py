"""One task, one trace: real processes export their spans to a real OTLP receiver, and
their JSON log lines name the task and its trace."""

import uuid

from .deployment import eventually, noted
from .otlp_receiver import Receiver, Span, spans_of_logged_traces, traced, untagged

PARTS = ("control-plane", "orchestrator", "echo", "outer", "flaky")


def ancestors(span: Span, spans: list[Span]) -> list[Span]:
    """The span's parent, its parent's parent, ... as far as the receiver has them."""
    by_id = {s.span_id: s for s in spans}
    found = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        found.append(span)
    return found


def processing(spans: list[Span], service: str, task_id: str) -> list[Span]:
    """The spans in which `service` processed a message about the task."""
    return [s for s in spans if s.service == service and s.attributes.get(
        "conveyor.task_id") == task_id and s.attributes.get("messaging.operation") == "process"]


async def test_a_nested_task_is_one_trace_across_every_process(fresh_deployment, tmp_path):
    deployment = fresh_deployment
    with Receiver() as receiver:
        deployment.overrides = {**traced(receiver), "CONVEYOR_MAX_RETRIES": "1",
                                "CONVEYOR_RETRY_BACKOFF": "0.1"}
        deployment.start(*PARTS)
        await deployment.ready("echo", "outer", "flaky")
        task_id = f"traced-{uuid.uuid4().hex[:8]}"
        done = deployment.cli("publish", "outer", "--input", '{"message": "hi"}',
                              "--task-id", task_id, "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        retried = f"retried-{uuid.uuid4().hex[:8]}"
        flaky_input = f'{{"failures": 1, "log": "{tmp_path / "runs.log"}"}}'
        done = deployment.cli("publish", "flaky", "--input", flaky_input, "--task-id", retried,
                              "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        # A task steered while it runs: an event its workflow cannot take, then a cancel,
        # both reaching its worker on the service's broadcast topic.
        steered, runs = f"steered-{uuid.uuid4().hex[:8]}", tmp_path / "steered.log"
        async with deployment.client() as client:
            await client.run_nowait("flaky", task_id=steered, log=str(runs), hang=60)
            await eventually(lambda: noted(runs, "run"), timeout=30)
            # Recorded by the control plane, which refuses events for a task it doesn't know.
            await eventually(lambda: status_is(client, steered, "running"), timeout=30)
            # A Progress event (sample_workflows) without its fields: it does not validate.
            await client.send_event(steered, {"type": "Progress", "value": {}})
            await client.cancel(steered)
            assert (await client.wait(steered, timeout=30)).status == "cancelled"
            # The control plane answers before the worker has taken the event and the
            # cancel off its broadcast topic: wait for the worker's word on both.
            await eventually(lambda: worker_steered(deployment, steered), timeout=30)
        spans = receiver.spans

        async def worker_spans_in() -> list[Span]:
            # The inner task's outcome is recorded last: wait for the control plane's span.
            inner = [s for s in spans if s.service == "echo" and s.attributes.get(
                "conveyor.task_id", task_id) != task_id]
            return inner and processing(spans, "control-plane", inner[0].attributes[
                "conveyor.task_id"])

        await eventually(worker_spans_in, timeout=30)
        await eventually(lambda: attempt_spans(spans, retried, 2), timeout=30)
        await spans_of_logged_traces(deployment, spans, PARTS, task_id, retried, steered)
    trace_ids = {s.trace_id for s in spans if s.attributes.get("conveyor.task_id") == task_id}
    print(f"found: {len(spans)} spans from {sorted({s.service for s in spans})}; "
          f"the task's in {len(trace_ids)} trace(s)")
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    mine = [s for s in spans if s.trace_id == trace_id]
    # FastStream opens a "<topic> create" span for each message sent (its "publish" span is
    # a child) and carries the create span's context: consumers are its children.
    (created,) = [s for s in mine if s.service == "client" and s.name.endswith(" create")]
    # The path: client -> orchestrator -> outer service -> its step -> the inner task on the
    # echo service -> back on the control plane; each a descendant of the one before. The
    # control plane records the NEW_TASK beside the dispatch: both children of the client's.
    dispatched = processing(mine, "orchestrator", task_id)[0]
    assert dispatched.parent_id == created.span_id
    assert [s for s in processing(mine, "control-plane", task_id)
            if s.parent_id == created.span_id], "the NEW_TASK recorded, beside the dispatch"
    ran = next(s for s in processing(mine, "outer", task_id)
               if s.attributes.get("conveyor.attempt") == 1)
    assert dispatched in ancestors(ran, mine)
    assert ran.attributes["conveyor.service"] == "outer"
    assert ran.attributes["messaging.system"] in ("rabbitmq", "kafka")
    step = next(s for s in mine if s.service == "outer" and s.name.endswith(".delegate"))
    assert ran in ancestors(step, mine)
    inner = next(s for s in mine if s.service == "echo"
                 and s.attributes.get("messaging.operation") == "process")
    inner_id = inner.attributes["conveyor.task_id"]
    assert inner_id != task_id and step in ancestors(inner, mine)
    recorded = [s for s in processing(mine, "control-plane", task_id)
                if ran in ancestors(s, mine)]
    assert recorded, "the outcome recorded by the control plane, in the same trace"
    print(f"found: client -> orchestrator -> outer ({ran.name}) -> {step.name} -> "
          f"echo (inner task {inner_id}) -> control plane, all in trace {trace_id}")
    # A retry is dispatched in the trace of the first attempt.
    first, second = await attempt_spans(spans, retried, 1), await attempt_spans(spans, retried, 2)
    assert {s.trace_id for s in first + second} == {
        s.trace_id for s in spans if s.attributes.get("conveyor.task_id") == retried}
    assert len({s.trace_id for s in first + second}) == 1
    # Heartbeats and registrations are no task's: not traced.
    assert not [s for s in spans if ".registry " in s.name]
    # Logs: one JSON object per line in every part's log; each line naming a task carries
    # its task id and a trace of the task (a send_event or cancel has a trace of its own).
    for about in (task_id, inner_id, retried, steered):
        found = deployment.lines_about(about, *PARTS)
        print(f"found: {len(found)} log lines about {about}, e.g. {found[-1] if found else None}")
        assert not untagged(deployment, spans, about, *PARTS)
    assert any("retrying" in r["message"] for r in deployment.lines_about(retried, "flaky"))
    assert any("not delivered" in r["message"] for r in deployment.lines_about(steered, "flaky"))


async def attempt_spans(spans: list[Span], task_id: str, attempt: int,
                        service: str = "flaky") -> list[Span]:
    return [s for s in processing(spans, service, task_id)
            if s.attributes.get("conveyor.attempt") == attempt]


async def test_a_task_recovered_after_kill9_of_its_worker_stays_in_its_trace(fresh_deployment):
    deployment = fresh_deployment
    with Receiver() as receiver:
        deployment.overrides = {**traced(receiver), "CONVEYOR_HEARTBEAT_TIMEOUT": "3"}
        deployment.start("control-plane", "orchestrator", "slow")
        await deployment.ready("slow")
        async with deployment.client() as client:
            # "running" is read from the control plane's record: on Kafka its consumer of
            # the front door may join well after the task of ready() has run.
            await eventually(lambda: client.list_tasks(service="slow"), timeout=60)
            task_id = f"recovered-{uuid.uuid4().hex[:8]}"
            sent = deployment.cli("publish", "slow", "--input", '{"seconds": 3}',
                                  "--task-id", task_id)
            assert sent.returncode == 0, sent.stderr
            await eventually(lambda: status_is(client, task_id, "running"), timeout=30)
            deployment.kill("slow")

            async def redispatched() -> bool:
                return any("attempt 2" in r["message"]
                           for r in deployment.lines_about(task_id, "orchestrator"))

            # Once attempt 2 is dispatched: a replica started sooner might take attempt 1 over.
            await eventually(redispatched, timeout=30)
            deployment.start("slow#2")
            assert (await client.wait(task_id, timeout=90)).status == "completed"
        spans = receiver.spans
        second = await eventually(lambda: attempt_spans(spans, task_id, 2, "slow"), timeout=30)
        parts = ("control-plane", "orchestrator", "slow", "slow#2")
        await spans_of_logged_traces(deployment, spans, parts, task_id)
    dispatched = processing(spans, "orchestrator", task_id)[0]
    (created,) = [s for s in spans if s.span_id == dispatched.parent_id]  # the NEW_TASK's
    worked = processing(spans, "slow", task_id)  # by either replica, of either attempt
    print(f"found: attempts {sorted(s.attributes['conveyor.attempt'] for s in worked)} "
          f"processed in traces {sorted({s.trace_id for s in worked})}, the NEW_TASK's "
          f"{created.trace_id}")
    assert created.service == "client"
    assert dispatched in ancestors(second[0], spans)  # dispatched again in the first's context
    assert {s.trace_id for s in worked} == {created.trace_id}
    assert not untagged(deployment, spans, task_id, *parts)
    assert any("went silent" in r["message"] for r in deployment.lines_about(task_id, *parts))


async def status_is(client, task_id: str, status: str) -> bool:
    return ((await client.get_task(task_id)) or {}).get("status") == status


async def worker_steered(deployment, task_id: str) -> bool:
    """The flaky service's worker has logged the event it refused and the cancel."""
    said = [r["message"] for r in deployment.lines_about(task_id, "flaky")]
    return any("not delivered" in m for m in said) and any(m.endswith("cancelled") for m in said)


async def test_a_task_from_a_client_that_exports_nothing_is_still_one_trace(fresh_deployment):
    deployment = fresh_deployment  # the parts export; this test's own Client does not
    with Receiver() as receiver:
        deployment.overrides = traced(receiver)
        deployment.start("control-plane", "orchestrator", "echo")
        await deployment.ready("echo")
        async with deployment.client() as client:
            task_id = await client.run_nowait("echo", message="hi")
            assert (await client.wait(task_id, timeout=30)).status == "completed"
        spans = receiver.spans

        async def recorded() -> list[Span]:  # the NEW_TASK and the outcome, by the control plane
            found = processing(spans, "control-plane", task_id)
            return found if len(found) == 2 else []

        await eventually(recorded, timeout=30)
    about = [s for s in spans if s.attributes.get("conveyor.task_id") == task_id]
    print(f"found: {sorted((s.service, s.name) for s in about)}")
    assert len({s.trace_id for s in about}) == 1
    # The orchestrator and the control plane took the NEW_TASK in the context it came with,
    # a span of the client's that is not exported: both are its children.
    dispatched = processing(spans, "orchestrator", task_id)[0]
    assert dispatched.parent_id
    assert [s for s in processing(spans, "control-plane", task_id)
            if s.parent_id == dispatched.parent_id], "the NEW_TASK recorded in the same context"
    assert not [s for s in spans if s.service == "client"]
    ran = processing(spans, "echo", task_id)[0]
    assert dispatched in ancestors(ran, spans)
