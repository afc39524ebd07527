"""A real OTLP/HTTP trace receiver for tests: what the exporters of other processes send,
decoded with opentelemetry-proto; and the check of their JSON log lines against it."""

import contextlib
import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from .deployment import eventually


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict = field(default_factory=dict)


def _value(value: AnyValue):
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


class Receiver:
    """Listens on 127.0.0.1 (a free port) at /v1/traces while used as a context manager."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Span(
                        service=resource.get("service.name", ""), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(), kind=span.kind,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                    ))

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()


def traced(receiver: Receiver) -> dict[str, str]:
    """The environment of parts that export their spans to `receiver` and log JSON."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "CONVEYOR_LOG_FORMAT": "json"}


def untagged(deployment, spans: list[Span], task_id: str, *parts: str) -> list[dict]:
    """The log lines of `parts` that name the task but carry another task id (or none), or
    a trace id that none of the task's spans is in."""
    traces = {s.trace_id for s in spans if s.attributes.get("conveyor.task_id") == task_id}
    return [r for r in deployment.lines_about(task_id, *parts)
            if r["task_id"] != task_id or r["trace_id"] not in traces]


async def spans_of_logged_traces(deployment, spans: list[Span], parts, *task_ids: str) -> None:
    """Wait a while for the spans that the log lines naming the tasks are checked against:
    they are exported in batches, after they end. The assertions then say what is missing."""

    async def arrived() -> bool:
        return not any(untagged(deployment, spans, t, *parts) for t in task_ids)

    with contextlib.suppress(TimeoutError):
        await eventually(arrived, timeout=15)
