"""`conveyor up`: every part of Conveyor on one machine, as child processes.

Starts the embedded Kafka-compatible broker when CONVEYOR_BROKER_URL is unset, then the
control plane, the orchestrator, the HTTP gateway and the workflow services; Ctrl-C stops
every one of them.
"""

import asyncio
import ctypes
import os
import signal
import subprocess
import sys

from rich.console import Console

from conveyor import embedded_broker
from conveyor.client import Client
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.services.settings import load

EXAMPLES = [
    "echo=conveyor.services.examples.echo:workflow",
    "slow=conveyor.services.examples.slow:workflow",
    "counter=conveyor.services.examples.counter:workflow",
    "greeter=conveyor.services.examples.greeter:workflow",
    "outer=conveyor.services.examples.nested:workflow",
]
GRACE_SECONDS = 15
READY_SECONDS = 120
PR_SET_PDEATHSIG = 1

console = Console(soft_wrap=True)


def _die_with_parent() -> None:
    """In a child, before exec: on Linux, be sent SIGTERM if `conveyor up` itself dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _conveyor(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


def run_everything(services: list[str]) -> int:
    settings = load()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops everything, as Ctrl-C does
    children: dict[str, subprocess.Popen] = {}
    env = dict(os.environ)
    broker = None
    if not settings.broker_url:
        port = 9092 if not embedded_broker.port_open(9092) else embedded_broker.free_port()
        broker, url = embedded_broker.start(port, preexec_fn=_die_with_parent)
        env["CONVEYOR_BROKER_URL"] = url
        console.print(f"embedded Kafka-compatible broker (tansu, in memory) at [bold]{url}[/]")
    url = env["CONVEYOR_BROKER_URL"]
    gateway = GatewaySettings().gateway_port
    if "CONVEYOR_GATEWAY_PORT" not in os.environ and embedded_broker.port_open(gateway):
        gateway = embedded_broker.free_port()  # 8080 is taken: any free port will do
    commands = {"control-plane": _conveyor("control-plane"),
                "orchestrator": _conveyor("orchestrator"),
                "gateway": _conveyor("gateway", "--port", str(gateway))}
    for spec in services or EXAMPLES:
        name, _, workflow = spec.partition("=")
        commands[name] = _conveyor("serve", workflow, "--name", name)
    try:
        for name, command in commands.items():
            children[name] = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        services_up = [name for name in commands
                       if name not in ("control-plane", "orchestrator", "gateway")]
        asyncio.run(_until_registered(url, settings.namespace, services_up))
        console.print(f"running {', '.join(children)} on {url} (state: {settings.state_url})")
        console.print(f"the HTTP gateway: http://127.0.0.1:{gateway} (routes: /docs)")
        console.print(f"the dashboard: http://127.0.0.1:{gateway}/dashboard")
        console.print("publish a task from another shell with:\n"
                      f"  CONVEYOR_BROKER_URL={url} conveyor publish echo "
                      "--input '{\"message\": \"hello\"}' --wait\n"
                      "press Ctrl-C to stop everything")
        pid, status = os.wait()
        gone = next((n for n, p in children.items() if p.pid == pid), str(pid))
        console.print(f"[red]{gone} exited with status {os.waitstatus_to_exitcode(status)}[/]; "
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
        _stop(list(children.values()) + ([broker] if broker else []))


async def _until_registered(url: str, namespace: str, names: list[str]) -> None:
    """Return once every service has a live instance, so the first task finds it."""
    async with Client(url, namespace) as client, asyncio.timeout(READY_SECONDS):
        while True:
            try:
                found = await client.list_services()
            except TimeoutError:  # the control plane is still starting: ask again
                continue
            alive = {s["name"] for s in found if any(i["alive"] for i in s["instances"])}
            if set(names) <= alive:
                return
            await asyncio.sleep(0.2)  # noqa: ASYNC110 (start-up only: registrations land in the database)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process, then SIGKILL whatever is still there after the grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
