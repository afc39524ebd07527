"""`conveyor up`: every part of Conveyor on one machine, as child processes.

Starts the embedded Kafka-compatible broker when CONVEYOR_BROKER_URL is unset, then the
control plane, the orchestrator, the HTTP gateway and the workflow services; Ctrl-C stops
every one of them.

Each part is a process of its own, forked (on Linux) from this one once it has imported
what the part imports, as gunicorn's --preload does: eight parts each importing FastStream,
SQLAlchemy and llama-index-workflows anew took seconds of CPU on the two cores they shared.
The parts a first task needs start first, while this process imports what the others need.
Elsewhere the parts are spawned, and import for themselves.
"""

import asyncio
import ctypes
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import wait as wait_for_any

from rich.console import Console

from conveyor import embedded_broker, running
from conveyor.client import Client
from conveyor.services import bus
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.services.settings import load

EXAMPLES = [
    "echo=conveyor.services.examples.echo:workflow",
    "slow=conveyor.services.examples.slow:workflow",
    "counter=conveyor.services.examples.counter:workflow",
    "greeter=conveyor.services.examples.greeter:workflow",
    "outer=conveyor.services.examples.nested:workflow",
]
# What each command imports, imported here before its first part is forked (workflow
# modules are left to the services that serve them).
IMPORTS = {
    "control-plane": "conveyor.services.control_plane.app",
    "orchestrator": "conveyor.services.orchestrator.app",
    "serve": "conveyor.services.runtime.app",
    "gateway": "conveyor.services.gateway.app",
}
GRACE_SECONDS = 15
READY_SECONDS = 120
PR_SET_PDEATHSIG = 1

console = Console(soft_wrap=True)


def _die_with_parent() -> None:
    """In a child, before exec: on Linux, be sent SIGTERM if `conveyor up` itself dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _broker_apart() -> None:
    """The embedded broker, before exec: out of the terminal's process group, so that Ctrl-C
    reaches the parts, which stop first; `conveyor up` stops it after them, or it dies with
    `conveyor up`."""
    os.setsid()
    _die_with_parent()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _part(args: list[str]) -> None:
    """A child's whole life: one `conveyor` command, as `conveyor ARGS` would run it."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the part's own handlers take over
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from conveyor.cli import app

    app(args, prog_name="conveyor")


def _start(name: str, args: list[str]) -> multiprocessing.Process:
    linux = sys.platform.startswith("linux")
    if linux:
        importlib.import_module(IMPORTS[args[0]])
    context = multiprocessing.get_context("fork" if linux else "spawn")
    process = context.Process(target=_part, args=(args,), name=name)
    process.start()
    return process


def run_everything(services: list[str]) -> int:
    settings = load()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops everything, as Ctrl-C does
    children: dict[str, multiprocessing.Process] = {}
    broker = None
    if not settings.broker_url:
        port = 9092 if not embedded_broker.port_open(9092) else embedded_broker.free_port()
        broker, url = embedded_broker.start(port, preexec_fn=_broker_apart)
        os.environ["CONVEYOR_BROKER_URL"] = url  # for the parts, forked or spawned
        console.print(f"embedded Kafka-compatible broker (tansu, in memory) at [bold]{url}[/]")
    url = os.environ["CONVEYOR_BROKER_URL"]
    gateway = GatewaySettings().gateway_port
    if "CONVEYOR_GATEWAY_PORT" not in os.environ and embedded_broker.port_open(gateway):
        gateway = embedded_broker.free_port()  # 8080 is taken: any free port will do
    commands = {"control-plane": ["control-plane"], "orchestrator": ["orchestrator"]}
    for spec in services or EXAMPLES:
        name, _, workflow = spec.partition("=")
        commands[name] = ["serve", workflow, "--name", name]
    commands["gateway"] = ["gateway", "--port", str(gateway)]
    if sys.platform.startswith("linux"):  # forked with it, as with IMPORTS (see _start)
        bus.import_broker_client(load(broker_url=url))
    try:
        for name, command in commands.items():
            children[name] = _start(name, command)
        services_up = [name for name in commands
                       if name not in ("control-plane", "orchestrator", "gateway")]
        running.run(_until_registered(url, settings.namespace, services_up, children),
                    uvloop=False)
        console.print(f"running {', '.join(children)} on {url} (state: {settings.state_url})")
        console.print(f"the HTTP gateway: http://127.0.0.1:{gateway} (routes: /docs)")
        console.print(f"the dashboard: http://127.0.0.1:{gateway}/dashboard")
        console.print("publish a task from another shell with:\n"
                      f"  CONVEYOR_BROKER_URL={url} conveyor publish echo "
                      "--input '{\"message\": \"hello\"}' --wait\n"
                      "press Ctrl-C to stop everything")
        raise PartExited(*_first_to_exit(children, broker))
    except PartExited as exited:
        console.print(f"[red]{exited.part} exited with status {exited.code}[/]; "
                      "stopping the rest")
        return 1
    except KeyboardInterrupt:
        console.print("stopping")
        return 0
    except TimeoutError:
        console.print(f"[red]the services did not register within {READY_SECONDS} s[/]; "
                      "stopping everything")
        return 1
    finally:
        _stop(list(children.values()), broker)


class PartExited(Exception):
    """A part (or the embedded broker) exited: everything stops."""

    def __init__(self, part: str, code: int | None) -> None:
        self.part, self.code = part, code


async def _until_registered(url: str, namespace: str, names: list[str],
                            children: dict[str, multiprocessing.Process]) -> None:
    """Return once every service has a live instance, so the first task finds it; raise
    PartExited if a part exits meanwhile (a workflow that cannot be loaded, say)."""
    async with Client(url, namespace) as client, asyncio.timeout(READY_SECONDS):
        while True:
            for name, part in children.items():
                if not part.is_alive():
                    raise PartExited(name, part.exitcode)
            try:
                found = await client.list_services()
            except TimeoutError:  # the control plane is still starting: ask again
                continue
            alive = {s["name"] for s in found if any(i["alive"] for i in s["instances"])}
            if set(names) <= alive:
                return
            await asyncio.sleep(0.2)  # noqa: ASYNC110 (start-up only: registrations land in the database)


def _first_to_exit(children: dict[str, multiprocessing.Process],
                   broker: subprocess.Popen | None) -> tuple[str, int | None]:
    """Wait until a part (or the embedded broker) exits: its name and exit status."""
    watched: dict[object, str] = {p.sentinel: name for name, p in children.items()}
    if broker is not None and hasattr(os, "pidfd_open"):
        watched[os.pidfd_open(broker.pid)] = "the embedded broker"
    gone = watched[wait_for_any(list(watched))[0]]
    if gone in children:
        children[gone].join()
        return gone, children[gone].exitcode
    return gone, broker.wait()


def _stop(parts: list[multiprocessing.Process], broker: subprocess.Popen | None) -> None:
    """SIGTERM every process, then SIGKILL whatever is still there after the grace period
    (one for all of them); the broker last, once the parts have let go of it."""
    for part in parts:
        if part.is_alive():
            part.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for part in parts:
        part.join(max(0.0, deadline - time.monotonic()))
        if part.is_alive():
            part.kill()
            part.join()
    if broker is not None and broker.poll() is None:
        broker.terminate()
        try:
            broker.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
