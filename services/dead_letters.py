"""What every part does with a message it cannot handle: answer it, keep it, carry on.

The sender hears why on its reply_to (when the message names one) as a failed
outcome, and the message itself goes to `<namespace>.dead_letter` with the reason,
where the control plane stores it for `conveyor tasks dead-letters`.
"""

import json
import logging
from typing import Any

from conveyor.contracts import (
    CompletedTask,
    CompletedTaskMessage,
    DeadLetter,
    DeadLetterMessage,
    TaskError,
    topic,
)
from conveyor.contracts.topics import DEAD_LETTER

from .bus import Broker, publish
from .database import now
from .settings import Settings

log = logging.getLogger("conveyor.dead_letters")

BODY_LIMIT = 64 * 1024


def _fields(body: bytes) -> dict[str, Any]:
    """Whatever ids can still be read from a message that failed validation."""
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(decoded, dict):
        return {}
    data = decoded.get("data") if isinstance(decoded.get("data"), dict) else {}
    return {
        "message_id": _text(decoded.get("id")),
        "publisher_id": _text(decoded.get("publisher_id")),
        "task_id": _text(data.get("task_id")),
        "session_id": _text(data.get("session_id")),
        "service": _text(data.get("service")) or "",
        "reply_to": _text(data.get("reply_to")),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


async def reject(
    broker: Broker,
    settings: Settings,
    *,
    body: bytes,
    source_topic: str,
    error_type: str,
    reason: str,
    publisher_id: str,
    answer: bool = True,
) -> None:
    """Dead-letter a message and tell its sender why, if it said where to."""
    fields = _fields(body)
    log.warning("rejected a message on %s: %s: %s", source_topic, error_type, reason)
    letter = DeadLetter(
        reason=reason,
        error_type=error_type,
        topic=source_topic,
        body=body[:BODY_LIMIT].decode(errors="replace"),
        message_id=fields.get("message_id"),
        publisher_id=fields.get("publisher_id"),
        task_id=fields.get("task_id"),
        received_at=now(),
    )
    await publish(
        broker,
        settings,
        DeadLetterMessage(type=DEAD_LETTER, publisher_id=publisher_id, data=letter),
        topic(settings.namespace, DEAD_LETTER),
        key=letter.task_id,
    )
    if answer and fields.get("reply_to"):
        await answer_failure(
            broker,
            settings,
            reply_to=fields["reply_to"],
            task_id=fields.get("task_id") or "",
            session_id=fields.get("session_id"),
            service=fields.get("service") or "",
            error=TaskError(type=error_type, message=reason),
            publisher_id=publisher_id,
        )


async def answer_failure(
    broker: Broker,
    settings: Settings,
    *,
    reply_to: str,
    task_id: str,
    session_id: str | None,
    service: str,
    error: TaskError,
    publisher_id: str,
) -> None:
    outcome = CompletedTask(
        task_id=task_id, session_id=session_id, service=service, status="failed", error=error
    )
    message = CompletedTaskMessage(type=reply_to, publisher_id=publisher_id, data=outcome)
    await publish(broker, settings, message, reply_to, key=task_id or None)
