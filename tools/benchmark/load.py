"""Throughput: tasks per second with many in flight and with a deep backlog, and what each
process (the broker's too) spent on them in CPU seconds per 1,000 tasks.

A load is over once its last outcome is back and every part has caught up with it: under
load the control plane, off the task's path, may record outcomes seconds after the client
has them (measured: a whole core for 2 s after 13,000 tasks). Its catch-up counts, in time
and CPU, and the next phase starts on a deployment at rest."""

import asyncio
import time
from dataclasses import dataclass

import psutil

from conveyor import Client

from .parts import cpu_seconds
from .stats import Tally

PARTS = ("control-plane", "orchestrator", "service")  # the parts a load waits on
BUSY = 0.25  # share of a core over which a part counts as still working
QUIET = 0.6  # seconds every part stays under BUSY for the deployment to count as at rest


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


async def at_rest(processes: dict[str, psutil.Process], limit: float = 300) -> float:
    """Wait until the parts among `processes` have been idle for QUIET seconds (at most
    `limit`); returns when (perf_counter) the last of them was last seen busy."""
    parts = {name: process for name, process in processes.items() if name in PARTS}
    last_busy = time.perf_counter()
    if not parts:  # the bare path, or a load measured without its parts: nothing to wait on
        return last_busy
    deadline = last_busy + limit
    window = QUIET / 4
    while (now := time.perf_counter()) - last_busy < QUIET and now < deadline:
        before = cpu_seconds(parts)
        await asyncio.sleep(window)
        after = cpu_seconds(parts)
        if any(after[name] - before[name] > BUSY * window for name in parts):
            last_busy = time.perf_counter()
    return last_busy


async def _measured(work, processes: dict[str, psutil.Process], tasks: int) -> Load:
    before = cpu_seconds(processes)
    started = time.perf_counter()
    await work()
    outcomes_back = time.perf_counter()
    ended = max(outcomes_back, await at_rest(processes))
    after = cpu_seconds(processes)  # and QUIET seconds of rest: a few hundredths of a second
    return Load(tasks / (ended - started),
                {name: (after[name] - before[name]) / tasks * 1000 for name in processes})
