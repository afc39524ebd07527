"""What the orchestrator stores: one dispatch row per task, the attempt it is on."""

from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.contracts import Heartbeat

from ..database import dialect_insert, dispatches, now, services


class Claim(NamedTuple):
    new: bool  # False: the task was dispatched before (a duplicate)
    held: bool = False  # another task of its session is open: it waits for that one to end
    # A duplicate whose first attempt no worker has taken yet: its dispatch may not have
    # reached the broker (the orchestrator stopped between its commit and its publish).
    untaken: bool = False


async def claim_first_dispatch(
    conn: AsyncConnection, task_id: str, service: str, parent_task_id: str | None = None,
    task: dict | None = None, trace: dict | None = None, session_id: str | None = None,
) -> Claim:
    """Record attempt 1 of a task, held back when another task of its session is open (tasks
    of one session share its state, so they run one at a time, in the order they came)."""
    held = session_id is not None and await _session_busy(conn, session_id)
    result = await conn.execute(
        dialect_insert(conn, dispatches)
        .values(task_id=task_id, service=service, attempt=1, parent_task_id=parent_task_id,
                session_id=session_id, held=held, finished=False, task=task, trace=trace,
                dispatched_at=now())
        .on_conflict_do_nothing()
    )
    if result.rowcount == 1:
        return Claim(True, held)
    row = (await conn.execute(
        select(dispatches.c.attempt, dispatches.c.held, dispatches.c.instance_id)
        .where(*_open(task_id), dispatches.c.paused.is_(False)))).first()
    untaken = row is not None and row.attempt == 1 and not row.held and row.instance_id is None
    return Claim(False, untaken=untaken)


async def _session_busy(conn: AsyncConnection, session_id: str) -> bool:
    """Whether a task of the session is open and not held; on PostgreSQL, first waits for any
    other transaction deciding about the same session (an advisory lock until commit)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(session_id))))
    busy = await conn.execute(
        select(dispatches.c.task_id)
        .where(dispatches.c.session_id == session_id, dispatches.c.finished.is_(False),
               dispatches.c.held.is_(False))
        .limit(1)
    )
    return busy.first() is not None


async def release_next(conn: AsyncConnection, task_id: str) -> dict | None:
    """Once a task has ended, the next held task of its session, no longer held: returns its
    NEW_TASK and trace, to dispatch; None when there is none (or the session is busy)."""
    row = (await conn.execute(
        select(dispatches.c.session_id, dispatches.c.finished)
        .where(dispatches.c.task_id == task_id))).first()
    if row is None or not row.finished or row.session_id is None:
        return None
    if await _session_busy(conn, row.session_id):
        return None
    waiting = (await conn.execute(
        select(dispatches.c.task_id, dispatches.c.task, dispatches.c.trace)
        .where(dispatches.c.session_id == row.session_id, dispatches.c.held.is_(True),
               dispatches.c.finished.is_(False))
        .order_by(dispatches.c.dispatched_at).limit(1))).first()
    if waiting is None:
        return None
    await conn.execute(update(dispatches).where(dispatches.c.task_id == waiting.task_id)
                       .values(held=False, dispatched_at=now()))
    return {"task": waiting.task, "attempt": 1, "trace": waiting.trace}


async def renew_leases(conn: AsyncConnection, beat: Heartbeat) -> None:
    """A worker's heartbeat renews the lease of each attempt it holds (stale ones excepted)."""
    moment = now()
    for held in beat.running:
        await conn.execute(
            update(dispatches)
            .where(dispatches.c.task_id == held.task_id, dispatches.c.attempt == held.attempt,
                   dispatches.c.finished.is_(False))
            .values(heartbeat_at=moment, instance_id=beat.instance_id)
        )


