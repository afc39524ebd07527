"""Removing finished tasks, after their TTL or on request: the record, its event log, inbox,
errors, watchers, checkpoint and dispatch row.

Every control plane replica sweeps; on PostgreSQL each takes rows the others have not
locked (SKIP LOCKED), on SQLite one writer runs at a time, so a task is removed once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, or_, select

from ..database import (
    attempt_errors,
    checkpoints,
    dispatches,
    events,
    inbox,
    now,
    tasks,
    watchers,
)

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection

OWNED = (events, inbox, attempt_errors, watchers, checkpoints, dispatches)


async def remove_expired(conn: AsyncConnection, ttls: dict[str, float], limit: int = 500) -> int:
    """Remove up to `limit` tasks whose final status' TTL has run out; returns how many."""
    moment = now()
    statement = (
        select(tasks.c.task_id)
        .where(or_(*(
            (tasks.c.status == status) & (tasks.c.finished_at < moment - timedelta(seconds=ttl))
            for status, ttl in ttls.items()
        )))
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        statement = statement.with_for_update(skip_locked=True)
    expired = list((await conn.execute(statement)).scalars())
    if expired:
        await remove(conn, expired)
    return len(expired)


async def remove(conn: AsyncConnection, task_ids: list[str]) -> None:
    """Remove these tasks and everything kept for them."""
    for table in OWNED:
        await conn.execute(delete(table).where(table.c.task_id.in_(task_ids)))
    await conn.execute(delete(tasks).where(tasks.c.task_id.in_(task_ids)))
