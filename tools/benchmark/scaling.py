"""Scaling: tasks per second with many in flight through 1, 2 and 4 replicas of `slow`, whose
step waits 20 ms, each count in a deployment of its own; and how many tasks each replica ran."""

import asyncio
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from conveyor.services import database
from conveyor.services.database import dispatches

from .load import in_flight
from .parts import SLOW, Deployment, forget_namespace
from .report import Results
from .stats import Tally, count_dead_letters

SERVICE = "slow"
REPLICAS = (1, 2, 4)
# One task at a time: a replica then runs at most 50 tasks/s of 20 ms steps (about 20 with
# its own work per task), below what the control plane and orchestrator pass on when all
# parts share 2 cores (some 60 echo tasks/s on RabbitMQ), so that one replica is the
# bottleneck. With 4 at a time a single replica already outruns them: the table would show
# only their limit.
MAX_CONCURRENT_TASKS = 1
# A Kafka partition feeds one consumer (a replica has one): with fewer partitions than
# replicas at the largest count, some sit idle and adding replicas cannot help.
KAFKA_PARTITIONS = max(REPLICAS)


def figure(replicas: int) -> str:
    return f"scaling_tps_{replicas}"


async def scaling(broker: str, fresh: Callable[[], str], tasks: int, width: int,
                  repetitions: int, timeout: float, results: Results, tally: Tally, workdir: Path,
                  say: Console) -> dict[str, list[int]]:
    """Each replica count's figure in `results`, each count a deployment on the broker
    `fresh()` gives; returns, by count, the tasks each replica ran (readiness probes
    included), most first."""
    settings = {"CONVEYOR_MAX_CONCURRENT_TASKS": str(MAX_CONCURRENT_TASKS)}
    if broker == "kafka":
        settings["CONVEYOR_KAFKA_PARTITIONS"] = str(KAFKA_PARTITIONS)
    per_replica = {}
    for replicas in REPLICAS:
        deployment = Deployment(fresh(), workdir / f"scaling-{replicas}", settings)
        deployment.workdir.mkdir()
        deployment.start_core()
        for n in range(replicas):
            deployment.serve(f"{SERVICE}-{n}", SLOW, SERVICE)
        try:
            async with deployment.client() as client:
                await deployment.ready(client, SERVICE)
                await deployment.alive(client, SERVICE, replicas)
                for rep in range(repetitions):
                    load = await in_flight(client, {}, tasks, width, tally, timeout, SERVICE)
                    results.add(figure(replicas), broker, load.tasks_per_second)
                    say.log(f"{broker}: {replicas} x {SERVICE}, repetition {rep + 1}: "
                            f"{load.tasks_per_second:.0f} tasks/s")
                await count_dead_letters(client, tally)
        finally:
            await asyncio.to_thread(deployment.stop)
            await forget_namespace(deployment.broker_url, deployment.namespace, [SERVICE])
        per_replica[str(replicas)] = await _tasks_per_replica(deployment)
    return per_replica


async def _tasks_per_replica(deployment: Deployment) -> list[int]:
    """From the leases the replicas took in the state store, once the parts have stopped."""
    engine = await database.connect(deployment.state_url, deployment.namespace)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(sa.func.count())
                .where(dispatches.c.service == SERVICE, dispatches.c.instance_id.is_not(None))
                .group_by(dispatches.c.instance_id))
            return sorted((count for (count,) in rows), reverse=True)
    finally:
        await engine.dispose()
