"""The HTTP gateway, as a user of llama-agents-client's unmodified WorkflowClient sees it,
against real processes on both brokers."""

import asyncio

import httpx
import pytest
from llama_agents.client import WorkflowClient
from prometheus_client.parser import text_string_to_metric_families
from workflows.events import HumanResponseEvent, StartEvent

from .deployment import Deployment, eventually, serving, start_gateway
from .otlp_receiver import Receiver

TOKEN = "s3cret-token"
ALLOWED_ORIGIN = "http://dashboard.example"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def deployment(broker_url, tmp_path_factory):
    """A deployment with echo, greeter and slow."""
    with serving(Deployment(broker_url, tmp_path_factory.mktemp("gateway")),
                 "echo", "greeter", "slow") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def gateways(deployment):
    """Two `conveyor gateway` processes in front of the deployment."""
    return [start_gateway(deployment, name, CONVEYOR_GATEWAY_TOKEN=TOKEN,
                          CONVEYOR_GATEWAY_CORS_ORIGINS=ALLOWED_ORIGIN)
            for name in ("gateway", "gateway-b")]


@pytest.fixture(scope="module")
def gateway(gateways):
    return gateways[0]


@pytest.fixture
async def client(gateway):
    """WorkflowClient as its docs say to pass custom auth headers: an httpx client."""
    async with httpx.AsyncClient(base_url=gateway, headers=AUTH, timeout=60) as http:
        yield WorkflowClient(httpx_client=http)


@pytest.fixture
async def http(gateway):
    async with httpx.AsyncClient(base_url=gateway, headers=AUTH, timeout=60) as http:
        yield http


async def _collect(stream) -> list[tuple[int, str, dict]]:
    return [(stream.last_sequence, event.type, event.value) async for event in stream]


async def test_health_and_workflow_list(client):
    assert (await client.is_healthy()).status == "healthy"
    assert {"echo", "greeter", "slow"} <= set((await client.list_workflows()).workflows)


async def test_run_workflow_answers_with_the_result_as_a_stop_event(client):
    handler = await client.run_workflow("echo", start_event=StartEvent(message="hi"))

    assert handler.status == "completed"
    assert handler.workflow_name == "echo"
    assert handler.result.type == "StopEvent"
    assert handler.result.value == {"result": {"echo": {"message": "hi"}}}
    assert handler.result.load_event().result == {"echo": {"message": "hi"}}


async def test_run_workflow_of_a_failing_task_answers_failed_with_its_error(client):
    handler = await client.run_workflow("echo", start_event={"fail": "on purpose"})

    assert handler.status == "failed"
    assert handler.result is None
    assert handler.error == "EchoFailed: on purpose"


async def test_events_stream_in_order_with_sequences_and_resume_after_one(client):
    handler = await client.run_workflow_nowait(
        "echo", start_event=StartEvent(events=3, pause=0.05))

    everything = await _collect(client.get_workflow_events(handler.handler_id))
    resumed = await _collect(client.get_workflow_events(handler.handler_id, after_sequence=1))
    after_the_end = await _collect(client.get_workflow_events(handler.handler_id,
                                                              after_sequence=3))

    assert everything == [
        (0, "Progress", {"step": 1, "of": 3}),
        (1, "Progress", {"step": 2, "of": 3}),
        (2, "Progress", {"step": 3, "of": 3}),
        (3, "StopEvent", {"result": {"echo": {"events": 3, "pause": 0.05}}}),
    ]
    assert resumed == everything[2:]
    assert after_the_end == []


async def test_a_stream_left_on_one_gateway_resumes_on_the_other(gateways):
    first, second = (WorkflowClient(httpx_client=httpx.AsyncClient(
        base_url=url, headers=AUTH, timeout=60)) for url in gateways)
    handler = await first.run_workflow_nowait(
        "echo", start_event=StartEvent(events=4, pause=0.3))
    stream = first.get_workflow_events(handler.handler_id)
    seen = []
    async for event in stream:
        seen.append((stream.last_sequence, event.type))
        if len(seen) == 2:
            break  # the connection to the first gateway is gone
    rest = second.get_workflow_events(handler.handler_id,
                                      after_sequence=stream.last_sequence)
    seen += [(rest.last_sequence, event.type) async for event in rest]
    assert seen == [(0, "Progress"), (1, "Progress"), (2, "Progress"), (3, "Progress"),
                    (4, "StopEvent")]
    # Both gateways see the task, finished.
    for client in (first, second):
        assert (await client.get_handler(handler.handler_id)).status == "completed"


