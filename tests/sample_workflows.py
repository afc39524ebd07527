"""Workflows the integration tests serve; importable by the service processes (PYTHONPATH)."""

from pathlib import Path
from typing import Any

from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent


class RecordedRun(Workflow):
    """Appends one line per run to the file named by `log`, so a test can count runs."""

    @step
    async def record(self, ev: StartEvent) -> StopEvent:
        with Path(ev.get("log")).open("a") as log:  # noqa: ASYNC230 (one tiny line, in a test)
            log.write(f"{ev.get('tag', '')}\n")
        return StopEvent(result={"tag": ev.get("tag")})


class Opaque(Event):
    thing: Any


class Unserializable(Workflow):
    """Returns what JSON cannot hold; with `in_event`, streams it first."""

    @step
    async def give(self, ctx: Context, ev: StartEvent) -> StopEvent:
        if ev.get("in_event"):
            ctx.write_event_to_stream(Opaque(thing=object()))
        return StopEvent(result=object())


recorded = RecordedRun(timeout=60)
unserializable = Unserializable(timeout=60)
