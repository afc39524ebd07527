"""A one-step workflow that notes which process started it and when, and holds until it is
released, so that the benchmark can kill its replica mid-step and see the moment the task's
next attempt starts on another replica."""

import asyncio
import os
import time
from pathlib import Path

from workflows import Workflow, step
from workflows.events import StartEvent, StopEvent


def _note_start(log: str) -> None:
    with Path(log).open("a") as file:
        file.write(f"{os.getpid()} {time.time()}\n")


class Resumable(Workflow):
    @step
    async def hold(self, ev: StartEvent) -> StopEvent:
        if ev.get("log"):
            await asyncio.to_thread(_note_start, ev.get("log"))
        release = ev.get("release")
        # The benchmark releases the task by creating a file: nothing to wait on but it.
        while release and not await asyncio.to_thread(os.path.exists, release):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return StopEvent(result={"pid": os.getpid()})


resumable = Resumable(timeout=3600)


def starts(log: str) -> list[tuple[int, float]]:
    """(pid, wall-clock time) of every start noted in `log`, in order."""
    path = Path(log)
    if not path.exists():
        return []
    return [(int(pid), float(at)) for pid, at in
            (line.split() for line in path.read_text().splitlines() if line.strip())]
