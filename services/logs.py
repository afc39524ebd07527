"""Log lines: text, or one JSON object per line with CONVEYOR_LOG_FORMAT=json.

Every line written while a part handles a task's message (or acts on a task later: a
retry, a recovery) carries the task's `task_id`, and its `trace_id` when it is traced.
"""

import logging
from contextvars import ContextVar

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from .settings import Settings

current_task: ContextVar[str | None] = ContextVar("conveyor_task", default=None)

JSON_FIELDS = ["asctime", "levelname", "name", "message", "task_id", "trace_id"]


class TaskFields(logging.Filter):
    """Adds task_id and trace_id (or None) to a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.task_id = current_task.get()
        span = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(span.trace_id) if span.is_valid else None
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [task_id=... trace_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        found = [f"{k}={v}" for k in ("task_id", "trace_id") if (v := getattr(record, k, None))]
        line = super().formatMessage(record)
        return f"{line} [{' '.join(found)}]" if found else line


def configure(settings: Settings) -> None:
    """Send every log line to stderr in the configured format; Conveyor's at its level."""
    handler = logging.StreamHandler()
    handler.addFilter(TaskFields())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(
            JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level",
                                        "name": "logger"}))
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(handlers=[handler], force=True)
    # FastStream logs through its own loggers; Conveyor's parts log at the level asked.
    logging.getLogger("conveyor").setLevel(settings.log_level.upper())
