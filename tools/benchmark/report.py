"""The figures of a run: kept per repetition, summarised as median / min / max, printed as one
Rich table with the brokers side by side and written as JSON.

The JSON file is one object:

    {"mode": "quick" | "full", "repetitions": 2, "state": "sqlite" | "postgresql",
     "hops_on_critical_path": 3, "hops_why": "...", "recovery_heartbeat_interval": 0.5,
     "recovery_heartbeat_timeout": 3.0,
     "scaling_max_concurrent_tasks": 1, "scaling_kafka_partitions": 4,
     "scaling_tasks_per_replica": {"<broker>": {"4": [51, 50, 50, 49]}},
     "sizes": {...the task counts used...},
     "figures": {"<figure>": {"<broker>": {"median": 1.2, "min": 1.0, "max": 1.5,
                                           "unit": "ms", "runs": [1.0, 1.2, 1.5]}}},
     "tasks": {"<broker>": {"submitted": 900, "completed": 900, "lost": 0,
                            "dead_letters": 0}},
     "lost": 0, "dead_letters": 0,
     "errors": {"<broker>": "what stopped that broker's run"}}

`<broker>` is "rabbit" or "kafka"; a figure a broker's run did not reach is absent for it.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BROKERS = {"rabbit": "RabbitMQ", "kafka": "Kafka (tansu)"}

PARTS = ["control-plane", "orchestrator", "service", "broker"]
CPU_PARTS = [*PARTS, "client", "postgres"]  # postgres: with --state-url only

# (figure, what it is, unit), in the order of the README's points (a) to (g).
FIGURES: list[tuple[str, str, str]] = [
    ("hop_p50", "(a) bare FastStream hop p50", "ms"),
    ("hop_p99", "(a) bare FastStream hop p99", "ms"),
    ("workflow_p50", "(a) bare in-process workflow run p50", "ms"),
    ("workflow_p99", "(a) bare in-process workflow run p99", "ms"),
    ("physical_path", "(a) physical path: hops x hop p50 + run p50", "ms"),
    ("bare_path_p50", "(a) the same path built bare, processes apart, p50", "ms"),
    ("bare_path_p99", "(a) the same path built bare, processes apart, p99", "ms"),
    *[(f"client_{q}", f"(b) Conveyor via Client {q}", "ms") for q in ("p50", "p95", "p99")],
    *[(f"raw_{q}", f"(b) Conveyor via raw JSON {q}", "ms") for q in ("p50", "p95", "p99")],
    ("client_ratio", "(b) Client p50 / physical path", "x"),
    ("raw_ratio", "(b) raw JSON p50 / physical path", "x"),
    ("client_bare_ratio", "(b) Client p50 / bare path p50", "x"),
    ("raw_bare_ratio", "(b) raw JSON p50 / bare path p50", "x"),
    ("bare_path_tps", "(c) the same path built bare, as many in flight: tasks/s", "tasks/s"),
    ("bare_path_cpu", "(c)   its CPU per 1,000 tasks, every process and the broker", "s"),
    ("in_flight_tps", "(c) tasks/s, many in flight", "tasks/s"),
    *[(f"in_flight_cpu_{p}", f"(c)   CPU {p} per 1,000 tasks", "s") for p in CPU_PARTS],
    ("in_flight_cpu_all", "(c)   CPU per 1,000 tasks, every process and the broker", "s"),
    ("queued_tps", "(c) tasks/s, backlog queued", "tasks/s"),
    *[(f"queued_cpu_{p}", f"(c)   CPU {p} per 1,000 tasks", "s") for p in CPU_PARTS],
    ("up_to_first_task", "(d) `conveyor up` to first completed task", "s"),
    *[(f"rss_idle_{p}", f"(e) RSS idle, {p}", "MB") for p in PARTS],
    *[(f"rss_load_{p}", f"(e) RSS under load (peak), {p}", "MB") for p in PARTS],
    ("resume_after_kill9", "(f) kill -9 of worker to attempt 2 started", "s"),
    *[(f"scaling_tps_{n}", f"(g) scaling tasks/s, {n} replica{'s' if n > 1 else ''}",
       "tasks/s") for n in (1, 2, 4)],
]
UNITS = {name: unit for name, _, unit in FIGURES}
# On Kafka a bare FastStream group consumer handles one message at a time and commits each:
# many in flight through it would measure that consumer, not a floor (see bare_path).
RABBIT_ONLY = {"bare_path_tps", "bare_path_cpu"}


@dataclass
class Results:
    mode: str
    repetitions: int
    sizes: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, figure: str, broker: str, value: float) -> None:
        assert figure in UNITS, figure
        self.runs.setdefault(figure, {}).setdefault(broker, []).append(value)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {
            figure: {broker: {"median": statistics.median(values), "min": min(values),
                              "max": max(values), "unit": UNITS[figure], "runs": values}
                     for broker, values in by_broker.items()}
            for figure, by_broker in self.runs.items()
        }

    def missing(self, brokers: list[str]) -> list[str]:
        return [f"{figure} on {broker}" for figure in UNITS for broker in brokers
                if broker not in self.runs.get(figure, {})
                and (self.meta.get("state") == "postgresql" or "postgres" not in figure)
                and (broker == "rabbit" or figure not in RABBIT_ONLY)]

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "repetitions": self.repetitions, **self.meta,
                "sizes": self.sizes, "figures": self.summary(), "tasks": self.tasks,
                "lost": self.lost(), "dead_letters": self.dead_letters(),
                "errors": self.errors}

    def lost(self) -> int:
        return sum(t["lost"] for t in self.tasks.values())

    def dead_letters(self) -> int:
        return sum(t.get("dead_letters", 0) for t in self.tasks.values())

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")

    def print(self, brokers: list[str], console: Console) -> None:
        table = Table(title=f"Conveyor benchmark ({self.mode}: median (min to max) over "
                            f"{self.repetitions} runs; state: {self.meta.get('state')})")
        table.add_column("figure")
        table.add_column("unit")
        for broker in brokers:
            table.add_column(BROKERS[broker], justify="right")
        summary = self.summary()
        for figure, label, unit in FIGURES:
            if figure not in summary and "postgres" in figure:
                continue  # measured with --state-url only
            cells = [_cell(summary.get(figure, {}).get(broker)) for broker in brokers]
            table.add_row(label, unit, *cells)
        table.add_row("tasks submitted / lost / messages dead-lettered", "", *[
            f"{self.tasks[b]['submitted']} / {self.tasks[b]['lost']} / "
            f"{self.tasks[b]['dead_letters']}" if b in self.tasks else "-" for b in brokers])
        console.print(table)
        for key, value in self.meta.items():
            console.print(f"{key}: {value}")
        for broker, error in self.errors.items():
            console.print(f"[red]{BROKERS[broker]}: {error}[/]")


def _cell(figure: dict[str, Any] | None) -> str:
    if figure is None:
        return "-"
    return f"{_num(figure['median'])} ({_num(figure['min'])} to {_num(figure['max'])})"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"
