"""What the control plane stores: task records, their event logs and inboxes, the registry,
dead letters.

Every write is idempotent on the message's own ids, so a redelivered message changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, exists, func, insert, literal, or_, select, text, update

from conveyor.contracts import (
    FINAL_STATUSES,
    CompletedTask,
    DeadLetter,
    Heartbeat,
    NewTask,
    Query,
    RegisterService,
    SendEvent,
    TaskStatusUpdate,
    TaskStream,
)

from .. import checkpoints
from ..database import (
    attempt_errors,
    dead_letters,
    dispatches,
    events,
    inbox,
    insert_ignoring_duplicates,
    instances,
    now,
    services,
    tasks,
    upsert,
    watchers,
)
from . import cleanup

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection


class EventRefused(ValueError):
    """An event sent into a task that cannot take it; the text says why."""


class TaskNotEnded(ValueError):
    """A task asked to be deleted while it has not ended yet."""


async def _insert_once(conn: AsyncConnection, table, **values) -> bool:
    """Insert the row unless one with its key is there already; whether it was inserted."""
    inserted = await conn.execute(insert_ignoring_duplicates(conn.dialect.name, table), values)
    return inserted.rowcount == 1


async def _upsert(conn: AsyncConnection, table, keys: list[str], values: dict,
                  update_keys: list[str]) -> None:
    statement = upsert(conn.dialect.name, table, tuple(keys), tuple(update_keys))
    await conn.execute(statement, values)


# Statements run for every query, sent event or streamed event, built once: building one
# costs SQLAlchemy about four times what running it costs on SQLite.
_TASK_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:task_id, 0))")
_TASK = select(tasks).where(tasks.c.task_id == bindparam("the_task"))
_TRACE = select(dispatches.c.trace).where(dispatches.c.task_id == bindparam("the_task"))
_ERRORS = (select(attempt_errors).where(attempt_errors.c.task_id == bindparam("the_task"))
           .order_by(attempt_errors.c.attempt))
_EVENTS_AFTER = (select(events.c.idx, events.c.event)
                 .where(events.c.task_id == bindparam("the_task"),
                        events.c.idx > bindparam("after"))
                 .order_by(events.c.idx))
_ACCEPTED = select(services.c.event_types).where(services.c.name == bindparam("the_service"))
_SENT_BEFORE = select(inbox.c.seq).where(inbox.c.task_id == bindparam("the_task"),
                                         inbox.c.message_id == bindparam("the_message"))
_LAST_SENT = select(func.max(inbox.c.seq)).where(inbox.c.task_id == bindparam("the_task"))
_INBOX = insert(inbox)


async def _task(conn: AsyncConnection, task_id: str):
    """The task's record (a row), or None."""
    return (await conn.execute(_TASK, {"the_task": task_id})).first()


