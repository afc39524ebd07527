"""One broker's part of a benchmark run: the floor; a deployment (control plane,
orchestrator, one echo service, default settings) for latency, throughput and memory; a
second one with two replicas of a service and short heartbeats for recovery; `conveyor up`
from nothing; and last one deployment for each count of `slow` replicas, for scaling. On
Kafka each deployment, and each repetition of the first, has a fresh tansu (BrokerServer)."""

import asyncio
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from rich.console import Console

from .bare_path import bare_path
from .floor import HOPS, bare_hop, workflow_run
from .latency import raw_publisher, via_client, via_raw_json
from .load import at_rest, bare_in_flight, in_flight, queued
from .parts import ECHO, BrokerServer, Deployment, PeakRss, forget_namespace, rss_mb
from .recovery import SERVICE as RESUMABLE_SERVICE
from .recovery import resume_after_kill9
from .report import Results
from .scaling import scaling
from .startup import up_to_first_task
from .state import server_process
from .stats import Tally, count_dead_letters, percentile

# The recovery deployment's heartbeats. Only there: under load, a timeout this short has
# workers that are merely busy taken for silent (see README "Benchmark").
HEARTBEAT = {"CONVEYOR_HEARTBEAT_INTERVAL": "0.5", "CONVEYOR_HEARTBEAT_TIMEOUT": "3"}


@dataclass(frozen=True)
class Sizes:
    repetitions: int
    hops: int  # bare hops per repetition
    workflow_runs: int  # bare in-process runs per repetition
    sequential: int  # tasks timed one after another, per path (Client, raw JSON)
    in_flight: int  # tasks kept in flight at once...
    in_flight_tasks: int  # ...until this many have run
    queued: int  # tasks published before any is awaited
    task_timeout: float  # seconds an outcome may take under load before it counts as lost
    scaling_tasks: int  # tasks per replica count, kept `in_flight` at a time

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


QUICK = Sizes(repetitions=2, hops=30, workflow_runs=30, sequential=20, in_flight=50,
              in_flight_tasks=100, queued=100, task_timeout=120, scaling_tasks=100)
FULL = Sizes(repetitions=5, hops=500, workflow_runs=500, sequential=300, in_flight=1000,
             in_flight_tasks=3000, queued=10_000, task_timeout=900, scaling_tasks=1000)


async def bench_broker(broker: str, server: BrokerServer, sizes: Sizes, results: Results,
                       workdir: Path, say: Console) -> None:
    tally = Tally()
    reps = range(sizes.repetitions)
    try:
        url = server.fresh()
        deployment = Deployment(url, workdir / "deployment")
        deployment.workdir.mkdir()
        say.log(f"{broker}: the floor (bare hop, bare workflow run, bare path)")
        paths = await _floor(broker, url, deployment.namespace, sizes, results)
        bare = await _bare_path(broker, deployment, server, sizes, results)
        say.log(f"{broker}: a deployment: latency, throughput, memory")
        if server.kind == "rabbit":  # one deployment, its repetitions one after another
            await _deployment(broker, deployment, server, sizes, reps, results, paths, bare,
                              tally, say)
        else:  # a fresh tansu and deployment for each repetition (see BrokerServer)
            for rep in reps:
                again = Deployment(server.fresh(), workdir / f"deployment-{rep}")
                again.workdir.mkdir()
                await _deployment(broker, again, server, sizes, [rep], results, paths, bare,
                                  tally, say)
        say.log(f"{broker}: two replicas: kill -9 of the one holding a task")
        replicas = Deployment(server.fresh(), workdir / "recovery", HEARTBEAT)
        replicas.workdir.mkdir()
        await _recovery(broker, replicas, sizes, results, tally, say)
        for rep in reps:
            say.log(f"{broker}: conveyor up to the first task ({rep + 1})")
            up_dir = workdir / f"up-{rep}"
            up_dir.mkdir()
            results.add("up_to_first_task", broker, await up_to_first_task(server.url, up_dir))
        say.log(f"{broker}: scaling: 1, 2 and 4 replicas of a 20 ms step")
        per_replica = await scaling(broker, server.fresh, sizes.scaling_tasks, sizes.in_flight,
                                    sizes.repetitions, sizes.task_timeout, results, tally,
                                    workdir, say)
        results.meta.setdefault("scaling_tasks_per_replica", {})[broker] = per_replica
    finally:
        results.tasks[broker] = {"submitted": tally.submitted, "completed": tally.completed,
                                 "lost": tally.lost, "dead_letters": tally.dead_letters}


async def _floor(broker: str, url: str, namespace: str, sizes: Sizes,
                 results: Results) -> list[float]:
    """Each repetition's floor; returns its physical path in ms."""
    paths = []
    async with bare_hop(url, namespace) as hop:
        for _ in range(sizes.repetitions):
            hops = [await hop() for _ in range(sizes.hops)]
            runs = [await workflow_run() for _ in range(sizes.workflow_runs)]
            paths.append(HOPS * percentile(hops, 50) + percentile(runs, 50))
            results.add("hop_p50", broker, percentile(hops, 50))
            results.add("hop_p99", broker, percentile(hops, 99))
            results.add("workflow_p50", broker, percentile(runs, 50))
            results.add("workflow_p99", broker, percentile(runs, 99))
            results.add("physical_path", broker, paths[-1])
    return paths


