"""Workflows the integration tests serve; importable by the service processes (PYTHONPATH)."""

import asyncio
import os
import time
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
    """Returns what JSON cannot hold; with `in_event`, streams it first; with `size`, returns
    a text of that many characters instead (more than a message may hold)."""

    @step
    async def give(self, ctx: Context, ev: StartEvent) -> StopEvent:
        if ev.get("size"):
            return StopEvent(result="x" * int(ev.get("size")))
        if ev.get("in_event"):
            ctx.write_event_to_stream(Opaque(thing=object()))
        return StopEvent(result=object())


recorded = RecordedRun(timeout=60)
unserializable = Unserializable(timeout=60)


class Halfway(Event):
    pass


class Done(Event):
    pass


def note(path: str, line: str) -> int:
    """Append a line to the file; returns how many lines it now has."""
    with Path(path).open("a") as log:
        log.write(f"{line}\n")
    return len(Path(path).read_text().split())


class Stepper(Workflow):
    """Three steps, each noted in the file `log` as it starts; the second takes `seconds`.

    `blob` characters of state make its checkpoints as large as a test needs.
    """

    @step
    async def one(self, ctx: Context, ev: StartEvent) -> Halfway:
        note(ev.get("log"), "one")
        await ctx.store.set("log", ev.get("log"))
        await ctx.store.set("seconds", float(ev.get("seconds", 0)))
        await ctx.store.set("blob", "x" * int(ev.get("blob", 0)))
        ctx.write_event_to_stream(Halfway())
        return Halfway()

    @step
    async def two(self, ctx: Context, ev: Halfway) -> Done:
        note(await ctx.store.get("log"), "two")
        await asyncio.sleep(await ctx.store.get("seconds"))
        ctx.write_event_to_stream(Done())
        return Done()

    @step
    async def three(self, ctx: Context, ev: Done) -> StopEvent:
        note(await ctx.store.get("log"), "three")
        return StopEvent(result={"blob": len(await ctx.store.get("blob"))})


stepper = Stepper(timeout=None)


class Flake(RuntimeError):
    """A failure that may pass on the next attempt."""


class Flaky(Workflow):
    """Fails its step the first `failures` times it runs (counted in the file `log`) with
    the exception named by `raises`; with `hang`, the step then sleeps that long."""

    @step
    async def work(self, ev: StartEvent) -> StopEvent:
        runs = note(ev.get("log"), "run")
        if runs <= int(ev.get("failures", 0)):
            kind = {"ValueError": ValueError}.get(ev.get("raises"), Flake)
            raise kind(f"failure {runs}")
        await asyncio.sleep(float(ev.get("hang", 0)))
        return StopEvent(result={"runs": runs})


flaky = Flaky(timeout=None)


class SlowCounter(Workflow):
    """Counts the runs of its session in the Context's state; its first run (counted in the
    file `log`) then waits `seconds`."""

    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = await ctx.store.get("count", default=0) + 1
        await ctx.store.set("count", count)
        if note(ev.get("log"), f"count-{count}") == 1:
            await asyncio.sleep(float(ev.get("seconds", 0)))
        return StopEvent(result=count)


slow_counter = SlowCounter(timeout=None)


class Progress(Event):
    n: int
    i: int


class Work(Workflow):
    """For the scale-out tests: streams `events` Progress events, waits `seconds`, notes its
    run as "n pid" in the file `log`, and returns its `n`, pid and when it started and ended."""

    @step
    async def work(self, ctx: Context, ev: StartEvent) -> StopEvent:
        started = time.time()
        n = int(ev.get("n", 0))
        for i in range(int(ev.get("events", 0))):
            ctx.write_event_to_stream(Progress(n=n, i=i))
        await asyncio.sleep(float(ev.get("seconds", 0)))
        if log := ev.get("log"):
            with Path(log).open("a") as runs:  # noqa: ASYNC230 (one tiny line, in a test)
                runs.write(f"{n} {os.getpid()}\n")
        return StopEvent(result={"n": n, "pid": os.getpid(), "started": started,
                                 "ended": time.time()})


work = Work(timeout=None)
