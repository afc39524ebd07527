"""The operators' live dashboard: one page at /dashboard and the JSON routes it polls.

The page (its script inlined) is the same for everyone and holds no data. When the gateway
wants its token, a browser cannot send it to open the page, so a request for the page
without it is answered 401 with the page as the body: it asks for the token and sends it in
an Authorization header with every request for data (see dashboard.js). All it shows comes
from the control plane through the gateway's one Client.
"""

import asyncio
import functools
from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from conveyor import Client, QueryFailed
from conveyor.contracts import TaskStatus

from .settings import GatewaySettings

PAGE = "/dashboard"
EVENTS_PER_ANSWER = 500
NOT_FOUND = {404: {"description": "no such task"}}
DONE = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}
NOTHING_TO_DO = {"cancel": "the task had already ended",
                 "pause": "the task had ended or was paused already",
                 "resume": "the task was not paused"}


class Instance(BaseModel):
    instance_id: str
    host: str | None
    pid: int | None
    alive: bool = Field(description="it sent a heartbeat within CONVEYOR_HEARTBEAT_TIMEOUT")
    running: int = Field(description="tasks it held at its last heartbeat")
    last_heartbeat: str | None


class Service(BaseModel):
    name: str
    workflow: str | None
    alive: int = Field(description="how many of its instances are alive")
    instances: list[Instance]
    pending: dict[str, int] = Field(
        description="its unfinished tasks by status: queued, running, retrying, paused")


class ServicesResponse(BaseModel):
    services: list[Service]


class Task(BaseModel):
    task_id: str
    service: str
    status: TaskStatus
    session_id: str | None
    parent_task_id: str | None
    attempts: int
    events: int = Field(description="events streamed (known once the task has ended)")
    error: str | None = Field(description="'<type>: <message>' of a failed or cancelled task")
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class TasksResponse(BaseModel):
    tasks: list[Task]


class TimelineEvent(BaseModel):
    index: int = Field(description="the event's sequence, from 0 without gaps")
    type: str
    at: str | None = Field(description="when the control plane stored it")
    value: dict[str, Any]


class TaskDetail(Task):
    result: Any = None
    trace_id: str | None
    trace_url: str | None = Field(description="the task's trace in the Jaeger UI, when "
                                  "CONVEYOR_JAEGER_UI_URL is set and the task was traced")
    timeline: list[TimelineEvent] = Field(
        description=f"its events after `after`, at most {EVENTS_PER_ANSWER} per answer")


class SteerResponse(BaseModel):
    task_id: str
    action: Literal["cancel", "pause", "resume"]
    done: bool = Field(description="false when there was nothing to do (e.g. it had ended)")
    detail: str


class Minute(BaseModel):
    minute: str = Field(description="the minute's start, ISO 8601 in UTC")
    completed: int
    failed: int
    cancelled: int


class ThroughputResponse(BaseModel):
    minutes: list[Minute] = Field(description="oldest first, the current minute last")
    completed: int
    failed: int
    cancelled: int


def _client(request: Request) -> Client:
    return request.app.state.client


ClientDep = Annotated[Client, Depends(_client)]
TaskId = Annotated[str, Path(min_length=1, max_length=200)]


def _static(name: str) -> str:
    return (files("conveyor.services.gateway") / "static" / name).read_text(encoding="utf-8")


@functools.cache
def page() -> str:
    """The page with its script inlined: one document, fetched with or without the token."""
    return _static("dashboard.html").replace(
        "</body>", f"<script>\n{_static('dashboard.js')}</script>\n</body>")


