"""The orchestrator: decides when and where each task runs.

It reads the front door beside the control plane (and its own topic, where workflow services
tell it of a failed attempt to retry and of an ended task that held tasks wait for; the rest
of what they report is the control plane's alone): a NEW_TASK for a registered service is
dispatched once (the task id is the key) to that service's topic, where its replicas
compete for it; a NEW_TASK for a service nobody registered is failed with UnknownService.
A CANCEL_TASK ends a task as cancelled, stops the instance running it and cancels its inner
tasks.
"""

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from faststream import FastStream

from conveyor.contracts import (
    CancelTask,
    CancelTaskMessage,
    CompletedTask,
    CompletedTaskMessage,
    DispatchTask,
    DispatchTaskMessage,
    HeartbeatMessage,
    InvalidMessage,
    NewTask,
    NewTaskMessage,
    PauseTaskMessage,
    QueryResult,
    QueryResultMessage,
    RegisterServiceMessage,
    ResumeTaskMessage,
    TaskError,
    TaskStatusMessage,
    TaskStatusUpdate,
    broadcast_topic,
    parse_message,
    service_topic,
    topic,
)
from conveyor.contracts.topics import CONTROL_PLANE, QUERY, REGISTRY

from .. import counters, database, health, logs, telemetry
from ..bus import (
    create_broker,
    declare_system_topics,
    publish,
    publish_to_any_replica,
    reports_topic,
    subscribe_system,
)
from ..dead_letters import reject
from ..group_commit import GroupCommit, Item
from ..ordering import InOrderPerKey, task_and_session
from ..settings import Settings, load
from ..wall_clock import WallClock
from . import state

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("conveyor.orchestrator")


class UnknownService(LookupError):
    """A task names a service that never registered."""


