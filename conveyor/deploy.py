"""Manual orchestration from Python, in the manner of llama_deploy's helpers.

    asyncio.run(conveyor.deploy_core())                          # control plane + orchestrator
    asyncio.run(conveyor.deploy_workflow(MyWorkflow(), name="my_workflow"))

Each runs its parts in the calling process until it is cancelled (Ctrl-C). Settings not
given as arguments come from the environment (CONVEYOR_BROKER_URL, ...), as for the
`conveyor` commands.
"""

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from faststream import FastStream
from workflows import Workflow

from .services.control_plane.app import create_app as control_plane_app
from .services.orchestrator.app import create_app as orchestrator_app
from .services.runtime.app import create_app as service_app
from .services.runtime.settings import RuntimeSettings
from .services.settings import Settings, load


def _overrides(**given: Any) -> dict[str, Any]:
    return {key: value for key, value in given.items() if value is not None}


async def deploy_core(
    *,
    broker_url: str | None = None,
    namespace: str | None = None,
    state_url: str | None = None,
) -> None:
    """Run the control plane and the orchestrator in this process until cancelled."""
    settings = load(Settings, **_overrides(broker_url=broker_url, namespace=namespace,
                                           state_url=state_url))
    await _run(control_plane_app(settings), orchestrator_app(settings))


async def deploy_workflow(
    workflow: Workflow,
    name: str,
    *,
    broker_url: str | None = None,
    namespace: str | None = None,
    state_url: str | None = None,
    max_concurrent_tasks: int | None = None,
    service_max_concurrent_tasks: int | None = None,
) -> None:
    """Serve `workflow` as the service `name` from this process until cancelled:
    `max_concurrent_tasks` at once in this process, `service_max_concurrent_tasks` across
    all the service's replicas."""
    settings = load(RuntimeSettings, **_overrides(
        service_name=name, broker_url=broker_url, namespace=namespace, state_url=state_url,
        max_concurrent_tasks=max_concurrent_tasks,
        service_max_concurrent_tasks=service_max_concurrent_tasks,
        workflow=f"{type(workflow).__module__}:{type(workflow).__qualname__}",
    ))
    await _run(service_app(settings, workflow=workflow))


async def _run(*apps: FastStream) -> None:
    async with AsyncExitStack() as running:
        for app in apps:
            await running.enter_async_context(app)
        await asyncio.Future()  # until cancelled
