"""The OpenTelemetry SDK side of tracing, imported only by a process that traces: the
exporting tracer provider, the sampler that leaves heartbeats out, and the span handler of
workflow steps (see telemetry.py)."""

import os

from opentelemetry import trace
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

from conveyor.contracts.topics import REGISTRY

from .settings import Settings

_exporting: TracerProvider | None = None  # this process's, once set up


def tracing_middleware(settings: Settings, part: str):
    """FastStream's telemetry middleware, exporting to OTEL_EXPORTER_OTLP_ENDPOINT."""
    provider = exporting(part)
    if settings.broker_kind == "rabbit":  # each imports its broker's client (see bus._wire)
        from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware as kind
    else:
        from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware as kind
    return kind(tracer_provider=provider)


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


def _trace_workflow_steps(provider: TracerProvider) -> None:
    import llama_index_instrumentation as instrument
    from llama_index.observability.otel.base import OTelCompatibleSpanHandler

    handler = OTelCompatibleSpanHandler(tracer=provider.get_tracer("conveyor.workflow"),
                                        tracer_provider=provider)
    instrument.get_dispatcher().add_span_handler(handler)
