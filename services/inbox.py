"""A task's inbox: the events sent into it, in the order the control plane took them."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from .database import inbox


async def sent_events(conn: AsyncConnection, task_id: str) -> list[dict[str, Any]]:
    found = await conn.execute(
        select(inbox.c.seq, inbox.c.event, inbox.c.step)
        .where(inbox.c.task_id == task_id)
        .order_by(inbox.c.seq)
    )
    return [{"seq": seq, "event": event, "step": step} for seq, event, step in found]
