"""Every command exits 1 with a one-line reason when it cannot work."""

import asyncio
import os
import subprocess
import sys

import pytest

from conveyor.embedded_broker import free_port
from conveyor.services import database

CLOSED = free_port()


@pytest.mark.parametrize(
    ("args", "env", "reason"),
    [
        (["control-plane"], {"CONVEYOR_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{CLOSED}/"},
         "AMQPConnectionError"),
        (["orchestrator"], {"CONVEYOR_BROKER_URL": f"kafka://127.0.0.1:{CLOSED}"},
         "KafkaConnectionError"),
        (["control-plane"], {"CONVEYOR_BROKER_URL": "http://example"},
         "must start with amqp:// (RabbitMQ) or kafka:// (Kafka)"),
        (["control-plane"], {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/",
                             "CONVEYOR_STATE_URL": f"postgresql://nobody@127.0.0.1:{CLOSED}/x"},
         "cannot be reached"),
        (["control-plane"], {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/",
                             "CONVEYOR_STATE_URL": "mysql://x"},
         "must be sqlite:///path or postgresql://"),
        (["orchestrator"], {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/",
                            "CONVEYOR_NAMESPACE": "has.dots"}, "CONVEYOR_NAMESPACE"),
        (["serve", "no_such_module:workflow", "--name", "x"],
         {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}, "No module named"),
        (["serve", "conveyor.services.examples.echo:workflow", "--name", "control_plane"],
         {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}, "is reserved"),
        (["publish", "echo"], {"CONVEYOR_BROKER_URL": ""}, "CONVEYOR_BROKER_URL is not set"),
        (["publish", "echo", "--input", "{oops"],
         {"CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"}, "--input is not JSON"),
    ],
)
def test_command_fails_with_one_line_naming_the_problem(args, env, reason, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", *args], cwd=tmp_path,
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1
    assert last.startswith("conveyor: ") and reason in last


def test_a_part_refuses_a_state_store_that_holds_another_namespace(tmp_path):
    """Two namespaces in one state store would take each other's tasks (one orchestrator's
    sweep dispatching the other's to topics nobody reads): the second is refused at start."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = asyncio.run(database.connect(url, "blue"))
    asyncio.run(engine.dispose())
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "orchestrator"], cwd=tmp_path,
        env={**os.environ, "CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/",
             "CONVEYOR_NAMESPACE": "green", "CONVEYOR_STATE_URL": url},
        capture_output=True, text=True, timeout=60,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1
    assert last.startswith("conveyor: ")
    assert "holds the state of namespace 'blue', not 'green'" in last
