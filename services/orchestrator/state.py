"""What the orchestrator stores: one dispatch row per task, the attempt it is on."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy import bindparam, func, or_, select, update

from ..database import dispatches, insert_ignoring_duplicates, now, services

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection


class Claim(NamedTuple):
    new: bool  # False: the task was dispatched before (a duplicate)
    held: bool = False  # it waits: for the task before it in its session, or for room
    # A duplicate whose first attempt no worker has taken yet: its dispatch may not have
    # reached the broker (the orchestrator stopped between its commit and its publish).
    untaken: bool = False


async def claim_first_dispatch(
    conn: AsyncConnection, task_id: str, service: str, parent_task_id: str | None = None,
    task: dict | None = None, trace: dict | None = None, session_id: str | None = None,
    limit: int | None = None,
) -> Claim:
    """Record attempt 1 of a task, held back when another task of its session is open (tasks
    of one session share its state, so they run one at a time, in the order they came) or
    when `limit` tasks of its service are open already. Held too behind a task held before
    it: a worker marks its task ended before the orchestrator releases the next, and a task
    that came meanwhile must not pass those waiting."""
    held = False
    if session_id is not None or limit:
        await _decide_alone(conn)
        held = (session_id is not None and await _unfinished(conn, session_id=session_id)) or (
            bool(limit) and (await _open_tasks(conn, service) >= limit
                             or await _unfinished(conn, service=service, held=True)))
    result = await conn.execute(insert_ignoring_duplicates(conn.dialect.name, dispatches),
                                first_dispatch(task_id, service, parent_task_id, session_id,
                                               task, trace, held=held))
    if result.rowcount == 1:
        return Claim(True, held)
    row = (await conn.execute(
        select(dispatches.c.attempt, dispatches.c.held, dispatches.c.instance_id)
        .where(*_open(task_id), dispatches.c.paused.is_(False)))).first()
    untaken = row is not None and row.attempt == 1 and not row.held and row.instance_id is None
    return Claim(False, untaken=untaken)


async def record_published(conn: AsyncConnection, rows: list[dict]) -> None:
    """Record attempt 1 of tasks that wait for nothing, published already (each row a
    `first_dispatch`), unless the worker that took one recorded it first."""
    await conn.execute(insert_ignoring_duplicates(conn.dialect.name, dispatches), rows)


def first_dispatch(task_id: str, service: str, parent_task_id: str | None,
                   session_id: str | None, task: dict | None, trace: dict | None, *,
                   held: bool = False) -> dict:
    """The dispatch row of a task's attempt 1, as recorded (by the orchestrator, or by the
    worker that got its message first)."""
    return {"task_id": task_id, "service": service, "attempt": 1,
            "parent_task_id": parent_task_id, "session_id": session_id, "held": held,
            "finished": False, "task": task, "trace": trace, "dispatched_at": now()}


async def _decide_alone(conn: AsyncConnection) -> None:
    """On PostgreSQL, wait for any other transaction deciding whether a task waits or runs
    (an advisory lock until commit); SQLite's writers take turns anyway (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_HOLD_DECISION)


HOLD_LOCK = 0x636F6E76  # "conv": one advisory lock for every hold decision

# The statements of a session's (or a limited service's) every task are built once: building
# one costs SQLAlchemy about four times what running it costs on SQLite.
_HOLD_DECISION = select(func.pg_advisory_xact_lock(HOLD_LOCK))
_OPEN_TASKS = (select(func.count()).select_from(dispatches)
               .where(dispatches.c.service == bindparam("of_service"),
                      dispatches.c.finished.is_(False), dispatches.c.held.is_(False),
                      dispatches.c.paused.is_(False)))
_FIRST_HELD = (select(dispatches.c.task_id)
               .where(dispatches.c.session_id == bindparam("in_session"),
                      dispatches.c.held.is_(True), dispatches.c.finished.is_(False))
               .order_by(dispatches.c.dispatched_at).limit(1))
_RELEASE = (update(dispatches).where(dispatches.c.task_id == bindparam("released"))
            .values(held=False, dispatched_at=bindparam("released_at",
                                                        type_=dispatches.c.dispatched_at.type)))


@functools.cache
def _unfinished_statement(by_session: bool, by_service: bool, held: bool | None):
    where = [dispatches.c.finished.is_(False)]
    if by_session:
        where.append(dispatches.c.session_id == bindparam("in_session"))
    if by_service:
        where.append(dispatches.c.service == bindparam("of_service"))
    if held is not None:
        where.append(dispatches.c.held.is_(held))
    return select(dispatches.c.task_id).where(*where).limit(1)


@functools.cache
def _held_statement(by_session: bool, by_service: bool, every: bool):
    scopes = []
    if by_session:
        scopes.append(dispatches.c.session_id == bindparam("in_session"))
    if by_service:
        scopes.append(dispatches.c.service == bindparam("of_service"))
    if every:
        scopes.append(dispatches.c.held.is_(True))
    return (select(dispatches.c.task_id, dispatches.c.service, dispatches.c.session_id,
                   dispatches.c.attempt, dispatches.c.task, dispatches.c.trace)
            .where(or_(*scopes), dispatches.c.held.is_(True), dispatches.c.finished.is_(False))
            .order_by(dispatches.c.dispatched_at).limit(100))


async def _unfinished(conn: AsyncConnection, *, session_id: str | None = None,
                      service: str | None = None, held: bool | None = None) -> bool:
    """Whether a task of the session (or service) has not ended; with `held`, one held or not."""
    statement = _unfinished_statement(session_id is not None, service is not None, held)
    found = await conn.execute(statement, {"in_session": session_id, "of_service": service})
    return found.first() is not None


