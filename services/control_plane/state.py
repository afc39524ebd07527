"""What the control plane stores: task records, their event logs, the registry, dead letters.

Every write is idempotent on the message's own ids, so a redelivered message changes nothing.
"""

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.contracts import (
    FINAL_STATUSES,
    CompletedTask,
    DeadLetter,
    Heartbeat,
    NewTask,
    Query,
    RegisterService,
    TaskStream,
)

from ..database import dead_letters, events, instances, now, services, tasks, watchers


def _insert_ignoring_duplicates(conn: AsyncConnection, table, **values):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).values(**values).on_conflict_do_nothing()


def _upsert(conn: AsyncConnection, table, keys: list[str], values: dict, update_keys: list[str]):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**values)
    return statement.on_conflict_do_update(
        index_elements=keys, set_={k: statement.excluded[k] for k in update_keys}
    )


async def _lock_task(conn: AsyncConnection, task_id: str) -> None:
    """Serialize the outcome and the watchers of one task, even before its record exists.

    PostgreSQL: a transaction-scoped advisory lock on the task id. SQLite: every
    transaction already begins IMMEDIATE, holding the database's write lock.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:task_id, 0))"),
            {"task_id": task_id},
        )


async def record_new_task(conn: AsyncConnection, task: NewTask, publisher_id: str) -> None:
    await conn.execute(
        _insert_ignoring_duplicates(
            conn,
            tasks,
            task_id=task.task_id,
            service=task.service,
            session_id=task.session_id,
            parent_task_id=task.parent_task_id,
            publisher_id=publisher_id,
            status="queued",
            input=task.input,
            attempts=0,
            reply_to=task.reply_to,
            stream=task.stream,
            created_at=now(),
        )
    )


async def record_outcome(
    conn: AsyncConnection, outcome: CompletedTask
) -> list[dict[str, str]] | None:
    """Store a task's outcome once; returns the watchers to tell, or None if already final."""
    await _lock_task(conn, outcome.task_id)
    await conn.execute(
            _insert_ignoring_duplicates(
                conn,
                tasks,
                task_id=outcome.task_id,
                service=outcome.service,
                session_id=outcome.session_id,
                status="queued",
                attempts=0,
                reply_to=outcome.reply_to,
                created_at=now(),
            )
        )
    stored = await conn.execute(
        update(tasks)
        .where(tasks.c.task_id == outcome.task_id, tasks.c.status.not_in(FINAL_STATUSES))
        .values(
            status=outcome.status,
            result=outcome.result,
            error=outcome.error.model_dump() if outcome.error else None,
            attempts=outcome.attempt,
            finished_at=now(),
        )
    )
    if stored.rowcount == 0:
        return None
    waiting = (
        await conn.execute(select(watchers).where(watchers.c.task_id == outcome.task_id))
    ).all()
    if waiting:
        await conn.execute(delete(watchers).where(watchers.c.task_id == outcome.task_id))
    return [{"reply_to": w.reply_to, "request_id": w.request_id} for w in waiting]


async def append_event(conn: AsyncConnection, stream: TaskStream) -> None:
    await conn.execute(
        _insert_ignoring_duplicates(
            conn,
            events,
            task_id=stream.task_id,
            idx=stream.index,
            event=stream.event.model_dump(),
            created_at=now(),
        )
    )


async def record_registration(conn: AsyncConnection, reg: RegisterService) -> None:
    moment = now()
    await conn.execute(
        _upsert(
            conn,
            services,
            ["name"],
            {"name": reg.service, "workflow": reg.workflow, "registered_at": moment,
             "last_seen": moment},
            ["workflow", "last_seen"],
        )
    )
    await conn.execute(
        _upsert(
            conn,
            instances,
            ["instance_id"],
            {"instance_id": reg.instance_id, "service": reg.service, "host": reg.host,
             "pid": reg.pid, "started_at": moment, "last_heartbeat": moment, "running": 0,
             "stopped": False},
            ["last_heartbeat", "stopped"],
        )
    )


async def record_heartbeat(conn: AsyncConnection, beat: Heartbeat) -> None:
    moment = now()
    await conn.execute(
        _upsert(
            conn,
            instances,
            ["instance_id"],
            {"instance_id": beat.instance_id, "service": beat.service, "started_at": moment,
             "last_heartbeat": moment, "running": len(beat.running), "stopped": False},
            ["last_heartbeat", "running", "stopped"],
        )
    )
    await conn.execute(
        _upsert(conn, services, ["name"],
                {"name": beat.service, "registered_at": moment, "last_seen": moment},
                ["last_seen"])
    )
    for running in beat.running:
        await conn.execute(
            update(tasks)
            .where(and_(tasks.c.task_id == running.task_id, tasks.c.status == "queued"))
            .values(status="running", started_at=moment, attempts=running.attempt)
        )


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
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def get_task(conn: AsyncConnection, task_id: str) -> dict[str, Any] | None:
    row = (await conn.execute(select(tasks).where(tasks.c.task_id == task_id))).first()
    return task_view(row) if row else None


async def watch_task(
    conn: AsyncConnection, task_id: str, reply_to: str, request_id: str
) -> dict[str, Any] | None:
    """The task if it has finished; otherwise remember to tell reply_to when it does."""
    await _lock_task(conn, task_id)
    row = (await conn.execute(select(tasks).where(tasks.c.task_id == task_id))).first()
    if row is not None and row.status in FINAL_STATUSES:
        return task_view(row)
    await conn.execute(
        _insert_ignoring_duplicates(
            conn, watchers, task_id=task_id, reply_to=reply_to, request_id=request_id
        )
    )
    return None


async def list_tasks(conn: AsyncConnection, query: Query) -> list[dict[str, Any]]:
    statement = select(tasks).order_by(tasks.c.created_at.desc()).limit(query.limit)
    if query.service:
        statement = statement.where(tasks.c.service == query.service)
    if query.status:
        statement = statement.where(tasks.c.status == query.status)
    if query.session_id:
        statement = statement.where(tasks.c.session_id == query.session_id)
    return [task_view(row) for row in await conn.execute(statement)]


async def list_services(conn: AsyncConnection, heartbeat_timeout: float) -> list[dict[str, Any]]:
    alive_after = now() - timedelta(seconds=heartbeat_timeout)
    found: dict[str, dict[str, Any]] = {}
    for row in await conn.execute(select(services).order_by(services.c.name)):
        found[row.name] = {"name": row.name, "workflow": row.workflow, "instances": []}
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
