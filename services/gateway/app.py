"""The gateway's FastAPI app: each route of the workflow server's protocol, over conveyor.Client.

The gateway keeps no state. A handler is a Conveyor task and a workflow is a Conveyor
service: every answer comes from the control plane, over the broker, through the one
Client this process starts in its lifespan. Workflows are never imported here; their
schemas and graph are what their services registered.
"""

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from conveyor import Client, MessageTooLarge, PublishFailed, QueryFailed

from . import dashboard, events, metrics
from .protocol import (
    CONVEYOR_STATUSES,
    FINISHED,
    BadRequest,
    CancelHandlerResponse,
    HandlerData,
    HandlersListResponse,
    HealthResponse,
    RunRequest,
    SendEventRequest,
    SendEventResponse,
    WorkflowEventsListResponse,
    WorkflowGraphResponse,
    WorkflowSchemaResponse,
    WorkflowsListResponse,
    event_to_send,
    handler_data,
    start_fields,
)
from .settings import GatewaySettings

NOT_FOUND = {404: {"description": "unknown workflow or handler"}}


def gateway_client(settings: GatewaySettings) -> Client:
    """The gateway's one Client: named "gateway" on the wire and in its spans, with the
    Prometheus middleware whose figures /metrics serves."""
    return Client(settings=settings, publisher_id="gateway", part="gateway",
                  middlewares=(metrics.broker_middleware(settings),))