async def _session_busy(conn: AsyncConnection, session_id: str) -> bool:
    """Whether a task of the session is open and not held."""
    return await _unfinished(conn, session_id=session_id, held=False)


async def _open_tasks(conn: AsyncConnection, service: str) -> int:
    """Tasks of the service that hold a place: dispatched, not held, paused or finished."""
    return (await conn.execute(_OPEN_TASKS, {"of_service": service})).scalar_one()


async def release_held(conn: AsyncConnection, limits: dict[str, int | None], *,
                       session_id: str | None = None, service: str | None = None,
                       every: bool = False) -> list[dict]:
    """Held tasks that may run now, no longer held: returns each one's NEW_TASK, attempt and
    trace, to dispatch. After a task of `session_id` / `service` ended or paused, looks at the
    held tasks of that session and that service; with `every`, at all held tasks (the sweep).
    A held task runs once its session has no other open task and its service has room."""
    by_service = service is not None and bool(limits.get(service))
    if session_id is None and not by_service and not every:
        return []
    await _decide_alone(conn)
    waiting = await conn.execute(_held_statement(session_id is not None, by_service, every),
                                 {"in_session": session_id, "of_service": service})
    released = []
    full: set[str] = set()  # services found with no room: none frees up meanwhile
    for row in waiting.all():  # first come, first served
        if row.service in full:
            continue
        limit = limits.get(row.service)
        if limit and await _open_tasks(conn, row.service) >= limit:
            full.add(row.service)
        elif await _next_of_its_session(conn, row):
            await conn.execute(_RELEASE, {"released": row.task_id, "released_at": now()})
            released.append({"task": row.task, "attempt": row.attempt, "trace": row.trace})
    return released


async def waiting_behind(conn: AsyncConnection, session_id: str | None,
                         service: str | None) -> bool:
    """Whether a held task waits for a task that is ending now: one of its session, or of
    its `service` (given when the service has a limit). The worker ending it asks, in the
    transaction that marks it ended, so that the orchestrator hears of an outcome only when
    it has a task to release. The hold decisions' lock orders this against a task being
    held meanwhile: either it is seen here, or its decision sees this end."""
    if session_id is None and service is None:
        return False
    await _decide_alone(conn)
    return (session_id is not None and await _unfinished(conn, session_id=session_id, held=True)
            ) or (service is not None and await _unfinished(conn, service=service, held=True))


_ENDED_OR_PAUSED = (
    select(dispatches.c.session_id, dispatches.c.service, dispatches.c.finished,
           dispatches.c.paused)
    .where(dispatches.c.task_id == bindparam("left")))


async def release_after(conn: AsyncConnection, task_id: str,
                        limits: dict[str, int | None]) -> list[dict]:
    """Once a task has ended or paused, the held tasks that may run in its place (a paused
    task gives up its place in its service, not in its session: it will go on)."""
    row = (await conn.execute(_ENDED_OR_PAUSED, {"left": task_id})).first()
    if row is None or not (row.finished or row.paused):
        return []
    return await release_held(conn, limits, service=row.service,
                              session_id=row.session_id if row.finished else None)


async def _next_of_its_session(conn: AsyncConnection, row) -> bool:
    """Whether a held task is free to go as far as its session is concerned: it has none,
    or no other task of it is open and no older one waits."""
    if row.session_id is None:
        return True
    if await _session_busy(conn, row.session_id):
        return False
    first = (await conn.execute(_FIRST_HELD, {"in_session": row.session_id})).scalar()
    return first == row.task_id


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
               dispatches.c.paused.is_(False), dispatches.c.reported_at.is_(None),
               dispatches.c.heartbeat_at < silent_since)
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


NO_LEASE = {"instance_id": None, "started_at": None, "heartbeat_at": None, "reported_at": None}


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
    task: dict | None = None  # for a resumed task: the NEW_TASK to dispatch now (None: held)
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


async def resume(conn: AsyncConnection, task_id: str,
                 limits: dict[str, int | None] | None = None) -> Steered:
    """Unpause a task as its next attempt, which resumes from its last checkpoint; held (no
    task to dispatch now) when its service's limit of open tasks is reached."""
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    if row is None:
        return Steered(False, False, "")
    limit = (limits or {}).get(row.service)
    if limit:
        await _decide_alone(conn)
    held = bool(limit) and await _open_tasks(conn, row.service) >= limit
    resumed = await conn.execute(
        update(dispatches).where(*_open(task_id), dispatches.c.paused.is_(True))
        .values(paused=False, held=held, attempt=row.attempt + 1, dispatched_at=now(),
                **NO_LEASE)
    )
    if resumed.rowcount == 0:
        return Steered(True, False, row.service)
    if held:
        return Steered(True, True, row.service, None, row.attempt + 1)
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


_FINISHED_ANY = (update(dispatches).where(dispatches.c.task_id == bindparam("finished_task"))
                 .values(finished=True))
_FINISHED = _FINISHED_ANY.where(dispatches.c.attempt <= bindparam("finished_attempt"))


async def mark_finished(conn: AsyncConnection, task_id: str, attempt: int = 0) -> None:
    """The task has ended; an outcome from a replaced attempt (not attempt 0, the
    orchestrator's own) changes nothing."""
    await conn.execute(_FINISHED if attempt > 0 else _FINISHED_ANY,
                       {"finished_task": task_id, "finished_attempt": attempt})


async def known_services(conn: AsyncConnection) -> dict[str, int | None]:
    """Each registered service, with the number of its tasks that may run at once across all
    its replicas (None: no limit)."""
    rows = await conn.execute(select(services.c.name, services.c.max_concurrent_tasks))
    return {name: limit for name, limit in rows}
