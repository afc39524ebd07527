"""Sessions: tasks run in one session share the workflow Context's state.

The state is kept as llama-index-workflows serializes a context's state store
(`ctx.to_dict()["state"]`), so a task of the session starts from
`Context.from_dict(workflow, {"state": ...})`. Clients see and set it as a plain dict.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, select
from workflows.context.serializers import JsonSerializer
from workflows.context.state_store import DictState, InMemoryStateStore

from conveyor.contracts import new_id

from .database import dialect_insert, now, sessions, upsert

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncConnection

_serializer = JsonSerializer()


def plain_state(stored: dict[str, Any] | None) -> dict[str, Any]:
    """A stored state as the client sees it: the values of a dict state, decoded."""
    if not stored:
        return {}
    data = stored.get("state_data") or {}
    if stored.get("state_type") == "DictState":
        return {key: json.loads(value) for key, value in (data.get("_data") or {}).items()}
    return dict(data)


def stored_state(plain: dict[str, Any]) -> dict[str, Any]:
    """A plain dict as the state store of a context whose state is a dict."""
    try:
        encoded = {key: _serializer.serialize(value) for key, value in plain.items()}
    except Exception as exc:
        raise ValueError(f"session state must be JSON: {exc}") from None
    store = InMemoryStateStore(DictState())
    document = store.to_dict(_serializer)
    document["state_data"] = {"_data": encoded}
    return document


def view(row: Any) -> dict[str, Any]:
    return {
        "session_id": row.session_id,
        "state": plain_state(row.state),
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


async def _upsert(conn: AsyncConnection, session_id: str, state: dict[str, Any] | None) -> None:
    moment = now()
    statement = upsert(conn.dialect.name, sessions, ("session_id",), ("state", "updated_at"))
    await conn.execute(statement, {"session_id": session_id, "state": state,
                                   "created_at": moment, "updated_at": moment})


async def create(conn: AsyncConnection, session_id: str | None = None) -> dict[str, Any]:
    """A new session (or the existing one of that id)."""
    session_id = session_id or new_id()
    moment = now()
    await conn.execute(
        dialect_insert(conn, sessions)
        .values(session_id=session_id, state=None, created_at=moment, updated_at=moment)
        .on_conflict_do_nothing()
    )
    return await get(conn, session_id)


async def get(conn: AsyncConnection, session_id: str) -> dict[str, Any] | None:
    row = (await conn.execute(select(sessions).where(sessions.c.session_id == session_id))).first()
    return view(row) if row else None


async def list_all(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    statement = select(sessions).order_by(sessions.c.created_at.desc()).limit(limit)
    return [view(row) for row in await conn.execute(statement)]


async def delete_one(conn: AsyncConnection, session_id: str) -> bool:
    gone = await conn.execute(delete(sessions).where(sessions.c.session_id == session_id))
    return gone.rowcount > 0


async def set_state(conn: AsyncConnection, session_id: str, plain: dict[str, Any]) -> dict:
    await _upsert(conn, session_id, stored_state(plain))
    return await get(conn, session_id)


_STATE = select(sessions.c.state).where(sessions.c.session_id == bindparam("of_session"))


async def load_context_state(conn: AsyncConnection, session_id: str) -> dict[str, Any] | None:
    """The serialized state store a task of this session starts from, if any."""
    found = await conn.execute(_STATE, {"of_session": session_id})
    return found.scalar_one_or_none()


async def save_context_state(conn: AsyncConnection, session_id: str, state: dict) -> None:
    await _upsert(conn, session_id, state)
