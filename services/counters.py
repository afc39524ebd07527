"""Counters kept with the state: stale attempts rejected, tasks recovered, and the like."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from .database import counters, upsert

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection

STALE_REJECTED = "stale_attempts_rejected"
RECOVERED = "tasks_recovered"


async def add(conn: AsyncConnection, name: str, by: int = 1) -> None:
    statement = upsert(conn.dialect.name, counters, ("name",), (), ("value",))
    await conn.execute(statement, {"name": name, "value": by})


async def read(conn: AsyncConnection) -> dict[str, int]:
    return {name: value for name, value in await conn.execute(select(counters))}