def create_app(settings: Settings | None = None) -> FastStream:
    settings = settings or load()
    ns = settings.namespace
    broker = create_broker(settings, "orchestrator")
    publisher_id = f"orchestrator@{socket.gethostname()}:{os.getpid()}"
    engine: AsyncEngine | None = None
    known: dict[str, int | None] = {}  # registered services -> their limit across replicas
    sweeper: asyncio.Task | None = None
    timers: set[asyncio.Task] = set()  # retries waiting for their time
    in_order = InOrderPerKey()  # a task's (a session's, a limited service's) messages, in order

    async def is_registered(service: str) -> bool:
        if service not in known:
            async with engine.connect() as conn:
                known.update(await state.known_services(conn))
        return service in known

    def nothing_waits_behind(session_id: str | None, service: str) -> bool:
        """No task can be held waiting for a task of this session and service to end: it has
        no session, and its service is known to have no limit across its replicas."""
        return session_id is None and service in known and not known[service]

    async def dispatch(task: NewTask) -> None:
        limit = known.get(task.service)
        # A task that waits for nothing (no session, no limit on its service) is published
        # first and recorded after, off its path: the worker that takes it records it itself
        # should it come first (starting_point). Any other is recorded first, the record
        # deciding whether it waits, and published after the commit. Should this process
        # stop in between (or the publish fail), the NEW_TASK is not acknowledged: delivered
        # again, it is published again (the first kind), or finds its dispatch untaken and
        # sends it again; a worker runs an attempt once however many copies of its dispatch
        # arrive, and never one that has ended.
        at_once = nothing_waits_behind(task.session_id, task.service)
        if at_once:
            await publish_first_attempt(task)
            await record_published(state.first_dispatch(
                task.task_id, task.service, task.parent_task_id, None,
                task.model_dump(mode="json"), telemetry.carrier()))
            return
        async with engine.begin() as conn:
            claim = await state.claim_first_dispatch(
                conn, task.task_id, task.service, task.parent_task_id,
                task.model_dump(mode="json"), telemetry.carrier(), task.session_id, limit)
        if not claim.new and not claim.untaken:
            log.info("task %s was dispatched before; duplicate ignored", task.task_id)
            return
        if claim.held:
            log.info("task %s waits for the task before it in its session or for room in "
                     "service %s", task.task_id, task.service)
            return
        await publish_first_attempt(task)

    async def write_published(batch: list[Item[dict]]) -> None:
        async with database.autocommit(engine) as conn:  # one statement
            await state.record_published(conn, [item.value for item in batch])

    # The dispatches published while others are being recorded are recorded together, in
    # the order of their task ids, as a worker claims them.
    record_published = GroupCommit(write_published, key=lambda row: row["task_id"])

    async def publish_first_attempt(task: NewTask) -> None:
        message = DispatchTaskMessage(
            type=task.service, publisher_id=publisher_id,
            data=DispatchTask(task=task, attempt=1),
        )
        await publish(broker, settings, message, service_topic(ns, task.service),
                      key=task.task_id)

    async def fail_unknown(task: NewTask, body: bytes) -> None:
        error = UnknownService(f"no service named {task.service!r} is registered")
        outcome = CompletedTask(
            task_id=task.task_id, session_id=task.session_id, service=task.service,
            status="failed", error=TaskError(type="UnknownService", message=str(error)),
            reply_to=task.reply_to,
        )
        await reject(
            broker, settings, body=body, source_topic=topic(ns, CONTROL_PLANE),
            error_type="UnknownService", reason=str(error), publisher_id=publisher_id,
            answer=False,
        )
        await publish(
            broker, settings,
            CompletedTaskMessage(type=CONTROL_PLANE, publisher_id=publisher_id, data=outcome),
            topic(ns, CONTROL_PLANE), key=task.task_id,
        )

    @subscribe_system(broker, settings, CONTROL_PLANE, "orchestrator",
                      concurrency=settings.prefetch)
    async def on_task_message(body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage:
            return  # the control plane answers and dead-letters it
        telemetry.tag(message)
        limited = None  # a limited service's tasks start in the order they came, too
        if isinstance(message, NewTaskMessage) and known.get(message.data.service):
            limited = f"service {message.data.service}"
        async with in_order.turn(*task_and_session(message.data), limited):
            await act_on(message, body)

    async def act_on(message, body: bytes) -> None:
        match message:
            case NewTaskMessage(data=task):
                if await is_registered(task.service):
                    await dispatch(task)
                else:
                    await fail_unknown(task, body)
            case CompletedTaskMessage(data=outcome) if (
                    outcome.attempt and nothing_waits_behind(outcome.session_id, outcome.service)):
                # Its worker marked the attempt ended, and no task waits for it. On RabbitMQ
                # such an outcome never comes here (the worker copies an outcome to the
                # orchestrator only when a task waits behind it); on Kafka every outcome
                # does, on the front door, and writing each again cost a transaction per task.
                pass
            case CompletedTaskMessage(data=outcome):
                async with engine.begin() as conn:
                    await state.mark_finished(conn, outcome.task_id, outcome.attempt)
                    for after in await state.release_after(conn, outcome.task_id, known):
                        await redispatch(after["task"], after["attempt"], after["trace"])
            case CancelTaskMessage():
                await cancel(message)
            case PauseTaskMessage() | ResumeTaskMessage():
                await steer(message)
            case TaskStatusMessage(data=update) if update.status == "retrying":
                await retry_later(update)

    async def retry_later(update: TaskStatusUpdate) -> None:
        """Move a task whose attempt failed to its next attempt, dispatched when due."""
        async with engine.begin() as conn:
            moved = await state.schedule_retry(conn, update.task_id, update.attempt,
                                               update.retry_in or 0)
        if moved:
            timers.add(timer := asyncio.create_task(dispatch_due_in(update.retry_in or 0)))
            timer.add_done_callback(timers.discard)

    async def dispatch_due_in(seconds: float) -> None:
        await asyncio.sleep(seconds)
        try:
            await dispatch_due()
        except Exception as exc:  # the broker away, say: the sweep tries again
            log.warning("retries due now not dispatched yet (%s: %s); the sweep tries again",
                        type(exc).__name__, exc)

    async def dispatch_due() -> None:
        async with engine.begin() as conn:
            for item in await state.take_due(conn):
                await redispatch(item["task"], item["attempt"], item["trace"])

    async def redispatch(task_data: dict, attempt: int, trace: dict | None, *,
                         everywhere: bool = False) -> None:
        """Dispatch a later attempt, in the trace of the task's first.

        `everywhere`: its last worker went silent; on Kafka the partition that worker read
        would hold the dispatch up (see publish_to_any_replica).
        """
        task = NewTask.model_validate(task_data)
        message = DispatchTaskMessage(type=task.service, publisher_id=publisher_id,
                                      data=DispatchTask(task=task, attempt=attempt))
        to = service_topic(ns, task.service)
        with telemetry.resumed(task.task_id, trace):
            send = publish_to_any_replica if everywhere else publish
            await send(broker, settings, message, to, key=task.task_id)

    async def steer(message: PauseTaskMessage | ResumeTaskMessage) -> None:
        """Pause a task (its worker checkpoints and lets go of it) or resume it as its next
        attempt, from that checkpoint; the control plane hears of its new status."""
        request = message.data
        pausing = isinstance(message, PauseTaskMessage)
        async with engine.begin() as conn:
            if pausing:
                found = await state.pause(conn, request.task_id)
            else:
                found = await state.resume(conn, request.task_id, known)
            if found.done and pausing:
                # Before the status: an event sent once "paused" shows reaches the worker
                # after the pause on the same broadcast, and waits in the inbox.
                await publish(broker, settings, message,
                              broadcast_topic(ns, found.service), partition=0)
            if found.done:
                status = TaskStatusUpdate(task_id=request.task_id, service=found.service,
                                          status="paused" if pausing else "queued",
                                          attempt=found.attempt)
                await publish(broker, settings, TaskStatusMessage(
                    type=CONTROL_PLANE, publisher_id=publisher_id, data=status),
                    reports_topic(settings), key=request.task_id)
            if found.done and not pausing and found.task is not None:
                await redispatch(found.task, found.attempt, found.trace)
            if found.done and pausing:
                for after in await state.release_after(conn, request.task_id, known):
                    await redispatch(after["task"], after["attempt"], after["trace"])
        await answer(message, found.found, found.done)

    async def answer(message, found: bool, done: bool) -> None:
        request = message.data
        if not request.reply_to:
            return
        reply = QueryResult(request_id=message.id,
                            result={"task_id": request.task_id, "done": done})
        if not found:
            reply = QueryResult(request_id=message.id, error=TaskError(
                type="UnknownTask", message=f"no task {request.task_id!r} was dispatched"))
        await publish(broker, settings, QueryResultMessage(
            type=QUERY, publisher_id=publisher_id, data=reply), request.reply_to)

    async def cancel(message: CancelTaskMessage) -> None:
        """End a task as cancelled: record the outcome, stop the instance running it (if
        any), cancel its inner tasks, and tell whoever asked."""
        request = message.data
        async with engine.begin() as conn:
            found = await state.cancel(conn, request.task_id)
            if found.cancelled_now:
                # Published inside the transaction: the cancellation commits once they are out.
                outcome = CompletedTask(
                    task_id=request.task_id, service=found.service, status="cancelled",
                    error=TaskError(type="TaskCancelled", message=request.reason),
                )
                await publish(broker, settings, CompletedTaskMessage(
                    type=CONTROL_PLANE, publisher_id=publisher_id, data=outcome),
                    topic(ns, CONTROL_PLANE), key=request.task_id)
                await publish(broker, settings, message, broadcast_topic(ns, found.service),
                              partition=0)
                for child in found.children:
                    inner = CancelTask(task_id=child, reason=f"its outer task {request.task_id} "
                                       f"was cancelled: {request.reason}")
                    await publish(broker, settings, CancelTaskMessage(
                        type=CONTROL_PLANE, publisher_id=publisher_id, data=inner),
                        topic(ns, CONTROL_PLANE), key=child)
        await answer(message, found.found, found.cancelled_now)

    @subscribe_system(broker, settings, REGISTRY, "orchestrator")
    async def on_registry(body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage:
            return  # the control plane answers and dead-letters it
        match message:
            case RegisterServiceMessage(data=registration):
                known[registration.service] = registration.max_concurrent_tasks
            case HeartbeatMessage(data=beat):
                # Replicas of the orchestrator share the registry's messages: a replica the
                # registration did not reach learns the service and its limit here. (Leases:
                # each worker renews its own.)
                known[beat.service] = beat.max_concurrent_tasks

    async def recover_forever() -> None:
        """Re-dispatch, as their next attempt, the tasks whose worker stopped heartbeating:
        once the wall clock has been steady for a heartbeat timeout (see wall_clock)."""
        clock = WallClock()
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            try:
                if (steady := clock.steady_for()) >= settings.heartbeat_timeout:
                    await recover_expired()
                elif steady == 0:  # the step was seen just now
                    log.warning("the wall clock stepped (the machine slept, or the clock was "
                                "set): leases are judged again once it has run steadily for "
                                "%.0f s", settings.heartbeat_timeout)
                await dispatch_due()
                await release_held()
            except Exception:  # the next sweep tries again
                log.exception("sweep for expired leases failed")

    async def recover_expired() -> None:
        async with engine.begin() as conn:
            expired = await state.take_expired(conn, settings.heartbeat_timeout)
            for item in expired:
                task_id = item["task"]["task_id"]
                with telemetry.resumed(task_id, item["trace"]):  # the line joins the task's
                    log.warning("task %s: its worker went silent; dispatching attempt %d",
                                task_id, item["attempt"])
                await redispatch(item["task"], item["attempt"], item["trace"], everywhere=True)
            if expired:
                await counters.add(conn, counters.RECOVERED, len(expired))

    async def release_held() -> None:
        """Held tasks that may run now: a missed release, or a service given a higher limit
        (each replica of the orchestrator learns the limits of every registration here)."""
        async with engine.begin() as conn:
            known.update(await state.known_services(conn))
            for item in await state.release_held(conn, known, every=True):
                await redispatch(item["task"], item["attempt"], item["trace"])

    async def start() -> None:
        nonlocal engine
        engine = await database.connect(settings.state_url, settings.namespace)
        async with engine.connect() as conn:
            known.update(await state.known_services(conn))

    async def stop_sweeping() -> None:
        for waiting in [sweeper, *timers]:
            if waiting is not None:
                waiting.cancel()
        await asyncio.gather(*timers, *([sweeper] if sweeper else []), return_exceptions=True)

    async def stop() -> None:
        if engine is not None:
            await engine.dispose()

    async def declare() -> None:
        nonlocal sweeper
        await declare_system_topics(broker, settings)
        sweeper = asyncio.create_task(recover_forever())

    app = FastStream(broker, logger=logging.getLogger("conveyor.app"),
                     on_startup=[start], after_startup=[declare],
                     on_shutdown=[stop_sweeping], after_shutdown=[stop])
    return health.watched(app, settings)


def __getattr__(name: str) -> FastStream:
    # `faststream run conveyor.services.orchestrator.app:app` builds the app from the environment.
    if name == "app":
        settings = load()
        logs.configure(settings)  # as `conveyor orchestrator` does before it calls create_app
        return create_app(settings)
    raise AttributeError(name)
