"""The durable state at CONVEYOR_STATE_URL: PostgreSQL through SQLAlchemy's async core
(asyncpg), or SQLite through its sync core with the same async interface (SQLiteStore).

Every part shares one database and owns its own tables: the control plane the task
records, event log, inboxes, sessions, registry and dead letters; the orchestrator its
dispatches. A workflow service reads a task's inbox and its session's state when it starts
the task, and writes the session's state back when the task has run.
"""

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects import sqlite

from . import write_lock
from .settings import ConfigurationError

if TYPE_CHECKING:  # imported for PostgreSQL only: SQLAlchemy's asyncio and its ORM take time
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

metadata = MetaData()


class UTCDateTime(TypeDecorator):
    """A moment stored and read back in UTC, on SQLite (which keeps no offset) as elsewhere."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def now() -> datetime:
    return datetime.now(UTC)


tasks = Table(
    "tasks",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("service", String(100), nullable=False, index=True),
    Column("session_id", String(200), index=True),
    Column("parent_task_id", String(200), index=True),
    Column("publisher_id", String(200)),
    Column("status", String(16), nullable=False, index=True),
    Column("input", JSON),
    Column("result", JSON),
    Column("error", JSON),
    Column("attempts", Integer, nullable=False, default=0),
    Column("events", Integer, nullable=False, default=0),
    Column("steps", JSON),  # seconds each run of each step took, in the last attempt
    Column("reply_to", String(300)),
    Column("stream", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
)

events = Table(
    "events",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("event", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

watchers = Table(
    "watchers",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("reply_to", String(300), primary_key=True),
    Column("request_id", String(200), primary_key=True),
    # "outcome": answered once, when the task ends; "stream": sent every event, then the end.
    Column("kind", String(16), nullable=False, default="outcome"),
)

inbox = Table(
    "inbox",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("event", JSON, nullable=False),
    Column("step", String(200)),
    Column("message_id", String(200)),
    Column("created_at", UTCDateTime(), nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(200), primary_key=True),
    Column("state", JSON),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

services = Table(
    "services",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("workflow", String(300)),
    Column("event_types", JSON),
    # start_schema, stop_schema, event_schemas, graph: what the gateway serves.
    Column("described", JSON),
    # Tasks of the service that may run at once across its replicas; NULL: no limit.
    Column("max_concurrent_tasks", Integer),
    Column("registered_at", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("instance_id", String(200), primary_key=True),
    Column("service", String(100), nullable=False, index=True),
    Column("host", String(200)),
    Column("pid", Integer),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("last_heartbeat", UTCDateTime(), nullable=False),
    Column("running", Integer, nullable=False, default=0),
    Column("stopped", Boolean, nullable=False, default=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(200), index=True),
    Column("topic", String(300)),
    Column("reason", Text, nullable=False),
    Column("error_type", String(100)),
    Column("body", Text),
    Column("publisher_id", String(200)),
    Column("task_id", String(200)),
    Column("received_at", UTCDateTime(), nullable=False),
)

dispatches = Table(
    "dispatches",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("service", String(100), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("parent_task_id", String(200), index=True),
    Column("session_id", String(200), index=True),
    # Held back until the task before it in its session ends (one runs per session at once)
    # or until its service, at its limit of open tasks, has room.
    Column("held", Boolean, nullable=False, default=False),
    Column("finished", Boolean, nullable=False, default=False),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("paused", Boolean, nullable=False, default=False),
    Column("retry_at", UTCDateTime(), index=True),  # when the next attempt is due
    Column("task", JSON),  # the NEW_TASK, to dispatch again
    Column("trace", JSON),  # the trace context it was first dispatched in, for the next ones
    Column("dispatched_at", UTCDateTime(), nullable=False),
    # The lease: set by the worker that takes the attempt, renewed by its heartbeats.
    Column("instance_id", String(200)),
    Column("started_at", UTCDateTime()),
    Column("heartbeat_at", UTCDateTime(), index=True),
    # Set once the attempt's worker has published its outcome: its lease is no longer watched.
    Column("reported_at", UTCDateTime()),
)

attempt_errors = Table(
    "attempt_errors",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("type", String(200), nullable=False),
    Column("message", Text, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("steps", Integer, nullable=False),  # checkpoints taken so far
    Column("inbox_seq", Integer, nullable=False),  # sent events the context has taken
    Column("streamed", Integer, nullable=False),  # events the task had streamed
    Column("context", Text, nullable=False),  # ctx.to_dict() as JSON text
    Column("signature", String(64), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

secrets = Table(
    "secrets",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

# The namespace whose state this is: one row, written by the first part to open the store.
owner = Table(
    "owner",
    metadata,
    Column("namespace", String(200), primary_key=True),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Integer, nullable=False),
)


@functools.cache
def insert_ignoring_duplicates(dialect: str, table: Table):
    """INSERT ... ON CONFLICT DO NOTHING in a dialect, built once; the row's values are the
    execution's parameters."""
    return _dialect(dialect).insert(table).on_conflict_do_nothing()


