"""The wire contract: schema files, parsing of hand-built messages, topic names (no broker)."""

import importlib.util
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conveyor.contracts import (
    MAX_MESSAGE_BYTES,
    TYPED_MESSAGES,
    Action,
    CancelTask,
    CancelTaskMessage,
    CompletedTask,
    CompletedTaskMessage,
    DeadLetter,
    DeadLetterMessage,
    DeregisterService,
    DeregisterServiceMessage,
    DispatchTask,
    DispatchTaskMessage,
    EventEnvelope,
    Heartbeat,
    HeartbeatMessage,
    InvalidMessage,
    InvalidName,
    MessageTooLarge,
    NewTask,
    NewTaskMessage,
    PauseTaskMessage,
    Query,
    QueryMessage,
    QueryResult,
    QueryResultMessage,
    RegisterService,
    RegisterServiceMessage,
    ResumeTaskMessage,
    RunningTask,
    SendEvent,
    SendEventMessage,
    TaskControl,
    TaskError,
    TaskStatusMessage,
    TaskStatusUpdate,
    TaskStream,
    TaskStreamMessage,
    encode,
    parse_message,
    service_topic,
    topic,
)

ROOT = Path(__file__).resolve().parent.parent


def _load_export_schema():
    path = ROOT / "tools" / "export_schema.py"
    spec = importlib.util.spec_from_file_location("export_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_schema = _load_export_schema()

# The NEW_TASK of the wire-contract example, as another system would build it by hand.
WIRE_NEW_TASK = """{
  "id": "0f8e2c1d9a7b4e6f8a1b2c3d4e5f6a7b",
  "type": "control_plane",
  "action": "new_task",
  "publisher_id": "billing-system",
  "data": {
    "task_id": "t-1",
    "session_id": null,
    "service": "my_workflow",
    "input": {"arg1": "hello"},
    "reply_to": "conveyor.replies.billing",
    "stream": false
  }
}"""


def new_task_body(drop: str = "", **data_changes) -> str:
    """The wire example as JSON text, with `data` fields changed or one field dropped."""
    body = json.loads(WIRE_NEW_TASK)
    body["data"].update(data_changes)
    body.pop(drop, None)
    body["data"].pop(drop, None)
    return json.dumps(body, ensure_ascii=False)


# Schema files


def test_checked_in_schema_files_match_the_code():
    assert export_schema.problems(export_schema.SCHEMA_DIR) == []


def test_there_is_one_schema_file_per_action_plus_the_envelope():
    expected = {f"{action.value}.json" for action in Action} | {"queue_message.json"}
    assert set(export_schema.render()) == expected


def test_check_exits_1_naming_missing_stale_and_extra_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_schema, "SCHEMA_DIR", tmp_path)
    assert export_schema.main([]) == 0
    (tmp_path / "heartbeat.json").unlink()
    (tmp_path / "new_task.json").write_text("{}\n")
    (tmp_path / "old_message.json").write_text("{}\n")
    capsys.readouterr()

    assert export_schema.main(["--check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"missing: {tmp_path / 'heartbeat.json'}" in lines
    assert f"stale: {tmp_path / 'new_task.json'}" in lines
    assert f"extra: {tmp_path / 'old_message.json'}" in lines
    assert (tmp_path / "new_task.json").read_text() == "{}\n"  # --check writes nothing


def test_writing_fixes_what_check_found(tmp_path, monkeypatch):
    monkeypatch.setattr(export_schema, "SCHEMA_DIR", tmp_path)
    (tmp_path / "new_task.json").write_text("{}\n")
    (tmp_path / "old_message.json").write_text("{}\n")

    assert export_schema.main([]) == 0
    assert export_schema.main(["--check"]) == 0
    assert not (tmp_path / "old_message.json").exists()


# Parsing what other systems send


def test_hand_built_new_task_parses():
    message = parse_message(WIRE_NEW_TASK)
    assert isinstance(message, NewTaskMessage)
    assert message.id == "0f8e2c1d9a7b4e6f8a1b2c3d4e5f6a7b"
    assert message.type == "control_plane"
    assert message.publisher_id == "billing-system"
    assert message.data == NewTask(
        task_id="t-1",
        session_id=None,
        service="my_workflow",
        input={"arg1": "hello"},
        reply_to="conveyor.replies.billing",
        stream=False,
    )


def test_new_task_without_task_id_gets_one():
    body = new_task_body(drop="task_id")
    first = parse_message(body)
    second = parse_message(body)
    assert first.data.task_id and second.data.task_id
    assert first.data.task_id != second.data.task_id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param('{"id": "m-1", "type": ', "malformed JSON", id="malformed-json"),
        pytest.param("[]", "message: Input should be an object", id="json-array"),
        pytest.param(
            new_task_body().replace('"new_task"', '"cancel_everything"'),
            "unknown action 'cancel_everything'",
            id="unknown-action",
        ),
        pytest.param(new_task_body(drop="action"), "action: field required", id="no-action"),
        pytest.param(
            new_task_body(session_id="s" * 201),
            "data.session_id: String should have at most 200 characters",
            id="session-id-too-long",
        ),
        pytest.param(
            new_task_body(drop="service"), "data.service: Field required", id="no-service"
        ),
        pytest.param(
            new_task_body(input=["hello"]),
            "data.input: Input should be an object",
            id="input-not-object",
        ),
        pytest.param(
            new_task_body(service="my.workflow"),
            "data.service: String should match pattern",
            id="bad-service-name",
        ),
    ],
)
def test_invalid_message_names_the_problem(body, expected):
    with pytest.raises(InvalidMessage, match=re.escape(expected)):
        parse_message(body)


