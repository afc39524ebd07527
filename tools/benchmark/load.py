"""Throughput: tasks per second with many in flight and with a deep backlog, and what each
process (the broker's too) spent on them in CPU seconds per 1,000 tasks."""

import asyncio
import time
from dataclasses import dataclass

import psutil

from conveyor import Client

from .parts import cpu_seconds
from .stats import Tally


@dataclass
class Load:
    tasks_per_second: float
    cpu_per_1000: dict[str, float]  # process -> CPU seconds per 1,000 tasks


async def _outcome(client: Client, task_id: str, timeout: float, tally: Tally) -> None:
    try:
        outcome = await client.wait(task_id, timeout=timeout)
    except TimeoutError:
        return
    if outcome.status == "completed":
        tally.completed += 1


async def in_flight(client: Client, processes: dict[str, psutil.Process], total: int,
                    width: int, tally: Tally, timeout: float, service: str = "echo") -> Load:
    """`total` tasks of the service (echo unless told), kept `width` at a time in flight
    (each finished one makes room for the next)."""

    async def one(n: int) -> None:
        tally.submitted += 1
        task_id = await client.run_nowait(service, n=n)
        await _outcome(client, task_id, timeout, tally)

    return await _measured(lambda: _kept_in_flight(one, total, width), processes, total)


async def bare_in_flight(send, processes: dict[str, psutil.Process], total: int,
                         width: int, timeout: float) -> Load:
    """`total` requests through the bare path (benchmark/bare_path.py), `width` at a time."""

    async def one(_: int) -> None:
        await send(timeout)

    return await _measured(lambda: _kept_in_flight(one, total, width), processes, total)


async def _kept_in_flight(one, total: int, width: int) -> None:
    """`one(n)` for n in range(total), `width` at a time."""
    counter = iter(range(total))

    async def lane() -> None:
        for n in counter:
            await one(n)

    await asyncio.gather(*(lane() for _ in range(width)))


async def queued(client: Client, processes: dict[str, psutil.Process], total: int,
                 tally: Tally, timeout: float) -> Load:
    """`total` echo tasks published as fast as the broker confirms them, then drained:
    from the first publish to the last outcome."""

    async def publish_all() -> None:
        waits = []
        for first in range(0, total, 500):
            batch = range(first, min(first + 500, total))
            ids = await asyncio.gather(*(client.run_nowait("echo", n=n) for n in batch))
            tally.submitted += len(ids)
            waits += [asyncio.ensure_future(_outcome(client, i, timeout, tally)) for i in ids]
        await asyncio.gather(*waits)

    return await _measured(publish_all, processes, total)


async def _measured(work, processes: dict[str, psutil.Process], tasks: int) -> Load:
    before = cpu_seconds(processes)
    started = time.perf_counter()
    await work()
    seconds = time.perf_counter() - started
    after = cpu_seconds(processes)
    return Load(tasks / seconds,
                {name: (after[name] - before[name]) / tasks * 1000 for name in processes})
