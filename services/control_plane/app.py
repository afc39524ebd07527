"""The control plane: Conveyor's system of record.

It records each NEW_TASK beside the orchestrator's dispatch (both consume the front door),
stores the streamed events, status changes and outcomes that workflow services report (on
their own topic, which only it reads), answers reply_to, watchers and stream followers, keeps
each task's inbox of sent events, sessions and their state, the service registry and dead
letters, and answers queries over the broker.
"""

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from faststream import FastStream

from conveyor.contracts import (
    FINAL_STATUSES,
    TASK_QUERIES,
    CancelTaskMessage,
    CompletedTask,
    CompletedTaskMessage,
    DeadLetterMessage,
    DeregisterServiceMessage,
    HeartbeatMessage,
    InvalidMessage,
    NewTaskMessage,
    PauseTaskMessage,
    QueryMessage,
    QueryResult,
    QueryResultMessage,
    QueueMessage,
    RegisterServiceMessage,
    ResumeTaskMessage,
    SendEventMessage,
    TaskError,
    TaskStatusMessage,
    TaskStream,
    TaskStreamMessage,
    broadcast_topic,
    parse_message,
    topic,
)
from conveyor.contracts.topics import CONTROL_PLANE, DEAD_LETTER, QUERY, REGISTRY

from .. import checkpoints, counters, database, health, logs, sessions, telemetry, write_lock
from ..bus import (
    Broker,
    create_broker,
    declare_system_topics,
    publish,
    subscribe_system,
    unreachable_errors,
)
from ..dead_letters import reject
from ..group_commit import GroupCommit, Item, all_ended
from ..ordering import InOrderPerKey, task_and_session
from ..settings import Settings, load
from . import cleanup, metrics, state

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("conveyor.control_plane")


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load()
    ns = settings.namespace
    broker = create_broker(settings, "control-plane")
    publisher_id = f"control_plane@{socket.gethostname()}:{os.getpid()}"
    engine: AsyncEngine | None = None
    cleaner: asyncio.Task | None = None
    in_order = InOrderPerKey()  # a task's (and a session's) messages, one at a time

    async def rejected(body: bytes, source: str, exc: Exception) -> None:
        error_type = getattr(exc, "error_type", type(exc).__name__)
        await reject(
            broker, settings, body=body, source_topic=source, error_type=error_type,
            reason=str(exc), publisher_id=publisher_id,
        )

    @subscribe_system(broker, settings, CONTROL_PLANE, "recorder",
                      concurrency=settings.prefetch)
    async def on_task_message(body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            await rejected(body, topic(ns, CONTROL_PLANE), exc)
            return
        telemetry.tag(message)
        async with in_order.turn(*task_and_session(message.data)):
            await record(message, body)

    async def record(message, body: bytes) -> None:
        source = topic(ns, CONTROL_PLANE)
        # Replies go out before the commit: a crash between the two repeats the reply
        # (clients dedupe on task id and event index) rather than losing it. Live followers
        # are told after it, so that one who joins meanwhile reads the event from the log.
        if isinstance(message, SendEventMessage):
            await on_sent_event(message, body)
            return
        if isinstance(message, QueryMessage) and message.data.kind in TASK_QUERIES:
            await answer_query(message)
            return
        if isinstance(message, NewTaskMessage | CompletedTaskMessage):
            await write_together(message)  # with those that come while others are written
            return
        async with engine.begin() as conn:
            match message:
                case TaskStreamMessage(data=event):
                    if not await state.append_event(conn, event):
                        log.warning("event %d of %s from replaced attempt %d dropped",
                                    event.index, event.task_id, event.attempt)
                        return
                    if event.stream and event.reply_to:
                        await publish(broker, settings, message, event.reply_to, key=event.task_id)
                case TaskStatusMessage(data=change):
                    await state.record_status(conn, change)
                case CancelTaskMessage() | PauseTaskMessage() | ResumeTaskMessage():
                    return  # the orchestrator's to act on; what follows comes back here
                case _:
                    await rejected(body, source, InvalidMessage(
                        f"action {message.action.value!r} is not taken on {source}"))
                    return
        if isinstance(message, TaskStreamMessage):
            async with engine.connect() as conn:
                followers = await state.stream_watchers(conn, message.data.task_id)
            for reply_to in followers:
                await publish(broker, settings, message, reply_to, key=message.data.task_id)

    async def write_each(batch: list[Item[NewTaskMessage | CompletedTaskMessage]]) -> None:
        """Record tasks and outcomes in one transaction (in the order of their task ids: on
        PostgreSQL each takes its task's lock). What is said or sent for one is said and
        sent in its own task's context (its trace, its log lines), the outcomes' sends in
        flight at once."""
        async with engine.begin() as conn:
            held = write_lock.held()
            telling = []
            for item in batch:
                message = item.value
                if isinstance(message, NewTaskMessage):
                    await state.record_new_task(conn, message.data, message.publisher_id)
                    continue
                outcome = message.data
                waiting = await state.record_outcome(conn, outcome)
                if waiting is None:
                    item.context.run(
                        log.info, "outcome of %s (attempt %d) not taken: recorded before, or "
                        "from a replaced attempt", outcome.task_id, outcome.attempt)
                elif sends := _outcome_sends(message, waiting):
                    telling.append(item.start(write_lock.within(held, publish_each(sends))))
            await all_ended(telling)

    async def publish_each(sends: list["Send"]) -> None:
        for message, to, key in sends:
            await publish(broker, settings, message, to, key=key)

    # Tasks and outcomes that come while others are being recorded are recorded together:
    # under load one transaction (and, on SQLite, one turn of the write lock) for many.
    write_together = GroupCommit(write_each, not_theirs=unreachable_errors(settings),
                                 key=lambda message: message.data.task_id)

    async def on_sent_event(message: SendEventMessage, body: bytes) -> None:
        """Keep the event in the task's inbox, pass it to the service, tell the sender.

        It is passed on only once kept, so an instance that takes the task later finds it
        in the inbox, and one that holds it now gets it at once.
        """
        sent = message.data
        answer = QueryResult(request_id=message.id)
        try:
            async with engine.begin() as conn:
                sent.seq = await state.record_sent_event(conn, sent, message.id)
                service = await state.service_of(conn, sent.task_id)
        except state.EventRefused as exc:
            await reject(broker, settings, body=body, source_topic=topic(ns, CONTROL_PLANE),
                         error_type="EventRefused", reason=str(exc), publisher_id=publisher_id,
                         answer=False)
            answer.error = TaskError(type="EventRefused", message=str(exc))
        else:
            await publish(broker, settings, message, broadcast_topic(ns, service), partition=0)
            answer.result = {"task_id": sent.task_id, "seq": sent.seq}
        if sent.reply_to:
            await publish(
                broker, settings,
                QueryResultMessage(type=QUERY, publisher_id=publisher_id, data=answer),
                sent.reply_to,
            )

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

    @subscribe_system(broker, settings, QUERY, "control_plane",
                      concurrency=settings.prefetch)
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
        async with in_order.turn(*task_and_session(message.data)):
            await answer_query(message)

    async def answer_query(message: QueryMessage) -> None:
        query = message.data
        answer = QueryResult(request_id=message.id)
        try:
            if query.kind == "stream_task":
                await _replay(broker, settings, engine, message, publisher_id)
                return
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

    async def clean_forever() -> None:
        """Remove finished tasks past their TTL, a batch at a time."""
        while True:
            try:
                async with engine.begin() as conn:
                    removed = await cleanup.remove_expired(conn, settings.ttls)
                if removed:
                    log.info("removed %d finished tasks past their TTL", removed)
                    continue  # there may be more
            except Exception:  # the next sweep tries again
                log.exception("TTL sweep failed")
            await asyncio.sleep(settings.cleanup_interval)

    async def start() -> None:
        nonlocal engine
        engine = await database.connect(settings.state_url, settings.namespace)

    async def stop() -> None:
        if engine is not None:
            await engine.dispose()

    async def declare() -> None:
        nonlocal cleaner
        await declare_system_topics(broker, settings)
        cleaner = asyncio.create_task(clean_forever())

    async def stop_cleaning() -> None:
        if cleaner is not None:
            cleaner.cancel()
            await asyncio.gather(cleaner, return_exceptions=True)

    app = FastStream(broker, logger=logging.getLogger("conveyor.app"),
                     on_startup=[start], after_startup=[declare],
                     on_shutdown=[stop_cleaning], after_shutdown=[stop])
    return health.watched(app, settings)


async def _answer(engine: "AsyncEngine", settings: Settings, message: QueryMessage):
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
            case "delete_task":
                return await state.delete_task(conn, _required(query.task_id, "task_id")), False
            case "list_tasks":
                return await state.list_tasks(conn, query), False
            case "list_services":
                return await state.list_services(conn, settings.heartbeat_timeout), False
            case "list_dead_letters":
                return await state.list_dead_letters(conn, query.limit), False
            case "get_checkpoint":
                return await checkpoints.describe(
                    conn, _required(query.task_id, "task_id")), False
            case "pending_work":
                return await state.pending_work(conn), False
            case "get_counters":
                return await counters.read(conn), False
            case "get_metrics":
                return await metrics.read(conn), False
            case "get_throughput":
                return await metrics.throughput(conn, query.minutes), False
            case "list_events":
                return await state.events_of(
                    conn, _required(query.task_id, "task_id"), query.after, query.limit), False
            case "create_session":
                return await sessions.create(conn, query.session_id), False
            case "get_session":
                return await sessions.get(conn, _required(query.session_id, "session_id")), False
            case "list_sessions":
                return await sessions.list_all(conn, query.limit), False
            case "delete_session":
                return await sessions.delete_one(
                    conn, _required(query.session_id, "session_id")), False
            case "set_session_state":
                return await sessions.set_state(
                    conn, _required(query.session_id, "session_id"), query.state or {}), False
        raise ValueError(f"query kind {query.kind!r} is not answered here")


def _required(value: str | None, name: str) -> str:
    if not value:
        raise ValueError(f"{name} is required")
    return value


async def _replay(broker: Broker, settings: Settings, engine: "AsyncEngine",
                  message: QueryMessage, publisher_id: str) -> None:
    """Answer stream_task: the task, then its stored events after `after`, then its end.

    Unfinished, the asker is then sent each new event live and the outcome at the end.
    """
    query = message.data
    task_id = _required(query.task_id, "task_id")
    async with engine.begin() as conn:
        task, stored = await state.watch_stream(conn, task_id, query.reply_to, message.id,
                                                query.after)
    answer = QueryResult(request_id=message.id, result=task)
    if task is None:
        answer.error = TaskError(type="UnknownTask", message=f"no task {task_id!r}")
    await publish(broker, settings,
                  QueryResultMessage(type=QUERY, publisher_id=publisher_id, data=answer),
                  query.reply_to)
    if task is None:
        return
    for item in stored:
        event = TaskStream(task_id=task_id, session_id=task["session_id"], index=item["index"],
                           event=item["event"])
        await publish(broker, settings,
                      TaskStreamMessage(type=QUERY, publisher_id=publisher_id, data=event),
                      query.reply_to, key=task_id)
    if task["status"] in FINAL_STATUSES:
        outcome = CompletedTask(
            task_id=task_id, session_id=task["session_id"], service=task["service"],
            status=task["status"], result=task["result"], error=task["error"],
            attempt=task["attempts"], events=task["events"],
        )
        await publish(broker, settings,
                      CompletedTaskMessage(type=QUERY, publisher_id=publisher_id, data=outcome),
                      query.reply_to, key=task_id)


Send = tuple[QueueMessage, str, str | None]  # a message, its topic, its key


def _outcome_sends(message: CompletedTaskMessage, waiting: list[dict]) -> list[Send]:
    """What tells the stored outcome to the task's reply_to (unless its worker did) and to
    everyone waiting on it, in order: (message, topic, key) each."""
    outcome = message.data
    sends: list[Send] = []
    if outcome.reply_to and not outcome.replied:
        sends.append((message, outcome.reply_to, outcome.task_id))
    for watcher in waiting:
        if watcher["kind"] == "stream":
            sends.append((message, watcher["reply_to"], outcome.task_id))
            continue
        view = outcome.model_dump(mode="json", exclude={"reply_to", "attempt"})
        answer = QueryResultMessage(type=QUERY, publisher_id=message.publisher_id,
                                    data=QueryResult(request_id=watcher["request_id"],
                                                     result=view))
        sends.append((answer, watcher["reply_to"], None))
    return sends


def __getattr__(name: str) -> FastStream:
    # `faststream run conveyor.services.control_plane.app:app` builds the app from the environment.
    if name == "app":
        settings = load()
        logs.configure(settings)  # as `conveyor control-plane` does before it calls create_app
        return create_app(settings)
    raise AttributeError(name)