def test_message_at_the_limit_parses():
    body = new_task_body().encode()
    body += b" " * (MAX_MESSAGE_BYTES - len(body))
    assert len(body) == MAX_MESSAGE_BYTES
    assert isinstance(parse_message(body), NewTaskMessage)


def test_message_over_the_limit_is_too_large():
    body = new_task_body().encode()
    body += b" " * (MAX_MESSAGE_BYTES + 1 - len(body))
    assert issubclass(MessageTooLarge, InvalidMessage)
    with pytest.raises(MessageTooLarge, match=f"over the limit of {MAX_MESSAGE_BYTES} bytes"):
        parse_message(body)


def test_text_body_is_measured_in_utf8_bytes():
    body = new_task_body(input={"text": "é" * (MAX_MESSAGE_BYTES // 2)})
    assert len(body) < MAX_MESSAGE_BYTES < len(body.encode())
    with pytest.raises(MessageTooLarge):
        parse_message(body)


# Topic names


def test_topic_is_namespace_dot_message_type():
    assert topic("ns", "control_plane") == "ns.control_plane"
    assert service_topic("ns", "my_workflow") == "ns.my_workflow"


@pytest.mark.parametrize(
    "name",
    ["control_plane", "dead_letter", "registry", "query", "reply", "orchestrator"],
)
def test_service_topic_refuses_reserved_names(name):
    with pytest.raises(InvalidName, match="reserved"):
        service_topic("ns", name)


@pytest.mark.parametrize("name", ["my.workflow", "my workflow", "", "-leading-dash", "x" * 101])
def test_service_topic_refuses_names_that_cannot_be_a_topic_part(name):
    with pytest.raises(InvalidName, match="service name"):
        service_topic("ns", name)


# Round trip


TASK = NewTask(
    task_id="t-1",
    session_id="s-1",
    service="my_workflow",
    input={"arg1": "hello", "n": [1, 2.5, None]},
    reply_to="conveyor.reply.c-1",
    stream=True,
    parent_task_id="t-0",
)
EVENT = EventEnvelope(
    type="ProgressEvent", types=["Event"], qualified_name="app.ProgressEvent", value={"pct": 50}
)
ERROR = TaskError(type="ValueError", message="bad input")

SAMPLES = {
    NewTaskMessage: NewTaskMessage(type="control_plane", publisher_id="p", data=TASK),
    DispatchTaskMessage: DispatchTaskMessage(
        type="my_workflow", data=DispatchTask(task=TASK, attempt=2)
    ),
    TaskStreamMessage: TaskStreamMessage(
        type="control_plane",
        data=TaskStream(
            task_id="t-1",
            session_id="s-1",
            index=3,
            event=EVENT,
            attempt=1,
            reply_to="conveyor.reply.c-1",
            stream=True,
        ),
    ),
    SendEventMessage: SendEventMessage(
        type="control_plane",
        data=SendEvent(task_id="t-1", event=EVENT, step="ask", reply_to="conveyor.reply.c-1",
                       seq=2),
    ),
    CancelTaskMessage: CancelTaskMessage(
        type="control_plane",
        data=CancelTask(task_id="t-1", reason="not needed", reply_to="conveyor.reply.c-1"),
    ),
    PauseTaskMessage: PauseTaskMessage(
        type="control_plane", data=TaskControl(task_id="t-1", reply_to="conveyor.reply.c-1"),
    ),
    ResumeTaskMessage: ResumeTaskMessage(
        type="control_plane", data=TaskControl(task_id="t-1"),
    ),
    TaskStatusMessage: TaskStatusMessage(
        type="control_plane",
        data=TaskStatusUpdate(task_id="t-1", service="my_workflow", status="retrying",
                              attempt=2, error=ERROR, retry_in=1.5),
    ),
    CompletedTaskMessage: CompletedTaskMessage(
        type="control_plane",
        data=CompletedTask(
            task_id="t-1",
            service="my_workflow",
            status="failed",
            result={"partial": [1, 2]},
            error=ERROR,
            attempt=3,
            events=7,
            steps={"work": [0.25, 0.5]},
        ),
    ),
    RegisterServiceMessage: RegisterServiceMessage(
        type="registry",
        data=RegisterService(
            service="my_workflow", instance_id="i-1", host="h", pid=42, workflow="app:workflow",
            event_types=["workflows.events.HumanResponseEvent"],
        ),
    ),
    HeartbeatMessage: HeartbeatMessage(
        type="registry",
        data=Heartbeat(
            service="my_workflow",
            instance_id="i-1",
            running=[RunningTask(task_id="t-1", attempt=1)],
        ),
    ),
    DeregisterServiceMessage: DeregisterServiceMessage(
        type="registry", data=DeregisterService(service="my_workflow", instance_id="i-1")
    ),
    QueryMessage: QueryMessage(
        type="query",
        data=Query(
            kind="list_tasks",
            reply_to="conveyor.reply.c-1",
            service="my_workflow",
            status="running",
            limit=5,
        ),
    ),
    QueryResultMessage: QueryResultMessage(
        type="reply", data=QueryResult(request_id="m-1", result=[{"task_id": "t-1"}], error=ERROR)
    ),
    DeadLetterMessage: DeadLetterMessage(
        type="dead_letter",
        data=DeadLetter(
            reason="no such action",
            error_type="InvalidMessage",
            topic="conveyor.control_plane",
            body="{}",
            message_id="m-1",
            publisher_id="p",
            task_id="t-1",
            received_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
    ),
}


@pytest.mark.parametrize("model", TYPED_MESSAGES, ids=lambda model: model.__name__)
def test_every_message_survives_encode_and_parse(model):
    message = SAMPLES[model]
    parsed = parse_message(encode(message))
    assert type(parsed) is model
    assert parsed == message