@functools.cache
def upsert(dialect: str, table: Table, keys: tuple[str, ...], updated: tuple[str, ...],
           summed: tuple[str, ...] = ()):
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET each `updated` column to the new row's
    value and add the new row's value to each `summed` one, in a dialect, built once; the
    row's values are the execution's parameters."""
    statement = _dialect(dialect).insert(table)
    changes = {column: statement.excluded[column] for column in updated}
    changes |= {column: table.c[column] + statement.excluded[column] for column in summed}
    return statement.on_conflict_do_update(index_elements=list(keys), set_=changes)


def dialect_insert(conn: "AsyncConnection", table: Table):
    """An INSERT with ON CONFLICT clauses, in the connection's dialect (PostgreSQL or SQLite)."""
    return _dialect(conn.dialect.name).insert(table)


def _dialect(name: str):
    if name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql
    return sqlite


def async_url(state_url: str) -> str:
    """CONVEYOR_STATE_URL in the form SQLAlchemy's async drivers take."""
    if state_url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + state_url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://"):
        if state_url.startswith(prefix):
            return "postgresql+asyncpg://" + state_url.removeprefix(prefix)
    if state_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return state_url
    raise ConfigurationError(
        f"CONVEYOR_STATE_URL {state_url!r} must be sqlite:///path or postgresql://user@host/db"
    )


BUSY_TIMEOUT = 10.0  # seconds a transaction waits for SQLite's write lock


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Let SQLAlchemy, not the driver, begin transactions, so that SQLiteStore can make
    # every one BEGIN IMMEDIATE: writers queue for the lock instead of racing on stale reads.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # From here on nothing waits inside SQLite: _begin_immediate tries the lock itself.
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.close()


