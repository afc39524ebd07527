"""The workflow runner without a broker: loading MODULE:ATTR and running one task."""

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel
from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent

from conveyor.contracts import EventEnvelope, NewTask
from conveyor.services.runtime.task_run import TaskRun, run_task
from conveyor.services.runtime.worker import (
    KeptRegistrations,
    ResultNotSerializable,
    WorkflowNotFound,
    envelope,
    load_workflow,
)

# Workflows the tests load as tests.test_worker:NAME


class Greet(Workflow):
    @step
    async def greet(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result={"greeting": f"hello {ev.get('name', 'world')}"})


greet = Greet(timeout=10)


def make_greet() -> Greet:
    return Greet(timeout=10)


def make_number() -> int:
    return 42


class Progress(Event):
    step: int
    note: str


class Milestone(Progress):
    """A subclass, so that `types` lists every Event ancestor."""


class Counting(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        total = int(ev.get("count"))
        for n in range(total):
            ctx.write_event_to_stream(Progress(step=n, note=f"step {n}"))
        ctx.write_event_to_stream(Milestone(step=total, note="done"))
        return StopEvent(result={"counted": total})


class Exploded(RuntimeError):
    pass


class Exploding(Workflow):
    @step
    async def explode(self, ctx: Context, ev: StartEvent) -> StopEvent:
        ctx.write_event_to_stream(Progress(step=0, note="about to fail"))
        raise Exploded(ev.get("why", "no reason"))


class Opaque(Event):
    thing: Any


class Unsendable(Workflow):
    @step
    async def give(self, ctx: Context, ev: StartEvent) -> StopEvent:
        if ev.get("in_event"):
            ctx.write_event_to_stream(Opaque(thing=object()))
        return StopEvent(result=object())


class Report(BaseModel):
    title: str
    at: datetime


class Reporting(Workflow):
    @step
    async def report(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result=Report(title=ev.get("title"), at=datetime(2025, 1, 2, tzinfo=UTC)))


class Summary(StopEvent):
    total: int


class Summarizing(Workflow):
    @step
    async def summarize(self, ev: StartEvent) -> Summary:
        return Summary(total=len(ev.get("items")))


class Noted(Event):
    pass


class Remembering(Workflow):
    """Keeps its input's name in the state in one step and greets by it in the next."""

    @step
    async def keep(self, ctx: Context, ev: StartEvent) -> Noted:
        await ctx.store.set("name", ev.get("name"))
        return Noted()

    @step
    async def greet(self, ctx: Context, ev: Noted) -> StopEvent:
        return StopEvent(result={"greeting": f"hello {await ctx.store.get('name')}"})


def task(**input_) -> NewTask:
    return NewTask(service="test", input=input_)


class Collector:
    def __init__(self) -> None:
        self.events: list[EventEnvelope] = []

    async def __call__(self, event: EventEnvelope) -> None:
        self.events.append(event)


# load_workflow


def test_load_workflow_accepts_an_instance():
    assert load_workflow("tests.test_worker:greet") is greet


def test_load_workflow_instantiates_a_workflow_subclass():
    loaded = load_workflow("tests.test_worker:Greet")
    assert type(loaded) is Greet


def test_load_workflow_calls_a_zero_argument_factory():
    loaded = load_workflow("tests.test_worker:make_greet")
    assert type(loaded) is Greet
    assert loaded is not load_workflow("tests.test_worker:make_greet")


async def test_a_loaded_workflow_is_registered_once_for_all_its_runs(monkeypatch):
    registered = []
    register = KeptRegistrations.register
    monkeypatch.setattr(KeptRegistrations, "register",
                        lambda runtime, workflow: registered.append(workflow)
                        or register(runtime, workflow))
    loaded = load_workflow("tests.test_worker:make_greet")
    results = [await loaded.run(name=name) for name in ("ada", "bob", "cy")]
    assert results == [{"greeting": f"hello {name}"} for name in ("ada", "bob", "cy")]
    assert registered == [loaded]  # BasicRuntime registers it twice per run


def test_load_workflow_loads_the_shipped_example():
    loaded = load_workflow("conveyor.services.examples.echo:workflow")
    assert isinstance(loaded, Workflow)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("nomodule:x", ["nomodule:x", "nomodule"]),
        ("os:path", ["os:path", "module", "not a workflows.Workflow"]),
        ("no_colon", ["no_colon", "MODULE:ATTR"]),
        (":greet", ["MODULE:ATTR"]),
        ("tests.test_worker:", ["MODULE:ATTR"]),
        ("tests.test_worker:missing", ["tests.test_worker:missing", "missing"]),
        ("tests.test_worker:make_number", ["make_number", "int", "not a workflows.Workflow"]),
    ],
)
def test_load_workflow_names_the_problem(spec, named):
    with pytest.raises(WorkflowNotFound) as raised:
        load_workflow(spec)
    assert isinstance(raised.value, ImportError)
    for part in named:
        assert part in str(raised.value)


# run_task


async def test_run_task_returns_the_stop_event_result():
    result = await run_task(greet, task(name="ada"), Collector())
    assert result == {"greeting": "hello ada"}


