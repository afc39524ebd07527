"""What a worker reads and claims in the state store when it takes an attempt of a task."""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.contracts import NewTask

from .. import checkpoints, sessions
from ..checkpoints import Checkpoint
from ..database import dispatches, inbox, now


@dataclass
class StartingPoint:
    skip: str | None = None  # why this attempt must not run (cancelled, replaced, ended)
    checkpoint: Checkpoint | None = None  # where a resumed task picks up
    state: dict[str, Any] | None = None  # its session's Context state, for a fresh start
    sent: list[dict[str, Any]] = field(default_factory=list)  # inbox events not yet taken


async def starting_point(
    conn: AsyncConnection, task: NewTask, attempt: int, instance_id: str, key: bytes
) -> StartingPoint:
    """Claim the attempt (its lease starts now) and gather what it starts from.

    Raises CheckpointRefused when the task's last checkpoint fails verification.
    """
    claimed = await conn.execute(
        update(dispatches)
        .where(dispatches.c.task_id == task.task_id, dispatches.c.attempt == attempt,
               dispatches.c.finished.is_(False), dispatches.c.cancelled.is_(False),
               dispatches.c.paused.is_(False))
        .values(instance_id=instance_id, started_at=now(), heartbeat_at=now())
    )
    if claimed.rowcount == 0:
        return StartingPoint(skip=await _why_not(conn, task.task_id, attempt))
    point = StartingPoint(checkpoint=await checkpoints.load(conn, key, task.task_id))
    if point.checkpoint is None and task.session_id:
        point.state = await sessions.load_context_state(conn, task.session_id)
    taken = point.checkpoint.inbox_seq if point.checkpoint else 0
    found = await conn.execute(
        select(inbox.c.seq, inbox.c.event, inbox.c.step)
        .where(inbox.c.task_id == task.task_id, inbox.c.seq > taken)
        .order_by(inbox.c.seq)
    )
    point.sent = [{"seq": seq, "event": event, "step": step} for seq, event, step in found]
    return point


async def _why_not(conn: AsyncConnection, task_id: str, attempt: int) -> str:
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    if row is None:
        return "the orchestrator never dispatched it"
    if row.cancelled:
        return "it was cancelled"
    if row.paused:
        return "it is paused"
    if row.attempt != attempt:
        return f"attempt {attempt} was replaced by attempt {row.attempt}"
    return "it has ended"
