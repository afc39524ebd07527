"""What the control plane's records say about the whole deployment, for the gateway's
/metrics: tasks by service and status, retries, and how long finished tasks took."""

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .. import counters
from ..database import tasks

# Upper bounds (seconds) of the task-duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)


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
