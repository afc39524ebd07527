"""Where a run's deployments keep their state: a SQLite file in each one's directory (the
default), or, with `--state-url postgresql://user@host:port`, a database of its own on that
PostgreSQL server, created for it and dropped when the run ends; and what that server spent
on the run, in CPU seconds."""

import asyncio
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psutil

_server: str | None = None  # the PostgreSQL server given, without a database
_created: list[str] = []

CpuTimes = namedtuple("CpuTimes", "user system")


def use_postgres(server_url: str) -> None:
    global _server
    _server = server_url.rstrip("/")


def kind() -> str:
    return "postgresql" if _server else "sqlite"


def fresh_state_url(workdir: Path, namespace: str) -> str:
    """A new, empty state store for the deployment in `workdir` of this namespace."""
    if _server is None:
        return f"sqlite:///{workdir / 'state.db'}"
    _run(_admin(f'CREATE DATABASE "{namespace}"'))
    _created.append(namespace)
    return f"{_server}/{namespace}"


def drop_created() -> None:
    """Drop the databases this run created (its parts have stopped)."""
    while _created:
        _run(_admin(f'DROP DATABASE IF EXISTS "{_created.pop()}" WITH (FORCE)'))


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(f"{_server}/postgres")
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _run(coroutine) -> None:
    """Run it to the end from sync code, even inside the run's event loop (a thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


class PostgresServer:
    """The PostgreSQL server as one process for `cpu_seconds`: the postmaster, the backends
    alive now, and (in the postmaster's children's times) those that have exited."""

    def __init__(self) -> None:
        self.postmaster = next(p for p in psutil.process_iter(["name", "ppid"])
                               if p.info["name"] == "postgres"
                               and psutil.Process(p.info["ppid"]).name() != "postgres")

    def cpu_times(self) -> CpuTimes:
        spent = self.postmaster.cpu_times()
        user = spent.user + spent.children_user
        system = spent.system + spent.children_system
        for child in self.postmaster.children():
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue  # exited just now: counted with the postmaster's children next time
            user, system = user + times.user, system + times.system
        return CpuTimes(user, system)


def server_process() -> dict[str, PostgresServer]:
    """{"postgres": the server} when the state is on PostgreSQL, else nothing."""
    return {"postgres": PostgresServer()} if _server else {}
