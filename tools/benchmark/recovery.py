"""Recovery: seconds from kill -9 of the replica holding a task to the moment its next
attempt starts on another replica. Two replicas serve `resumable` (benchmark/workflows.py),
which notes the process and time each attempt starts."""

import asyncio
import time
from pathlib import Path

from conveyor import Client

from .parts import RESUMABLE, Deployment
from .stats import Tally
from .workflows import starts

SERVICE = "resumable"


async def two_replicas(deployment: Deployment, client: Client, timeout: float = 120) -> None:
    """Start replicas until two are alive, and run a task through them."""
    replicas = [p for p in deployment.processes if p.startswith(SERVICE)]
    for n in range(len(replicas), 2):
        deployment.serve(f"{SERVICE}-{time.monotonic_ns()}-{n}", RESUMABLE, SERVICE)
    await deployment.ready(client, SERVICE, timeout=timeout)
    await deployment.alive(client, SERVICE, 2, timeout=timeout)


async def resume_after_kill9(deployment: Deployment, client: Client, log: Path, tally: Tally,
                             timeout: float = 120) -> float:
    """Seconds from the kill -9 to the next attempt's start on the other replica."""
    await two_replicas(deployment, client)
    tally.submitted += 1
    release = log.with_suffix(".release")
    # The task holds its replica until released, so that it is killed mid-step.
    task_id = await client.run_nowait(SERVICE, log=str(log), release=str(release))
    async with asyncio.timeout(timeout):
        # Another process writes the log: there is nothing here to wait on but the file.
        while not (noted := starts(str(log))):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        holder = noted[0][0]
        killed_at = time.time()
        deployment.kill(holder)
        while len(noted := starts(str(log))) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    pid, resumed_at = noted[1]
    if pid == holder:
        raise RuntimeError("the killed replica started the task again")
    release.touch()
    outcome = await client.wait(task_id, timeout=60)
    if outcome.status == "completed":
        tally.completed += 1
    return resumed_at - killed_at
