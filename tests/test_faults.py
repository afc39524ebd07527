"""Real processes killed for real: what was acknowledged is never lost."""

import asyncio


async def test_kill9_control_plane_mid_load_loses_nothing(fresh_deployment):
    deployment = fresh_deployment
    deployment.start("control-plane", "orchestrator", "echo")
    await deployment.ready("echo")
    async with deployment.client() as client:
        ids = [await client.run_nowait("echo", n=n) for n in range(200)]
        waits = [asyncio.ensure_future(client.wait(i, timeout=120)) for i in ids]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        deployment.kill("control-plane")
        print(f"injected: kill -9 of the control plane after {len(done)} of 200 outcomes")
        await asyncio.sleep(1.0)
        deployment.start("control-plane")
        outcomes = await asyncio.gather(*waits)
        records = await client.list_tasks(service="echo", limit=1000)
    recorded = {r["task_id"]: r for r in records}
    print(f"found: {sum(o.status == 'completed' for o in outcomes)} outcomes completed, "
          f"{sum(r['status'] == 'completed' for r in recorded.values())} records completed")
    assert [o.result for o in outcomes] == [{"echo": {"n": n}} for n in range(200)]
    assert all(recorded[i]["status"] == "completed" for i in ids)