def create_app(settings: GatewaySettings, client: Client | None = None) -> FastAPI:
    """The app; with `client`, it rides on a Client its caller has started and will close
    (`conveyor gateway` does, to fail with one line when the broker is away)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is not None:
            app.state.client = client
            yield
            return
        async with gateway_client(settings) as own:
            app.state.client = own
            yield

    app = FastAPI(title="Conveyor gateway", lifespan=lifespan,
                  description="The LlamaIndex workflow server's HTTP protocol over Conveyor "
                  "tasks: a handler is a task, a workflow is a service.")
    if settings.gateway_token is not None:
        app.middleware("http")(_bearer_check(settings.gateway_token.get_secret_value()))
    if origins := [o.strip() for o in settings.gateway_cors_origins.split(",") if o.strip()]:
        # Added last, so it runs first: a preflight is answered before the token is asked.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"])
    _add_error_handlers(app)
    _add_workflow_routes(app)
    _add_handler_routes(app)
    app.include_router(dashboard.router(settings))
    return app


def _bearer_check(token: str):
    """Every route but /health (the docs, /openapi.json and the dashboard too) wants the
    token, and answers 401 without it."""
    expected = f"Bearer {token}".encode()

    async def check(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        path = request.url.path
        if path == "/health" or secrets.compare_digest(given, expected):
            return await call_next(request)
        if path == f"{dashboard.PAGE}/":  # the page's links are relative to /dashboard
            return RedirectResponse(dashboard.PAGE, status_code=307)
        if path == dashboard.PAGE and request.method == "GET":
            # A browser opening the page cannot send the header: the 401's body is the
            # page, which asks for the token and sends it with each request for data.
            answer = dashboard.page_answer(401)
        else:
            answer = JSONResponse({"detail": "missing or wrong bearer token: send "
                                   "'Authorization: Bearer <CONVEYOR_GATEWAY_TOKEN>'"},
                                  status_code=401)
        answer.headers["WWW-Authenticate"] = "Bearer"
        return answer

    return check


def _add_error_handlers(app: FastAPI) -> None:
    """The broker or the control plane being away is a 503 that says so, never a bare 500."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(TimeoutError)
    async def no_answer(request: Request, exc: TimeoutError) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or "the control plane did not answer"},
                            status_code=503)

    @app.exception_handler(ValidationError)
    async def invalid(request: Request, exc: ValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or exc.title}: {error['msg']}"
                             for error in exc.errors(include_url=False)[:5])
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(MessageTooLarge)
    async def too_large(request: Request, exc: MessageTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(PublishFailed)
    async def broker_away(request: Request, exc: PublishFailed) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(QueryFailed)
    async def query_failed(request: Request, exc: QueryFailed) -> JSONResponse:
        return JSONResponse({"detail": f"the control plane could not answer: {exc}"},
                            status_code=502)


def client_of(request: Request) -> Client:
    return request.app.state.client


ClientDep = Annotated[Client, Depends(client_of)]


async def _service(client: Client, name: str) -> dict[str, Any]:
    for service in await client.list_services():
        if service["name"] == name:
            return service
    raise HTTPException(404, f"workflow {name!r} not found: no service of that name is "
                        "registered")


async def _task(client: Client, handler_id: str) -> dict[str, Any]:
    task = await client.get_task(handler_id)
    if task is None:
        raise HTTPException(404, f"handler {handler_id!r} not found: no such task")
    return task


async def _delete_once_ended(client: Client, handler_id: str) -> bool:
    """Delete the task's record once its end is recorded; False if there is no record."""
    try:
        await client.wait(handler_id, timeout=client.query_timeout)
    except TimeoutError:
        raise HTTPException(504, f"handler {handler_id!r} was told to cancel but had not "
                            f"ended within {client.query_timeout} s; not deleted") from None
    # The requester can hear of an outcome just before the control plane has stored it.
    not_stored_yet = AsyncRetrying(
        retry=retry_if_exception(lambda exc: str(exc).startswith("TaskNotEnded")),
        wait=wait_exponential(multiplier=0.05, max=1), stop=stop_after_delay(5), reraise=True)
    try:
        return await not_stored_yet(client.delete_task, handler_id)
    except QueryFailed as exc:
        raise HTTPException(409, f"handler {handler_id!r}: {exc}") from None


def _registered(service: dict[str, Any], key: str) -> Any:
    """What the service registered under `key`; older services registered no schemas."""
    found = service.get(key)
    if found is None:
        raise HTTPException(503, f"workflow {service['name']!r} registered without its "
                            f"{key!r}: restart its service with this Conveyor version")
    return found


def _add_workflow_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> HealthResponse:
        """Unauthenticated; says the gateway is up, not that every service is."""
        return HealthResponse(status="healthy")

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}})
    async def prometheus(client: ClientDep) -> Response:
        """Tasks by service and status, queue depth, retries, task durations, recoveries,
        stale-attempt rejections (from the control plane) and this gateway's broker figures
        (FastStream's Prometheus middleware)."""
        figures = await client.deployment_metrics()
        return Response(metrics.render(figures), media_type=CONTENT_TYPE_LATEST)

    @app.get("/workflows")
    async def list_workflows(client: ClientDep) -> WorkflowsListResponse:
        """Every registered service's name."""
        return WorkflowsListResponse(workflows=[s["name"] for s in await client.list_services()])

    @app.get("/workflows/{name}/schema", responses=NOT_FOUND)
    async def workflow_schema(name: str, client: ClientDep) -> WorkflowSchemaResponse:
        """JSON Schemas of the workflow's start and stop events."""
        service = await _service(client, name)
        return WorkflowSchemaResponse(start=_registered(service, "start_schema"),
                                      stop=_registered(service, "stop_schema"))

    @app.get("/workflows/{name}/events", responses=NOT_FOUND)
    async def workflow_events(name: str, client: ClientDep) -> WorkflowEventsListResponse:
        """JSON Schemas of the workflow's event types."""
        service = await _service(client, name)
        return WorkflowEventsListResponse(events=_registered(service, "event_schemas"))

    @app.get("/workflows/{name}/representation", responses=NOT_FOUND)
    async def workflow_representation(name: str, client: ClientDep) -> WorkflowGraphResponse:
        """The workflow's graph of steps and events."""
        service = await _service(client, name)
        return WorkflowGraphResponse(graph=_registered(service, "graph"))

    @app.post("/workflows/{name}/run", responses=NOT_FOUND)
    async def run_workflow(name: str, body: RunRequest, client: ClientDep) -> HandlerData:
        """Run the workflow as a task and answer once it has ended, failed or not."""
        task_id = await _start(client, name, body)
        await client.wait(task_id)
        return handler_data(await _task(client, task_id))

    @app.post("/workflows/{name}/run-nowait", responses=NOT_FOUND)
    async def run_workflow_nowait(name: str, body: RunRequest, client: ClientDep) -> HandlerData:
        """Start the workflow as a task; the handler id is the task id."""
        task_id = await _start(client, name, body)
        # Asked through the front door after the NEW_TASK: the record is there.
        return handler_data(await _task(client, task_id))


async def _start(client: Client, name: str, body: RunRequest) -> str:
    fields = start_fields(body)
    await _service(client, name)
    return await client.run_nowait(name, task_id=body.handler_id, **fields)