async def test_run_task_returns_a_fresh_result_per_run_of_one_instance():
    first = await run_task(greet, task(name="ada"), Collector())
    second = await run_task(greet, task(name="bob"), Collector())
    assert (first, second) == ({"greeting": "hello ada"}, {"greeting": "hello bob"})


async def test_streamed_events_reach_on_event_in_order_as_envelopes():
    seen = Collector()
    result = await run_task(Counting(timeout=10), task(count=3), seen)
    assert result == {"counted": 3}
    assert all(isinstance(e, EventEnvelope) for e in seen.events)
    assert [e.value for e in seen.events] == [
        {"step": 0, "note": "step 0"},
        {"step": 1, "note": "step 1"},
        {"step": 2, "note": "step 2"},
        {"step": 3, "note": "done"},
    ]
    first = seen.events[0]
    assert first.type == "Progress"
    assert "Event" in first.types
    assert first.qualified_name == "tests.test_worker.Progress"
    last = seen.events[-1]
    assert last.type == "Milestone"
    assert last.types == ["Progress", "Event"]
    assert last.qualified_name == "tests.test_worker.Milestone"
    # The StopEvent is the result, not a streamed event.
    assert not any("StopEvent" in (e.types or []) or e.type == "StopEvent" for e in seen.events)


async def test_an_envelope_survives_the_wire():
    sent = envelope(Progress(step=1, note="x"))
    again = EventEnvelope.model_validate_json(sent.model_dump_json())
    assert again == sent


async def test_a_failing_step_raises_its_own_exception():
    seen = Collector()
    with pytest.raises(Exploded, match="disk full"):
        await run_task(Exploding(timeout=10), task(why="disk full"), seen)
    # What was streamed before the failure was handed on; the failure itself was not.
    assert [e.type for e in seen.events] == ["Progress"]


async def test_an_unserializable_result_raises_result_not_serializable():
    with pytest.raises(ResultNotSerializable, match="object"):
        await run_task(Unsendable(timeout=10), task(), Collector())


async def test_an_unserializable_event_raises_result_not_serializable():
    seen = Collector()
    with pytest.raises(ResultNotSerializable, match="Opaque"):
        await run_task(Unsendable(timeout=10), task(in_event=True), seen)
    assert seen.events == []


async def test_a_pydantic_result_is_sent_as_json():
    result = await run_task(Reporting(timeout=10), task(title="q1"), Collector())
    assert result == {"title": "q1", "at": "2025-01-02T00:00:00Z"}


async def test_a_custom_stop_event_is_sent_as_its_fields():
    result = await run_task(Summarizing(timeout=10), task(items=[1, 2, 3]), Collector())
    assert result == {"total": 3}


async def test_a_failing_on_event_stops_the_run_and_propagates():
    class ConsumerGone(Exception):
        pass

    async def refuse(_event: EventEnvelope) -> None:
        raise ConsumerGone

    with pytest.raises(ConsumerGone):
        await run_task(Counting(timeout=10), task(count=3), refuse)


# checkpoints of a run


class Kept:
    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    async def __call__(self, context: dict[str, Any], _inbox_seq: int) -> None:
        self.contexts.append(context)


async def test_a_run_checkpoints_after_each_step_and_resumes_from_any():
    kept = Kept()
    given = task(name="ada")
    assert await TaskRun(Remembering(timeout=10), given, Collector(),
                         on_checkpoint=kept).run() == {"greeting": "hello ada"}
    assert len(kept.contexts) == 1  # after `keep`; none after the step that ends the run
    resumed = TaskRun(Remembering(timeout=10), given, Collector(), resume_from=kept.contexts[0])
    assert await resumed.run() == {"greeting": "hello ada"}
    assert list(resumed.steps) == ["greet"]


async def test_a_run_not_begun_or_ended_leaves_no_checkpoint():
    # A stop or a pause just as a run starts, or just as it ends, asks for a checkpoint: a
    # context without its start event, or without work, would run again from an empty one.
    kept = Kept()
    run = TaskRun(Remembering(timeout=10), task(name="ada"), Collector(), on_checkpoint=kept)
    runner = asyncio.create_task(run.run())
    await asyncio.sleep(0)  # the run is handed to the workflow; no step has begun
    assert run._handler is not None and not kept.contexts
    await run.checkpoint()
    assert kept.contexts == []
    await runner
    after_steps = len(kept.contexts)
    await run.checkpoint()
    assert len(kept.contexts) == after_steps == 1


async def test_a_context_kept_before_its_run_began_runs_from_the_task_input():
    # As an earlier version kept it: the run then began afresh, with its state.
    workflow = Remembering(timeout=10)
    before = Context(workflow)
    await before.store.set("seen", "before")
    context = before.to_dict()
    assert context["is_running"] is False
    run = TaskRun(workflow, task(name="ada"), Collector(), resume_from=context)
    assert await run.run() == {"greeting": "hello ada"}
    assert list(run.steps) == ["keep", "greet"]
    assert run.context_state()["state_data"]["_data"]["seen"] == '"before"'