def page_answer(status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(page(), status_code=status_code, headers={"Cache-Control": "no-cache"})


def router(settings: GatewaySettings) -> APIRouter:
    """The page and its JSON routes."""
    routes = APIRouter(tags=["dashboard"])
    @routes.get(PAGE, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The live dashboard. Asked for without the gateway's token, it is the body of the
        401 answer: it asks for the token, and sends it with every request for data."""
        return page_answer()

    @routes.get("/dashboard/api/services")
    async def list_services(client: ClientDep) -> ServicesResponse:
        """Registered services, their instances with liveness, their unfinished tasks."""
        registered, pending = await asyncio.gather(client.list_services(), client.pending_work())
        return ServicesResponse(services=[
            Service(name=s["name"], workflow=s.get("workflow"), instances=s["instances"],
                    alive=sum(i["alive"] for i in s["instances"]),
                    pending=pending.get(s["name"], {}))
            for s in registered])

    @routes.get("/dashboard/api/tasks")
    async def list_tasks(
        client: ClientDep,
        status: Annotated[TaskStatus | None, Query(description="only tasks in this status")]
        = None,
        q: Annotated[str | None, Query(max_length=200, description="a piece of the task "
                                       "id or of its service's name (any case)")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> TasksResponse:
        """Tasks, newest first."""
        found = await client.list_tasks(status=status, search=q or None, limit=limit)
        return TasksResponse(tasks=[_task(t) for t in found])

    @routes.get("/dashboard/api/tasks/{task_id}", responses=NOT_FOUND)
    async def task_detail(
        task_id: TaskId, client: ClientDep,
        after: Annotated[int, Query(ge=-1, description="only the events after this index "
                                    "(the page asks for what it has not seen yet)")] = -1,
    ) -> TaskDetail:
        """One task: its record, its trace link and its events after `after`."""
        record, logged = await asyncio.gather(
            client.get_task(task_id),
            client.event_log(task_id, after=after, limit=EVENTS_PER_ANSWER))
        if record is None:
            raise HTTPException(404, f"task {task_id!r} not found: the control plane has no "
                                "record of it (never started, or removed after its TTL)")
        trace = record.get("trace_id")
        return TaskDetail(
            **_task(record).model_dump(), result=record["result"], trace_id=trace,
            trace_url=f"{settings.jaeger_ui_url.rstrip('/')}/trace/{trace}"
            if trace and settings.jaeger_ui_url else None,
            timeline=[TimelineEvent(index=e["index"], type=e["event"]["type"], at=e["at"],
                                    value=e["event"].get("value") or {}) for e in logged])

    @routes.post("/dashboard/api/tasks/{task_id}/{action}", responses=NOT_FOUND)
    async def steer_task(task_id: TaskId, action: Literal["cancel", "pause", "resume"],
                    client: ClientDep) -> SteerResponse:
        """Cancel a task (and its inner tasks), pause it (its worker checkpoints and lets go
        of it) or resume it from that checkpoint."""
        try:
            if action == "cancel":
                done = await client.cancel(task_id, reason="cancelled from the dashboard")
            else:
                done = await getattr(client, action)(task_id)
        except QueryFailed as exc:
            status = 404 if str(exc).startswith("UnknownTask") else 400
            raise HTTPException(status, f"task {task_id!r}: {exc}") from None
        detail = DONE[action] if done else f"nothing to {action}: {NOTHING_TO_DO[action]}"
        return SteerResponse(task_id=task_id, action=action, done=done, detail=detail)

    @routes.get("/dashboard/api/throughput")
    async def tasks_per_minute(
        client: ClientDep,
        minutes: Annotated[int, Query(ge=1, le=1440)] = 60,
    ) -> ThroughputResponse:
        """Tasks completed, failed and cancelled in each of the last `minutes` minutes."""
        found = [Minute(**m) for m in await client.throughput(minutes)]
        return ThroughputResponse(minutes=found, **{
            status: sum(getattr(m, status) for m in found)
            for status in ("completed", "failed", "cancelled")})

    return routes


def _task(record: dict[str, Any]) -> Task:
    error = record.get("error")
    return Task(**{key: record.get(key) for key in Task.model_fields if key != "error"},
                error=f"{error['type']}: {error['message']}" if error else None)
