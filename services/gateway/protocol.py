"""The workflow server's HTTP shapes, and how Conveyor's task records map onto them.

The models mirror `llama_agents.client.protocol` (0.4.x) field for field, so that the
unmodified `WorkflowClient` reads our answers; the gateway does not import that package.
"""

import inspect
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from conveyor import Client

Status = Literal["running", "completed", "failed", "cancelled"]

# Conveyor's statuses by the workflow server's: a task between start and end is "running".
CONVEYOR_STATUSES: dict[str, tuple[str, ...]] = {
    "running": ("queued", "running", "retrying", "paused"),
    "completed": ("completed",),
    "failed": ("failed",),
    "cancelled": ("cancelled",),
}
FINISHED = frozenset({"completed", "failed", "cancelled"})

# Keywords of Client.run_nowait itself: a start event field of that name would be taken
# as the keyword, not passed to the workflow.
RESERVED_FIELDS = frozenset(
    name for name, parameter in inspect.signature(Client.run_nowait).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY)


class EventEnvelopeWithMetadata(BaseModel):
    value: dict[str, Any]
    qualified_name: str | None
    type: str
    types: list[str] | None


class HandlerData(BaseModel):
    handler_id: str
    workflow_name: str
    run_id: str | None
    error: str | None
    result: EventEnvelopeWithMetadata | None
    result_unreadable: bool = False
    status: Status
    started_at: str
    updated_at: str | None
    completed_at: str | None


class HandlersListResponse(BaseModel):
    handlers: list[HandlerData]


class HealthResponse(BaseModel):
    status: Literal["healthy", "unhealthy"]


class WorkflowsListResponse(BaseModel):
    workflows: list[str]


class SendEventResponse(BaseModel):
    status: Literal["sent"]


class CancelHandlerResponse(BaseModel):
    status: Literal["deleted", "cancelled"]
    purged: bool = Field(description="whether the task's record was deleted")
    detail: str = Field(description="what the gateway did")


class WorkflowSchemaResponse(BaseModel):
    start: dict[str, Any]
    stop: dict[str, Any]


class WorkflowEventsListResponse(BaseModel):
    events: list[dict[str, Any]]


class WorkflowGraphResponse(BaseModel):
    graph: dict[str, Any]


class RunRequest(BaseModel):
    start_event: dict[str, Any] | str | None = Field(
        default=None, description="the start event: its fields, or its envelope "
        '{"type", "value"}; a JSON string of either is accepted too')
    context: dict[str, Any] | None = Field(
        default=None, description="a serialized Context to restore: not supported, must be empty")
    handler_id: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="the task id to use (the idempotency key: an existing one is not run again)")
    kwargs: dict[str, Any] | None = Field(
        default=None, description="the start event's fields, when start_event is absent")


class SendEventRequest(BaseModel):
    event: dict[str, Any] | str = Field(
        description='the event\'s envelope {"type", "value"} (or a JSON string of it)')
    step: str | None = Field(default=None, description="the step to send it to; any by default")


class BadRequest(ValueError):
    """A request the gateway can read but not act on; the message says why."""


def _json_object(value: Any, field: str) -> dict[str, Any]:
    """A request field given as a JSON object, or as a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"'{field}' is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"'{field}' must be a JSON object")
    return value


def start_fields(request: RunRequest) -> dict[str, Any]:
    """The start event's fields, which are a Conveyor task's input."""
    if request.context:
        raise BadRequest("restoring a serialized 'context' is not supported by the Conveyor "
                         "gateway; run in a session to share Context state between tasks")
    data = _json_object(
        request.start_event if request.start_event is not None else request.kwargs or {},
        "start_event")
    if "value" in data and ("type" in data or "qualified_name" in data):
        data = data["value"] if data["value"] is not None else {}
        if not isinstance(data, dict):
            raise BadRequest("the value of the 'start_event' envelope must be a JSON object")
    # An Event dumps the fields it does not declare under "_data".
    extra = data.get("_data")
    fields = {k: v for k, v in data.items() if k != "_data"}
    if isinstance(extra, dict):
        fields |= extra
    clash = sorted(RESERVED_FIELDS & fields.keys())
    if clash:
        raise BadRequest(f"start event fields {clash} are not supported by the gateway "
                         "(they are names of Conveyor's own task options)")
    return fields


def event_to_send(event: dict[str, Any] | str) -> dict[str, Any]:
    """The envelope {"type", "qualified_name", "value"} of an event a client sends in."""
    event = _json_object(event, "event")
    qualified_name = event.get("qualified_name")
    if qualified_name is not None and not isinstance(qualified_name, str):
        raise BadRequest("the 'qualified_name' of 'event' must be text, e.g. "
                         '"workflows.events.HumanResponseEvent"')
    kind = event.get("type") or (qualified_name.rsplit(".", 1)[-1]
                                 if isinstance(qualified_name, str) else None)
    if not isinstance(kind, str) or not kind:
        raise BadRequest("'event' needs its 'type' (the event class's name), e.g. "
                         '{"type": "HumanResponseEvent", "value": {"response": "yes"}}')
    value = event.get("value", event.get("data")) or {}
    if not isinstance(value, dict):
        raise BadRequest("the 'value' of 'event' must be a JSON object of the event's fields")
    return {"type": kind, "qualified_name": qualified_name, "value": value}


def stop_event(result: Any) -> EventEnvelopeWithMetadata:
    """A completed task's result as the StopEvent envelope the client expects."""
    return EventEnvelopeWithMetadata(value={"result": result}, type="StopEvent", types=None,
                                     qualified_name="workflows.events.StopEvent")


def cancelled_event() -> EventEnvelopeWithMetadata:
    return EventEnvelopeWithMetadata(value={}, type="WorkflowCancelledEvent", types=["StopEvent"],
                                     qualified_name="workflows.events.WorkflowCancelledEvent")


def handler_status(status: str) -> Status:
    return status if status in FINISHED else "running"  # type: ignore[return-value]


def handler_data(task: dict[str, Any]) -> HandlerData:
    """A Conveyor task record as the workflow server's handler."""
    error = task.get("error")
    started = task.get("started_at") or task.get("created_at") or ""
    return HandlerData(
        handler_id=task["task_id"],
        workflow_name=task["service"],
        run_id=task["task_id"],
        error=f"{error['type']}: {error['message']}" if error else None,
        result=stop_event(task.get("result")) if task["status"] == "completed" else None,
        status=handler_status(task["status"]),
        started_at=started,
        updated_at=task.get("finished_at") or started or None,
        completed_at=task.get("finished_at"),
    )
