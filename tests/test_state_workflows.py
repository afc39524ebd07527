"""Sessions, events sent into tasks, stream watchers, cancellation and a task's starting point,
against real SQLite and PostgreSQL (the `engine` fixture of test_state.py: every test runs on
both).
"""

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select
from workflows import Context

from conveyor.contracts import (
    EventEnvelope,
    RegisterService,
    SendEvent,
    TaskStream,
)
from conveyor.services import checkpoints, counters, database, sessions
from conveyor.services.control_plane import cleanup, state
from conveyor.services.examples.counter import workflow as counter
from conveyor.services.orchestrator import state as orchestrator_state
from conveyor.services.runtime.starting_point import release, renew, reported, starting_point

from . import test_state
from .test_state import count, new_task, outcome

# The same fixtures as test_state.py: a store emptied before each test, on each backend.
engine = test_state.engine
postgres_url = test_state.postgres_url


# Sessions


async def test_a_session_is_created_with_a_generated_or_the_given_id(engine):
    async with engine.begin() as conn:
        generated = await sessions.create(conn)
        given = await sessions.create(conn, "s1")
    assert generated["session_id"] and generated["session_id"] != "s1"
    assert given["session_id"] == "s1"
    assert given["state"] == {}
    assert given["created_at"] and given["updated_at"]


async def test_creating_a_session_twice_keeps_one_and_its_state(engine):
    async with engine.begin() as conn:
        await sessions.create(conn, "s1")
        await sessions.set_state(conn, "s1", {"count": 3})
    async with engine.begin() as conn:
        again = await sessions.create(conn, "s1")
    assert again["state"] == {"count": 3}
    assert await count(engine, database.sessions) == 1


async def test_an_unknown_session_is_none(engine):
    async with engine.begin() as conn:
        assert await sessions.get(conn, "never-made") is None


async def test_sessions_are_listed_newest_first(engine):
    for session_id in ("s1", "s2", "s3"):
        async with engine.begin() as conn:
            await sessions.create(conn, session_id)
    async with engine.begin() as conn:
        assert [s["session_id"] for s in await sessions.list_all(conn, 10)] == ["s3", "s2", "s1"]
        assert [s["session_id"] for s in await sessions.list_all(conn, 2)] == ["s3", "s2"]


async def test_a_session_is_deleted_once(engine):
    async with engine.begin() as conn:
        await sessions.create(conn, "s1")
    async with engine.begin() as conn:
        assert await sessions.delete_one(conn, "s1") is True
    async with engine.begin() as conn:
        assert await sessions.delete_one(conn, "s1") is False
        assert await sessions.get(conn, "s1") is None


async def test_a_state_set_is_read_back_as_the_same_plain_dict(engine):
    nested = {"count": 1, "name": "ada", "tags": ["a", "b"], "deep": {"x": [1, {"y": None}]},
              "ratio": 0.5, "ok": True}
    assert sessions.plain_state(sessions.stored_state(nested)) == nested
    async with engine.begin() as conn:
        # Setting the state of a session not created yet creates it.
        await sessions.set_state(conn, "s1", nested)
    async with engine.begin() as conn:
        assert (await sessions.get(conn, "s1"))["state"] == nested


def test_a_state_that_is_not_json_is_refused():
    with pytest.raises(ValueError, match="session state must be JSON"):
        sessions.stored_state({"when": object()})


async def test_a_workflows_context_state_is_saved_and_loaded_unchanged(engine):
    ctx = Context(counter)
    assert await counter.run(ctx=ctx) == 1
    document = ctx.to_dict()["state"]
    async with engine.begin() as conn:
        assert await sessions.load_context_state(conn, "s1") is None
        await sessions.save_context_state(conn, "s1", document)
    async with engine.begin() as conn:
        assert await sessions.load_context_state(conn, "s1") == document
        assert (await sessions.get(conn, "s1"))["state"] == {"count": 1}


