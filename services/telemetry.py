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

from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)

from conveyor.contracts import QueueMessage
from conveyor.contracts.topics import REGISTRY

from . import logs
from .settings import Settings

_exporting: TracerProvider | None = None  # this process's, once set up


def exporting(part: str) -> TracerProvider | None:
    """The process's exporting tracer provider, made on first use; None when tracing is off.

    The service name is OTEL_SERVICE_NAME when set, else `part`.
    """
    global _exporting
    if _exporting is None and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        name = os.environ.get("OTEL_SERVICE_NAME") or part
        _exporting = TracerProvider(resource=Resource.create({SERVICE_NAME: name}),
                                    sampler=ParentBased(root=_TasksOnly()))
        _exporting.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_exporting)
        _trace_workflow_steps(_exporting)
    return _exporting


class _TasksOnly(Sampler):
    """Every trace but those of heartbeats and registrations, which are no task's and would
    bury the tasks' traces (a heartbeat every CONVEYOR_HEARTBEAT_INTERVAL per instance)."""

    def should_sample(self, parent_context, trace_id, name, *args, **kwargs) -> SamplingResult:
        destination = name.split(" ", 1)[0]  # FastStream's span names: "<topic> <action>"
        if destination.endswith(f".{REGISTRY}"):
            return SamplingResult(Decision.DROP)
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, *args, **kwargs)

    def get_description(self) -> str:
        return "ConveyorTasksOnly"


def middlewares(settings: Settings, part: str, *, always: bool = False) -> tuple:
    """The broker middleware that traces messages; `always` traces without exporting."""
    provider = exporting(part)
    if provider is None and not always:
        return ()
    provider = provider or TracerProvider()  # ids for the traceparent, nothing exported
    kind = RabbitTelemetryMiddleware if settings.broker_kind == "rabbit" else (
        KafkaTelemetryMiddleware)
    return (kind(tracer_provider=provider),)


def _trace_workflow_steps(provider: TracerProvider) -> None:
    import llama_index_instrumentation as instrument
    from llama_index.observability.otel.base import OTelCompatibleSpanHandler

    handler = OTelCompatibleSpanHandler(tracer=provider.get_tracer("conveyor.workflow"),
                                        tracer_provider=provider)
    instrument.get_dispatcher().add_span_handler(handler)


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