def _add_handler_routes(app: FastAPI) -> None:
    @app.get("/events/{handler_id}", responses={
        **NOT_FOUND, 204: {"description": "the task has ended and every event was sent"},
        200: {"content": {"text/event-stream": {}, "application/x-ndjson": {}}}})
    async def stream_events(
        handler_id: str, client: ClientDep,
        sse: Annotated[bool, Query(description="SSE (default) or NDJSON")] = True,
        after_sequence: Annotated[str, Query(description="an index, or 'now'")] = "-1",
        include_qualified_name: bool = True,
        include_internal: Annotated[bool, Query(
            description="ignored: Conveyor streams only the events a workflow writes")] = False,
    ) -> Response:
        """The task's events in order, replayed from its durable log, then live."""
        task = await _task(client, handler_id)
        try:
            after = events.first_after(after_sequence, task)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if events.drained(after, task):
            return Response(status_code=204)
        return StreamingResponse(
            events.stream(client, handler_id, after, sse=sse,
                          qualified_names=include_qualified_name),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"Cache-Control": "no-cache"})

    @app.post("/events/{handler_id}", responses={
        **NOT_FOUND, 409: {"description": "the task has ended"},
        400: {"description": "the workflow does not take that event"}})
    async def send_event(handler_id: str, body: SendEventRequest,
                         client: ClientDep) -> SendEventResponse:
        """Send an event into the running task (human in the loop)."""
        event = event_to_send(body.event)
        task = await _task(client, handler_id)
        if task["status"] in FINISHED:
            raise HTTPException(409, f"workflow already {task['status']}")
        try:
            await client.send_event(handler_id, event, step=body.step)
        except QueryFailed as exc:
            raise HTTPException(400, str(exc)) from None
        return SendEventResponse(status="sent")

    @app.get("/handlers")
    async def list_handlers(
        client: ClientDep,
        status: Annotated[list[str] | None, Query(
            description="running, completed, failed or cancelled; may repeat")] = None,
        workflow_name: Annotated[list[str] | None, Query(description="may repeat")] = None,
    ) -> HandlersListResponse:
        """Tasks, newest first, filtered by status and workflow (each may repeat)."""
        # WorkflowClient sends `status=` and `workflow_name=` empty when it has no filter.
        wanted = [s.strip() for s in status or () if s.strip()]
        unknown = sorted(set(wanted) - CONVEYOR_STATUSES.keys())
        if unknown:
            raise BadRequest(f"unknown status {unknown}: use running, completed, failed or "
                             "cancelled")
        statuses = [s for w in wanted for s in CONVEYOR_STATUSES[w]] or [None]
        services = [n.strip() for n in workflow_name or () if n.strip()] or [None]
        found: dict[str, dict[str, Any]] = {}
        for service in services:
            for conveyor_status in statuses:
                for task in await client.list_tasks(service=service, status=conveyor_status):
                    found[task["task_id"]] = task
        newest_first = sorted(found.values(), key=lambda t: t["created_at"] or "", reverse=True)
        return HandlersListResponse(handlers=[handler_data(t) for t in newest_first])

    @app.get("/handlers/{handler_id}", responses={
        **NOT_FOUND, 202: {"model": HandlerData, "description": "still running"}})
    async def get_handler(handler_id: str, client: ClientDep, response: Response) -> HandlerData:
        """The task as a handler: 202 while it runs, 200 once it has ended (its result in)."""
        handler = handler_data(await _task(client, handler_id))
        response.status_code = 202 if handler.status == "running" else 200
        return handler

    @app.post("/handlers/{handler_id}/cancel", responses=NOT_FOUND)
    async def cancel_handler(handler_id: str, client: ClientDep,
                             purge: bool = False) -> CancelHandlerResponse:
        """Cancel the task and its inner tasks. With `purge`, wait for the task to end and
        delete its record, event log and checkpoint, as its TTL would later."""
        # Cancelling goes through the front door, after the task's NEW_TASK, so a task
        # the control plane has not recorded yet is found and cancelled all the same.
        try:
            done = await client.cancel(handler_id, reason="cancelled through the HTTP gateway")
        except QueryFailed as exc:
            status = 404 if str(exc).startswith("UnknownTask") else 400
            raise HTTPException(status, f"handler {handler_id!r}: {exc}") from None
        detail = "cancelled" if done else "nothing to cancel: the task had already ended"
        if not purge:
            return CancelHandlerResponse(status="cancelled", purged=False, detail=detail)
        if not await _delete_once_ended(client, handler_id):
            raise HTTPException(404, f"handler {handler_id!r} not found: no such task")
        return CancelHandlerResponse(status="deleted", purged=True,
                                     detail=f"{detail}; its record was deleted")