async def test_send_event_answers_a_greeter_waiting_for_input(client):
    handler = await client.run_workflow_nowait("greeter", start_event=StartEvent(greeting="hi"))
    stream = client.get_workflow_events(handler.handler_id)

    async for event in stream:
        if event.type == "InputRequiredEvent":
            sent = await client.send_event(handler.handler_id,
                                           HumanResponseEvent(response="Ada"))
            break
    await stream.aclose()
    done = await client.wait_for_handler(handler.handler_id, timeout=60, poll_interval=0.2)

    assert sent.status == "sent"
    assert done.status == "completed"
    assert done.result.value == {"result": "hi, Ada"}


async def test_get_handler_is_running_then_completed(client):
    handler = await client.run_workflow_nowait("slow", start_event=StartEvent(seconds=3))

    running = await client.get_handler(handler.handler_id)
    done = await client.wait_for_handler(handler.handler_id, timeout=60, poll_interval=0.2)

    assert running.status == "running"
    assert running.result is None
    assert done.status == "completed"
    assert done.result.value == {"result": {"waited": 3}}
    assert done.completed_at is not None


async def test_get_handlers_filters_by_status_and_workflow(client):
    finished = (await client.run_workflow("echo", start_event={"n": 1})).handler_id
    running = (await client.run_workflow_nowait("slow", start_event={"seconds": 60})).handler_id

    slow_running = await client.get_handlers(status=["running"], workflow_name=["slow"])
    echo_completed = await client.get_handlers(status=["completed"], workflow_name=["echo"])
    both = await client.get_handlers(workflow_name=["echo", "slow"])
    await client.cancel_handler(running)

    slow_ids = {h.handler_id for h in slow_running.handlers}
    echo_ids = {h.handler_id for h in echo_completed.handlers}
    assert running in slow_ids and finished not in slow_ids
    assert {h.status for h in slow_running.handlers} == {"running"}
    assert finished in echo_ids and running not in echo_ids
    assert {running, finished} <= {h.handler_id for h in both.handlers}


async def test_cancel_handler_cancels_a_running_task(client):
    handler = await client.run_workflow_nowait("slow", start_event={"seconds": 60})

    cancelled = await client.cancel_handler(handler.handler_id)
    ended = await client.wait_for_handler(handler.handler_id, timeout=60, poll_interval=0.2)

    assert cancelled.status == "cancelled"
    assert ended.status == "cancelled"
    assert ended.error.startswith("TaskCancelled")


async def test_cancel_with_purge_deletes_the_handler_once_it_has_ended(client, http):
    handler = await client.run_workflow_nowait("slow", start_event={"seconds": 60})

    purged = await client.cancel_handler(handler.handler_id, purge=True)
    listed = await client.get_handlers(workflow_name=["slow"])
    again = await http.post(f"/handlers/{handler.handler_id}/cancel", params={"purge": "true"})

    assert purged.status == "deleted"
    assert handler.handler_id not in {h.handler_id for h in listed.handlers}
    assert (await http.get(f"/handlers/{handler.handler_id}")).status_code == 404
    assert (await http.get(f"/events/{handler.handler_id}")).status_code == 404
    assert again.status_code == 404


async def test_workflow_schema_events_and_graph_come_from_registration(client):
    schema = await client.get_workflow_schema("greeter")
    kinds = await client.get_workflow_events_schema("greeter")
    graph = await client.get_workflow_graph("greeter")

    assert schema.start["title"] == "StartEvent"
    assert schema.stop["title"] == "StopEvent"
    assert "HumanResponseEvent" in {e["title"] for e in kinds.events}
    assert graph.graph.nodes


PUBLIC = {"/health"}  # the one route open without the token


