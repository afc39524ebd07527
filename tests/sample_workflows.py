"""Workflows the integration tests serve; importable by the service processes (PYTHONPATH)."""

from pathlib import Path

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


class RecordedRun(Workflow):
    """Appends one line per run to the file named by `log`, so a test can count runs."""

    @step
    async def record(self, ev: StartEvent) -> StopEvent:
        with Path(ev.get("log")).open("a") as log:  # noqa: ASYNC230 (one tiny line, in a test)
            log.write(f"{ev.get('tag', '')}\n")
        return StopEvent(result={"tag": ev.get("tag")})


class Unserializable(Workflow):
    @step
    async def give(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=object())


recorded = RecordedRun(timeout=60)
unserializable = Unserializable(timeout=60)
