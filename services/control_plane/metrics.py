"""What the control plane's records say about the whole deployment, for the gateway's
/metrics (tasks by service and status, retries, how long finished tasks took) and its
dashboard (tasks finished per minute)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select

from .. import counters
from ..database import now, tasks

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection

# Upper bounds (seconds) of the task-duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
FINISHED = ("completed", "failed", "cancelled")


def _seconds(conn: AsyncConnection):
    """A finished task's duration, from its creation, in the store's own SQL."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", tasks.c.finished_at - tasks.c.created_at)
    return (func.julianday(tasks.c.finished_at) - func.julianday(tasks.c.created_at)) * 86400


async def read(conn: AsyncConnection) -> dict[str, Any]:
    """{"tasks": [{service, status, count}], "retries": {service: n}, "durations":
    {service: {"buckets": [count <= bound, ...], "count", "sum"}}, "counters": {...}}."""
    by_status = await conn.execute(
        select(tasks.c.service, tasks.c.status, func.count())
        .group_by(tasks.c.service, tasks.c.status))
    retries = await conn.execute(
        select(tasks.c.service, func.sum(tasks.c.attempts - 1))
        .where(tasks.c.attempts > 1).group_by(tasks.c.service))
    seconds = _seconds(conn)
    durations = await conn.execute(
        select(tasks.c.service, func.count(), func.sum(seconds),
               *[func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS])
        .where(tasks.c.finished_at.is_not(None)).group_by(tasks.c.service))
    return {
        "tasks": [{"service": s, "status": st, "count": n} for s, st, n in by_status],
        "retries": {service: int(n or 0) for service, n in retries},
        "durations": {
            row[0]: {"count": row[1], "sum": float(row[2] or 0.0),
                     "buckets": [int(n or 0) for n in row[3:]]}
            for row in durations
        },
        "bucket_bounds": list(DURATION_BUCKETS),
        "counters": await counters.read(conn),
    }


def _minute(conn: AsyncConnection):
    """A finished task's minute, 'YYYY-MM-DD HH:MM' in UTC, in the store's own SQL."""
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", tasks.c.finished_at), "YYYY-MM-DD HH24:MI")
    # SQLite keeps a UTC moment as text, 'YYYY-MM-DD HH:MM:SS.ffffff'.
    return func.substr(tasks.c.finished_at, 1, 16)


async def throughput(conn: AsyncConnection, minutes: int,
                     until: datetime | None = None) -> list[dict[str, Any]]:
    """Tasks that ended in each of the `minutes` minutes up to `until` (now), oldest first, by
    final status: [{"minute": "2025-01-02T03:04:00+00:00", "completed", "failed", "cancelled"}]."""
    moment = (until or now()).replace(second=0, microsecond=0)
    first = moment - timedelta(minutes=minutes - 1)
    minute = _minute(conn)
    found = await conn.execute(
        select(minute, tasks.c.status, func.count())
        .where(tasks.c.finished_at >= first, tasks.c.status.in_(FINISHED))
        .group_by(minute, tasks.c.status))
    counts: dict[tuple[str, str], int] = {(m, status): n for m, status, n in found}
    slots = []
    for back in range(minutes - 1, -1, -1):
        start = moment - timedelta(minutes=back)
        key = start.strftime("%Y-%m-%d %H:%M")
        slots.append({"minute": start.isoformat(),
                      **{status: counts.get((key, status), 0) for status in FINISHED}})
    return slots