async def _bare_path(broker: str, deployment: Deployment, server: BrokerServer,
                     sizes: Sizes, results: Results) -> list[float]:
    """Each repetition's bare path (benchmark/bare_path.py): its p50 timed as the sequential
    tasks are (after a second idle, one after another, as many), and its throughput with as
    many in flight as the deployment will have. Returns the p50s."""
    medians = []
    async with bare_path(deployment.broker_url, deployment.namespace,
                         env=deployment.env) as path:
        processes = {**path.processes, "broker": server.process(), "client": psutil.Process()}
        for _ in range(sizes.repetitions):
            await asyncio.sleep(1.0)  # idle first, as before the deployment's sequential tasks
            times = [await path.send() for _ in range(sizes.sequential)]
            medians.append(percentile(times, 50))
            results.add("bare_path_p50", broker, medians[-1])
            results.add("bare_path_p99", broker, percentile(times, 99))
            if server.kind != "rabbit":
                continue  # see report.RABBIT_ONLY
            load = await bare_in_flight(path.send, processes, sizes.in_flight_tasks,
                                        sizes.in_flight, sizes.task_timeout)
            results.add("bare_path_tps", broker, load.tasks_per_second)
            results.add("bare_path_cpu", broker, sum(load.cpu_per_1000.values()))
    return medians


async def _deployment(broker: str, deployment: Deployment, server: BrokerServer, sizes: Sizes,
                      reps: Iterable[int], results: Results, paths: list[float],
                      bare: list[float], tally: Tally, say: Console) -> None:
    """The repetitions `reps` of latency, throughput and memory, one after another."""
    deployment.start_core()
    deployment.serve("service", ECHO, "echo")
    try:
        async with deployment.client() as client, \
                raw_publisher(deployment.broker_url, deployment.namespace) as raw:
            await deployment.ready(client, "echo")
            await via_raw_json(raw, 1, tally)  # the reply topic's first message
            processes = {part: psutil.Process(deployment.processes[part].pid)
                         for part in ("control-plane", "orchestrator", "service")}
            processes["broker"] = server.process()
            with_client = {**processes, "client": psutil.Process(), **server_process()}
            for rep in reps:
                await at_rest(processes)  # nothing in flight, nothing left to record
                await asyncio.sleep(1.0)
                for part, mb in rss_mb(processes).items():
                    results.add(f"rss_idle_{part}", broker, mb)
                _latency(broker, "client", await via_client(client, sizes.sequential, tally),
                         paths[rep], bare[rep], results)
                _latency(broker, "raw", await via_raw_json(raw, sizes.sequential, tally),
                         paths[rep], bare[rep], results)
                async with PeakRss(processes) as peak:
                    many = await in_flight(client, with_client, sizes.in_flight_tasks,
                                           sizes.in_flight, tally, sizes.task_timeout)
                    backlog = await queued(client, with_client, sizes.queued, tally,
                                           sizes.task_timeout)
                for name, load in (("in_flight", many), ("queued", backlog)):
                    results.add(f"{name}_tps", broker, load.tasks_per_second)
                    for part, seconds in load.cpu_per_1000.items():
                        results.add(f"{name}_cpu_{part}", broker, seconds)
                results.add("in_flight_cpu_all", broker, sum(many.cpu_per_1000.values()))
                for part, mb in peak.peak.items():
                    results.add(f"rss_load_{part}", broker, mb)
                say.log(f"{broker}: repetition {rep + 1}: {many.tasks_per_second:.0f} "
                          f"and {backlog.tasks_per_second:.0f} tasks/s")
            await count_dead_letters(client, tally)
    finally:
        await asyncio.to_thread(deployment.stop)
        await forget_namespace(deployment.broker_url, deployment.namespace, ["echo"])


async def _recovery(broker: str, deployment: Deployment, sizes: Sizes, results: Results,
                    tally: Tally, say: Console) -> None:
    deployment.start_core()
    try:
        async with deployment.client() as client:
            for rep in range(sizes.repetitions):
                log = deployment.workdir / f"resume-{rep}.log"
                seconds = await resume_after_kill9(deployment, client, log, tally)
                results.add("resume_after_kill9", broker, seconds)
                say.log(f"{broker}: attempt 2 started {seconds:.1f} s after the kill -9")
            await count_dead_letters(client, tally)
    finally:
        await asyncio.to_thread(deployment.stop)
        await forget_namespace(deployment.broker_url, deployment.namespace,
                               [RESUMABLE_SERVICE])


def _latency(broker: str, path: str, times: list[float], physical: float, bare: float,
             results: Results) -> None:
    if not times:
        return  # every task was lost; the tally says so
    for q in (50, 95, 99):
        results.add(f"{path}_p{q}", broker, percentile(times, q))
    results.add(f"{path}_ratio", broker, percentile(times, 50) / physical)
    results.add(f"{path}_bare_ratio", broker, percentile(times, 50) / bare)
