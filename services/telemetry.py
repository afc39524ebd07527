"""Tracing: one trace per task, across every process it passes through.

With OTEL_EXPORTER_OTLP_ENDPOINT set (the standard OpenTelemetry variable), a process
exports its spans over OTLP/HTTP. FastStream's telemetry middleware opens a span for every
message published and processed and carries the trace context in the message headers;
LlamaIndex's OpenTelemetry span handler opens one for every workflow run and step, inside
the span of the dispatch that started it. The Client always traces its publishes, exported
or not, so that every NEW_TASK it sends carries a traceparent.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context, propagate, trace

from conveyor.contracts import QueueMessage

from . import logs
from .settings import Settings


def middlewares(settings: Settings, part: str, *, always: bool = False) -> tuple:
    """The broker middleware that traces messages; `always` traces without exporting.

    The OpenTelemetry SDK is imported only by a process that traces (see exporting.py).
    """
    if not (always or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return ()
    from .exporting import tracing_middleware

    return (tracing_middleware(settings, part),)


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