async def take_expired(conn: AsyncConnection, timeout: float, limit: int = 100) -> list[dict]:
    """Attempts whose worker went silent for `timeout` seconds, moved to their next attempt.

    Returns each task's NEW_TASK, new attempt number and trace, to dispatch again. Several
    orchestrators may sweep at once: on PostgreSQL each takes rows the others have not
    locked (SKIP LOCKED); SQLite runs one writer at a time.
    """
    silent_since = now() - timedelta(seconds=timeout)
    statement = (
        select(dispatches.c.task_id, dispatches.c.attempt, dispatches.c.task, dispatches.c.trace)
        .where(dispatches.c.finished.is_(False), dispatches.c.cancelled.is_(False),
               dispatches.c.paused.is_(False), dispatches.c.heartbeat_at < silent_since)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        statement = statement.with_for_update(skip_locked=True)
    expired = (await conn.execute(statement)).all()
    for row in expired:
        await conn.execute(
            update(dispatches).where(dispatches.c.task_id == row.task_id)
            .values(attempt=row.attempt + 1, dispatched_at=now(), **NO_LEASE)
        )
    return [{"task": row.task, "attempt": row.attempt + 1, "trace": row.trace}
            for row in expired if row.task]


NO_LEASE = {"instance_id": None, "started_at": None, "heartbeat_at": None}


def _open(task_id: str):
    """The dispatch of a task that may still run: not finished, not cancelled."""
    return (dispatches.c.task_id == task_id, dispatches.c.finished.is_(False),
            dispatches.c.cancelled.is_(False))


async def schedule_retry(conn: AsyncConnection, task_id: str, attempt: int,
                         retry_in: float) -> bool:
    """Move a task whose `attempt` failed to its next attempt, due in `retry_in` seconds."""
    moved = await conn.execute(
        update(dispatches)
        .where(*_open(task_id), dispatches.c.attempt == attempt, dispatches.c.paused.is_(False))
        .values(attempt=attempt + 1, retry_at=now() + timedelta(seconds=retry_in), **NO_LEASE)
    )
    return moved.rowcount == 1


async def take_due(conn: AsyncConnection, limit: int = 100) -> list[dict]:
    """Retries whose time has come, taken to be dispatched (SKIP LOCKED, as take_expired)."""
    statement = (
        select(dispatches.c.task_id, dispatches.c.attempt, dispatches.c.task, dispatches.c.trace)
        .where(dispatches.c.finished.is_(False), dispatches.c.cancelled.is_(False),
               dispatches.c.paused.is_(False), dispatches.c.retry_at <= now())
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        statement = statement.with_for_update(skip_locked=True)
    due = (await conn.execute(statement)).all()
    for row in due:
        await conn.execute(update(dispatches).where(dispatches.c.task_id == row.task_id)
                           .values(retry_at=None, dispatched_at=now()))
    return [{"task": row.task, "attempt": row.attempt, "trace": row.trace}
            for row in due if row.task]


class Steered(NamedTuple):
    found: bool  # the task was ever dispatched
    done: bool  # this request changed it
    service: str
    task: dict | None = None  # for a resumed task: the NEW_TASK to dispatch again
    attempt: int = 0  # for a resumed task: its new attempt
    trace: dict | None = None  # for a resumed task: the trace it was first dispatched in


async def pause(conn: AsyncConnection, task_id: str) -> Steered:
    """Mark a task paused: no worker starts it, its lease is not swept, retries wait."""
    paused = await conn.execute(
        update(dispatches).where(*_open(task_id), dispatches.c.paused.is_(False))
        .values(paused=True, retry_at=None)
    )
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    return Steered(row is not None, paused.rowcount == 1, row.service if row else "")


async def resume(conn: AsyncConnection, task_id: str) -> Steered:
    """Unpause a task as its next attempt, which resumes from its last checkpoint."""
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    if row is None:
        return Steered(False, False, "")
    resumed = await conn.execute(
        update(dispatches).where(*_open(task_id), dispatches.c.paused.is_(True))
        .values(paused=False, attempt=row.attempt + 1, dispatched_at=now(), **NO_LEASE)
    )
    if resumed.rowcount == 0:
        return Steered(True, False, row.service)
    return Steered(True, True, row.service, row.task, row.attempt + 1, row.trace)


class Cancellation(NamedTuple):
    found: bool  # the task was ever dispatched
    cancelled_now: bool  # this request ended it; False if it had ended before
    service: str
    children: list[str]  # its unfinished inner tasks, to cancel in turn


async def cancel(conn: AsyncConnection, task_id: str) -> Cancellation:
    """Mark a dispatched, unfinished task cancelled, so no worker starts or keeps it."""
    ended = await conn.execute(
        update(dispatches)
        .where(dispatches.c.task_id == task_id, dispatches.c.finished.is_(False))
        .values(finished=True, cancelled=True)
    )
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    if row is None:
        return Cancellation(False, False, "", [])
    children = await conn.execute(
        select(dispatches.c.task_id).where(dispatches.c.parent_task_id == task_id,
                                           dispatches.c.finished.is_(False))
    )
    return Cancellation(True, ended.rowcount == 1, row.service, list(children.scalars()))


async def mark_finished(conn: AsyncConnection, task_id: str, attempt: int = 0) -> None:
    """The task has ended; an outcome from a replaced attempt (not attempt 0, the
    orchestrator's own) changes nothing."""
    statement = update(dispatches).where(dispatches.c.task_id == task_id)
    if attempt > 0:
        statement = statement.where(dispatches.c.attempt <= attempt)
    await conn.execute(statement.values(finished=True))


async def known_services(conn: AsyncConnection) -> set[str]:
    return set((await conn.execute(select(services.c.name))).scalars())