async def _begin_immediate(connection: Connection) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock another process may hold.

    With no busy timeout the attempt takes the lock or fails at once, so it runs on the
    event loop, and is tried again after 0.1, 0.2, 0.4 ... ms, at most 4: SQLite's own busy
    handler sleeps 1, 2, 5, 10 ms and more between tries (a lock held for half a
    millisecond cost its waiter several), and a driver thread costs a round trip (and the
    GIL) on every statement. A short hold is waited out as closely as before; under load,
    when parts write in batches (group_commit) that hold the lock for milliseconds, tries
    every 4 ms rather than every 1 cost the waiters less than half the failed tries (4.0
    per task rather than 9.7, 300 in flight) and no throughput.
    """
    cursor = connection.connection.driver_connection.cursor()
    try:
        deadline, pause = time.monotonic() + BUSY_TIMEOUT, 0.0001
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.004)
    finally:
        cursor.close()
    connection.begin()  # SQLAlchemy's own account of it; the driver sends nothing more


class SQLiteConnection:
    """One SQLite transaction, with AsyncConnection's `execute` and `run_sync`.

    Its statements run on the event loop's thread: once BEGIN IMMEDIATE holds the write
    lock, a statement takes microseconds and never waits, which is far less than a trip to
    a driver thread (aiosqlite makes one per statement, ~0.3 ms each, holding the lock the
    while for the other parts).
    """

    def __init__(self, connection: Connection) -> None:
        self.sync_connection = connection
        self.dialect = connection.dialect

    async def begin(self) -> None:
        await _begin_immediate(self.sync_connection)

    async def commit(self) -> None:
        self.sync_connection.commit()

    async def rollback(self) -> None:
        self.sync_connection.rollback()

    async def execute(self, statement: Any, parameters: Any = None, **options: Any) -> Any:
        if not self.sync_connection.in_transaction():
            await self.begin()
        return self.sync_connection.execute(statement, parameters, **options)

    async def run_sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.sync_connection.in_transaction():
            await self.begin()
        return fn(self.sync_connection, *args, **kwargs)


class SQLiteStore:
    """A SQLite state store with AsyncEngine's `begin`, `connect` and `dispose`.

    A process runs one transaction at a time (SQLite has one writer anyway); waiting for
    the write lock another process holds never blocks the event loop.
    """

    def __init__(self, url: str) -> None:
        self.sync_engine: Engine = create_engine(url, pool_pre_ping=False)
        self.dialect = self.sync_engine.dialect
        event.listen(self.sync_engine, "connect", _sqlite_pragmas)
        self._turn = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[SQLiteConnection]:
        """A transaction, committed when the block ends, rolled back when it raises."""
        async with self._turn:
            connection = self.sync_engine.connect()
            try:
                await _begin_immediate(connection)
                with write_lock.holding():
                    yield SQLiteConnection(connection)
                connection.commit()
            finally:
                connection.close()  # rolls back what was not committed

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[SQLiteConnection]:
        """A connection whose transaction begins with its first statement (or `begin()`)
        and is rolled back at the end unless committed."""
        async with self._turn:
            connection = self.sync_engine.connect()
            try:
                with write_lock.holding():  # from its first statement on
                    yield SQLiteConnection(connection)
            finally:
                connection.close()

    async def dispose(self) -> None:
        async with self._turn:
            self.sync_engine.dispose()


@contextlib.asynccontextmanager
async def autocommit(engine: Any) -> AsyncIterator[Any]:
    """A connection whose statements each commit by themselves, for writes that need no
    transaction around them: on PostgreSQL a statement is then one round trip, not three
    (BEGIN, it, COMMIT). SQLite's writers take the write lock first, so there it is a
    transaction like any other (`SQLiteStore.begin`)."""
    if isinstance(engine, SQLiteStore):
        async with engine.begin() as conn:
            yield conn
        return
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


def sync_url(state_url: str) -> str:
    return "sqlite:///" + async_url(state_url).removeprefix("sqlite+aiosqlite:///")


# A part's PostgreSQL connections: at most POOL_MAX at once, as many as POOL_KEPT kept open
# between uses. With SQLAlchemy's default of 5 kept, a part under load (8 front-door
# messages at once, 16 tasks) closed and reopened connections all the time: 330 to 390
# sessions for 3,000 tasks, a fork and a handshake each, PostgreSQL spending 1.9 to 2.3 ms
# of CPU per task; with 10 kept, 26 to 30 sessions and 1.2 ms.
POOL_KEPT, POOL_MAX = 10, 15

CREATE_LOCK = 0x636F6E63  # "conc": the advisory lock of creating the tables


async def connect(state_url: str, namespace: str | None = None) -> "AsyncEngine":
    """Open the state store and create its tables; fails with one line if it can't, or if
    it holds another namespace's state."""
    url = async_url(state_url)
    if url.startswith("sqlite"):
        engine: Any = SQLiteStore(sync_url(state_url))
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url, pool_pre_ping=False, pool_size=POOL_KEPT,
                                     max_overflow=POOL_MAX - POOL_KEPT)
    for attempt in range(5):
        try:
            async with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Parts starting together take turns: one creates, the others find.
                    await conn.execute(select(func.pg_advisory_xact_lock(CREATE_LOCK)))
                await conn.run_sync(metadata.create_all)
                await conn.run_sync(_check_columns, state_url)
                if namespace is not None:
                    await _check_owner(conn, state_url, namespace)
            return engine
        except ConfigurationError:
            await engine.dispose()
            raise
        except Exception as exc:
            # Parts starting together race to create the tables (on SQLite, one may find the
            # file locked by another's for longer than its busy timeout): try again.
            if attempt < 4 and ("already exists" in str(exc) or "database is locked" in str(exc)):
                await asyncio.sleep(0.2 * 2 ** attempt)
                continue
            await engine.dispose()
            raise ConfigurationError(
                f"state store {state_url!r} cannot be reached: {type(exc).__name__}: {exc}"
            ) from None
    return engine


def _check_columns(conn: Connection, state_url: str) -> None:
    """Every column this version writes is in the store. `create_all` makes missing tables,
    never missing columns: a store made by an earlier version would fail on the first task
    that writes one, with an error naming only SQL."""
    found = inspect(conn).get_multi_columns(filter_names=list(metadata.tables))
    lacking = []
    for name, table in metadata.tables.items():
        there = {column["name"] for column in found.get((None, name), ())}
        if missing := [column.name for column in table.columns if column.name not in there]:
            lacking.append(f"table {name} lacks {', '.join(missing)}")
    if lacking:
        raise ConfigurationError(
            f"state store {state_url!r} was made by another version of Conveyor "
            f"({'; '.join(lacking)}): give this version a CONVEYOR_STATE_URL of its own, or "
            f"add those columns to the store"
        )


async def _check_owner(conn: "AsyncConnection", state_url: str, namespace: str) -> None:
    """The store is the namespace's (claimed now if it is nobody's yet). Two namespaces in
    one store would take each other's tasks: one orchestrator's sweep would dispatch the
    other's to topics nobody reads, and each would count the other's services as its own."""
    found = (await conn.execute(select(owner.c.namespace))).scalar_one_or_none()
    if found is None:
        await conn.execute(owner.insert().values(namespace=namespace))
    elif found != namespace:
        raise ConfigurationError(
            f"state store {state_url!r} holds the state of namespace {found!r}, not "
            f"{namespace!r}: give each namespace a CONVEYOR_STATE_URL of its own"
        )