async def test_a_workflow_run_in_a_session_counts_on_from_its_stored_state(engine):
    async with engine.begin() as conn:
        await sessions.set_state(conn, "s1", {"count": 41})
    async with engine.begin() as conn:
        stored = await sessions.load_context_state(conn, "s1")
    assert stored == sessions.stored_state({"count": 41})

    ctx = Context.from_dict(counter, {"state": stored})
    assert await counter.run(ctx=ctx) == 42

    async with engine.begin() as conn:
        await sessions.save_context_state(conn, "s1", ctx.to_dict()["state"])
    async with engine.begin() as conn:
        assert (await sessions.get(conn, "s1"))["state"] == {"count": 42}


# Events sent into a task


def sent(task_id: str = "t1", type: str = "Approval", qualified_name: str | None = "app.Approval",
         step: str | None = None) -> SendEvent:
    event = EventEnvelope(type=type, qualified_name=qualified_name, value={"ok": True})
    return SendEvent(task_id=task_id, event=event, step=step)


async def registered_task(conn, task_id: str = "t1", **fields) -> None:
    """A queued task of service echo, which declared the events Approval and Reply."""
    await state.record_registration(
        conn, RegisterService(service="echo", instance_id="echo-1",
                              event_types=["app.Approval", "app.Reply"])
    )
    await state.record_new_task(conn, new_task(task_id, **fields), "publisher")


async def test_an_event_for_an_unknown_task_is_refused(engine):
    async with engine.begin() as conn:
        with pytest.raises(state.EventRefused, match="no task 'nope'"):
            await state.record_sent_event(conn, sent("nope"), "m1")


async def test_an_event_for_a_task_that_has_ended_is_refused(engine):
    async with engine.begin() as conn:
        await registered_task(conn)
        await state.record_outcome(conn, outcome())
    async with engine.begin() as conn:
        with pytest.raises(state.EventRefused, match=r"'t1' has already ended \(completed\)"):
            await state.record_sent_event(conn, sent(), "m1")


@pytest.mark.parametrize(
    "type_, qualified_name",
    [("Other", "app.Other"), ("Approval", "elsewhere.Approval"), ("Other", None)],
)
async def test_an_event_type_the_service_did_not_declare_is_refused(engine, type_,
                                                                    qualified_name):
    async with engine.begin() as conn:
        await registered_task(conn)
    async with engine.begin() as conn:
        with pytest.raises(state.EventRefused,
                           match=r"service 'echo' accepts \(it accepts: Approval, Reply\)"):
            await state.record_sent_event(conn, sent(type=type_, qualified_name=qualified_name),
                                          "m1")
    assert await count(engine, database.inbox) == 0


async def test_declared_events_are_accepted_and_numbered_per_task(engine):
    async with engine.begin() as conn:
        await registered_task(conn, "t1")
        await registered_task(conn, "t2")
    async with engine.begin() as conn:
        assert await state.record_sent_event(conn, sent("t1"), "m1") == 1
        # Without a qualified name, the bare type name is matched.
        assert await state.record_sent_event(conn, sent("t1", "Reply", None), "m2") == 2
        assert await state.record_sent_event(conn, sent("t2"), "m3") == 1
        assert await state.record_sent_event(conn, sent("t1", step="review"), "m4") == 3


async def test_the_same_sent_message_twice_is_kept_once(engine):
    async with engine.begin() as conn:
        await registered_task(conn)
        assert await state.record_sent_event(conn, sent(), "m1") == 1
    async with engine.begin() as conn:
        assert await state.record_sent_event(conn, sent(), "m1") == 1
        assert await state.record_sent_event(conn, sent(), "m2") == 2
    assert await count(engine, database.inbox) == 2


# Following a task's stream


def streamed(index: int, task_id: str = "t1") -> TaskStream:
    event = EventEnvelope(type="Progress", qualified_name="app.Progress", value={"i": index})
    return TaskStream(task_id=task_id, index=index, event=event)


async def test_the_stream_of_an_unknown_task_is_nothing(engine):
    async with engine.begin() as conn:
        assert await state.watch_stream(conn, "nope", "replies", "req-1", after=-1) == (None, [])
    assert await count(engine, database.watchers) == 0


