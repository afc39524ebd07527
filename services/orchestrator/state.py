"""What the orchestrator stores: one dispatch row per task, the attempt it is on."""

from typing import NamedTuple

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..database import dispatches, now, services


async def claim_first_dispatch(
    conn: AsyncConnection, task_id: str, service: str, parent_task_id: str | None = None
) -> bool:
    """Record attempt 1 of a task; False when the task was dispatched before (a duplicate)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    result = await conn.execute(
        dialect.insert(dispatches)
        .values(task_id=task_id, service=service, attempt=1, parent_task_id=parent_task_id,
                finished=False, dispatched_at=now())
        .on_conflict_do_nothing()
    )
    return result.rowcount == 1


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


async def mark_finished(conn: AsyncConnection, task_id: str) -> None:
    await conn.execute(
        update(dispatches).where(dispatches.c.task_id == task_id).values(finished=True)
    )


async def known_services(conn: AsyncConnection) -> set[str]:
    return set((await conn.execute(select(services.c.name))).scalars())
