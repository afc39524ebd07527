"""`tools/bench --quick` in the suite: every figure is produced on both brokers and no task
is lost. No timing is asserted: the figures are for reading, not for passing."""

import asyncio
import json
import os
import subprocess
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ["rabbit", "kafka"]
PARTS = ["control-plane", "orchestrator", "service", "broker"]
# The README's points (a) to (g), figure by figure.
FIGURES = [
    "hop_p50", "hop_p99", "workflow_p50", "workflow_p99", "physical_path",
    "bare_path_p50", "bare_path_p99",
    "client_p50", "client_p95", "client_p99", "raw_p50", "raw_p95", "raw_p99",
    "client_ratio", "raw_ratio", "client_bare_ratio", "raw_bare_ratio",
    "in_flight_tps", "queued_tps", "in_flight_cpu_all",
    *[f"{load}_cpu_{part}" for load in ("in_flight", "queued") for part in [*PARTS, "client"]],
    "up_to_first_task",
    *[f"rss_{state}_{part}" for state in ("idle", "load") for part in PARTS],
    "resume_after_kill9",
    *[f"scaling_tps_{replicas}" for replicas in (1, 2, 4)],
]
# Many in flight through the bare path: on RabbitMQ only (see benchmark/report.py).
RABBIT_ONLY = ["bare_path_tps", "bare_path_cpu"]


@pytest.mark.rabbit
@pytest.mark.kafka
@pytest.mark.timeout(1140)
def test_bench_quick_produces_every_figure_for_both_brokers_and_loses_no_task(rabbit_url,
                                                                             tmp_path):
    path = tmp_path / "bench.json"
    run = subprocess.run([str(ROOT / "tools" / "bench"), "--quick", "--json", str(path)],
                         capture_output=True, text=True, timeout=1080)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(path.read_text())
    figures = report["figures"]
    wanted = [(name, broker) for name in FIGURES for broker in BROKERS]
    wanted += [(name, "rabbit") for name in RABBIT_ONLY]
    missing = [f"{name} on {broker}" for name, broker in wanted
               if not isinstance(figures.get(name, {}).get(broker, {}).get("median"),
                                 int | float)]
    assert missing == []
    assert all(set(figures[name][broker]) >= {"median", "min", "max", "unit"}
               for name, broker in wanted)
    assert report["hops_on_critical_path"] == 3
    assert report["recovery_heartbeat_timeout"] > 0
    assert {broker: report["tasks"][broker]["lost"] for broker in BROKERS} == \
        {"rabbit": 0, "kafka": 0}
    assert all(report["tasks"][broker]["submitted"] > 0 for broker in BROKERS)
    assert report["lost"] == 0
    assert report["dead_letters"] == 0  # no handler failed on a message five times
    assert "RabbitMQ" in run.stdout and "Kafka" in run.stdout  # the table, side by side


@pytest.mark.rabbit
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_bench_quick_with_postgres_state_counts_the_server_and_drops_its_databases(tmp_path):
    # The topology compose.yaml runs: each deployment's state in a database of its own on a
    # PostgreSQL server, whose CPU is counted beside the broker's.
    server = os.environ.get("CONVEYOR_TEST_POSTGRES",
                            "postgresql://postgres@127.0.0.1:5432/test").rpartition("/")[0]
    path = tmp_path / "bench.json"
    before = set(_bench_databases(server))  # a run killed before this one keeps its own
    run = subprocess.run([str(ROOT / "tools" / "bench"), "--quick", "--broker", "rabbit",
                          "--state-url", server, "--json", str(path)],
                         capture_output=True, text=True, timeout=560)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(path.read_text())
    assert report["state"] == "postgresql"
    figures = report["figures"]
    postgres = ["in_flight_cpu_postgres", "queued_cpu_postgres"]
    missing = [name for name in [*FIGURES, *postgres]
               if not isinstance(figures.get(name, {}).get("rabbit", {}).get("median"),
                                 int | float)]
    assert missing == []
    assert all(figures[name]["rabbit"]["median"] > 0 for name in postgres)
    assert report["lost"] == 0 and report["tasks"]["rabbit"]["submitted"] > 0
    assert report["dead_letters"] == 0
    assert set(_bench_databases(server)) - before == set()  # its own dropped at its end


def _bench_databases(server: str) -> list[str]:
    async def names() -> list[str]:
        conn = await asyncpg.connect(f"{server}/postgres", timeout=5)
        try:
            return [r["datname"] for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'bench%'")]
        finally:
            await conn.close()

    return asyncio.run(names())
