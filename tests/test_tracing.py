"""One task, one trace: five real processes export their spans to a real OTLP receiver."""

import json
import uuid

from .deployment import eventually
from .otlp_receiver import Receiver, Span


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
        deployment.overrides = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                "OTEL_BSP_SCHEDULE_DELAY": "100", "CONVEYOR_MAX_RETRIES": "1",
                                "CONVEYOR_RETRY_BACKOFF": "0.1", "CONVEYOR_LOG_FORMAT": "json"}
        deployment.start("control-plane", "orchestrator", "echo", "outer", "flaky")
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
        spans = receiver.spans

        async def worker_spans_in() -> list[Span]:
            # The inner task's outcome is recorded last: wait for the control plane's span.
            inner = [s for s in spans if s.service == "echo" and s.attributes.get(
                "conveyor.task_id", task_id) != task_id]
            return inner and processing(spans, "control-plane", inner[0].attributes[
                "conveyor.task_id"])

        await eventually(worker_spans_in, timeout=30)
        await eventually(lambda: attempt_spans(spans, retried, 2), timeout=30)
    trace_ids = {s.trace_id for s in spans if s.attributes.get("conveyor.task_id") == task_id}
    print(f"found: {len(spans)} spans from {sorted({s.service for s in spans})}; "
          f"the task's in {len(trace_ids)} trace(s)")
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    mine = [s for s in spans if s.trace_id == trace_id]
    client = [s for s in mine if s.service == "client"]
    assert client, "the publisher's span"
    # The path: client -> orchestrator -> outer service -> its step -> the inner task on the
    # echo service -> back on the control plane; each a descendant of the one before.
    dispatched = processing(mine, "orchestrator", task_id)[0]
    assert {a.service for a in ancestors(dispatched, mine)} == {"client"}
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
    # Logs: one JSON object per line; those about a task carry its task id and trace id.
    (retried_trace,) = {s.trace_id for s in first}
    lines = (deployment.workdir / "flaky.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    about = [r for r in records if r.get("task_id") == retried]
    print(f"found: {len(records)} JSON log lines from the flaky service, {len(about)} about "
          f"{retried}, e.g. {about[0] if about else None}")
    assert any("retrying" in r["message"] for r in about)
    assert all(r["trace_id"] == retried_trace for r in about)


async def attempt_spans(spans: list[Span], task_id: str, attempt: int) -> list[Span]:
    return [s for s in processing(spans, "flaky", task_id)
            if s.attributes.get("conveyor.attempt") == attempt]
