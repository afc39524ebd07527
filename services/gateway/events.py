"""A task's events as the workflow server streams them: SSE with `id:` sequence numbers, or NDJSON.

Conveyor numbers a task's streamed events from 0 without gaps; that index is the SSE
sequence, so `after_sequence` resumes from the durable event log. A completed task's stream
ends with its StopEvent (numbered after the last streamed event), as a workflow server's does.
"""

from collections.abc import AsyncIterator
from typing import Any

from conveyor import Client

from .protocol import FINISHED, EventEnvelopeWithMetadata, cancelled_event, stop_event


def first_after(after_sequence: str, task: dict[str, Any]) -> int:
    """The index after which to start: "now" skips what was streamed so far."""
    if after_sequence.strip() == "now":
        return _last(task) if task["status"] in FINISHED else task["events"] - 1
    try:
        after = int(after_sequence)
    except ValueError:
        raise ValueError(
            f"after_sequence must be an integer or 'now', not {after_sequence!r}") from None
    if after < -1:
        raise ValueError("after_sequence must be -1 (from the start) or more")
    return after


def drained(after: int, task: dict[str, Any]) -> bool:
    """Whether a finished task has nothing left to send after `after` (its final event too)."""
    return task["status"] in FINISHED and after >= _last(task)


def _last(task: dict[str, Any]) -> int:
    """The sequence of a finished task's last event: its final event's, if it has one."""
    return task["events"] if task["status"] in ("completed", "cancelled") else task["events"] - 1


def _final_event(status: str, result: Any) -> EventEnvelopeWithMetadata | None:
    if status == "completed":
        return stop_event(result)
    if status == "cancelled":
        return cancelled_event()
    return None


async def stream(client: Client, task_id: str, after: int, *, sse: bool,
                 qualified_names: bool) -> AsyncIterator[str]:
    """The task's events after `after`, live until it ends, then its final event."""
    sequence = after
    async for item in client.stream(task_id, after=after):
        sequence = item.index
        envelope = EventEnvelopeWithMetadata.model_validate(item.event.model_dump())
        yield _frame(sequence, envelope, sse=sse, qualified_names=qualified_names)
    outcome = await client.wait(task_id)
    final = _final_event(outcome.status, outcome.result)
    if final is not None:
        yield _frame(sequence + 1, final, sse=sse, qualified_names=qualified_names)


def _frame(sequence: int, envelope: EventEnvelopeWithMetadata, *, sse: bool,
           qualified_names: bool) -> str:
    if not qualified_names:
        envelope = envelope.model_copy(update={"qualified_name": None})
    payload = envelope.model_dump_json()
    return f"id: {sequence}\ndata: {payload}\n\n" if sse else f"{payload}\n"