async def test_every_route_but_health_demands_the_token(gateway, http):
    paths = (await http.get("/openapi.json")).json()["paths"]
    asked = {}
    async with httpx.AsyncClient(base_url=gateway) as anonymous:
        for path, methods in paths.items():
            concrete = path.format(name="echo", handler_id="x", task_id="x", action="cancel")
            for method in methods:
                for headers in ({}, {"Authorization": "Bearer nope"}):
                    answer = await anonymous.request(method, concrete, headers=headers)
                    asked[(method, path, bool(headers))] = answer.status_code
        without = await anonymous.get("/workflows")

    assert {key: code for key, code in asked.items() if key[1] not in PUBLIC} == {
        key: 401 for key in asked if key[1] not in PUBLIC}
    assert {code for key, code in asked.items() if key[1] in PUBLIC} == {200}
    # The dashboard's page is the body of its 401: a browser cannot send the token to open
    # it, so the page asks for it and sends it with every request for data.
    assert "token-form" in (await http.get("/dashboard")).text
    assert len(asked) == 2 * sum(len(methods) for methods in paths.values())
    assert "Bearer" in without.json()["detail"]


async def test_cors_lets_the_configured_origin_in_and_no_other(gateway):
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        preflight = await http.options("/workflows", headers={
            "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        allowed = await http.get("/workflows", headers={**AUTH, "Origin": ALLOWED_ORIGIN})
        other = await http.get("/workflows", headers={**AUTH, "Origin": "http://elsewhere"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-origin" not in other.headers


async def test_unknown_workflow_and_handler_are_404(http):
    answers = [
        await http.post("/workflows/nope/run", json={}),
        await http.post("/workflows/nope/run-nowait", json={}),
        await http.get("/workflows/nope/schema"),
        await http.get("/workflows/nope/events"),
        await http.get("/workflows/nope/representation"),
        await http.get("/handlers/no-such-task"),
        await http.get("/events/no-such-task"),
        await http.post("/events/no-such-task", json={"event": {"type": "X", "value": {}}}),
        await http.post("/handlers/no-such-task/cancel"),
    ]

    assert [a.status_code for a in answers] == [404] * len(answers)
    assert "nope" in answers[0].json()["detail"]
    assert "no-such-task" in answers[5].json()["detail"]


async def test_malformed_requests_get_a_4xx_that_names_the_problem(http):
    not_json = await http.post("/workflows/echo/run-nowait", content=b"{not json",
                               headers={"Content-Type": "application/json"})
    wrong_type = await http.post("/workflows/echo/run-nowait", json={"start_event": 5})
    reserved = await http.post("/workflows/echo/run-nowait",
                               json={"start_event": {"task_id": "x"}})
    bad_status = await http.get("/handlers", params={"status": "sleeping"})
    started = (await http.post("/workflows/greeter/run-nowait", json={})).json()
    untyped_event = await http.post(f"/events/{started['handler_id']}",
                                    json={"event": {"value": {"response": "x"}}})
    bad_sequence = await http.get(f"/events/{started['handler_id']}",
                                  params={"after_sequence": "soon"})
    await http.post(f"/handlers/{started['handler_id']}/cancel")

    assert not_json.status_code == 422 and "JSON" in not_json.text
    assert wrong_type.status_code == 422 and "start_event" in wrong_type.text
    assert reserved.status_code == 422 and "task_id" in reserved.text
    assert bad_status.status_code == 422 and "running" in bad_status.text
    assert untyped_event.status_code == 422 and "type" in untyped_event.text
    assert bad_sequence.status_code == 422 and "after_sequence" in bad_sequence.text


async def test_requests_that_used_to_break_the_gateway_get_a_4xx(http):
    """Each of these answered 500 once: start event fields named like the arguments of
    Client.run_nowait or Workflow.run, an event whose qualified_name is not text, a start
    event over the broker's message limit."""
    fields = {"service": "x", "ctx": 1, "run_id": 2, "start_event": 3}
    own_arguments = await http.post("/workflows/echo/run", json={"start_event": fields})
    named_self = await http.post("/workflows/echo/run", json={"start_event": {"self": 1}})
    started = (await http.post("/workflows/greeter/run-nowait", json={})).json()
    bad_name = await http.post(f"/events/{started['handler_id']}", json={
        "event": {"type": "HumanResponseEvent", "qualified_name": 5, "value": {}}})
    await http.post(f"/handlers/{started['handler_id']}/cancel")
    too_large = await http.post("/workflows/echo/run-nowait",
                                json={"start_event": {"text": "x" * 1_000_000}})

    assert own_arguments.status_code == 200, own_arguments.text
    assert own_arguments.json()["result"]["value"] == {"result": {"echo": fields}}
    # A StartEvent cannot have a field named self: the task fails and says so.
    assert named_self.status_code == 200 and named_self.json()["status"] == "failed"
    assert "'self'" in named_self.json()["error"]
    assert bad_name.status_code == 422 and "qualified_name" in bad_name.text
    assert too_large.status_code == 413
    assert "over the limit of 1000000 bytes" in too_large.json()["detail"]


async def test_a_running_handler_is_202_and_a_drained_stream_is_204(http):
    running = (await http.post("/workflows/slow/run-nowait",
                               json={"start_event": {"seconds": 60}})).json()["handler_id"]
    ended = (await http.post("/workflows/echo/run", json={"start_event": {}})).json()

    while_running = await http.get(f"/handlers/{running}")
    await http.post(f"/handlers/{running}/cancel")
    drained = await http.get(f"/events/{ended['handler_id']}", params={"after_sequence": 0})

    assert while_running.status_code == 202 and while_running.json()["status"] == "running"
    assert ended["status"] == "completed"
    assert drained.status_code == 204


async def test_metrics_serve_the_deployment_and_broker_figures_as_prometheus_text(
    client, http,
):
    await client.run_workflow("echo", start_event=StartEvent(n=1))
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    completed = [s for s in families["conveyor_tasks"].samples
                 if s.labels == {"service": "echo", "status": "completed"}]
    assert completed and completed[0].value >= 1
    durations = {s.name: s for s in families["conveyor_task_duration_seconds"].samples
                 if s.labels.get("le") in (None, "+Inf") and s.labels["service"] == "echo"}
    assert durations["conveyor_task_duration_seconds_count"].value >= 1
    assert {"conveyor_queue_depth", "conveyor_task_retries", "conveyor_tasks_recovered",
            "conveyor_stale_attempts_rejected"} <= set(families)
    assert any(name.startswith("faststream_") for name in families)  # the gateway's broker


async def test_openapi_describes_every_route(http):
    paths = (await http.get("/openapi.json")).json()["paths"]

    assert {
        "/health": {"get"}, "/workflows": {"get"}, "/workflows/{name}/schema": {"get"},
        "/workflows/{name}/events": {"get"}, "/workflows/{name}/representation": {"get"},
        "/workflows/{name}/run": {"post"}, "/workflows/{name}/run-nowait": {"post"},
        "/events/{handler_id}": {"get", "post"}, "/handlers": {"get"}, "/metrics": {"get"},
        "/handlers/{handler_id}": {"get"}, "/handlers/{handler_id}/cancel": {"post"},
        "/dashboard": {"get"},
        "/dashboard/api/services": {"get"}, "/dashboard/api/tasks": {"get"},
        "/dashboard/api/tasks/{task_id}": {"get"},
        "/dashboard/api/tasks/{task_id}/{action}": {"post"},
        "/dashboard/api/throughput": {"get"},
    } == {path: set(methods) for path, methods in paths.items()}


def test_a_traced_gateway_names_its_spans_gateway(deployment):
    with Receiver() as receiver:
        url = start_gateway(deployment, "gateway-traced", CONVEYOR_GATEWAY_TOKEN=TOKEN,
                            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                            OTEL_BSP_SCHEDULE_DELAY="100")
        answer = httpx.post(f"{url}/workflows/echo/run", headers=AUTH, timeout=60,
                            json={"start_event": {"message": "traced"}})
        assert answer.status_code == 200, answer.text

        async def exported() -> bool:
            return bool(receiver.spans)

        asyncio.run(eventually(exported, timeout=30))
    # Only this gateway exports (the other parts were started without an endpoint).
    assert {span.service for span in receiver.spans} == {"gateway"}
