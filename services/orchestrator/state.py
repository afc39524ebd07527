"""What the orchestrator stores: one dispatch row per task, the attempt it is on."""

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..database import dispatches, now, services


async def claim_first_dispatch(conn: AsyncConnection, task_id: str, service: str) -> bool:
    """Record attempt 1 of a task; False when the task was dispatched before (a duplicate)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    result = await conn.execute(
        dialect.insert(dispatches)
        .values(task_id=task_id, service=service, attempt=1, finished=False,
                dispatched_at=now())
        .on_conflict_do_nothing()
    )
    return result.rowcount == 1


async def mark_finished(conn: AsyncConnection, task_id: str) -> None:
    await conn.execute(
        update(dispatches).where(dispatches.c.task_id == task_id).values(finished=True)
    )


async def known_services(conn: AsyncConnection) -> set[str]:
    return set((await conn.execute(select(services.c.name))).scalars())
