"""`tools/bench [--quick] [--json PATH]`: Conveyor on RabbitMQ and on Kafka (tansu brokers
started here), beside the floor each broker sets, in one run.

Exits 1 when a figure could not be produced, a task was lost or a message dead-lettered.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import uvloop
from rich.console import Console

from . import state
from .floor import HOPS, HOPS_WHY
from .parts import BrokerServer
from .report import BROKERS, Results
from .run import FULL, HEARTBEAT, QUICK, bench_broker
from .scaling import KAFKA_PARTITIONS, MAX_CONCURRENT_TASKS

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a small run (the test suite's): 2 repetitions, hundreds of tasks")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--repetitions", type=int, help="override the number of repetitions")
    parser.add_argument("--broker", choices=list(BROKERS), action="append",
                        help="only this broker (repeatable); default both")
    parser.add_argument("--rabbit-url", default=RABBIT_URL)
    parser.add_argument("--state-url", metavar="postgresql://USER@HOST:PORT",
                        help="keep each deployment's state in a database of its own on this "
                             "PostgreSQL server (created, and dropped at the end), and count "
                             "the server's CPU; default a SQLite file per deployment")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the parts' and brokers' logs (the run's directory) even when "
                             "every figure was produced")
    return parser.parse_args()


async def run_all(brokers: list[str], args: argparse.Namespace, results: Results,
                  workdir: Path, say: Console) -> None:
    sizes = QUICK if args.quick else FULL
    if args.repetitions:
        sizes = type(sizes)(**{**sizes.as_dict(), "repetitions": args.repetitions})
    results.repetitions = sizes.repetitions
    results.sizes = sizes.as_dict()
    for broker in brokers:
        (workdir / broker).mkdir()
        server = BrokerServer(broker, args.rabbit_url, workdir / broker)
        try:
            await bench_broker(broker, server, sizes, results, workdir / broker, say)
        except Exception as exc:
            results.errors[broker] = f"{type(exc).__name__}: {exc}"
            say.print_exception()
        finally:
            server.stop()


def main() -> int:
    args = arguments()
    brokers = args.broker or list(BROKERS)
    say = Console(stderr=True, log_path=False)
    results = Results(mode="quick" if args.quick else "full", repetitions=0, sizes={})
    if args.state_url:
        state.use_postgres(args.state_url)
    results.meta = {"state": state.kind(), "hops_on_critical_path": HOPS, "hops_why": HOPS_WHY,
                    "recovery_heartbeat_interval": float(HEARTBEAT["CONVEYOR_HEARTBEAT_INTERVAL"]),
                    "recovery_heartbeat_timeout": float(HEARTBEAT["CONVEYOR_HEARTBEAT_TIMEOUT"]),
                    "scaling_max_concurrent_tasks": MAX_CONCURRENT_TASKS,
                    "scaling_kafka_partitions": KAFKA_PARTITIONS}
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    try:
        uvloop.run(run_all(brokers, args, results, workdir, say))
    finally:
        state.drop_created()
    table = Console()
    if not table.is_terminal:
        table = Console(width=130)  # a file or a pipe: keep one figure a line
    results.print(brokers, table)
    if args.json:
        results.write(args.json)
    missing = results.missing(brokers)
    lost = results.lost()
    if missing:
        say.print(f"[red]not measured: {', '.join(missing)}[/]")
    if lost:
        say.print(f"[red]{lost} tasks lost[/]")
    if dead := results.dead_letters():
        say.print(f"[red]{dead} messages dead-lettered: see the control plane's log[/]")
    failed = bool(missing or lost or dead or results.errors)
    if failed or args.keep_logs:
        say.print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
