"""Conveyor's parts as the processes a user starts, and what they cost: CPU seconds and RSS
read with psutil, for each part and for the broker itself."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import psutil

from conveyor import Client, TaskFailed, embedded_broker
from conveyor.services.bus import SYSTEM_SUBSCRIPTIONS, group_name
from conveyor.services.settings import load

from . import state

TOOLS = Path(__file__).resolve().parent.parent
ECHO = "conveyor.services.examples.echo:workflow"
SLOW = "conveyor.services.examples.slow:workflow"
RESUMABLE = "benchmark.workflows:resumable"


def fresh_namespace() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


@dataclass
class Deployment:
    """Control plane, orchestrator and workflow services on one broker, in a namespace and a
    state store of their own (a SQLite file, or a PostgreSQL database: benchmark/state.py)."""

    broker_url: str
    workdir: Path
    overrides: dict[str, str] = field(default_factory=dict)  # more environment for each part
    namespace: str = field(default_factory=fresh_namespace)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    state_url: str = ""  # a fresh store of its own (benchmark/state.py) unless given

    def __post_init__(self) -> None:
        self.state_url = self.state_url or state.fresh_state_url(self.workdir, self.namespace)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONVEYOR_BROKER_URL": self.broker_url,
            "CONVEYOR_NAMESPACE": self.namespace,
            "CONVEYOR_STATE_URL": self.state_url,
            "PYTHONPATH": os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")]),
            **self.overrides,
        }

    def start(self, part: str, *args: str) -> None:
        with (self.workdir / f"{part}.log").open("ab") as log:
            self.processes[part] = subprocess.Popen(
                [sys.executable, "-m", "conveyor", *args], env=self.env, cwd=self.workdir,
                stdout=log, stderr=subprocess.STDOUT,
            )

    def start_core(self) -> None:
        self.start("control-plane", "control-plane")
        self.start("orchestrator", "orchestrator")

    def serve(self, part: str, workflow: str, name: str) -> None:
        self.start(part, "serve", workflow, "--name", name)

    def kill(self, pid: int) -> None:
        """kill -9 of the part with this pid."""
        part = next(p for p, process in self.processes.items() if process.pid == pid)
        process = self.processes.pop(part)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def check_running(self) -> None:
        gone = [part for part, process in self.processes.items() if process.poll() is not None]
        if gone:
            raise RuntimeError(f"{', '.join(gone)} exited; see the logs in {self.workdir}")

    def stop(self) -> None:
        stop_all(list(self.processes.values()))
        self.processes.clear()

    def client(self) -> Client:
        return Client(self.broker_url, self.namespace)

    async def ready(self, client: Client, service: str, timeout: float = 120, **input) -> None:
        """Until the parts have joined the broker a task may go nowhere: try until one runs."""
        async with asyncio.timeout(timeout):
            while True:
                self.check_running()
                try:
                    await client.run(service, timeout=5, **input)
                    return
                except TimeoutError:
                    continue
                except TaskFailed as exc:
                    if exc.error is None or exc.error.type != "UnknownService":
                        raise
                    await asyncio.sleep(0.3)

    async def alive(self, client: Client, service: str, replicas: int,
                    timeout: float = 120) -> None:
        """Until the registry shows this many replicas of the service alive; it lags a
        heartbeat behind the replicas themselves."""
        async with asyncio.timeout(timeout):
            while await alive_replicas(client, service) < replicas:
                self.check_running()
                await asyncio.sleep(0.2)


async def alive_replicas(client: Client, service: str) -> int:
    found = {s["name"]: s for s in await client.list_services()}.get(service)
    return sum(i["alive"] for i in found["instances"]) if found else 0


def stop_all(processes: list[subprocess.Popen], signum: int = signal.SIGTERM) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def forget_namespace(broker_url: str, namespace: str, services: list[str]) -> None:
    """Delete a namespace's durable queues and exchange from RabbitMQ (Kafka's topics go
    with the in-memory tansu)."""
    if not broker_url.startswith("amqp"):
        return
    settings = load(broker_url=broker_url, namespace=namespace)
    names = [group_name(settings, kind, part) for kind, part in SYSTEM_SUBSCRIPTIONS]
    names += [f"{namespace}.{service}" for service in services]
    try:
        connection = await aio_pika.connect(broker_url, timeout=5)
    except Exception:  # nothing to tidy if RabbitMQ is gone
        return
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
        await channel.exchange_delete(namespace)


class BrokerServer:
    """The broker a phase of the run is on: RabbitMQ as given, or a tansu of the run's own.

    tansu's memory storage keeps every message and slows as it fills: in one long run the
    second repetition's 13,000 tasks took over three times as long as the first's, tansu at
    a whole core, Conveyor's parts near idle. So each Kafka deployment gets a tansu of its
    own (`fresh`); RabbitMQ's drained queues stay as fast, and its deployments share it.
    """

    def __init__(self, kind: str, rabbit_url: str, workdir: Path) -> None:
        self.kind, self.url, self.workdir = kind, rabbit_url, workdir
        self.tansu: subprocess.Popen | None = None
        self.started = 0

    def fresh(self) -> str:
        """The URL of a broker for the next deployment: on Kafka a tansu just started."""
        if self.kind == "rabbit":
            return self.url
        self.stop()
        self.started += 1
        self.tansu, self.url = embedded_broker.start(
            log_path=str(self.workdir / f"tansu-{self.started}.log"))
        return self.url

    def process(self) -> psutil.Process:
        """RabbitMQ's Erlang VM (beam.smp), or the current tansu."""
        if self.tansu is not None:
            return psutil.Process(self.tansu.pid)
        for process in psutil.process_iter(["name"]):
            if process.info["name"] == "beam.smp":
                return process
        raise RuntimeError("no beam.smp process: is RabbitMQ running on this machine?")

    def stop(self) -> None:
        if self.tansu is not None:
            self.tansu.kill()
            self.tansu.wait()
            self.tansu = None


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    times = {}
    for name, process in processes.items():
        spent = process.cpu_times()
        times[name] = spent.user + spent.system
    return times


def rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: process.memory_info().rss / 2**20 for name, process in processes.items()}


class PeakRss:
    """The highest RSS of each process while the block runs, sampled every 0.2 s."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.peak = dict.fromkeys(processes, 0.0)
        self._sampler: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            for name, value in rss_mb(self.processes).items():
                self.peak[name] = max(self.peak[name], value)
            await asyncio.sleep(0.2)

    async def __aenter__(self) -> "PeakRss":
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._sampler is not None
        self._sampler.cancel()
        await asyncio.gather(self._sampler, return_exceptions=True)
        for name, value in rss_mb(self.processes).items():
            self.peak[name] = max(self.peak[name], value)
