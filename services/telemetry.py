"""Tracing: one trace per task, across every process it passes through.

With OTEL_EXPORTER_OTLP_ENDPOINT set (the standard OpenTelemetry variable), a process
exports its spans over OTLP/HTTP. FastStream's telemetry middleware opens a span for every
message published and processed and carries the trace context in the message headers;
LlamaIndex's OpenTelemetry span handler opens one for every workflow run and step, inside
the span of the dispatch that started it. A Client that does not export still stamps every
message it sends with a traceparent (see StampTraceparent), so that the parts that do export
put all of a task's spans in one trace.
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from faststream import BaseMiddleware
from opentelemetry import context, propagate, trace

from conveyor.contracts import QueueMessage

from . import logs
from .settings import Settings


def middlewares(settings: Settings, part: str, *, always: bool = False) -> tuple:
    """The broker middleware that traces messages when spans are exported; with `always`,
    one that stamps the messages published with a traceparent when they are not.

    The OpenTelemetry SDK is imported only by a process that exports (see exporting.py),
    and by one that stamps, for its id generator.
    """
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from .exporting import tracing_middleware

        return (tracing_middleware(settings, part),)
    if not always:
        return ()
    _id_generator()  # imported now, not on the first publish
    return (StampTraceparent,)


class StampTraceparent(BaseMiddleware):
    """Gives each message published a traceparent, recording no span: the caller's trace
    when it is in one, else a new trace (sampled, so that the parts that export record it).

    For a Client that exports nothing: FastStream's telemetry middleware would open, time and
    close a span (and record metrics) for every message sent and received only for its ids,
    a fifth of a Client's CPU per task.
    """

    async def publish_scope(self, call_next, cmd):
        current = trace.get_current_span().get_span_context()
        if not current.is_valid:
            ids = _id_generator()
            current = trace.SpanContext(
                trace_id=ids.generate_trace_id(), span_id=ids.generate_span_id(),
                is_remote=False, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        propagate.inject(cmd.headers, trace.set_span_in_context(trace.NonRecordingSpan(current)))
        return await call_next(cmd)


@functools.cache
def _id_generator():
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    return RandomIdGenerator()


def tag(message: QueueMessage) -> None:
    """Name the task a message is about, on the span processing it and on the log lines
    written meanwhile."""
    data = message.data
    task = getattr(data, "task", data)  # a dispatch carries the NEW_TASK
    task_id = getattr(task, "task_id", None)
    logs.current_task.set(task_id)
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if task_id:
        span.set_attribute("conveyor.task_id", task_id)
    if service := getattr(task, "service", None):
        span.set_attribute("conveyor.service", service)
    if (attempt := getattr(data, "attempt", None)) is not None:
        span.set_attribute("conveyor.attempt", attempt)


def carrier() -> dict[str, str] | None:
    """The current trace context, to be stored with a task and resumed later."""
    found: dict[str, str] = {}
    propagate.inject(found)
    return found or None


def sender_carrier() -> dict[str, str] | None:
    """The trace context of the span that sent the message being processed (its parent's),
    to be stored in the sender's stead; the current one when that is not known."""
    sent_from = getattr(trace.get_current_span(), "parent", None)  # an SDK span's
    if sent_from is None:
        return carrier()
    found: dict[str, str] = {}
    propagate.inject(found, trace.set_span_in_context(trace.NonRecordingSpan(sent_from)))
    return found or None


@contextmanager
def resumed(task_id: str, stored: dict[str, str] | None) -> Iterator[None]:
    """Work done later for a task (a retry, a recovery, a resume) in the task's trace."""
    about = logs.current_task.set(task_id)
    token = context.attach(propagate.extract(stored)) if stored else None
    try:
        yield
    finally:
        if token is not None:
            context.detach(token)
        logs.current_task.reset(about)
