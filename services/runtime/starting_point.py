"""What a worker reads and claims in the state store when it takes an attempt of a task,
and how it lets go of one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, or_, select, tuple_, update

from conveyor.contracts import NewTask

from .. import checkpoints, sessions
from ..checkpoints import Checkpoint
from ..database import dispatches, inbox, insert_ignoring_duplicates, now
from ..orchestrator.state import first_dispatch

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection

# The statements on every task's path are built once: building one costs about as much CPU
# as running it on SQLite.
_WHEN = dispatches.c.heartbeat_at.type
_CLAIM = (
    update(dispatches)
    .where(dispatches.c.task_id == bindparam("claimed_task"),
           dispatches.c.attempt == bindparam("claimed_attempt"),
           dispatches.c.finished.is_(False), dispatches.c.cancelled.is_(False),
           dispatches.c.paused.is_(False), dispatches.c.reported_at.is_(None),
           or_(dispatches.c.instance_id.is_(None),
               dispatches.c.instance_id == bindparam("claimer"),
               dispatches.c.heartbeat_at < bindparam("silent_since", type_=_WHEN)))
    .values(instance_id=bindparam("claimer"), started_at=bindparam("claimed_at", type_=_WHEN),
            heartbeat_at=bindparam("claimed_at", type_=_WHEN))
)
_SENT = (
    select(inbox.c.seq, inbox.c.event, inbox.c.step)
    .where(inbox.c.task_id == bindparam("sent_to"), inbox.c.seq > bindparam("taken"))
    .order_by(inbox.c.seq)
)
_REPORTED = (
    update(dispatches)
    .where(dispatches.c.task_id == bindparam("reported_task"),
           dispatches.c.attempt == bindparam("reported_attempt"),
           dispatches.c.instance_id == bindparam("reporter"),
           dispatches.c.finished.is_(False), dispatches.c.cancelled.is_(False))
    .values(reported_at=bindparam("reported", type_=_WHEN))
)
_ENDED = _REPORTED.values(finished=True)
NEVER = datetime.min.replace(tzinfo=UTC)  # no heartbeat is older


@dataclass
class StartingPoint:
    skip: str | None = None  # why this attempt must not run (cancelled, replaced, ended)
    dispatched: bool = True  # False: no dispatch of the task is in the state store (yet)
    checkpoint: Checkpoint | None = None  # where a resumed task picks up
    state: dict[str, Any] | None = None  # its session's Context state, for a fresh start
    sent: list[dict[str, Any]] = field(default_factory=list)  # inbox events not yet taken


async def starting_point(
    conn: AsyncConnection, task: NewTask, attempt: int, instance_id: str, key: bytes,
    lease_timeout: float | None, trace: dict | None = None,
) -> StartingPoint:
    """Claim the attempt (its lease starts now) and gather what it starts from.

    An attempt another instance holds, and has heartbeated for within `lease_timeout`, is
    not claimed: its message came again (a dropped connection) while that instance still
    runs it. With `lease_timeout` None no holder counts as silent (the wall clock has just
    stepped: see wall_clock); the orchestrator's sweep moves a silent one on. A first
    attempt the state store has no dispatch of yet is recorded here, claimed (tried first:
    the orchestrator publishes a task that waits for nothing before it records it, so its
    worker mostly gets there first; the orchestrator then finds it).
    `trace` is the context it is recorded in. Raises CheckpointRefused when the task's last
    checkpoint fails verification.
    """
    moment = now()
    silent_since = moment - timedelta(seconds=lease_timeout) if lease_timeout is not None else NEVER
    if attempt == 1 and await _record_first(conn, task, instance_id, moment, trace):
        point = StartingPoint()  # recorded just now: it has no checkpoint yet
    elif (await conn.execute(_CLAIM, {
            "claimed_task": task.task_id, "claimed_attempt": attempt, "claimer": instance_id,
            "claimed_at": moment, "silent_since": silent_since,
    })).rowcount == 0:
        reason, dispatched = await _why_not(conn, task.task_id, attempt)
        return StartingPoint(skip=reason, dispatched=dispatched)
    else:
        point = StartingPoint(checkpoint=await checkpoints.load(conn, key, task.task_id))
    if point.checkpoint is None and task.session_id:
        point.state = await sessions.load_context_state(conn, task.session_id)
    taken = point.checkpoint.inbox_seq if point.checkpoint else 0
    found = await conn.execute(_SENT, {"sent_to": task.task_id, "taken": taken})
    point.sent = [{"seq": seq, "event": event, "step": step} for seq, event, step in found]
    return point


async def _record_first(conn: AsyncConnection, task: NewTask, instance_id: str, moment,
                        trace: dict | None) -> bool:
    """Record attempt 1 of a task as the orchestrator would, claimed by this instance;
    False when a dispatch of it is recorded already."""
    row = first_dispatch(task.task_id, task.service, task.parent_task_id, task.session_id,
                         task.model_dump(mode="json"), trace)
    recorded = await conn.execute(insert_ignoring_duplicates(conn.dialect.name, dispatches), {
        **row, "instance_id": instance_id, "started_at": moment, "heartbeat_at": moment})
    return recorded.rowcount == 1


async def _why_not(conn: AsyncConnection, task_id: str, attempt: int) -> tuple[str, bool]:
    row = (await conn.execute(select(dispatches).where(dispatches.c.task_id == task_id))).first()
    if row is None:
        return "the orchestrator has no dispatch of it", False
    if row.cancelled:
        return "it was cancelled", True
    if row.paused:
        return "it is paused", True
    if row.attempt > attempt:
        return f"attempt {attempt} was replaced by attempt {row.attempt}", True
    if row.attempt < attempt:
        # The orchestrator published attempt `attempt` inside its transaction: committed
        # after this claim looked. The caller looks again.
        return f"attempt {attempt} is not committed yet (attempt {row.attempt} is)", False
    if row.finished or row.reported_at is not None:
        return "it has ended", True
    if row.instance_id is None:
        # Committed after the claim looked: on PostgreSQL each statement reads the rows
        # committed when it starts, and the orchestrator commits once the broker has the
        # dispatch. The caller looks again.
        return "the orchestrator's dispatch was not committed yet", False
    return f"instance {row.instance_id} holds it and is alive", True


async def release(conn: AsyncConnection, task_id: str, attempt: int, instance_id: str) -> None:
    """Let go of an attempt this instance holds, for another to claim it at once."""
    await conn.execute(
        update(dispatches)
        .where(dispatches.c.task_id == task_id, dispatches.c.attempt == attempt,
               dispatches.c.instance_id == instance_id)
        .values(instance_id=None, started_at=None, heartbeat_at=None)
    )


async def renew(conn: AsyncConnection, instance_id: str, running: Mapping[str, int]) -> None:
    """Renew the lease of each attempt this instance holds: `running` maps task ids to their
    attempts. One the orchestrator has moved to a next attempt stays lost.

    On PostgreSQL a row another transaction holds is skipped (SKIP LOCKED), not waited
    for: this instance's own outcome, marked in a transaction that spans its publish, may
    hold its row for as long as the broker takes to confirm (seconds, when a Kafka
    partition is moving), and the other leases, waiting behind it, would run out. The
    orchestrator's sweep skips a locked row too; the next beat renews it if it is still
    held.
    """
    if not running:
        return
    # Locked in the order of their task ids (the ORDER BY), as the batches of claims and
    # outcomes take them: two transactions never wait for each other in a circle.
    held = (select(dispatches.c.task_id)
            .where(tuple_(dispatches.c.task_id, dispatches.c.attempt).in_(list(running.items())),
                   dispatches.c.instance_id == instance_id, dispatches.c.finished.is_(False))
            .order_by(dispatches.c.task_id))
    if conn.dialect.name == "postgresql":
        held = held.with_for_update(skip_locked=True)
    await conn.execute(update(dispatches).where(dispatches.c.task_id.in_(held))
                       .values(heartbeat_at=now()))


async def reported(conn: AsyncConnection, task_id: str, attempt: int, instance_id: str, *,
                   ended: bool = False) -> bool:
    """Mark the attempt's outcome (or its retry) reported, and with `ended` the task ended:
    the orchestrator's sweep leaves it alone from then on, and its place in its session and
    service is free. The worker marks an outcome in the transaction that spans its
    publish, so a cancel that comes meanwhile waits for the commit (its outcome then reaches
    the control plane second, and is not taken). False when the attempt is no longer this
    instance's to report: replaced, cancelled or ended meanwhile."""
    marked = await conn.execute(_ENDED if ended else _REPORTED, {
        "reported_task": task_id, "reported_attempt": attempt, "reporter": instance_id,
        "reported": now()})
    return marked.rowcount == 1
