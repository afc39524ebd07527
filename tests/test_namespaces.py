"""Two deployments with different CONVEYOR_NAMESPACE on one broker run side by side and never
see each other's messages: the same service names, tasks, dead letters and queries."""

import asyncio

import pytest

from .deployment import Deployment, eventually


@pytest.fixture(scope="module")
def two(broker_url, tmp_path_factory):
    pair = [Deployment(broker_url, tmp_path_factory.mktemp(f"ns{n}")) for n in (1, 2)]
    for deployment in pair:
        deployment.start("control-plane", "orchestrator", "echo")
    try:
        asyncio.run(all_ready(pair))
    except BaseException:
        for deployment in pair:
            print(deployment.logs())
            deployment.stop()
        raise
    yield pair
    for deployment in pair:
        deployment.stop()


async def all_ready(pair: list[Deployment]) -> None:
    await asyncio.gather(*(deployment.ready("echo") for deployment in pair))


async def test_each_namespace_runs_its_own_tasks_and_sees_only_them(two):
    first, second = two
    async with first.client() as one, second.client() as other:
        ids_one = [await one.run_nowait("echo", ns="one", n=n) for n in range(20)]
        ids_two = [await other.run_nowait("echo", ns="two", n=n) for n in range(20)]
        done_one = await asyncio.gather(*(one.result(i, timeout=60) for i in ids_one))
        done_two = await asyncio.gather(*(other.result(i, timeout=60) for i in ids_two))
        assert {r["echo"]["ns"] for r in done_one} == {"one"}
        assert {r["echo"]["ns"] for r in done_two} == {"two"}

        # Listings may lag by the control plane's backlog (README, "How a task travels"): the
        # outcomes came straight from the worker, beside the control plane's record.
        seen_by_one = await eventually(lambda: listing_with(one, ids_one), timeout=30)
        seen_by_two = await eventually(lambda: listing_with(other, ids_two), timeout=30)
        assert set(ids_one) <= seen_by_one and not seen_by_one & set(ids_two)
        assert set(ids_two) <= seen_by_two and not seen_by_two & set(ids_one)
        assert await other.get_task(ids_one[0]) is None


async def listing_with(client, task_ids: list[str]) -> set[str] | None:
    """The task ids `list_tasks` gives, once they include all of `task_ids` (for
    `eventually`)."""
    listed = {t["task_id"] for t in await client.list_tasks(limit=1000)}
    return listed if set(task_ids) <= listed else None


async def test_a_service_known_in_one_namespace_is_unknown_in_the_other(two):
    first, second = two
    first.start("recorded")
    await first.ready("recorded")
    async with second.client() as other:
        task_id = await other.run_nowait("recorded", log="/dev/null")
        outcome = await other.wait(task_id, timeout=30)
        assert outcome.error.type == "UnknownService"
        assert "recorded" not in {s["name"] for s in await other.list_services()}

        async def dead_lettered():  # the dead letter comes apart from the outcome
            return task_id in {letter["task_id"] for letter in await other.dead_letters()}

        assert await eventually(dead_lettered)
    async with first.client() as one:
        assert task_id not in {letter["task_id"] for letter in await one.dead_letters()}
        assert await one.get_task(task_id) is None
