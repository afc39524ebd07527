"""`conveyor up` on a clean directory: embedded broker, every part, a task, then Ctrl-C."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from conveyor.up import EXAMPLES


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


@pytest.mark.parametrize("broker", ["embedded", "rabbit"])
def test_conveyor_up_runs_a_task_and_ctrl_c_stops_every_child(broker, request, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_BROKER_URL"}
    if broker == "rabbit":
        env["CONVEYOR_BROKER_URL"] = request.getfixturevalue("rabbit_url")
    env["CONVEYOR_NAMESPACE"] = f"up{uuid.uuid4().hex[:8]}"
    up = subprocess.Popen([sys.executable, "-m", "conveyor", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any(line.startswith("running") for line in lines):
            assert time.monotonic() < deadline, "conveyor up did not start:\n" + "".join(lines)
            time.sleep(0.1)
        found = re.search(r" on ((?:kafka|amqp)://\S+)", "".join(lines))
        assert found, "conveyor up did not print its broker's address"
        url = found.group(1)
        children = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()]
        # control plane, orchestrator, gateway, the examples; and the embedded broker if any
        parts = 3 + len(EXAMPLES)
        assert len(children) == (parts + 1 if broker == "embedded" else parts)

        published = subprocess.run(
            [sys.executable, "-m", "conveyor", "publish", "echo", "--input",
             '{"message": "hello"}', "--wait", "--timeout", "90"],
            env={**env, "CONVEYOR_BROKER_URL": url}, capture_output=True, text=True,
            timeout=120,
        )
        assert published.returncode == 0, published.stderr
        assert '"message": "hello"' in published.stdout
        gateway = re.search(r"the HTTP gateway: (http://\S+)", "".join(lines)).group(1)
        assert _healthy(gateway), f"no gateway answers at {gateway}"

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()


def _healthy(url: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"{url}/health", timeout=5).json() == {"status": "healthy"}
        except httpx.TransportError:
            time.sleep(0.2)
    return False


def test_children_die_with_conveyor_up_even_on_kill9(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_BROKER_URL"}
    env["CONVEYOR_NAMESPACE"] = f"up{uuid.uuid4().hex[:8]}"
    up = subprocess.Popen([sys.executable, "-m", "conveyor", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        children: list[int] = []
        # the embedded broker, control plane, orchestrator, gateway and the examples
        while len(children) < 4 + len(EXAMPLES) and time.monotonic() < deadline:
            time.sleep(0.2)
            children = [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()]
        assert len(children) == 4 + len(EXAMPLES)
    finally:
        up.kill()
        up.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in children if _alive(pid)] == []


def test_a_part_that_cannot_start_stops_conveyor_up_with_its_name(rabbit_url, tmp_path):
    env = {**os.environ, "CONVEYOR_BROKER_URL": rabbit_url,
           "CONVEYOR_NAMESPACE": f"up{uuid.uuid4().hex[:8]}"}
    up = subprocess.run(
        [sys.executable, "-m", "conveyor", "up", "--service", "broken=no_such_module:workflow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 1
    assert "No module named 'no_such_module'" in up.stderr + up.stdout
    assert "broken exited with status 1; stopping the rest" in up.stdout


def test_ctrl_c_while_conveyor_up_waits_for_its_parts_stops_everything(tmp_path):
    """Ctrl-C comes while `conveyor up` still connects to the broker (here one that never
    answers): it stops at once, for a connection cancelled while connecting goes on
    reconnecting in aio-pika, and asyncio.run would wait for it forever."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    port = silent.getsockname()[1]
    env = {**os.environ, "CONVEYOR_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}/",
           "CONVEYOR_NAMESPACE": f"up{uuid.uuid4().hex[:8]}"}
    log = (tmp_path / "up.log").open("w")  # not a pipe: a child left alive would hold it open
    up = subprocess.Popen([sys.executable, "-m", "conveyor", "up"], cwd=tmp_path, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 30
        while len(children) < 3 + len(EXAMPLES) and time.monotonic() < deadline:
            time.sleep(0.2)
            children = [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(up.pid)], capture_output=True, text=True).stdout.split()]
        assert len(children) == 3 + len(EXAMPLES)
        time.sleep(1.0)  # its own client is connecting by now
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("conveyor up did not stop on Ctrl-C while connecting")
        out = (tmp_path / "up.log").read_text()
        assert code == 0, out
        assert "stopping" in out
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
        silent.close()
