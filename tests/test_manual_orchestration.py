"""llama_deploy's manual-orchestration scenarios as Conveyor scripts, run as a user would run
them: deploy the core, deploy workflows, run with a client, stream events, nested workflows."""

import asyncio
import subprocess
import sys

import pytest

from .deployment import Deployment, eventually, registered

SCRIPTS = "conveyor.services.examples.manual"
SERVICES = ("my_workflow", "streaming_workflow", "inner_workflow", "outer_workflow")


@pytest.fixture(scope="module")
def manual(broker_url, tmp_path_factory):
    deployment = Deployment(broker_url, tmp_path_factory.mktemp("manual"))
    for script in ("deploy_core", "deploy_workflow", "deploy_nested"):
        log = open(deployment.workdir / f"{script}.log", "ab")
        deployment.processes[script] = subprocess.Popen(
            [sys.executable, "-m", f"{SCRIPTS}.{script}"], env=deployment.env,
            cwd=deployment.workdir, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        asyncio.run(all_registered(deployment))
    except BaseException:
        print(deployment.logs())
        deployment.stop()
        raise
    yield deployment
    deployment.stop()


async def all_registered(deployment: Deployment) -> None:
    async with deployment.client() as client:
        for service in SERVICES:
            await eventually(lambda s=service: registered(client, s), timeout=90)


def run_script(deployment: Deployment, script: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", f"{SCRIPTS}.{script}"], env=deployment.env,
        cwd=deployment.workdir, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"{done.stderr}\n{deployment.logs()}"
    return done.stdout.splitlines()


async def test_each_deployed_workflow_is_a_service_of_its_own(manual):
    async with manual.client() as client:
        found = {s["name"]: s for s in await client.list_services()}
    for service in SERVICES:
        assert [i["alive"] for i in found[service]["instances"]] == [True]
def test_a_client_runs_a_deployed_workflow_alone_and_in_a_session(manual):
    assert run_script(manual, "run_with_client") == [
        "hello_world_result",
        "in_a_session_result",
        "1 task in the session",
    ]


def test_a_client_streams_the_events_then_gets_the_result(manual):
    assert run_script(manual, "stream_events") == [
        "0 ProgressEvent progress 0",
        "1 ProgressEvent progress 1",
        "2 ProgressEvent progress 2",
        "hello_world_streamed",
    ]


def test_a_nested_workflow_runs_its_inner_workflow_as_a_child_task(manual):
    printed = run_script(manual, "run_nested")
    assert printed[0] == "hello_world_inner_outer"
    assert len(printed) == 2
    assert printed[1].startswith("inner task ") and printed[1].endswith(" completed")