async def test_a_running_tasks_stream_gives_the_later_events_then_follows_it(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "publisher")
        for index in (2, 0, 1):
            await state.append_event(conn, streamed(index))
        await state.append_event(conn, streamed(5, task_id="t2"))
    async with engine.begin() as conn:
        record, events = await state.watch_stream(conn, "t1", "replies", "req-1", after=0)
    assert (record["task_id"], record["status"]) == ("t1", "queued")
    assert [e["index"] for e in events] == [1, 2]
    assert events[0]["event"]["value"] == {"i": 1}
    async with engine.begin() as conn:
        assert await state.stream_watchers(conn, "t1") == ["replies"]

    async with engine.begin() as conn:
        told = await state.record_outcome(conn, outcome())
    assert told == [{"reply_to": "replies", "request_id": "req-1", "kind": "stream"}]
    async with engine.begin() as conn:
        assert await state.stream_watchers(conn, "t1") == []


async def test_a_finished_tasks_stream_is_returned_without_following_it(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(), "publisher")
        await state.append_event(conn, streamed(0))
        await state.record_outcome(conn, outcome())
    async with engine.begin() as conn:
        record, events = await state.watch_stream(conn, "t1", "replies", "req-1", after=-1)
        assert record["status"] == "completed"
        assert [e["index"] for e in events] == [0]
        assert await state.stream_watchers(conn, "t1") == []
    assert await count(engine, database.watchers) == 0


async def test_an_outcome_without_reply_to_goes_where_the_task_asked(engine):
    async with engine.begin() as conn:
        await state.record_new_task(conn, new_task(reply_to="client-replies"), "publisher")
    finished = outcome()
    async with engine.begin() as conn:
        await state.record_outcome(conn, finished)
    assert finished.reply_to == "client-replies"


# Cancelling a dispatched task


async def test_cancelling_a_task_never_dispatched_finds_nothing(engine):
    async with engine.begin() as conn:
        cancellation = await orchestrator_state.cancel(conn, "nope")
    assert (cancellation.found, cancellation.cancelled_now) == (False, False)


