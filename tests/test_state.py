"""The control plane's and orchestrator's state functions against real SQLite and PostgreSQL.

Every test runs twice: on a SQLite file of its own, and on a throwaway PostgreSQL database
(created once per session at 127.0.0.1:5432 as user postgres, emptied before each test and
dropped at the end). PostgreSQL being unreachable fails those tests; it never skips them.
"""

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest
from sqlalchemy import func, select, text

from conveyor.contracts import (
    CompletedTask,
    DeadLetter,
    EventEnvelope,
    Heartbeat,
    NewTask,
    Query,
    RegisterService,
    RunningTask,
    TaskError,
    TaskStream,
)
from conveyor.services import database
from conveyor.services.control_plane import metrics, state
from conveyor.services.orchestrator import state as orchestrator_state
from conveyor.services.runtime.starting_point import starting_point
from conveyor.services.settings import ConfigurationError

# Where the throwaway databases are created; an existing database to connect to first.
POSTGRES_ADMIN_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def _in_thread(coroutine_function, *args):
    """Run asyncpg outside the session's event loop (sync session fixtures can't await)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine_function(*args)).result()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database for this session, dropped afterwards."""
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    problem = None
    try:
        _in_thread(_admin, f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        pytest.fail(
            f"PostgreSQL is not usable at {POSTGRES_ADMIN_URL} ({problem}); start it "
            f"(trust auth, user postgres, database test) or point CONVEYOR_TEST_POSTGRES at one",
            pytrace=False,
        )
    admin_base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{admin_base}/{name}"
    _in_thread(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    params=[
        pytest.param("sqlite"),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
async def engine(request, tmp_path):
    """An empty state store, with its tables, on the parametrized backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = await database.connect(url)
    async with engine.begin() as conn:
        for table in reversed(database.metadata.sorted_tables):
            await conn.execute(table.delete())
    yield engine
    await engine.dispose()


@pytest.mark.postgres
async def test_a_part_keeps_its_postgres_connections_between_bursts(postgres_url):
    # Bursts of as many transactions at once as a part under load runs (8 front-door
    # messages, more tasks) reuse the connections the first burst opened: none is closed and
    # opened again, which cost PostgreSQL a fork and a handshake each time.
    engine = await database.connect(postgres_url)

    async def burst() -> set[int]:
        """The server processes (one per connection) that served the burst."""
        async def one() -> int:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT pg_sleep(0.05)"))
                return (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()

        return set(await asyncio.gather(*(one() for _ in range(database.POOL_KEPT))))

    try:
        first = await burst()
        assert len(first) == database.POOL_KEPT
        for _ in range(3):
            assert await burst() <= first
    finally:
        await engine.dispose()


def new_task(task_id: str = "t1", **fields) -> NewTask:
    values = {"task_id": task_id, "service": "echo", "input": {"text": "hi"}}
    return NewTask(**(values | fields))


def outcome(task_id: str = "t1", **fields) -> CompletedTask:
    values = {"task_id": task_id, "service": "echo", "status": "completed",
              "result": {"echo": "hi"}, "attempt": 1}
    return CompletedTask(**(values | fields))


def query(**fields) -> Query:
    return Query(kind="list_tasks", reply_to="replies", **fields)


async def count(engine, table, *where) -> int:
    async with engine.begin() as conn:
        statement = select(func.count()).select_from(table)
        if where:
            statement = statement.where(*where)
        return (await conn.execute(statement)).scalar_one()


async def get(engine, task_id: str) -> dict | None:
    async with engine.begin() as conn:
        return await state.get_task(conn, task_id)


# Task records


async def test_new_task_recorded_twice_keeps_one_queued_record(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(session_id="s1"), "client-a")
    async with engine.begin() as conn:
        # A redelivery, even one that differs, changes nothing.
        await state.record_new_task(conn, new_task(input={"text": "other"}), "client-b")

    assert await count(engine, database.tasks) == 1
    task = await get(engine, "t1")
    assert task["status"] == "queued"
    assert task["attempts"] == 0
    assert task["input"] == {"text": "hi"}
    assert task["session_id"] == "s1"
    assert task["publisher_id"] == "client-a"
    assert task["result"] is None and task["error"] is None
    assert task["created_at"] is not None
    assert task["started_at"] is None and task["finished_at"] is None


async def test_get_task_of_unknown_task_is_none(engine):
    assert await get(engine, "never-sent") is None


async def test_outcome_is_stored_once_and_a_second_outcome_changes_nothing(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")
    async with engine.begin() as conn:
        assert await state.record_outcome(conn, outcome(attempt=2)) == []
    first = await get(engine, "t1")
    assert first["status"] == "completed"
    assert first["result"] == {"echo": "hi"}
    assert first["error"] is None
    assert first["attempts"] == 2
    assert first["finished_at"] is not None

    async with engine.begin() as conn:
        again = await state.record_outcome(
            conn,
            outcome(status="failed", result=None, attempt=3,
                    error=TaskError(type="Boom", message="late duplicate")),
        )
    assert again is None
    assert await get(engine, "t1") == first


async def test_failed_outcome_stores_its_error(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")
        await state.record_outcome(
            conn,
            outcome(status="failed", result=None,
                    error=TaskError(type="EchoFailed", message="asked to fail")),
        )
    task = await get(engine, "t1")
    assert task["status"] == "failed"
    assert task["result"] is None
    assert task["error"] == {"type": "EchoFailed", "message": "asked to fail"}


async def test_outcome_before_its_new_task_is_stored_and_completed_by_it(engine):
    async with engine.begin() as conn:
        assert await state.record_outcome(conn, outcome(session_id="s1")) == []
    early = await get(engine, "t1")
    assert early["status"] == "completed"
    assert early["result"] == {"echo": "hi"}
    assert early["service"] == "echo"
    assert early["session_id"] == "s1"

    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(session_id="s1"), "client")
    assert await count(engine, database.tasks) == 1
    late = await get(engine, "t1")
    assert late["status"] == "completed"
    assert late["result"] == {"echo": "hi"}
    assert late["attempts"] == 1
    assert late["finished_at"] == early["finished_at"]
    # What only the NEW_TASK knows is filled in (two control planes may each take one).
    assert late["input"] == {"text": "hi"}
    assert late["publisher_id"] == "client"

    async with engine.begin() as conn:  # and only once
        await state.record_new_task(conn, new_task(input={"text": "other"}), "client-b")
    assert (await get(engine, "t1"))["input"] == {"text": "hi"}


# Watchers


async def test_watching_a_running_task_registers_a_watcher_told_once(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")
        await state.record_heartbeat(
            conn, Heartbeat(service="echo", instance_id="i1",
                            running=[RunningTask(task_id="t1", attempt=1)])
        )
    async with engine.begin() as conn:
        assert await state.watch_task(conn, "t1", "replies-a", "req-1") is None
        # The same request again (a redelivered query) is remembered once.
        assert await state.watch_task(conn, "t1", "replies-a", "req-1") is None
        assert await state.watch_task(conn, "t1", "replies-b", "req-2") is None
    assert await count(engine, database.watchers) == 2

    async with engine.begin() as conn:
        told = await state.record_outcome(conn, outcome())
    assert sorted(told, key=lambda w: w["request_id"]) == [
        {"reply_to": "replies-a", "request_id": "req-1", "kind": "outcome"},
        {"reply_to": "replies-b", "request_id": "req-2", "kind": "outcome"},
    ]
    # Told once: the watchers are forgotten.
    assert await count(engine, database.watchers) == 0
    async with engine.begin() as conn:
        assert await state.record_outcome(conn, outcome()) is None


async def test_watching_a_finished_task_returns_its_record_at_once(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")
        await state.record_outcome(conn, outcome())
    async with engine.begin() as conn:
        found = await state.watch_task(conn, "t1", "replies", "req-1")
    assert found is not None
    assert found["task_id"] == "t1"
    assert found["status"] == "completed"
    assert found["result"] == {"echo": "hi"}
    assert found == await get(engine, "t1")
    assert await count(engine, database.watchers) == 0


async def test_watching_a_task_not_yet_recorded_waits_for_its_outcome(engine):
    async with engine.begin() as conn:
        assert await state.watch_task(conn, "t1", "replies", "req-1") is None
    async with engine.begin() as conn:
        told = await state.record_outcome(conn, outcome())
    assert told == [{"reply_to": "replies", "request_id": "req-1", "kind": "outcome"}]


async def test_watchers_of_other_tasks_are_kept(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task("t1"), "client")
        await state.record_new_task(conn, new_task("t2"), "client")
        await state.watch_task(conn, "t1", "replies", "req-1")
        await state.watch_task(conn, "t2", "replies", "req-2")
    async with engine.begin() as conn:
        assert await state.record_outcome(conn, outcome("t1")) == [
            {"reply_to": "replies", "request_id": "req-1", "kind": "outcome"}
        ]
    assert await count(engine, database.watchers, database.watchers.c.task_id == "t2") == 1


# Event log


def stream(index: int, value: dict, task_id: str = "t1") -> TaskStream:
    return TaskStream(
        task_id=task_id, index=index,
        event=EventEnvelope(type="Progress", types=["Event"],
                            qualified_name="app.Progress", value=value),
    )


async def test_the_event_log_lists_events_after_an_index_with_when_each_was_stored(engine):
    async with engine.begin() as conn:
        for index in range(4):
            await state.append_event(conn, stream(index, {"step": index}))
        await state.append_event(conn, stream(0, {"step": 0}, task_id="t2"))
    async with engine.begin() as conn:
        after_one = await state.events_of(conn, "t1", after=1, limit=100)
        first_two = await state.events_of(conn, "t1", after=-1, limit=2)
        unknown = await state.events_of(conn, "never-sent", after=-1, limit=100)

    assert [(e["index"], e["event"]["value"]) for e in after_one] == [
        (2, {"step": 2}), (3, {"step": 3})]
    assert [e["index"] for e in first_two] == [0, 1]
    assert all(datetime.fromisoformat(e["at"]).tzinfo is not None for e in after_one)
    assert unknown == []


async def test_a_task_record_names_the_trace_it_was_dispatched_in(engine):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task("traced"), "client")
        await state.record_new_task(conn, new_task("untraced"), "client")
        await state.record_new_task(conn, new_task("waiting"), "client")
        await orchestrator_state.claim_first_dispatch(
            conn, "traced", "echo", trace={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        await orchestrator_state.claim_first_dispatch(conn, "untraced", "echo")

    assert (await get(engine, "traced"))["trace_id"] == trace_id
    assert (await get(engine, "untraced"))["trace_id"] is None
    assert (await get(engine, "waiting"))["trace_id"] is None  # not dispatched yet


async def test_an_event_appended_twice_with_the_same_index_keeps_one_row(engine):
    async with engine.begin() as conn:
        await state.append_event(conn, stream(0, {"step": 1}))
    async with engine.begin() as conn:
        await state.append_event(conn, stream(0, {"step": 999}))
        await state.append_event(conn, stream(1, {"step": 2}))
        await state.append_event(conn, stream(0, {"step": 1}, task_id="t2"))

    assert await count(engine, database.events, database.events.c.task_id == "t1") == 2
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                select(database.events.c.idx, database.events.c.event)
                .where(database.events.c.task_id == "t1")
                .order_by(database.events.c.idx)
            )
        ).all()
    assert [(row.idx, row.event["value"]) for row in rows] == [(0, {"step": 1}), (1, {"step": 2})]
    assert rows[0].event == {
        "type": "Progress", "types": ["Event"], "qualified_name": "app.Progress",
        "value": {"step": 1},
    }


# Registry


async def test_heartbeat_marks_its_listed_queued_tasks_running_and_registers_its_service(engine):
    async with engine.begin() as conn:
        for task_id in ("t1", "t2", "t3"):
            await state.record_new_task(conn, new_task(task_id), "client")
    async with engine.begin() as conn:
        # No RegisterService came first (the control plane started after the service).
        await state.record_heartbeat(
            conn, Heartbeat(service="echo", instance_id="echo-1",
                            running=[RunningTask(task_id="t1", attempt=2),
                                     RunningTask(task_id="t2", attempt=1)])
        )

    for task_id, attempt in (("t1", 2), ("t2", 1)):
        running = await get(engine, task_id)
        assert running["status"] == "running"
        assert running["attempts"] == attempt
        assert running["started_at"] is not None
    assert (await get(engine, "t3"))["status"] == "queued"

    async with engine.begin() as conn:
        listed = await state.list_services(conn, heartbeat_timeout=30)
    assert [s["name"] for s in listed] == ["echo"]
    [instance] = listed[0]["instances"]
    assert instance["instance_id"] == "echo-1"
    assert instance["running"] == 2
    assert instance["alive"] is True


async def test_heartbeat_does_not_reopen_a_finished_task(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")
        await state.record_outcome(conn, outcome(attempt=1))
    async with engine.begin() as conn:
        # A heartbeat sent just before the task finished, delivered just after.
        await state.record_heartbeat(
            conn, Heartbeat(service="echo", instance_id="echo-1",
                            running=[RunningTask(task_id="t1", attempt=1)])
        )
    task = await get(engine, "t1")
    assert task["status"] == "completed"
    assert task["started_at"] is None


async def test_instance_alive_after_heartbeat_and_not_after_deregistration(engine):
    async with engine.begin() as conn:
        await state.record_registration(
            conn, RegisterService(service="echo", instance_id="echo-1", host="h", pid=42,
                                  workflow="conveyor.services.examples.echo:workflow")
        )
        await state.record_registration(
            conn, RegisterService(service="echo", instance_id="echo-2", host="h", pid=43,
                                  workflow="conveyor.services.examples.echo:workflow")
        )
    async with engine.begin() as conn:
        await state.record_heartbeat(conn, Heartbeat(service="echo", instance_id="echo-1"))

    async with engine.begin() as conn:
        [service] = await state.list_services(conn, heartbeat_timeout=30)
    # A heartbeat does not forget what the registration said.
    assert service["workflow"] == "conveyor.services.examples.echo:workflow"
    by_id = {i["instance_id"]: i for i in service["instances"]}
    assert by_id["echo-1"]["alive"] is True
    assert by_id["echo-1"]["host"] == "h" and by_id["echo-1"]["pid"] == 42
    assert by_id["echo-2"]["alive"] is True

    async with engine.begin() as conn:
        await state.record_deregistration(conn, "echo-1")
    async with engine.begin() as conn:
        [service] = await state.list_services(conn, heartbeat_timeout=30)
    by_id = {i["instance_id"]: i for i in service["instances"]}
    assert by_id["echo-1"]["alive"] is False
    assert by_id["echo-2"]["alive"] is True


async def test_instance_silent_past_the_heartbeat_timeout_is_not_alive(engine):
    async with engine.begin() as conn:
        await state.record_heartbeat(conn, Heartbeat(service="echo", instance_id="echo-1"))
    await asyncio.sleep(0.05)
    async with engine.begin() as conn:
        [service] = await state.list_services(conn, heartbeat_timeout=0.01)
    assert service["instances"][0]["alive"] is False


# Queries


async def test_list_tasks_filters_by_service_status_and_session(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task("a1", service="alpha", session_id="s1"), "c")
        await state.record_new_task(conn, new_task("a2", service="alpha", session_id="s2"), "c")
        await state.record_new_task(conn, new_task("b1", service="beta", session_id="s1"), "c")
        await state.record_new_task(conn, new_task("b2", service="beta"), "c")
        await state.record_outcome(conn, outcome("a2", service="alpha", session_id="s2"))
        await state.record_outcome(
            conn, outcome("b1", service="beta", session_id="s1", status="failed", result=None)
        )

    async def ids(**filters) -> set[str]:
        async with engine.begin() as conn:
            return {t["task_id"] for t in await state.list_tasks(conn, query(**filters))}

    assert await ids() == {"a1", "a2", "b1", "b2"}
    assert await ids(service="alpha") == {"a1", "a2"}
    assert await ids(service="beta") == {"b1", "b2"}
    assert await ids(service="gamma") == set()
    assert await ids(status="queued") == {"a1", "b2"}
    assert await ids(status="completed") == {"a2"}
    assert await ids(status="failed") == {"b1"}
    assert await ids(session_id="s1") == {"a1", "b1"}
    assert await ids(session_id="s2") == {"a2"}
    assert await ids(service="alpha", status="queued") == {"a1"}
    assert await ids(service="beta", session_id="s1", status="failed") == {"b1"}
    assert await ids(service="beta", session_id="s2") == set()
    async with engine.begin() as conn:
        assert len(await state.list_tasks(conn, query(limit=3))) == 3


async def test_list_tasks_searches_ids_and_services_by_a_piece_of_either(engine):
    async with engine.begin() as conn:
        for task_id, service in (("invoice-42", "billing"), ("Invoice-7", "echo"),
                                 ("a_b", "echo"), ("axb", "greeter")):
            await state.record_new_task(conn, new_task(task_id, service=service), "c")

    async def ids(search: str) -> set[str]:
        async with engine.begin() as conn:
            return {t["task_id"] for t in await state.list_tasks(conn, query(search=search))}

    assert await ids("invoice") == {"invoice-42", "Invoice-7"}  # any case
    assert await ids("bill") == {"invoice-42"}
    assert await ids("echo") == {"Invoice-7", "a_b"}
    assert await ids("a_b") == {"a_b"}  # `_` is not a wildcard
    assert await ids("%") == set()


async def test_dead_letters_are_listed_newest_first(engine):
    received = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with engine.begin() as conn:
        await state.record_dead_letter(
            conn, DeadLetter(reason="malformed JSON", error_type="InvalidMessage",
                             topic="conveyor.control_plane", body="{not json",
                             publisher_id="client", received_at=received)
        )
    async with engine.begin() as conn:
        await state.record_dead_letter(
            conn, DeadLetter(reason="no service named 'nope'", error_type="UnknownService",
                             topic="conveyor.control_plane", body='{"a": 1}',
                             message_id="m2", task_id="t2")
        )
        await state.record_dead_letter(
            conn, DeadLetter(reason="third", error_type="InvalidMessage", topic="x", body="")
        )

    async with engine.begin() as conn:
        letters = await state.list_dead_letters(conn, limit=10)
    assert [letter["reason"] for letter in letters] == [
        "third", "no service named 'nope'", "malformed JSON"
    ]
    oldest = letters[-1]
    assert oldest["error_type"] == "InvalidMessage"
    assert oldest["topic"] == "conveyor.control_plane"
    assert oldest["body"] == "{not json"
    assert oldest["publisher_id"] == "client"
    assert oldest["message_id"] is None and oldest["task_id"] is None
    assert oldest["received_at"].startswith("2025-01-02T03:04:05")
    middle = letters[1]
    assert (middle["message_id"], middle["task_id"]) == ("m2", "t2")
    # Without a receipt time the store stamps one.
    stamped = datetime.fromisoformat(middle["received_at"])
    stamped = stamped if stamped.tzinfo else stamped.replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - stamped) < timedelta(minutes=1)

    async with engine.begin() as conn:
        assert [x["reason"] for x in await state.list_dead_letters(conn, limit=1)] == ["third"]


async def test_a_dead_letter_keeps_the_instant_it_was_received(engine):
    # DeadLetter is part of the wire contract: other systems may stamp it in their own zone.
    received = datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    async with engine.begin() as conn:
        await state.record_dead_letter(
            conn, DeadLetter(reason="r", error_type="InvalidMessage", topic="t", body="",
                             received_at=received)
        )
    async with engine.begin() as conn:
        [letter] = await state.list_dead_letters(conn, limit=1)
    assert datetime.fromisoformat(letter["received_at"]) == received


# The orchestrator's dispatches


async def test_claim_first_dispatch_once_per_task(engine):
    async with engine.begin() as conn:
        assert (await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")).new is True
    async with engine.begin() as conn:
        assert (await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")).new is False
        assert (await orchestrator_state.claim_first_dispatch(conn, "t2", "echo")).new is True
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                select(database.dispatches).where(database.dispatches.c.task_id == "t1")
            )
        ).one()
    assert (row.service, row.attempt, row.finished) == ("echo", 1, False)


async def test_published_tasks_are_recorded_once_together_and_their_workers_claims_stand(engine):
    # A task that waits for nothing is published first and recorded after, those published
    # meanwhile together, in one statement that commits by itself (on PostgreSQL without
    # BEGIN and COMMIT): the worker that took one may have recorded it already, claimed,
    # and that record stays as the worker left it.
    def published(task_id: str, task: dict | None = None) -> dict:
        return orchestrator_state.first_dispatch(task_id, "echo", None, None, task, None)

    async with database.autocommit(engine) as conn:
        await orchestrator_state.record_published(conn, [published("t1", {"task_id": "t1"})])
    async with engine.begin() as conn:
        start = await starting_point(conn, new_task(task_id="t2"), 1, "i1", b"key", 30.0)
    assert start.skip is None
    async with database.autocommit(engine) as conn:
        await orchestrator_state.record_published(
            conn, [published("t1"), published("t2"), published("t3", {"task_id": "t3"})])
    async with engine.connect() as conn:
        rows = {row.task_id: row for row in await conn.execute(select(database.dispatches))}
    assert (rows["t1"].attempt, rows["t1"].task, rows["t1"].instance_id) == (
        1, {"task_id": "t1"}, None)
    assert (rows["t2"].attempt, rows["t2"].instance_id) == (1, "i1")
    assert (rows["t3"].attempt, rows["t3"].task, rows["t3"].instance_id) == (
        1, {"task_id": "t3"}, None)


async def test_a_duplicate_new_task_finds_its_dispatch_untaken_until_a_worker_claims_it(engine):
    # The orchestrator commits the dispatch before publishing it: a NEW_TASK delivered again
    # (the orchestrator stopped in between) has it published again while no worker has it.
    task = new_task()
    async with engine.begin() as conn:
        assert (await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")).new is True
    async with engine.begin() as conn:
        again = await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
    assert (again.new, again.untaken) == (False, True)
    async with engine.begin() as conn:
        start = await starting_point(conn, task, 1, "i1", b"key", 30.0)
    assert start.skip is None
    async with engine.begin() as conn:
        again = await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
    assert (again.new, again.untaken) == (False, False)


async def test_tasks_of_one_session_are_dispatched_one_at_a_time_in_order(engine):
    claim = orchestrator_state.claim_first_dispatch
    async with engine.begin() as conn:
        first = await claim(conn, "t1", "counter", task={"task_id": "t1"}, session_id="s")
        second = await claim(conn, "t2", "counter", task={"task_id": "t2"}, session_id="s")
        third = await claim(conn, "t3", "counter", task={"task_id": "t3"}, session_id="s")
        elsewhere = await claim(conn, "t4", "counter", task={"task_id": "t4"}, session_id="o")
    assert [c.held for c in (first, second, third, elsewhere)] == [False, True, True, False]
    release = orchestrator_state.release_after
    async with engine.begin() as conn:
        assert await release(conn, "t1", {}) == []  # t1 still runs
        await orchestrator_state.mark_finished(conn, "t1")
        released = await release(conn, "t1", {})
        assert await release(conn, "t1", {}) == []  # t2 runs now
    assert released == [{"task": {"task_id": "t2"}, "attempt": 1, "trace": None}]
    async with engine.begin() as conn:
        await orchestrator_state.cancel(conn, "t2")
        released = await release(conn, "t2", {})
    assert [r["task"] for r in released] == [{"task_id": "t3"}]


async def test_a_service_limit_holds_tasks_until_a_place_frees(engine):
    claim = orchestrator_state.claim_first_dispatch
    release = orchestrator_state.release_after
    limits = {"slow": 2}
    async with engine.begin() as conn:
        held = [(await claim(conn, f"t{n}", "slow", task={"n": n}, limit=2)).held
                for n in range(5)]
        unlimited = await claim(conn, "e1", "echo", task={"n": "e"})
    assert held == [False, False, True, True, True]
    assert unlimited.held is False
    async with engine.begin() as conn:
        await orchestrator_state.pause(conn, "t0")  # a paused task gives up its place
        assert [r["task"] for r in await release(conn, "t0", limits)] == [{"n": 2}]
        await orchestrator_state.mark_finished(conn, "t1")
        assert [r["task"] for r in await release(conn, "t1", limits)] == [{"n": 3}]
        assert await release(conn, "t1", limits) == []  # full again: t2 and t3 run
    async with engine.begin() as conn:
        # A higher limit (a new registration) lets the sweep release the rest.
        released = await orchestrator_state.release_held(conn, {"slow": 3}, every=True)
    assert [r["task"] for r in released] == [{"n": 4}]


async def test_a_held_task_waits_for_both_its_session_and_its_service(engine):
    claim = orchestrator_state.claim_first_dispatch
    limits = {"slow": 1}
    async with engine.begin() as conn:
        await claim(conn, "a1", "slow", task={"id": "a1"}, session_id="a", limit=1)
        await claim(conn, "b1", "slow", task={"id": "b1"}, session_id="b", limit=1)
        await claim(conn, "a2", "slow", task={"id": "a2"}, session_id="a", limit=1)
    async with engine.begin() as conn:
        await orchestrator_state.mark_finished(conn, "a1")
        # b1 came first and its session is free; a2 is next in its session, but the
        # service has room for one.
        released = await orchestrator_state.release_after(conn, "a1", limits)
    assert [r["task"] for r in released] == [{"id": "b1"}]


async def test_a_claim_rolled_back_can_be_claimed_again(engine):
    class PublishFailed(Exception):
        pass

    # The orchestrator publishes inside the claim's transaction; a failed publish undoes it.
    with pytest.raises(PublishFailed):
        async with engine.begin() as conn:
            assert (await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")).new is True
            raise PublishFailed
    async with engine.begin() as conn:
        assert (await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")).new is True


async def test_mark_finished_and_known_services(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await orchestrator_state.mark_finished(conn, "t1")
        await state.record_registration(conn, RegisterService(service="echo", instance_id="i1"))
        await state.record_heartbeat(conn, Heartbeat(service="slow", instance_id="i2"))
    async with engine.begin() as conn:
        finished = (
            await conn.execute(select(database.dispatches.c.finished))
        ).scalar_one()
        assert finished is True
        assert await orchestrator_state.known_services(conn) == {"echo": None, "slow": None}


# Concurrent deliveries (two control-plane replicas, or a query beside the recorder)


async def _while_held(engine, first, second):
    """Run `first` in a transaction left open, start `second` in another, then commit first.

    `second` gets time to read before `first` commits, as it would when two messages are
    handled at the same moment.
    """
    async with engine.connect() as holder:
        await holder.begin()
        first_result = await first(holder)

        async def other():
            async with engine.begin() as conn:
                return await second(conn)

        racing = asyncio.create_task(other())
        await asyncio.sleep(0.5)
        await holder.commit()
    return first_result, await asyncio.wait_for(racing, 30)


@pytest.mark.parametrize("recorded_first", [True, False], ids=["recorded", "not-yet-recorded"])
async def test_concurrent_duplicate_outcomes_leave_the_first_standing(engine, recorded_first):
    if recorded_first:
        async with engine.begin() as conn:
            await state.record_new_task(conn, new_task(), "client")

    first, second = await _while_held(
        engine,
        lambda conn: state.record_outcome(conn, outcome()),
        lambda conn: state.record_outcome(
            conn, outcome(status="failed", result=None,
                          error=TaskError(type="Boom", message="duplicate"))
        ),
    )
    task = await get(engine, "t1")
    assert (task["status"], task["result"]) == ("completed", {"echo": "hi"})
    assert first == []
    assert second is None


@pytest.mark.parametrize("recorded_first", [True, False], ids=["recorded", "not-yet-recorded"])
async def test_a_watch_racing_the_outcome_is_answered(engine, recorded_first):
    if recorded_first:
        async with engine.begin() as conn:
            await state.record_new_task(conn, new_task(), "client")

    told, found = await _while_held(
        engine,
        lambda conn: state.record_outcome(conn, outcome()),
        lambda conn: state.watch_task(conn, "t1", "replies", "req-1"),
    )
    # Either the watch sees the outcome, or the outcome sees the watcher: never neither.
    watcher = {"reply_to": "replies", "request_id": "req-1", "kind": "outcome"}
    answered = found is not None or watcher in told
    assert answered, "the watcher was stored after the outcome and will never be told"


async def test_an_outcome_racing_a_watch_tells_the_watcher(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "client")

    found, told = await _while_held(
        engine,
        lambda conn: state.watch_task(conn, "t1", "replies", "req-1"),
        lambda conn: state.record_outcome(conn, outcome()),
    )
    assert found is None
    assert told == [{"reply_to": "replies", "request_id": "req-1", "kind": "outcome"}]


async def test_metrics_count_tasks_retries_and_bucket_durations(engine):
    async with engine.begin() as conn:
        for task_id, service, attempts, seconds in (("a", "echo", 1, 0.02), ("b", "echo", 3, 7),
                                                    ("c", "slow", 1, None)):
            created = database.now() - timedelta(seconds=100)
            await conn.execute(database.tasks.insert().values(
                task_id=task_id, service=service, status="completed" if seconds else "queued",
                attempts=attempts, created_at=created,
                finished_at=created + timedelta(seconds=seconds) if seconds else None))
        found = await metrics.read(conn)
    assert sorted((t["service"], t["status"], t["count"]) for t in found["tasks"]) == [
        ("echo", "completed", 2), ("slow", "queued", 1)]
    assert found["retries"] == {"echo": 2}
    echo = found["durations"]["echo"]
    assert echo["count"] == 2 and abs(echo["sum"] - 7.02) < 0.01
    bounds = found["bucket_bounds"]
    assert echo["buckets"] == [(0.02 <= b) + (7 <= b) for b in bounds]
    assert "slow" not in found["durations"]


async def test_throughput_counts_finished_tasks_per_minute_over_the_window(engine):
    moment = database.now().replace(second=30, microsecond=0)
    async with engine.begin() as conn:
        for task_id, status, minutes_ago in (
                ("a", "completed", 0), ("b", "completed", 0), ("c", "failed", 0),
                ("d", "completed", 2), ("e", "cancelled", 2), ("f", "completed", 5),
                ("g", "running", 0)):
            finished = moment - timedelta(minutes=minutes_ago)
            await conn.execute(database.tasks.insert().values(
                task_id=task_id, service="echo", status=status, attempts=1,
                created_at=finished - timedelta(seconds=1),
                finished_at=None if status == "running" else finished))
        found = await metrics.throughput(conn, minutes=3, until=moment)
    # This minute and the two before it.
    assert [(m["completed"], m["failed"], m["cancelled"]) for m in found] == [
        (1, 0, 1), (0, 0, 0), (2, 1, 0)]
    starts = [datetime.fromisoformat(m["minute"]) for m in found]
    first = moment.replace(second=0) - timedelta(minutes=2)
    assert starts == [first + timedelta(minutes=n) for n in range(3)]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_state_store_holds_one_namespace_and_refuses_another(request, tmp_path, backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    first = await database.connect(url, "blue")
    try:
        with pytest.raises(ConfigurationError) as refused:
            await database.connect(url, "green")
        again = await database.connect(url, "blue")  # its own parts, and its restarts
        await again.dispose()
    finally:
        async with first.begin() as conn:  # the PostgreSQL database is the session's
            await conn.execute(database.owner.delete())
        await first.dispose()
    print(f"found: {refused.value}")
    assert "holds the state of namespace 'blue', not 'green'" in str(refused.value)
    assert "CONVEYOR_STATE_URL of its own" in str(refused.value)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_state_store_made_by_another_version_is_refused_naming_what_it_lacks(
        request, tmp_path, backend):
    # create_all makes missing tables, never missing columns: a store from a version before
    # a column was added must be refused at start, not fail on the first task that writes it.
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = await database.connect(url)
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE checkpoints DROP COLUMN streamed"))
        await conn.execute(text("ALTER TABLE tasks DROP COLUMN steps"))
    try:
        with pytest.raises(ConfigurationError) as refused:
            await database.connect(url, "blue")
    finally:
        async with engine.begin() as conn:  # the PostgreSQL database is the session's
            await conn.execute(text(
                "ALTER TABLE checkpoints ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0"))
            await conn.execute(text("ALTER TABLE tasks ADD COLUMN steps JSON"))
        await engine.dispose()
    print(f"found: {refused.value}")
    assert "made by another version of Conveyor" in str(refused.value)
    assert "table tasks lacks steps" in str(refused.value)
    assert "table checkpoints lacks streamed" in str(refused.value)
    again = await database.connect(url, "blue")  # whole again: taken
    async with again.begin() as conn:
        await conn.execute(database.owner.delete())
    await again.dispose()
