"""The control plane: Conveyor's system of record.

It records each NEW_TASK beside the orchestrator's dispatch (both consume the front door),
stores streamed events and outcomes, answers reply_to and watchers, keeps the service
registry, stores dead letters, and answers queries over the broker.
"""

import logging
import os
import socket

from faststream import FastStream
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    CompletedTaskMessage,
    DeadLetterMessage,
    DeregisterServiceMessage,
    HeartbeatMessage,
    InvalidMessage,
    NewTaskMessage,
    QueryMessage,
    QueryResult,
    QueryResultMessage,
    RegisterServiceMessage,
    TaskError,
    TaskStreamMessage,
    parse_message,
    topic,
)
from conveyor.contracts.topics import CONTROL_PLANE, DEAD_LETTER, QUERY, REGISTRY

from .. import database
from ..bus import Broker, create_broker, declare_system_queues, publish, subscribe_system
from ..dead_letters import reject
from ..settings import Settings, load
from . import state

log = logging.getLogger("conveyor.control_plane")


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load()
    ns = settings.namespace
    broker = create_broker(settings)
    publisher_id = f"control_plane@{socket.gethostname()}:{os.getpid()}"
    engine: AsyncEngine | None = None

    async def rejected(body: bytes, source: str, exc: Exception) -> None:
        error_type = getattr(exc, "error_type", type(exc).__name__)
        await reject(
            broker, settings, body=body, source_topic=source, error_type=error_type,
            reason=str(exc), publisher_id=publisher_id,
        )

    @subscribe_system(broker, settings, CONTROL_PLANE, "recorder")
    async def on_task_message(body: bytes) -> None:
        source = topic(ns, CONTROL_PLANE)
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            await rejected(body, source, exc)
            return
        # Replies go out before the commit: a crash between the two repeats the reply
        # (clients dedupe on task id) rather than losing it.
        async with engine.begin() as conn:
            match message:
                case NewTaskMessage(data=task):
                    await state.record_new_task(conn, task, message.publisher_id)
                case TaskStreamMessage(data=event):
                    await state.append_event(conn, event)
                    if event.stream and event.reply_to:
                        await publish(broker, settings, message, event.reply_to, key=event.task_id)
                case CompletedTaskMessage(data=outcome):
                    waiting = await state.record_outcome(conn, outcome)
                    if waiting is None:
                        log.info("outcome of %s was recorded before; duplicate ignored",
                                 outcome.task_id)
                    else:
                        await _tell_outcome(broker, settings, message, waiting)
                case _:
                    await rejected(body, source, InvalidMessage(
                        f"action {message.action.value!r} is not taken on {source}"))

    @subscribe_system(broker, settings, REGISTRY, "control_plane")
    async def on_registry(body: bytes) -> None:
        source = topic(ns, REGISTRY)
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            await rejected(body, source, exc)
            return
        async with engine.begin() as conn:
            match message:
                case RegisterServiceMessage(data=registration):
                    await state.record_registration(conn, registration)
                    return
                case HeartbeatMessage(data=beat):
                    await state.record_heartbeat(conn, beat)
                    return
                case DeregisterServiceMessage(data=gone):
                    await state.record_deregistration(conn, gone.instance_id)
                    return
        await rejected(body, source, InvalidMessage(
            f"action {message.action.value!r} is not taken on {source}"))

    @subscribe_system(broker, settings, DEAD_LETTER, "control_plane")
    async def on_dead_letter(body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            log.warning("dropped an unreadable message on the dead-letter topic: %s", exc)
            return
        if isinstance(message, DeadLetterMessage):
            async with engine.begin() as conn:
                await state.record_dead_letter(conn, message.data)

    @subscribe_system(broker, settings, QUERY, "control_plane")
    async def on_query(body: bytes) -> None:
        source = topic(ns, QUERY)
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            await rejected(body, source, exc)
            return
        if not isinstance(message, QueryMessage):
            await rejected(body, source, InvalidMessage(
                f"action {message.action.value!r} is not taken on {source}"))
            return
        query = message.data
        answer = QueryResult(request_id=message.id)
        try:
            answer.result, pending = await _answer(engine, settings, message)
        except Exception as exc:  # the asker hears of any failure, the service keeps serving
            log.exception("query %s failed", query.kind)
            answer.error = TaskError(type=type(exc).__name__, message=str(exc))
            pending = False
        if not pending:
            await publish(
                broker, settings,
                QueryResultMessage(type=QUERY, publisher_id=publisher_id, data=answer),
                query.reply_to,
            )

    async def start() -> None:
        nonlocal engine
        engine = await database.connect(settings.state_url)

    async def stop() -> None:
        if engine is not None:
            await engine.dispose()

    async def declare() -> None:
        await declare_system_queues(broker, settings)

    return FastStream(broker, on_startup=[start], after_startup=[declare], after_shutdown=[stop])


async def _answer(engine: AsyncEngine, settings: Settings, message: QueryMessage):
    """The query's result, and whether the answer waits for the task to finish."""
    query = message.data
    async with engine.begin() as conn:
        match query.kind:
            case "get_task":
                return await state.get_task(conn, query.task_id or ""), False
            case "watch_task":
                found = await state.watch_task(
                    conn, query.task_id or "", query.reply_to, message.id
                )
                return found, found is None
            case "list_tasks":
                return await state.list_tasks(conn, query), False
            case "list_services":
                return await state.list_services(conn, settings.heartbeat_timeout), False
            case "list_dead_letters":
                return await state.list_dead_letters(conn, query.limit), False


async def _tell_outcome(
    broker: Broker, settings: Settings, message: CompletedTaskMessage, waiting: list[dict]
) -> None:
    """Send the stored outcome to the task's reply_to and to everyone waiting on it."""
    outcome = message.data
    if outcome.reply_to:
        await publish(broker, settings, message, outcome.reply_to, key=outcome.task_id)
    for watcher in waiting:
        view = outcome.model_dump(mode="json", exclude={"reply_to", "attempt"})
        await publish(
            broker, settings,
            QueryResultMessage(
                type=QUERY, publisher_id=message.publisher_id,
                data=QueryResult(request_id=watcher["request_id"], result=view),
            ),
            watcher["reply_to"],
        )


def __getattr__(name: str) -> FastStream:
    # `faststream run conveyor.services.control_plane.app:app` builds the app from the environment.
    if name == "app":
        return create_app()
    raise AttributeError(name)
