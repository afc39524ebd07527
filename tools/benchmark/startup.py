"""Start-up: seconds from launching `conveyor up` to the first completed task, on an empty
namespace and state store, then Ctrl-C (SIGINT) and wait for it to stop everything."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conveyor import Client
from conveyor.up import EXAMPLES

from .parts import forget_namespace, fresh_namespace, stop_all
from .state import fresh_state_url

SERVICES = [spec.partition("=")[0] for spec in EXAMPLES]


async def up_to_first_task(broker_url: str, workdir: Path, timeout: float = 180) -> float:
    namespace = fresh_namespace()
    started = time.perf_counter()
    up = _launch(broker_url, namespace, workdir)
    try:
        async with Client(broker_url, namespace) as client:
            await _first_completed(client, up, workdir / "up.log", timeout)
        return time.perf_counter() - started
    finally:
        await asyncio.to_thread(stop_all, [up], signal.SIGINT)
        await forget_namespace(broker_url, namespace, SERVICES)


def _launch(broker_url: str, namespace: str, workdir: Path) -> subprocess.Popen:
    """`.venv/bin/conveyor up` as from a shell, in an empty directory and namespace."""
    env = {**os.environ, "CONVEYOR_BROKER_URL": broker_url, "CONVEYOR_NAMESPACE": namespace,
           "CONVEYOR_STATE_URL": fresh_state_url(workdir, namespace)}
    conveyor = Path(sys.executable).parent / "conveyor"
    with (workdir / "up.log").open("ab") as log:
        return subprocess.Popen([str(conveyor), "up"], env=env, cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT)


async def _first_completed(client: Client, up: subprocess.Popen, log: Path,
                           timeout: float) -> None:
    """Publish an echo task every 0.1 s until one comes back completed. Until the services
    have joined, a task may fail (UnknownService) or wait: every probe counts."""
    probes: set[asyncio.Future] = set()
    try:
        async with asyncio.timeout(timeout):
            while True:
                if up.poll() is not None:
                    raise RuntimeError(f"conveyor up exited with {up.returncode}: "
                                       f"{_last_line(log)}")
                task_id = await client.run_nowait("echo", message="first")
                probes.add(asyncio.ensure_future(client.wait(task_id)))
                done, probes = await asyncio.wait(probes, timeout=0.1,
                                                  return_when=asyncio.FIRST_COMPLETED)
                if any(not p.exception() and p.result().status == "completed" for p in done):
                    return
    finally:
        for probe in probes:
            probe.cancel()


def _last_line(log: Path) -> str:
    """Why `conveyor up` stopped: its own last line (its children log to the same file)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing logged)"
