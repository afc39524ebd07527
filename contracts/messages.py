"""The typed QueueMessage: one envelope, one action enum, one payload model per action.

Every message on every topic is one JSON object of this shape. Other systems build it by
hand; Conveyor's services validate it once, on receipt, with `parse_message`.
"""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .topics import NAME_PATTERN

MAX_MESSAGE_BYTES = 1_000_000  # Kafka's default message limit; larger payloads are refused.


def new_id() -> str:
    return uuid.uuid4().hex


class Action(StrEnum):
    NEW_TASK = "new_task"
    DISPATCH_TASK = "dispatch_task"
    TASK_STREAM = "task_stream"
    SEND_EVENT = "send_event"
    CANCEL_TASK = "cancel_task"
    PAUSE_TASK = "pause_task"
    RESUME_TASK = "resume_task"
    TASK_STATUS = "task_status"
    COMPLETED_TASK = "completed_task"
    REGISTER_SERVICE = "register_service"
    HEARTBEAT = "heartbeat"
    DEREGISTER_SERVICE = "deregister_service"
    QUERY = "query"
    QUERY_RESULT = "query_result"
    DEAD_LETTER = "dead_letter"


TaskStatus = Literal[
    "queued", "running", "retrying", "paused", "completed", "failed", "cancelled"
]
FinalStatus = Literal["completed", "failed", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Task lifecycle


class NewTask(Payload):
    """Start a run of a workflow service. The task id is the idempotency key."""

    task_id: str = Field(default_factory=new_id, min_length=1, max_length=200)
    session_id: str | None = Field(default=None, min_length=1, max_length=200)
    service: str = Field(pattern=NAME_PATTERN)
    input: dict[str, Any] = Field(
        default_factory=dict, description="the start event's fields (the run's keyword arguments)"
    )
    reply_to: str | None = Field(
        default=None, max_length=300,
        description="topic that receives the outcome (and the stream, if asked)",
    )
    stream: bool = Field(default=False, description="also send every streamed event to reply_to")
    parent_task_id: str | None = Field(default=None, max_length=200)
    max_retries: int | None = Field(
        default=None, ge=0, le=100,
        description="attempts after a failed one; the service's setting when absent",
    )
    timeout: float | None = Field(
        default=None, gt=0, description="seconds one attempt may run; the service's when absent"
    )


class DispatchTask(Payload):
    """The orchestrator hands one attempt of a task to a workflow service."""

    task: NewTask
    attempt: int = Field(ge=1)


class EventEnvelope(Payload):
    """A workflow event as llama-index-workflows serializes it."""

    type: str
    types: list[str] | None = None
    qualified_name: str | None = None
    value: dict[str, Any] = Field(default_factory=dict)


class TaskStream(Payload):
    """One event a running workflow wrote to its stream, numbered from 0 without gaps."""

    task_id: str
    session_id: str | None = None
    index: int = Field(ge=0)
    event: EventEnvelope
    attempt: int = 0
    reply_to: str | None = None
    stream: bool = False


class SendEvent(Payload):
    """An event sent into a running task (human-in-the-loop).

    The control plane checks the event's type against those the task's service accepts,
    keeps it in the task's inbox (so it reaches the task even between attempts) and passes
    it to the service's instances; the answer goes to reply_to as a query_result whose
    request_id is this message's id.
    """

    task_id: str = Field(min_length=1)
    event: EventEnvelope
    step: str | None = Field(default=None, description="the step to send it to; any by default")
    reply_to: str | None = None
    seq: int | None = Field(
        default=None, ge=1, description="the inbox position, set by the control plane"
    )


class TaskError(BaseModel):
    type: str
    message: str


class TaskControl(Payload):
    """Steer a task: cancel, pause or resume it.

    The orchestrator answers reply_to with a query_result whose request_id is this
    message's id: {"task_id", "done": true}, or false when there was nothing to do (the task
    had ended; pausing a paused task; resuming one that is not paused).
    """

    task_id: str = Field(min_length=1)
    reason: str = "by request"
    reply_to: str | None = None


class CancelTask(TaskControl):
    """Stop a task: a queued one never starts, a running one stops, its inner tasks too."""

    reason: str = "cancelled by request"


class TaskStatusUpdate(Payload):
    """A task's status between its start and its end, told to the control plane.

    "retrying": an attempt failed with `error` and the next starts in `retry_in` seconds;
    "paused": it was paused and holds no worker; "queued": it was resumed.
    """

    task_id: str
    service: str
    status: Literal["retrying", "paused", "queued"]
    attempt: int = 0
    error: TaskError | None = None
    retry_in: float | None = None


class CompletedTask(Payload):
    """The outcome of a task, as recorded by the control plane and sent to reply_to."""

    task_id: str
    session_id: str | None = None
    service: str
    status: FinalStatus
    result: Any = None
    error: TaskError | None = None
    attempt: int = 0
    reply_to: str | None = None
    events: int = Field(default=0, ge=0, description="how many events the task streamed")
    steps: dict[str, list[float]] = Field(
        default_factory=dict, description="seconds each run of each step took (last attempt)"
    )
    replied: bool = Field(
        default=False,
        description="the worker sent this outcome to reply_to itself, in the same publish "
        "as to the control plane (the control plane does not send it there again)",
    )


# Service registry


class RegisterService(Payload):
    service: str = Field(pattern=NAME_PATTERN)
    instance_id: str
    host: str = ""
    pid: int = 0
    workflow: str = Field(default="", description="MODULE:ATTR of the workflow it runs")
    event_types: list[str] = Field(
        default_factory=list,
        description="qualified names of the event types send_event may deliver to its tasks",
    )
    start_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the workflow's start event")
    stop_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the workflow's stop event")
    event_schemas: list[dict[str, Any]] = Field(
        default_factory=list, description="JSON Schema of each event type of the workflow")
    graph: dict[str, Any] | None = Field(
        default=None, description="the workflow's graph (llama-index-workflows WorkflowGraph)")
    max_concurrent_tasks: int | None = Field(
        default=None, ge=1, description="tasks of the service that may run at once across all "
        "its replicas (the orchestrator holds the others back); none: no limit")


class RunningTask(BaseModel):
    task_id: str
    attempt: int


class Heartbeat(Payload):
    service: str = Field(pattern=NAME_PATTERN)
    instance_id: str
    running: list[RunningTask] = Field(default_factory=list)
    max_concurrent_tasks: int | None = Field(
        default=None, ge=1, description="as registered: every orchestrator replica learns the "
        "service's limit from it, not only the one the registration reached")


class DeregisterService(Payload):
    service: str = Field(pattern=NAME_PATTERN)
    instance_id: str


# Queries answered by the control plane over the broker


QueryKind = Literal[
    "get_task",
    "delete_task",
    "list_tasks",
    "list_services",
    "list_dead_letters",
    "watch_task",
    "stream_task",
    "create_session",
    "get_session",
    "list_sessions",
    "delete_session",
    "set_session_state",
    "get_counters",
    "get_checkpoint",
    "pending_work",
    "get_metrics",
    "list_events",
    "get_throughput",
]

# Queries about one task, sent through the front door (`<ns>.control_plane`) keyed by the
# task: answered after the task's NEW_TASK has been recorded.
TASK_QUERIES = frozenset({"get_task", "watch_task", "stream_task", "delete_task"})


class Query(Payload):
    kind: QueryKind
    reply_to: str
    task_id: str | None = None
    service: str | None = None
    status: TaskStatus | None = None
    session_id: str | None = None
    owner: str | None = Field(default=None, description="list_tasks: the publisher_id")
    search: str | None = Field(
        default=None, max_length=200,
        description="list_tasks: only tasks whose id or service contains this text, "
        "ignoring case")
    limit: int = Field(default=100, ge=1, le=10_000)
    after: int = Field(
        default=-1, ge=-1,
        description="stream_task, list_events: replay (list) the events after this index"
    )
    minutes: int = Field(
        default=60, ge=1, le=1440, description="get_throughput: how many minutes back from now"
    )
    state: dict[str, Any] | None = Field(
        default=None, description="set_session_state: the session's new state"
    )


class QueryResult(Payload):
    request_id: str
    result: Any = None
    error: TaskError | None = None


class DeadLetter(Payload):
    """A message that could not be handled, kept with the reason."""

    reason: str
    error_type: str
    topic: str
    body: str = Field(description="the original message, as received (cut at 64 KiB)")
    message_id: str | None = None
    publisher_id: str | None = None
    task_id: str | None = None
    received_at: datetime | None = None


# The envelope


class QueueMessage(BaseModel):
    """The envelope of every message: `{"id", "type", "action", "publisher_id", "data"}`."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_id, min_length=1)
    type: str
    action: Action
    publisher_id: str = Field(default="", max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


class NewTaskMessage(QueueMessage):
    action: Literal[Action.NEW_TASK] = Action.NEW_TASK
    data: NewTask


class DispatchTaskMessage(QueueMessage):
    action: Literal[Action.DISPATCH_TASK] = Action.DISPATCH_TASK
    data: DispatchTask


class TaskStreamMessage(QueueMessage):
    action: Literal[Action.TASK_STREAM] = Action.TASK_STREAM
    data: TaskStream


class SendEventMessage(QueueMessage):
    action: Literal[Action.SEND_EVENT] = Action.SEND_EVENT
    data: SendEvent


class CancelTaskMessage(QueueMessage):
    action: Literal[Action.CANCEL_TASK] = Action.CANCEL_TASK
    data: CancelTask


class PauseTaskMessage(QueueMessage):
    action: Literal[Action.PAUSE_TASK] = Action.PAUSE_TASK
    data: TaskControl


class ResumeTaskMessage(QueueMessage):
    action: Literal[Action.RESUME_TASK] = Action.RESUME_TASK
    data: TaskControl


class TaskStatusMessage(QueueMessage):
    action: Literal[Action.TASK_STATUS] = Action.TASK_STATUS
    data: TaskStatusUpdate


class CompletedTaskMessage(QueueMessage):
    action: Literal[Action.COMPLETED_TASK] = Action.COMPLETED_TASK
    data: CompletedTask


class RegisterServiceMessage(QueueMessage):
    action: Literal[Action.REGISTER_SERVICE] = Action.REGISTER_SERVICE
    data: RegisterService


class HeartbeatMessage(QueueMessage):
    action: Literal[Action.HEARTBEAT] = Action.HEARTBEAT
    data: Heartbeat


class DeregisterServiceMessage(QueueMessage):
    action: Literal[Action.DEREGISTER_SERVICE] = Action.DEREGISTER_SERVICE
    data: DeregisterService


class QueryMessage(QueueMessage):
    action: Literal[Action.QUERY] = Action.QUERY
    data: Query


class QueryResultMessage(QueueMessage):
    action: Literal[Action.QUERY_RESULT] = Action.QUERY_RESULT
    data: QueryResult


class DeadLetterMessage(QueueMessage):
    action: Literal[Action.DEAD_LETTER] = Action.DEAD_LETTER
    data: DeadLetter


TYPED_MESSAGES: tuple[type[QueueMessage], ...] = (
    NewTaskMessage,
    DispatchTaskMessage,
    TaskStreamMessage,
    SendEventMessage,
    CancelTaskMessage,
    PauseTaskMessage,
    ResumeTaskMessage,
    TaskStatusMessage,
    CompletedTaskMessage,
    RegisterServiceMessage,
    HeartbeatMessage,
    DeregisterServiceMessage,
    QueryMessage,
    QueryResultMessage,
    DeadLetterMessage,
)

AnyMessage = Annotated[
    NewTaskMessage
    | DispatchTaskMessage
    | TaskStreamMessage
    | SendEventMessage
    | CancelTaskMessage
    | PauseTaskMessage
    | ResumeTaskMessage
    | TaskStatusMessage
    | CompletedTaskMessage
    | RegisterServiceMessage
    | HeartbeatMessage
    | DeregisterServiceMessage
    | QueryMessage
    | QueryResultMessage
    | DeadLetterMessage,
    Field(discriminator="action"),
]

_any_message: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


class InvalidMessage(ValueError):
    """A message that is not a valid QueueMessage; the text names what is wrong."""

    error_type = "InvalidMessage"


class MessageTooLarge(InvalidMessage):
    """A message over MAX_MESSAGE_BYTES."""

    error_type = "MessageTooLarge"


def parse_message(body: bytes | str) -> AnyMessage:
    """Validate one message off the wire; raises InvalidMessage naming the problem."""
    size = len(body.encode(errors="surrogatepass")) if isinstance(body, str) else len(body)
    if size > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(
            f"message of {size} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes"
        )
    try:
        return _any_message.validate_json(body)
    except ValidationError as exc:
        raise InvalidMessage(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line naming each problem of a message: the field and what is wrong with it."""
    problems = []
    for error in exc.errors(include_url=False)[:5]:
        if error["type"] == "union_tag_invalid":
            tag = error.get("ctx", {}).get("tag")
            problems.append(f"unknown action {tag!r}; expected one of {', '.join(Action)}")
            continue
        if error["type"] == "union_tag_not_found":
            problems.append("action: field required")
            continue
        if error["type"] == "json_invalid":
            problems.append(f"malformed JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
            continue
        loc = ".".join(str(part) for part in error["loc"][1:]) or "message"
        problems.append(f"{loc}: {error['msg']}")
    return "; ".join(problems)


def encode(message: QueueMessage) -> bytes:
    return message.model_dump_json().encode()
