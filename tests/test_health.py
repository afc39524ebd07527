"""The healthcheck compose.yaml runs in the containers of the control plane, the orchestrator
and the workflow services, against real parts: healthy while a part runs, unhealthy once it
is frozen (SIGSTOP: its health file goes stale) or stopped (its file is gone)."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .deployment import eventually

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("control-plane", "orchestrator", "echo")


def healthcheck() -> list[str]:
    """The command compose.yaml gives the parts' containers, run with this Python."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    kind, *command = services["echo"]["healthcheck"]["test"]
    assert kind == "CMD"
    return [sys.executable if word == "python" else word for word in command]


def healthy(health_file: Path) -> bool:
    env = {**os.environ, "CONVEYOR_HEALTH_FILE": str(health_file)}
    return subprocess.run(healthcheck(), env=env, capture_output=True).returncode == 0


def test_the_healthcheck_wants_a_file_touched_in_the_last_10_seconds(tmp_path):
    health_file = tmp_path / "healthy"
    assert not healthy(health_file)  # never touched, or removed by a part that stopped
    health_file.touch()
    assert healthy(health_file)
    stale = time.time() - 11
    os.utime(health_file, (stale, stale))
    assert not healthy(health_file)


async def test_each_part_is_healthy_while_it_runs_and_unhealthy_once_frozen_or_stopped(
    fresh_deployment,
):
    deployment = fresh_deployment
    files = {part: deployment.workdir / f"{part}.healthy" for part in PARTS}
    for part in PARTS:  # each part a file of its own, as each container has
        deployment.overrides = {"CONVEYOR_HEALTH_FILE": str(files[part])}
        deployment.start(part)

    async def check(part: str, expected: bool) -> bool:
        return await asyncio.to_thread(healthy, files[part]) == expected

    for part in PARTS:
        await eventually(lambda p=part: check(p, True), timeout=60)
    frozen = deployment.processes["echo"].pid
    os.kill(frozen, signal.SIGSTOP)
    print("injected: SIGSTOP of the echo service")
    try:
        await eventually(lambda: check("echo", False), timeout=30)
        assert await check("control-plane", True) and await check("orchestrator", True)
    finally:
        os.kill(frozen, signal.SIGCONT)
    await eventually(lambda: check("echo", True), timeout=30)
    await asyncio.to_thread(deployment.stop_part, "orchestrator")
    print("found: echo unhealthy while frozen and healthy again after SIGCONT")
    assert not files["orchestrator"].exists()
    assert await check("orchestrator", False)
