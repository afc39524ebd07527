"""What a worker reads from the state store when it takes a task, in one round trip."""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.contracts import NewTask

from .. import sessions
from ..database import dispatches, inbox


@dataclass
class StartingPoint:
    cancelled: bool = False  # cancelled while it waited on the service's queue
    state: dict[str, Any] | None = None  # its session's Context state
    sent: list[dict[str, Any]] = field(default_factory=list)  # events already in its inbox


async def starting_point(conn: AsyncConnection, task: NewTask) -> StartingPoint:
    cancelled = await conn.execute(
        select(dispatches.c.cancelled).where(dispatches.c.task_id == task.task_id)
    )
    point = StartingPoint(cancelled=bool(cancelled.scalar_one_or_none()))
    if point.cancelled:
        return point
    if task.session_id:
        point.state = await sessions.load_context_state(conn, task.session_id)
    found = await conn.execute(
        select(inbox.c.seq, inbox.c.event, inbox.c.step)
        .where(inbox.c.task_id == task.task_id)
        .order_by(inbox.c.seq)
    )
    point.sent = [{"seq": seq, "event": event, "step": step} for seq, event, step in found]
    return point