async def _lock_task(conn: AsyncConnection, task_id: str) -> None:
    """Serialize the outcome and the watchers of one task, even before its record exists.

    PostgreSQL: a transaction-scoped advisory lock on the task id. SQLite: every
    transaction already begins IMMEDIATE, holding the database's write lock.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(_TASK_LOCK, {"task_id": task_id})


async def record_new_task(conn: AsyncConnection, task: NewTask, publisher_id: str) -> None:
    """Record a task once. Its outcome may have been recorded before it (two control planes
    may each take one): then what only the NEW_TASK knows is filled in (an outcome's record
    has no publisher), and the status the outcome left stands."""
    given = {"session_id": task.session_id, "parent_task_id": task.parent_task_id,
             "publisher_id": publisher_id, "input": task.input, "stream": task.stream}
    if not await _insert_once(conn, tasks, **given, task_id=task.task_id, service=task.service,
                              status="queued", attempts=0, reply_to=task.reply_to,
                              created_at=now()):
        await conn.execute(_FILLED_IN, {**given, "filled_task": task.task_id})


_FILLED_IN = (update(tasks)
              .where(tasks.c.task_id == bindparam("filled_task"), tasks.c.publisher_id.is_(None)))


# Built once, for every task's outcome. The final statuses are bound one by one: an IN
# list bound whole is expanded, and so compiled again, on every execution.
_END = (update(tasks)
        .where(tasks.c.task_id == bindparam("ended_task"),
               tasks.c.status.not_in([literal(status) for status in FINAL_STATUSES])))
# ...unless the orchestrator has dispatched a later attempt (see checkpoints.replaced).
_END_IF_CURRENT = _END.where(~exists().where(
    dispatches.c.task_id == bindparam("ended_task"),
    dispatches.c.attempt > bindparam("ended_attempt")))
_REPLY_TO = select(tasks.c.reply_to).where(tasks.c.task_id == bindparam("asked_of"))
_WATCHERS = select(watchers).where(watchers.c.task_id == bindparam("watched"))
_WATCHED = delete(watchers).where(watchers.c.task_id == bindparam("watched"))


async def record_outcome(
    conn: AsyncConnection, outcome: CompletedTask
) -> list[dict[str, str]] | None:
    """Store a task's outcome once; returns the watchers to tell, or None if already final.

    An outcome without reply_to gets the one the task was started with. An outcome from an
    attempt the orchestrator has replaced is not stored (and is counted).

    Each watcher is {"reply_to", "request_id", "kind"}: "outcome" watchers wait for the end,
    "stream" watchers follow the events and then the end.
    """
    await _lock_task(conn, outcome.task_id)
    ended = {
        "ended_task": outcome.task_id, "ended_attempt": outcome.attempt,
        "status": outcome.status, "result": outcome.result,
        "error": outcome.error.model_dump() if outcome.error else None,
        "attempts": outcome.attempt, "events": outcome.events, "steps": outcome.steps or None,
        "finished_at": now(),
    }
    # Attempt 0 is not a worker's: the orchestrator's own outcomes are never stale.
    end = _END_IF_CURRENT if outcome.attempt > 0 else _END
    stored = await conn.execute(end, ended)
    if stored.rowcount == 0:
        # Its attempt was replaced, it has no record yet (the outcome overtook its
        # NEW_TASK), or it has ended already.
        if await checkpoints.replaced(conn, outcome.task_id, outcome.attempt):
            return None
        await _insert_once(
            conn, tasks, task_id=outcome.task_id, service=outcome.service,
            session_id=outcome.session_id, status="queued", attempts=0,
            reply_to=outcome.reply_to, created_at=now(),
        )
        stored = await conn.execute(end, ended)
    if stored.rowcount == 0:
        return None
    if outcome.error is not None and outcome.status == "failed":
        await _keep_error(conn, outcome.task_id, outcome.attempt, outcome.error)
    if outcome.reply_to is None:
        # An outcome the orchestrator made (a cancellation) goes where the task asked too.
        outcome.reply_to = (
            await conn.execute(_REPLY_TO, {"asked_of": outcome.task_id})).scalar_one_or_none()
    waiting = (await conn.execute(_WATCHERS, {"watched": outcome.task_id})).all()
    if waiting:
        await conn.execute(_WATCHED, {"watched": outcome.task_id})
    return [{"reply_to": w.reply_to, "request_id": w.request_id, "kind": w.kind}
            for w in waiting]


async def append_event(conn: AsyncConnection, stream: TaskStream) -> bool:
    """Store a streamed event; False (and counted) if its attempt was replaced."""
    if await checkpoints.replaced(conn, stream.task_id, stream.attempt):
        return False
    await _insert_once(conn, events, task_id=stream.task_id, idx=stream.index,
                       event=stream.event.model_dump(), created_at=now())
    return True


async def record_status(conn: AsyncConnection, change: TaskStatusUpdate) -> None:
    """A task between start and end: retrying (keeping the failed attempt's error), paused,
    queued again. A task that has ended keeps its final status."""
    if change.error is not None:
        await _keep_error(conn, change.task_id, change.attempt, change.error)
    values: dict[str, Any] = {"status": change.status}
    if change.attempt:
        values["attempts"] = change.attempt
    await conn.execute(
        update(tasks)
        .where(tasks.c.task_id == change.task_id, tasks.c.status.not_in(FINAL_STATUSES))
        .values(**values)
    )


async def _keep_error(conn: AsyncConnection, task_id: str, attempt: int, error: Any) -> None:
    await _insert_once(conn, attempt_errors, task_id=task_id, attempt=attempt,
                       type=error.type, message=error.message, at=now())


async def errors_of(conn: AsyncConnection, task_id: str) -> list[dict[str, Any]]:
    """Every failed attempt's error, in order."""
    found = await conn.execute(_ERRORS, {"the_task": task_id})
    return [{"attempt": row.attempt, "type": row.type, "message": row.message,
             "at": _iso(row.at)} for row in found]


async def pending_work(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    """Per service, how many tasks wait, run, wait to retry or are paused."""
    found = await conn.execute(
        select(tasks.c.service, tasks.c.status, func.count())
        .where(tasks.c.status.not_in(FINAL_STATUSES))
        .group_by(tasks.c.service, tasks.c.status)
    )
    pending: dict[str, dict[str, int]] = {}
    for service, status, count in found:
        pending.setdefault(service, {})[status] = count
    return pending


# Built once: asked after every event a task streams.
_FOLLOWERS = select(watchers.c.reply_to).where(watchers.c.task_id == bindparam("followed"),
                                               watchers.c.kind == "stream")


async def stream_watchers(conn: AsyncConnection, task_id: str) -> list[str]:
    """The reply topics following a task's events live."""
    found = await conn.execute(_FOLLOWERS, {"followed": task_id})
    return list(found.scalars())


async def watch_stream(
    conn: AsyncConnection, task_id: str, reply_to: str, request_id: str, after: int
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A task's record and its stored events after `after`; follows it live if unfinished.

    The watcher is registered before the events are read, so an event stored meanwhile is
    either read here or sent live (or both: the index lets the follower drop the repeat).
    """
    await _lock_task(conn, task_id)
    row = await _task(conn, task_id)
    if row is None:
        return None, []
    if row.status not in FINAL_STATUSES:
        await _insert_once(conn, watchers, task_id=task_id, reply_to=reply_to,
                           request_id=request_id, kind="stream")
    stored = await conn.execute(_EVENTS_AFTER, {"the_task": task_id, "after": after})
    return task_view(row), [{"index": idx, "event": event} for idx, event in stored]


async def events_of(
    conn: AsyncConnection, task_id: str, after: int, limit: int
) -> list[dict[str, Any]]:
    """A task's stored events after `after`, with when each was stored (the dashboard's
    timeline): [{"index", "event", "at"}]."""
    stored = await conn.execute(
        select(events.c.idx, events.c.event, events.c.created_at)
        .where(events.c.task_id == task_id, events.c.idx > after)
        .order_by(events.c.idx).limit(limit)
    )
    return [{"index": idx, "event": event, "at": _iso(at)} for idx, event, at in stored]


async def record_sent_event(conn: AsyncConnection, sent: SendEvent, message_id: str) -> int:
    """Keep an event sent into a task in its inbox; returns its position there.

    Refuses (EventRefused) an unknown or finished task and an event type the task's
    service did not declare when it registered. The same message twice is kept once.
    """
    await _lock_task(conn, sent.task_id)
    task = await _task(conn, sent.task_id)
    if task is None:
        raise EventRefused(f"no task {sent.task_id!r}")
    if task.status in FINAL_STATUSES:
        raise EventRefused(f"task {sent.task_id!r} has already ended ({task.status})")
    accepted = (await conn.execute(_ACCEPTED, {"the_service": task.service})
                ).scalar_one_or_none() or []
    if not _accepts(accepted, sent):
        names = ", ".join(sorted(name.rsplit(".", 1)[-1] for name in accepted)) or "none"
        raise EventRefused(
            f"event type {sent.event.qualified_name or sent.event.type!r} is not one that "
            f"service {task.service!r} accepts (it accepts: {names})"
        )
    seen = (await conn.execute(_SENT_BEFORE, {"the_task": sent.task_id,
                                              "the_message": message_id})).scalar_one_or_none()
    if seen is not None:
        return seen
    last = (await conn.execute(_LAST_SENT, {"the_task": sent.task_id})).scalar_one_or_none()
    seq = (last or 0) + 1
    await conn.execute(_INBOX, {"task_id": sent.task_id, "seq": seq,
                                "event": sent.event.model_dump(), "step": sent.step,
                                "message_id": message_id, "created_at": now()})
    return seq


def _accepts(accepted: list[str], sent: SendEvent) -> bool:
    if sent.event.qualified_name:
        return sent.event.qualified_name in accepted
    return any(name.rsplit(".", 1)[-1] == sent.event.type for name in accepted)


DESCRIBED = {"start_schema", "stop_schema", "event_schemas", "graph"}


async def record_registration(conn: AsyncConnection, reg: RegisterService) -> None:
    moment = now()
    await _upsert(
        conn, services, ["name"],
        {"name": reg.service, "workflow": reg.workflow, "event_types": reg.event_types,
         "described": reg.model_dump(include=DESCRIBED),
         "max_concurrent_tasks": reg.max_concurrent_tasks, "registered_at": moment,
         "last_seen": moment},
        ["workflow", "event_types", "described", "max_concurrent_tasks", "last_seen"],
    )
    await _upsert(
        conn, instances, ["instance_id"],
        {"instance_id": reg.instance_id, "service": reg.service, "host": reg.host,
         "pid": reg.pid, "started_at": moment, "last_heartbeat": moment, "running": 0,
         "stopped": False},
        ["last_heartbeat", "stopped"],
    )


# Run with many parameter sets at once (executemany), which takes no IN list: two terms.
_STARTED = (update(tasks)
            .where(tasks.c.task_id == bindparam("started_task"),
                   or_(tasks.c.status == "queued", tasks.c.status == "retrying"))
            .values(status="running",
                    started_at=bindparam("started_at_", type_=tasks.c.started_at.type),
                    attempts=bindparam("started_attempt")))


async def record_heartbeat(conn: AsyncConnection, beat: Heartbeat) -> None:
    moment = now()
    await _upsert(
        conn, instances, ["instance_id"],
        {"instance_id": beat.instance_id, "service": beat.service, "started_at": moment,
         "last_heartbeat": moment, "running": len(beat.running), "stopped": False},
        ["last_heartbeat", "running", "stopped"],
    )
    await _upsert(conn, services, ["name"],
                  {"name": beat.service, "registered_at": moment, "last_seen": moment},
                  ["last_seen"])
    if beat.running:  # in the order of their task ids, as every batch of task writes goes
        await conn.execute(_STARTED, [
            {"started_task": running.task_id, "started_at_": moment,
             "started_attempt": running.attempt}
            for running in sorted(beat.running, key=lambda running: running.task_id)])


async def record_deregistration(conn: AsyncConnection, instance_id: str) -> None:
    await conn.execute(
        update(instances).where(instances.c.instance_id == instance_id).values(stopped=True)
    )


async def record_dead_letter(conn: AsyncConnection, letter: DeadLetter) -> None:
    await conn.execute(
        insert(dead_letters).values(
            message_id=letter.message_id,
            topic=letter.topic,
            reason=letter.reason,
            error_type=letter.error_type,
            body=letter.body,
            publisher_id=letter.publisher_id,
            task_id=letter.task_id,
            received_at=letter.received_at or now(),
        )
    )


def task_view(row: Any) -> dict[str, Any]:
    return {
        "task_id": row.task_id,
        "service": row.service,
        "session_id": row.session_id,
        "parent_task_id": row.parent_task_id,
        "publisher_id": row.publisher_id,
        "status": row.status,
        "input": row.input,
        "result": row.result,
        "error": row.error,
        "attempts": row.attempts,
        "events": row.events,
        "steps": row.steps or {},
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def service_of(conn: AsyncConnection, task_id: str) -> str:
    found = await conn.execute(select(tasks.c.service).where(tasks.c.task_id == task_id))
    return found.scalar_one()


async def get_task(conn: AsyncConnection, task_id: str) -> dict[str, Any] | None:
    """The task's record, with every failed attempt's error and its trace id (None until
    it is dispatched, or when the orchestrator does not trace)."""
    row = await _task(conn, task_id)
    if row is None:
        return None
    carrier = (await conn.execute(_TRACE, {"the_task": task_id})).scalar_one_or_none()
    return task_view(row) | {"errors": await errors_of(conn, task_id),
                             "trace_id": trace_id(carrier)}


def trace_id(carrier: dict[str, str] | None) -> str | None:
    """The trace id in a stored W3C trace context (`traceparent: 00-<trace id>-<span>-01`)."""
    parts = (carrier or {}).get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1].strip("0"):
        return parts[1]
    return None


async def watch_task(
    conn: AsyncConnection, task_id: str, reply_to: str, request_id: str
) -> dict[str, Any] | None:
    """The task if it has finished; otherwise remember to tell reply_to when it does."""
    await _lock_task(conn, task_id)
    row = await _task(conn, task_id)
    if row is not None and row.status in FINAL_STATUSES:
        return await get_task(conn, task_id)
    await _insert_once(conn, watchers, task_id=task_id, reply_to=reply_to,
                       request_id=request_id)
    return None


async def delete_task(conn: AsyncConnection, task_id: str) -> bool:
    """Delete an ended task's record and everything kept for it, as its TTL would; False
    when there is no such record."""
    await _lock_task(conn, task_id)
    found = await conn.execute(select(tasks.c.status).where(tasks.c.task_id == task_id))
    status = found.scalar_one_or_none()
    if status is None:
        return False
    if status not in FINAL_STATUSES:
        raise TaskNotEnded(f"task {task_id!r} is {status}: cancel it, or wait for it to end, "
                           "before deleting it")
    await cleanup.remove(conn, [task_id])
    return True


async def list_tasks(conn: AsyncConnection, query: Query) -> list[dict[str, Any]]:
    statement = select(tasks).order_by(tasks.c.created_at.desc()).limit(query.limit)
    if query.service:
        statement = statement.where(tasks.c.service == query.service)
    if query.status:
        statement = statement.where(tasks.c.status == query.status)
    if query.session_id:
        statement = statement.where(tasks.c.session_id == query.session_id)
    if query.owner:
        statement = statement.where(tasks.c.publisher_id == query.owner)
    if query.search:
        statement = statement.where(or_(tasks.c.task_id.icontains(query.search, autoescape=True),
                                        tasks.c.service.icontains(query.search, autoescape=True)))
    return [task_view(row) for row in await conn.execute(statement)]


async def list_services(conn: AsyncConnection, heartbeat_timeout: float) -> list[dict[str, Any]]:
    alive_after = now() - timedelta(seconds=heartbeat_timeout)
    found: dict[str, dict[str, Any]] = {}
    for row in await conn.execute(select(services).order_by(services.c.name)):
        found[row.name] = {"name": row.name, "workflow": row.workflow,
                           "max_concurrent_tasks": row.max_concurrent_tasks,
                           **dict.fromkeys(DESCRIBED), **(row.described or {}), "instances": []}
    for row in await conn.execute(select(instances).order_by(instances.c.started_at)):
        if row.service not in found:
            continue
        last = row.last_heartbeat
        found[row.service]["instances"].append(
            {
                "instance_id": row.instance_id,
                "host": row.host,
                "pid": row.pid,
                "running": row.running,
                "last_heartbeat": _iso(row.last_heartbeat),
                "alive": (not row.stopped) and last >= alive_after,
            }
        )
    return list(found.values())


async def list_dead_letters(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    statement = select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
    return [
        {
            "id": row.id,
            "message_id": row.message_id,
            "topic": row.topic,
            "reason": row.reason,
            "error_type": row.error_type,
            "publisher_id": row.publisher_id,
            "task_id": row.task_id,
            "received_at": _iso(row.received_at),
            "body": row.body,
        }
        for row in await conn.execute(statement)
    ]
