"""Checkpoints: a task's workflow Context after each step, kept as signed JSON.

The context is llama-index-workflows' own JSON form (`ctx.to_dict()`), never pickle. Each
checkpoint is signed with HMAC-SHA256 under CONVEYOR_SIGNING_KEY (or a key generated once
per deployment and kept with the state); one that fails verification is never loaded.
Checkpoints live in the state store, not on the broker, so a context of any size is kept.
Only the attempt the orchestrator dispatched last may write one: a stale attempt is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets as random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select

from . import counters
from .database import checkpoints, dialect_insert, dispatches, now, secrets, upsert

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection


class CheckpointRefused(ValueError):
    """A stored checkpoint that fails verification: altered, or signed with another key."""


class StaleAttempt(RuntimeError):
    """An attempt the orchestrator has since replaced; what it reports is not taken."""


@dataclass
class Checkpoint:
    task_id: str
    attempt: int
    steps: int
    inbox_seq: int
    streamed: int
    context: dict[str, Any]


async def signing_key(conn: AsyncConnection, configured: str | None) -> bytes:
    """The configured key, or the deployment's own, made by whoever asks first."""
    if configured:
        return configured.encode()
    await conn.execute(
        dialect_insert(conn, secrets)
        .values(name="signing_key", value=random.token_hex(32))
        .on_conflict_do_nothing()
    )
    found = await conn.execute(select(secrets.c.value).where(secrets.c.name == "signing_key"))
    return found.scalar_one().encode()


def _signature(key: bytes, task_id: str, inbox_seq: int, streamed: int, context: str) -> str:
    signed = f"{task_id}\n{inbox_seq}\n{streamed}\n{context}".encode()
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


# Built once: they run on every task's path.
_LAST = select(checkpoints).where(checkpoints.c.task_id == bindparam("checkpointed"))
_ATTEMPT = select(dispatches.c.attempt).where(dispatches.c.task_id == bindparam("dispatched"))


async def replaced(conn: AsyncConnection, task_id: str, attempt: int) -> bool:
    """Whether the orchestrator has dispatched a later attempt than `attempt` (counted when
    so: what a replaced attempt reports is not taken). Attempt 0 is not a worker's: the
    orchestrator's own outcomes (cancelled, unknown service) are never stale."""
    if attempt <= 0:
        return False
    current = (await conn.execute(_ATTEMPT, {"dispatched": task_id})).scalar_one_or_none()
    if current is None or current <= attempt:
        return False
    await counters.add(conn, counters.STALE_REJECTED)
    return True


async def save(
    conn: AsyncConnection,
    key: bytes,
    task_id: str,
    attempt: int,
    context: dict[str, Any],
    *,
    inbox_seq: int,
    streamed: int,
) -> bool:
    """Keep the context of `attempt`; False (and counted) if a later attempt was dispatched:
    the caller commits the count, then stops the attempt."""
    if await replaced(conn, task_id, attempt):
        return False
    text = json.dumps(context, separators=(",", ":"))
    values = {
        "attempt": attempt, "inbox_seq": inbox_seq, "streamed": streamed, "context": text,
        "signature": _signature(key, task_id, inbox_seq, streamed, text), "updated_at": now(),
    }
    statement = upsert(conn.dialect.name, checkpoints, ("task_id",), tuple(values), ("steps",))
    await conn.execute(statement, {"task_id": task_id, "steps": 1, **values})
    return True


async def load(conn: AsyncConnection, key: bytes, task_id: str) -> Checkpoint | None:
    """The task's last checkpoint, verified; None if it has none."""
    row = (await conn.execute(_LAST, {"checkpointed": task_id})).first()
    if row is None:
        return None
    expected = _signature(key, task_id, row.inbox_seq, row.streamed, row.context)
    if not hmac.compare_digest(expected, row.signature):
        raise CheckpointRefused(
            f"the checkpoint of task {task_id!r} fails verification (altered, or signed with "
            "another CONVEYOR_SIGNING_KEY) and is not loaded"
        )
    return Checkpoint(task_id, row.attempt, row.steps, row.inbox_seq, row.streamed,
                      json.loads(row.context))


async def describe(conn: AsyncConnection, task_id: str) -> dict[str, Any] | None:
    """What an operator sees of a task's last checkpoint (not the context itself)."""
    row = (await conn.execute(
        select(checkpoints.c.attempt, checkpoints.c.steps, checkpoints.c.inbox_seq,
               checkpoints.c.streamed, func.length(checkpoints.c.context).label("size"),
               checkpoints.c.updated_at)
        .where(checkpoints.c.task_id == task_id)
    )).first()
    if row is None:
        return None
    return {"task_id": task_id, "attempt": row.attempt, "steps": row.steps,
            "inbox_seq": row.inbox_seq, "streamed": row.streamed, "size": row.size,
            "updated_at": row.updated_at.isoformat()}
