"""Fixtures: a real tansu broker, the real RabbitMQ, and Conveyor deployments as processes."""

import socket

import pytest

from conveyor import embedded_broker

from .deployment import Deployment, serving

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
def kafka_url(tmp_path_factory):
    process, url = embedded_broker.start(log_path=str(tmp_path_factory.mktemp("tansu") / "log"))
    yield url
    process.kill()
    process.wait()


@pytest.fixture(scope="session")
def rabbit_url():
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not running at 127.0.0.1:5672 ({exc}); .ci/run starts it")
    return RABBIT_URL


@pytest.fixture(params=["rabbit", "kafka"], scope="module")
def broker_url(request):
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def fresh_deployment(broker_url, tmp_path):
    """A deployment of its own, for tests that kill or restart parts."""
    deployment = Deployment(broker_url, tmp_path)
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def deployment(broker_url, tmp_path_factory):
    """One running deployment per broker, shared by a module's tests."""
    with serving(Deployment(broker_url, tmp_path_factory.mktemp("deployment")),
                 "echo", "recorded") as deployment:
        yield deployment
