"""Real Conveyor processes for integration tests: start, kill -9, restart, read their logs."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx

from conveyor import Client, TaskFailed
from conveyor.services.bus import SYSTEM_SUBSCRIPTIONS, group_name
from conveyor.services.settings import load

TESTS = Path(__file__).parent

SERVICES = {
    "echo": "conveyor.services.examples.echo:workflow",
    "slow": "conveyor.services.examples.slow:workflow",
    "counter": "conveyor.services.examples.counter:workflow",
    "greeter": "conveyor.services.examples.greeter:workflow",
    "outer": "conveyor.services.examples.nested:workflow",
    "recorded": "sample_workflows:recorded",
    "unserializable": "sample_workflows:unserializable",
    "stepper": "sample_workflows:stepper",
    "flaky": "sample_workflows:flaky",
    "work": "sample_workflows:work",
    "slow_counter": "sample_workflows:slow_counter",
}
# Second replicas: part name -> the service it is another replica of. Any part named
# "PART#N" is another replica of PART too ("work#2", "control-plane#2").
REPLICAS = {"stepper-b": "stepper", "slow_counter-b": "slow_counter"}


def part_of(name: str) -> str:
    """The part (a core part's command or a service) a process name runs."""
    return REPLICAS.get(name, name.partition("#")[0])


@dataclass
class Deployment:
    broker_url: str
    workdir: Path
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    via_faststream: bool = False  # start the parts with `faststream run MODULE:app`
    overrides: dict[str, str] = field(default_factory=dict)  # more environment for every part

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONVEYOR_BROKER_URL": self.broker_url,
            "CONVEYOR_NAMESPACE": self.namespace,
            "CONVEYOR_STATE_URL": f"sqlite:///{self.workdir / 'state.db'}",
            "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            **self.overrides,
        }

    def command(self, part: str) -> list[str]:
        if self.via_faststream:
            module = {"control-plane": "control_plane", "orchestrator": "orchestrator"}
            target = module.get(part_of(part), "runtime")
            return [sys.executable, "-m", "faststream", "run",
                    f"conveyor.services.{target}.app:app"]
        service = part_of(part)
        if service in SERVICES:
            return [sys.executable, "-m", "conveyor", "serve", SERVICES[service], "--name",
                    service]
        return [sys.executable, "-m", "conveyor", service]

    def start(self, *parts: str) -> None:
        for part in parts:
            log = open(self.workdir / f"{part}.log", "ab")
            env = self.env
            service = part_of(part)
            if service in SERVICES:
                env |= {"CONVEYOR_SERVICE_NAME": service, "CONVEYOR_WORKFLOW": SERVICES[service]}
            self.processes[part] = subprocess.Popen(
                self.command(part), env=env, cwd=self.workdir, stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self, part: str) -> None:
        process = self.processes.pop(part)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_part(self, part: str, timeout: float = 20) -> None:
        """Stop one part as an operator would (SIGTERM), and wait until it has."""
        process = self.processes.pop(part)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout)

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()
        if self.broker_url.startswith("amqp"):
            # Durable queues outlive their test; a RabbitMQ with thousands of them recovers
            # slowly on restart. Each deployment removes its own namespace's.
            worker = threading.Thread(target=asyncio.run, args=(self._delete_queues(),))
            worker.start()
            worker.join(timeout=30)

    async def _delete_queues(self) -> None:
        settings = load(broker_url=self.broker_url, namespace=self.namespace)
        names = [group_name(settings, kind, part) for kind, part in SYSTEM_SUBSCRIPTIONS]
        names += [f"{self.namespace}.{service}" for service in {*SERVICES, *REPLICAS.values()}]
        try:
            connection = await aio_pika.connect(self.broker_url, timeout=5)
        except Exception:  # nothing to tidy if RabbitMQ is gone
            return
        async with connection:
            channel = await connection.channel()
            for name in names:
                await channel.queue_delete(name)
            await channel.exchange_delete(self.namespace)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def records(self, part: str) -> list[dict]:
        """The part's log lines, run with CONVEYOR_LOG_FORMAT=json: each must be one JSON
        object."""
        found = []
        for line in (self.workdir / f"{part}.log").read_text().splitlines():
            if not line.strip():
                continue
            try:
                found.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{part} logged a line that is not JSON: {line}") from None
        return found

    def lines_about(self, task_id: str, *parts: str) -> list[dict]:
        """The JSON log records of `parts` whose message names the task, each with its part
        as "part"."""
        return [{**record, "part": part} for part in parts for record in self.records(part)
                if task_id in record["message"]]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`conveyor ARGS...` against this deployment, as from a shell."""
        return subprocess.run([sys.executable, "-m", "conveyor", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def client(self) -> Client:
        """A client configured as the parts are (the queue type it declares, for one)."""
        settings = {key.removeprefix("CONVEYOR_").lower(): value
                    for key, value in self.overrides.items() if key.startswith("CONVEYOR_")}
        return Client(settings=load(**{**settings, "broker_url": self.broker_url,
                                       "namespace": self.namespace}))

    async def ready(self, *services: str, timeout: float = 90.0) -> None:
        """Wait until each service has run a task end to end (or, if it waits for input
        before it ends, until it is registered), and the control plane answers queries
        (a task's outcome reaches its requester without it)."""
        async with self.client() as client:
            async with asyncio.timeout(timeout):
                for service in services:
                    if service in WAIT_FOR_INPUT:
                        await eventually(lambda s=service: registered(client, s), timeout)
                        continue
                    # Until the parts have declared their queues, a task may go nowhere
                    # (RabbitMQ) or to a service not yet known: try again until one runs.
                    while True:
                        try:
                            await client.run(service, timeout=5, log=os.devnull)
                            break
                        except TimeoutError:
                            continue
                        except TaskFailed as exc:
                            if exc.error is None or exc.error.type != "UnknownService":
                                break  # it ran: the service is up
                            await asyncio.sleep(0.3)
                    await eventually(lambda s=service: registered(client, s), timeout)


@contextmanager
def serving(deployment: Deployment, *services: str):
    """The deployment running the control plane, the orchestrator and `services`, ready."""
    deployment.start("control-plane", "orchestrator", *services)
    try:
        asyncio.run(deployment.ready(*services))
    except BaseException:
        print(deployment.logs())
        deployment.stop()
        raise
    try:
        yield deployment
    finally:
        deployment.stop()


WAIT_FOR_INPUT = {"greeter"}


async def registered(client: Client, service: str) -> bool:
    found = {s["name"]: s for s in await client.list_services()}
    return service in found and any(i["alive"] for i in found[service]["instances"])


async def noted(log: Path, line: str) -> bool:
    """Whether a process has written `line` to the file `log` (for `eventually`)."""
    # A tiny file another process writes: nothing to wait on but the file itself.
    return log.exists() and line in log.read_text().split()  # noqa: ASYNC240


async def eventually(check, timeout: float = 15.0):
    """Await `check()` until it returns something truthy: for records written asynchronously."""
    async with asyncio.timeout(timeout):
        # The record is written by another process: there is no event here to wait on.
        while not (found := await check()):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    return found


async def records_once_completed(client, service: str | None, ids: list[str],
                                 timeout: float = 60.0) -> dict[str, dict]:
    """The records of tasks `ids`, once every one of them reads completed (a requester has
    the outcome as soon as the control plane does, not after it has stored it: after a
    control plane was killed its backlog takes a while). Times out with what it saw."""
    seen: dict[str, dict] = {}

    async def all_completed() -> bool:
        seen.clear()
        seen.update({r["task_id"]: r for r in await client.list_tasks(
            service=service, limit=2 * len(ids))})
        return all(seen.get(i, {}).get("status") == "completed" for i in ids)

    try:
        await eventually(all_completed, timeout)
    except TimeoutError:
        pass  # the caller's assertion names what is missing
    return dict(seen)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gateway(deployment: Deployment, name: str, **env: str) -> str:
    """`conveyor gateway` on a free port in front of the deployment, with `env` added;
    returns its address once it answers /health."""
    port = free_port()
    log = open(deployment.workdir / f"{name}.log", "ab")  # noqa: SIM115
    deployment.processes[name] = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "gateway", "--port", str(port)],
        env=deployment.env | env, cwd=deployment.workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(eventually(lambda: _answers(url), timeout=30))
    except TimeoutError:
        print(deployment.logs())
        raise
    return url


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{url}/health")).status_code == 200
    except httpx.TransportError:
        return False