async def test_cancelling_a_dispatched_task_ends_it_once(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
    async with engine.begin() as conn:
        first = await orchestrator_state.cancel(conn, "t1")
    async with engine.begin() as conn:
        second = await orchestrator_state.cancel(conn, "t1")
    assert (first.found, first.cancelled_now, first.service) == (True, True, "echo")
    assert (second.found, second.cancelled_now, second.service) == (True, False, "echo")


async def test_cancelling_a_task_lists_its_unfinished_children(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "parent", "outer")
        await orchestrator_state.claim_first_dispatch(conn, "running", "inner", "parent")
        await orchestrator_state.claim_first_dispatch(conn, "done", "inner", "parent")
        await orchestrator_state.claim_first_dispatch(conn, "grandchild", "inner", "running")
        await orchestrator_state.claim_first_dispatch(conn, "unrelated", "inner")
        await orchestrator_state.mark_finished(conn, "done")
    async with engine.begin() as conn:
        cancellation = await orchestrator_state.cancel(conn, "parent")
    assert cancellation.children == ["running"]


async def test_cancelling_a_task_that_already_finished_changes_nothing(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await orchestrator_state.mark_finished(conn, "t1")
    async with engine.begin() as conn:
        cancellation = await orchestrator_state.cancel(conn, "t1")
    assert (cancellation.found, cancellation.cancelled_now) == (True, False)


# Where a worker starts a task from

KEY = b"k" * 32
LEASE = 10.0  # seconds without a heartbeat after which a lease may be taken over


async def test_a_task_cancelled_while_queued_is_not_started(engine):
    async with engine.begin() as conn:
        await sessions.set_state(conn, "s1", {"count": 41})
        await registered_task(conn, session_id="s1")
        await state.record_sent_event(conn, sent(), "m1")
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await orchestrator_state.cancel(conn, "t1")
    async with engine.begin() as conn:
        point = await starting_point(conn, new_task(session_id="s1"), 1, "i-1", KEY, LEASE)
    assert (point.skip, point.state, point.sent) == ("it was cancelled", None, [])


async def test_a_replaced_attempt_is_not_started(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo", task={"x": 1})
        await conn.execute(database.dispatches.update().values(attempt=2))
    async with engine.begin() as conn:
        point = await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
    assert point.skip == "attempt 1 was replaced by attempt 2"


async def test_a_task_starts_from_its_session_state_and_its_inbox_in_order(engine):
    async with engine.begin() as conn:
        await sessions.set_state(conn, "s1", {"count": 41})
        await registered_task(conn, session_id="s1")
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await state.record_sent_event(conn, sent(), "m1")
        await state.record_sent_event(conn, sent(type="Reply", qualified_name="app.Reply",
                                                 step="review"), "m2")
    async with engine.begin() as conn:
        point = await starting_point(conn, new_task(session_id="s1"), 1, "i-1", KEY, LEASE)
    assert point.skip is None and point.checkpoint is None
    assert point.state == sessions.stored_state({"count": 41})
    assert [(e["seq"], e["event"]["type"], e["step"]) for e in point.sent] == [
        (1, "Approval", None), (2, "Reply", "review"),
    ]
    assert point.sent[0]["event"] == {"type": "Approval", "types": None,
                                      "qualified_name": "app.Approval", "value": {"ok": True}}
    async with engine.connect() as conn:
        lease = (await conn.execute(database.dispatches.select())).one()
    assert lease.instance_id == "i-1" and lease.started_at and lease.heartbeat_at


async def test_a_resumed_task_starts_from_its_checkpoint_and_the_events_it_had_not_taken(engine):
    async with engine.begin() as conn:
        await sessions.set_state(conn, "s1", {"count": 41})
        await registered_task(conn, session_id="s1")
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await state.record_sent_event(conn, sent(), "m1")
        await state.record_sent_event(conn, sent(), "m2")
        await checkpoints.save(conn, KEY, "t1", 1, {"is_running": True}, inbox_seq=1,
                               streamed=4)
    async with engine.begin() as conn:
        point = await starting_point(conn, new_task(session_id="s1"), 1, "i-2", KEY, LEASE)
    assert point.checkpoint.context == {"is_running": True}
    assert (point.checkpoint.streamed, point.checkpoint.inbox_seq) == (4, 1)
    assert point.state is None  # the checkpoint carries the state
    assert [e["seq"] for e in point.sent] == [2]


async def test_an_attempt_a_live_instance_holds_is_not_claimed_by_another(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        first = await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
        other = await starting_point(conn, new_task(), 1, "i-2", KEY, LEASE)
        again = await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
    assert first.skip is None and again.skip is None
    assert other.skip == "instance i-1 holds it and is alive" and other.dispatched


async def test_an_attempt_whose_holder_went_silent_or_let_go_is_claimed_by_another(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
        await conn.execute(database.dispatches.update().values(
            heartbeat_at=database.now() - timedelta(seconds=LEASE + 1)))
        taken_over = await starting_point(conn, new_task(), 1, "i-2", KEY, LEASE)
        await release(conn, "t1", 1, "i-2")
        after_release = await starting_point(conn, new_task(), 1, "i-3", KEY, LEASE)
    assert taken_over.skip is None and after_release.skip is None
    async with engine.connect() as conn:
        lease = (await conn.execute(database.dispatches.select())).one()
    assert lease.instance_id == "i-3"


async def test_no_holder_is_judged_silent_while_the_claimers_wall_clock_has_just_stepped(engine):
    # The worker passes no lease timeout then (services/wall_clock.py): its holder, asleep
    # with the same machine, may not have renewed yet.
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
        await conn.execute(database.dispatches.update().values(
            heartbeat_at=database.now() - timedelta(hours=1)))
        not_judged = await starting_point(conn, new_task(), 1, "i-2", KEY, None)
        own = await starting_point(conn, new_task(), 1, "i-1", KEY, None)
    assert not_judged.skip == "instance i-1 holds it and is alive" and not_judged.dispatched
    assert own.skip is None
    async with engine.connect() as conn:
        lease = (await conn.execute(database.dispatches.select())).one()
    assert lease.instance_id == "i-1"


async def test_a_first_attempt_its_worker_gets_before_the_orchestrator_records_it_is_claimed(
    engine,
):
    # The orchestrator publishes a task that waits for nothing before it records it.
    task = new_task(parent_task_id="outer")
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    async with engine.begin() as conn:
        point = await starting_point(conn, task, 1, "i-1", KEY, LEASE, trace)
    async with engine.begin() as conn:
        recorded_after = await orchestrator_state.claim_first_dispatch(
            conn, task.task_id, "echo", task=task.model_dump(mode="json"))
        other = await starting_point(conn, task, 1, "i-2", KEY, LEASE)
        row = (await conn.execute(database.dispatches.select())).one()
    assert point.skip is None
    assert (recorded_after.new, recorded_after.untaken) == (False, False)  # not sent again
    assert other.skip == "instance i-1 holds it and is alive"
    # What the sweep needs to dispatch it again, should i-1 go silent.
    assert (row.attempt, row.instance_id, row.parent_task_id, row.held, row.trace) == (
        1, "i-1", "outer", False, trace)
    assert row.task == task.model_dump(mode="json") and row.heartbeat_at is not None


async def test_a_later_attempt_the_orchestrator_has_not_committed_is_told_apart(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        point = await starting_point(conn, new_task(), 2, "i-1", KEY, LEASE)
        rows = (await conn.execute(database.dispatches.select())).all()
    assert (point.skip, point.dispatched) == (
        "attempt 2 is not committed yet (attempt 1 is)", False)
    assert [(row.attempt, row.instance_id) for row in rows] == [(1, None)]


async def test_a_task_without_a_session_starts_with_no_state(engine):
    async with engine.begin() as conn:
        await sessions.set_state(conn, "s1", {"count": 41})
        await registered_task(conn)
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
    async with engine.begin() as conn:
        point = await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
    assert (point.skip, point.state, point.sent) == (None, None, [])


# Checkpoints


async def test_a_checkpoint_round_trips_and_counts_its_steps(engine):
    context = {"state": {"big": "x" * 2_000_000}, "is_running": True}
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await checkpoints.save(conn, KEY, "t1", 1, {"first": True}, inbox_seq=0, streamed=0)
        await checkpoints.save(conn, KEY, "t1", 1, context, inbox_seq=2, streamed=3)
    async with engine.begin() as conn:
        found = await checkpoints.load(conn, KEY, "t1")
    assert found.context == context  # over 1 MB: kept in the state store, not on the broker
    assert (found.attempt, found.steps, found.inbox_seq, found.streamed) == (1, 2, 2, 3)


@pytest.mark.parametrize("tamper", [
    {"context": '{"is_running": false}'},
    {"streamed": 0},
    {"inbox_seq": 7},
], ids=["context", "streamed", "inbox"])
async def test_an_altered_checkpoint_is_refused(engine, tamper):
    async with engine.begin() as conn:
        await checkpoints.save(conn, KEY, "t1", 1, {"is_running": True}, inbox_seq=1,
                               streamed=2)
        await conn.execute(database.checkpoints.update().values(**tamper))
    async with engine.begin() as conn:
        with pytest.raises(checkpoints.CheckpointRefused, match="fails verification"):
            await checkpoints.load(conn, KEY, "t1")


async def test_a_checkpoint_signed_with_another_key_is_refused(engine):
    async with engine.begin() as conn:
        await checkpoints.save(conn, KEY, "t1", 1, {}, inbox_seq=0, streamed=0)
        with pytest.raises(checkpoints.CheckpointRefused, match="t1"):
            await checkpoints.load(conn, b"another key", "t1")


async def test_the_generated_signing_key_is_made_once_per_deployment(engine):
    async with engine.begin() as conn:
        first = await checkpoints.signing_key(conn, None)
        again = await checkpoints.signing_key(conn, None)
        configured = await checkpoints.signing_key(conn, "from the environment")
    assert first == again and len(first) == 64
    assert configured == b"from the environment"


async def test_a_replaced_attempt_cannot_checkpoint_and_is_counted(engine):
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await conn.execute(database.dispatches.update().values(attempt=2))
    async with engine.begin() as conn:
        assert not await checkpoints.save(conn, KEY, "t1", 1, {}, inbox_seq=0, streamed=0)
        assert await checkpoints.save(conn, KEY, "t1", 2, {}, inbox_seq=0, streamed=0)
    async with engine.begin() as conn:
        assert (await checkpoints.load(conn, KEY, "t1")).attempt == 2
        assert (await counters.read(conn))[counters.STALE_REJECTED] == 1


async def test_outcomes_and_events_of_a_replaced_attempt_are_rejected_and_counted(engine):
    async with engine.begin() as conn:
        await registered_task(conn)
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await conn.execute(database.dispatches.update().values(attempt=2))
        late = TaskStream(task_id="t1", index=0, attempt=1,
                          event=EventEnvelope(type="Progress"))
        assert await state.append_event(conn, late) is False
        assert await state.record_outcome(conn, outcome(attempt=1)) is None
        assert await state.record_outcome(conn, outcome(attempt=2)) == []
    async with engine.begin() as conn:
        assert (await counters.read(conn))[counters.STALE_REJECTED] == 2
    assert await count(engine, database.events) == 0


async def test_the_orchestrators_own_outcome_is_stored_whatever_attempt_was_dispatched(engine):
    # Attempt 0: a cancellation the orchestrator reports itself, never a replaced attempt's.
    async with engine.begin() as conn:
        await registered_task(conn)
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo")
        await conn.execute(database.dispatches.update().values(attempt=2))
        cancelled = outcome(status="cancelled", result=None, attempt=0)
        assert await state.record_outcome(conn, cancelled) == []
    async with engine.begin() as conn:
        assert (await state.get_task(conn, "t1"))["status"] == "cancelled"
        assert (await counters.read(conn)).get(counters.STALE_REJECTED, 0) == 0


# Leases


async def test_a_silent_attempt_moves_to_the_next_and_a_renewed_one_does_not(engine):
    task = new_task().model_dump(mode="json")
    async with engine.begin() as conn:
        for task_id in ("silent", "beating", "queued"):
            await orchestrator_state.claim_first_dispatch(conn, task_id, "echo",
                                                          task={**task, "task_id": task_id})
        for task_id in ("silent", "beating"):
            await starting_point(conn, new_task(task_id=task_id), 1, "i-1", KEY, LEASE)
        await conn.execute(database.dispatches.update().values(
            heartbeat_at=database.now() - timedelta(seconds=60)).where(
            database.dispatches.c.started_at.is_not(None)))
        await renew(conn, "i-1", {"beating": 1, "silent": 2})  # not its attempt of "silent"
    async with engine.begin() as conn:
        expired = await orchestrator_state.take_expired(conn, timeout=10)
        assert [(e["task"]["task_id"], e["attempt"]) for e in expired] == [("silent", 2)]
        assert await orchestrator_state.take_expired(conn, timeout=10) == []
        await orchestrator_state.mark_finished(conn, "silent", attempt=1)  # a late report
        row = (await conn.execute(database.dispatches.select().where(
            database.dispatches.c.task_id == "silent"))).one()
    assert (row.attempt, row.finished, row.started_at) == (2, False, None)


@pytest.mark.postgres
async def test_a_lease_held_by_an_outcome_being_reported_holds_up_no_other_lease(postgres_url):
    """The worker marks an outcome in a transaction that spans its publish, which may wait
    seconds for the broker: meanwhile its other leases are renewed, not held up behind it."""
    engine = await database.connect(postgres_url)
    try:
        async with engine.begin() as conn:
            for table in reversed(database.metadata.sorted_tables):
                await conn.execute(table.delete())
            for task_id in ("ending", "running"):
                await starting_point(conn, new_task(task_id=task_id), 1, "i-1", KEY, LEASE)
            await conn.execute(database.dispatches.update().values(
                heartbeat_at=database.now() - timedelta(seconds=60)))
        async with engine.begin() as reporting:
            assert await reported(reporting, "ending", 1, "i-1", ended=True)
            async with engine.begin() as conn:  # while the outcome's publish is under way
                await asyncio.wait_for(renew(conn, "i-1", {"ending": 1, "running": 1}), 5)
            async with engine.begin() as conn:
                expired = await orchestrator_state.take_expired(conn, timeout=10)
        assert expired == []  # "running" renewed; "ending" locked, and so skipped by the sweep
    finally:
        await engine.dispose()


async def test_an_attempt_whose_outcome_is_reported_is_neither_swept_nor_claimed_again(engine):
    task = new_task().model_dump(mode="json")
    async with engine.begin() as conn:
        await orchestrator_state.claim_first_dispatch(conn, "t1", "echo", task=task)
        await starting_point(conn, new_task(), 1, "i-1", KEY, LEASE)
        await reported(conn, "t1", 1, "i-1")
        await conn.execute(database.dispatches.update().values(
            heartbeat_at=database.now() - timedelta(seconds=60)))
    async with engine.begin() as conn:
        # The orchestrator has not read the outcome yet; its dispatch comes again (a Kafka
        # rebalance) to another replica, long after the lease would have expired.
        assert await orchestrator_state.take_expired(conn, timeout=10) == []
        again = await starting_point(conn, new_task(), 1, "i-2", KEY, LEASE)
    assert again.skip == "it has ended"


async def test_only_the_current_uncancelled_attempt_may_report_its_outcome(engine):
    """The worker replies to the requester itself only when this mark takes."""
    task = new_task().model_dump(mode="json")
    async with engine.begin() as conn:
        for task_id in ("current", "replaced", "cancelled"):
            await orchestrator_state.claim_first_dispatch(conn, task_id, "echo",
                                                          task={**task, "task_id": task_id})
            await starting_point(conn, new_task(task_id=task_id), 1, "i-1", KEY, LEASE)
        await conn.execute(database.dispatches.update().values(attempt=2).where(
            database.dispatches.c.task_id == "replaced"))
        await orchestrator_state.cancel(conn, "cancelled")
    async with engine.begin() as conn:
        assert await reported(conn, "current", 1, "i-1") is True
        assert await reported(conn, "current", 1, "i-2") is False  # not its holder
        assert await reported(conn, "replaced", 1, "i-1") is False
        assert await reported(conn, "cancelled", 1, "i-1") is False


# TTLs


async def test_finished_tasks_past_their_ttl_are_removed_with_all_they_own(engine):
    old = database.now() - timedelta(hours=2)
    async with engine.begin() as conn:
        for task_id, status in [("done", "completed"), ("broke", "failed"),
                                ("stopped", "cancelled"), ("busy", None)]:
            await state.record_new_task(conn, new_task(task_id=task_id), "publisher")
            await orchestrator_state.claim_first_dispatch(conn, task_id, "echo")
            await state.append_event(conn, TaskStream(task_id=task_id, index=0,
                                                      event=EventEnvelope(type="Progress")))
            await checkpoints.save(conn, KEY, task_id, 1, {}, inbox_seq=0, streamed=1)
            if status:
                await state.record_outcome(conn, outcome(task_id=task_id, status=status))
        await conn.execute(database.tasks.update().values(finished_at=old).where(
            database.tasks.c.finished_at.is_not(None)))
    hour, day = 3600, 86400
    async with engine.begin() as conn:
        removed = await cleanup.remove_expired(
            conn, {"completed": hour, "failed": day, "cancelled": hour})
    assert removed == 2
    async with engine.connect() as conn:
        left = set((await conn.execute(select(database.tasks.c.task_id))).scalars())
        for table in cleanup.OWNED:
            owners = set((await conn.execute(select(table.c.task_id))).scalars())
            assert owners <= {"broke", "busy"}, table.name
    assert left == {"broke", "busy"}


async def test_an_ended_task_is_deleted_on_request_and_a_running_one_is_refused(engine):
    async with engine.begin() as conn:
        for task_id in ("done", "busy"):
            await state.record_new_task(conn, new_task(task_id=task_id), "publisher")
            await orchestrator_state.claim_first_dispatch(conn, task_id, "echo")
            await state.append_event(conn, TaskStream(task_id=task_id, index=0,
                                                      event=EventEnvelope(type="Progress")))
            await checkpoints.save(conn, KEY, task_id, 1, {}, inbox_seq=0, streamed=1)
        await state.record_outcome(conn, outcome(task_id="done", status="cancelled"))
    async with engine.begin() as conn:
        assert await state.delete_task(conn, "done") is True
        assert await state.delete_task(conn, "done") is False  # nothing left to delete
        with pytest.raises(state.TaskNotEnded, match="'busy' is queued"):
            await state.delete_task(conn, "busy")
    async with engine.connect() as conn:
        for table in (database.tasks, *cleanup.OWNED):
            owners = set((await conn.execute(select(table.c.task_id))).scalars())
            assert "done" not in owners, table.name
        assert await state.get_task(conn, "busy") is not None
