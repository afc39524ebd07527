"""A workflow service: one replica running one workflow, as a FastStream app.

It registers with the control plane, heartbeats the tasks it holds, takes dispatched tasks
from its service topic (replicas compete), streams their events and publishes each outcome
to the front door, where the control plane records it and answers reply_to. Events sent into
its tasks reach every instance on the service's broadcast topic; the one holding the task
takes them. A task starts from its session's state and the events already in its inbox.
"""

import asyncio
import collections
import contextlib
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, NamedTuple

from faststream import FastStream

from conveyor.client import Client
from conveyor.contracts import (
    CancelTaskMessage,
    CompletedTask,
    CompletedTaskMessage,
    DeregisterService,
    DeregisterServiceMessage,
    DispatchTask,
    DispatchTaskMessage,
    EventEnvelope,
    Heartbeat,
    HeartbeatMessage,
    InvalidMessage,
    MessageTooLarge,
    PauseTaskMessage,
    RegisterService,
    RegisterServiceMessage,
    RunningTask,
    SendEventMessage,
    TaskError,
    TaskStatusMessage,
    TaskStatusUpdate,
    TaskStream,
    TaskStreamMessage,
    broadcast_topic,
    parse_message,
    service_topic,
    topic,
)
from conveyor.contracts.topics import CONTROL_PLANE, REGISTRY
from conveyor.remote import Caller, current_caller

from .. import checkpoints, database, health, logs, sessions, telemetry, write_lock
from ..bus import (
    PublishFailed,
    Redeliver,
    create_broker,
    declare_system_topics,
    orchestrator_topic,
    publish,
    publish_to_any_replica,
    reports_topic,
    subscribe,
    through_outages,
)
from ..checkpoints import StaleAttempt
from ..dead_letters import reject
from ..group_commit import GroupCommit, Item, all_ended
from ..orchestrator.state import waiting_behind
from ..settings import ConfigurationError, load
from ..wall_clock import WallClock
from .described import describe_workflow
from .settings import RuntimeSettings
from .starting_point import StartingPoint, release, renew, reported, starting_point
from .task_run import EventNotAccepted, TaskRun, accepted_events
from .worker import describe, load_workflow

if TYPE_CHECKING:  # the async engine's module is imported for PostgreSQL only
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("conveyor.runtime")

HANDED_BACK = "handed back"


class Ended(NamedTuple):
    """An attempt's outcome, to be marked ended and published (see report)."""

    outcome: CompletedTask
    streamed: bool  # its task streams its events: the control plane answers its reply_to
    session_state: dict | None  # the session's Context state the run left, to keep


def create_app(settings: RuntimeSettings | None = None, workflow=None) -> FastStream:
    settings = settings or load(RuntimeSettings)
    name = settings.service_name
    if not name:
        raise ConfigurationError("CONVEYOR_SERVICE_NAME (or --name) is required")
    ns = settings.namespace
    own_topic = service_topic(ns, name)
    reports, orchestrator = reports_topic(settings), orchestrator_topic(settings)
    workflow = workflow or load_workflow(settings.workflow)
    broker = create_broker(settings, name)
    instance_id = f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    accepted = accepted_events(workflow)
    described = describe_workflow(workflow)
    running: dict[str, int] = {}
    holding: dict[str, TaskRun] = {}
    runs: dict[str, asyncio.Task] = {}
    traces: dict[str, dict | None] = {}  # each run's trace, for lines logged outside the run
    # task id -> its attempt run here, the run (once ended, a done future), and when it was
    # claimed
    jobs: dict[str, tuple[int, asyncio.Future, asyncio.Future]] = {}
    # The attempts that ended here lately, oldest first: (when to forget, task id, attempt).
    ended_lately: collections.deque[tuple[float, str, int]] = collections.deque()
    finished: asyncio.Future | None = None  # what jobs keeps of each run that ended well
    stopping: dict[str, str] = {}  # why a run was stopped on request, when not cancelled
    draining = False  # stopping: new dispatches go back to the broker
    # On Kafka a partition's offset is committed only up to its first message in hand: a
    # handler that waited for its run would hold the commit of every dispatch behind it on
    # the partition for as long as the run (a crash would deliver them all again). There
    # the handler returns once the attempt is claimed (from then on its lease in the state
    # store keeps it, and the orchestrator's sweep takes it over should this process die),
    # the run goes on detached. A dispatch is claimed only when a place is free: with every
    # place taken, the consumer has at most as many more in hand, waiting.
    detached = settings.broker_kind == "kafka"
    places = asyncio.Semaphore(settings.max_concurrent_tasks)
    limited = bool(settings.service_max_concurrent_tasks)  # across the service's replicas
    # Nested workflows: inner tasks are started and awaited over this service's connection.
    caller = Client(settings=settings, broker=broker, publisher_id=instance_id)
    heartbeats: asyncio.Task | None = None
    engine: AsyncEngine | None = None
    key = b""  # signs checkpoints

    async def emit(message, to: str, key: str | None = None) -> None:
        await publish(broker, settings, message, to, key=key)

    async def run(dispatch: DispatchTask, claimed: asyncio.Future) -> None:
        """Run an attempt, holding its lease (renewed by the heartbeats, which report it as
        running here) from its claim until its outcome is with the broker and marked
        reported, or until it lets go. `claimed` is resolved once the attempt is claimed
        (or found not to be this instance's to run)."""
        try:
            await run_attempt(dispatch, claimed)
        finally:
            running.pop(dispatch.task.task_id, None)
            if not claimed.done():
                claimed.set_result(None)

    async def hand_back(dispatch: DispatchTask) -> None:
        """Let go of a claimed attempt for another replica to take at once: the broker
        delivers its message again (RabbitMQ), or, its Kafka offset being committed, the
        dispatch is published again, to every partition: by its key it would wait on this
        replica's own partition until the group moved it (publish_to_any_replica)."""

        async def once() -> None:
            async with engine.begin() as conn:
                await release(conn, dispatch.task.task_id, dispatch.attempt, instance_id)
                if detached:  # released only once the broker has it: else the lease runs out
                    await publish_to_any_replica(
                        broker, settings, DispatchTaskMessage(
                            type=name, publisher_id=instance_id, data=dispatch),
                        own_topic, key=dispatch.task.task_id)

        await through_outages(settings, f"task {dispatch.task.task_id} handed back", once)
        if not detached:
            raise Redeliver(dispatch.task.task_id)

    async def run_attempt(dispatch: DispatchTask, claimed: asyncio.Future) -> None:
        task = dispatch.task
        index = 0

        async def stream(event: EventEnvelope) -> None:
            nonlocal index
            data = TaskStream(
                task_id=task.task_id, session_id=task.session_id, index=index, event=event,
                attempt=dispatch.attempt, reply_to=task.reply_to, stream=task.stream,
            )
            index += 1
            await emit(TaskStreamMessage(type=CONTROL_PLANE, publisher_id=instance_id, data=data),
                       reports, task.task_id)

        outcome = CompletedTask(
            task_id=task.task_id, session_id=task.session_id, service=name,
            status="completed", attempt=dispatch.attempt, reply_to=task.reply_to,
        )
        async def checkpoint(context: dict, inbox_seq: int) -> None:
            async with engine.begin() as conn:
                kept = await checkpoints.save(conn, key, task.task_id, dispatch.attempt,
                                              context, inbox_seq=inbox_seq, streamed=index)
            if not kept:  # raised once the refusal's count is committed
                raise StaleAttempt(f"attempt {dispatch.attempt} of task {task.task_id} was "
                                   "replaced: its checkpoint is refused")

        task_run = session_state = None
        try:
            start = await claim(dispatch)
            claimed.set_result(None)
            if start.skip:
                log.info("attempt %d of task %s not run: %s", dispatch.attempt, task.task_id,
                         start.skip)
                forget_job(task.task_id, asyncio.current_task())  # a later dispatch may run
                return
            if draining:  # claimed while this replica began to stop: not started here
                await hand_back(dispatch)
                return
            running[task.task_id] = dispatch.attempt
            resumed = start.checkpoint
            if resumed is not None:
                index = resumed.streamed
                log.info("task %s resumes from its checkpoint after %d steps", task.task_id,
                         resumed.steps)
            holding[task.task_id] = task_run = TaskRun(
                workflow, task, stream, accepted=accepted, state=start.state,
                resume_from=resumed.context if resumed else None,
                taken_before=resumed.inbox_seq if resumed else 0, on_checkpoint=checkpoint,
                step_timeout=settings.step_timeout,
                task_timeout=task.timeout or settings.task_timeout,
            )
            for item in start.sent:
                deliver(task_run, item["seq"], item["event"], item["step"])
            token = current_caller.set(Caller(caller, task))
            try:
                runs[task.task_id] = runner = asyncio.create_task(task_run.run())
            finally:
                current_caller.reset(token)
            traces[task.task_id] = telemetry.carrier()
            outcome.result = await runner
            session_state = task_run.context_state() if task.session_id else None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this service is stopping
            why = stopping.pop(task.task_id, "cancelled")
            log.info("task %s %s", task.task_id, why)
            if why == HANDED_BACK:
                await hand_back(dispatch)
            return  # on request: the orchestrator has told the control plane
        except StaleAttempt as exc:
            log.warning("task %s stopped: %s", task.task_id, exc)
            return  # a later attempt holds the task now
        except Redeliver:
            raise
        except Exception as exc:  # the step's failure is the task's outcome, never a crash
            log.info("task %s failed: %s: %s", task.task_id, type(exc).__name__, exc)
            error = describe(exc)
            policy = settings.retry_policy(task.max_retries)
            if policy.retries(dispatch.attempt, error.type):
                await retry_later(dispatch, error, policy.delay(dispatch.attempt))
                return
            if dispatch.attempt > 1 or settings.max_retries or task.max_retries is not None:
                # Where retries are a thing at all, the error says why there was no other.
                error.message += f" ({policy.why_not(dispatch.attempt, error.type)})"
            outcome.status, outcome.error = "failed", error
        finally:
            holding.pop(task.task_id, None)
            runs.pop(task.task_id, None)
            traces.pop(task.task_id, None)
        outcome.events = index
        outcome.steps = task_run.steps if task_run else {}
        await report(outcome, streamed=task.stream, session_state=session_state)

    async def report(outcome: CompletedTask, streamed: bool,
                     session_state: dict | None = None) -> None:
        """Publish an outcome to the control plane and, when its task streams nothing there
        (the control plane keeps events and outcome in order), to its reply_to in the same
        publish: the requester hears of it one hop sooner. Only while this attempt is still
        the task's, not cancelled: the attempt is marked ended in the transaction that
        spans the publish, which the orchestrator's cancel and sweep wait for. A replaced or
        cancelled attempt's outcome goes to the control plane alone, which counts and drops
        it. The orchestrator hears of an outcome only when a held task waits for this one
        (of its session, or of a service with a limit), to release it. The session's state
        is kept in that transaction too, so a replaced attempt never overwrites what a later
        one (or the session's next task) left.

        The outcomes of attempts that end while others' are being written go together, in
        one transaction and with their publishes in flight at once (group_commit): under
        load a transaction, and the write lock on SQLite, is held through one wait for the
        broker's confirms for many outcomes rather than one each.
        """
        await write_ended(Ended(outcome, streamed, session_state))

    async def write_outcomes(batch: list[Item[Ended]]) -> None:
        async def once() -> None:
            async with engine.begin() as conn:
                copies = [await mark_ended(conn, item.value) for item in batch]
                held = write_lock.held()
                sends = [item.start(send_outcome(item.value.outcome, copy_to, held))
                         for item, copy_to in zip(batch, copies, strict=True)]
                await all_ended(sends)  # each confirmed or failed before the commit

        # While the broker is away the transaction is not held open: see write_lock.
        ids = ", ".join(item.value.outcome.task_id for item in batch)
        what = f"the outcome of task {ids}" if len(batch) == 1 else f"the outcomes of tasks {ids}"
        await through_outages(settings, what, once)

    async def mark_ended(conn, ended: Ended) -> tuple[str, ...]:
        """Mark the attempt ended (and keep its session's state) if it is still the task's;
        returns the topics its outcome is copied to besides the control plane's."""
        outcome = ended.outcome
        current = await reported(conn, outcome.task_id, outcome.attempt, instance_id,
                                 ended=True)
        if current and ended.session_state is not None and outcome.session_id:
            await sessions.save_context_state(conn, outcome.session_id, ended.session_state)
        outcome.replied = bool(current and outcome.reply_to and not ended.streamed)
        copy_to = (outcome.reply_to,) if outcome.replied else ()
        if current and await waiting_behind(conn, outcome.session_id, name if limited
                                            else None):
            copy_to += (orchestrator,)
        return copy_to

    async def send_outcome(outcome: CompletedTask, copy_to: tuple[str, ...], held: bool) -> None:
        """Publish an outcome, in the task's own context (its trace), inside the transaction
        that marks it ended: tried once when that holds SQLite's write lock."""
        message = CompletedTaskMessage(type=CONTROL_PLANE, publisher_id=instance_id, data=outcome)
        try:
            await write_lock.within(held, publish(broker, settings, message, reports,
                                                  key=outcome.task_id, copy_to=copy_to))
        except MessageTooLarge as exc:
            outcome.status, outcome.result, outcome.error = "failed", None, TaskError(
                type="MessageTooLarge", message=f"the task's outcome could not be sent: {exc}")
            await write_lock.within(held, publish(broker, settings, message, reports,
                                                  key=outcome.task_id, copy_to=copy_to))

    write_ended = GroupCommit(write_outcomes, not_theirs=(PublishFailed,),
                              key=lambda ended: ended.outcome.task_id)

    clock = WallClock()  # whether a holder that looks silent can be judged so (write_claims)

    async def claim(dispatch: DispatchTask) -> StartingPoint:
        """Claim the attempt. The orchestrator commits a first dispatch before publishing it,
        and a later attempt just after the broker has it (or rolls it back, to dispatch it
        again, when its connection dropped meanwhile): a dispatch not in the state store
        yet is looked for again for a while."""
        # Should it record the dispatch (attempt 1), in the dispatch's trace.
        trace = telemetry.sender_carrier() if dispatch.attempt == 1 else None
        for pause in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 0):
            start = await claim_together((dispatch, trace))
            if start.dispatched:
                break
            await asyncio.sleep(pause)
        return start

    async def write_claims(batch: list[Item[tuple[DispatchTask, dict | None]]]) -> None:
        """Claim attempts in one transaction (in the order of their task ids, as the
        orchestrator records the dispatches it publishes together). An attempt whose holder
        looks silent is taken over only once the wall clock has run steadily for a lease:
        across a step every holder looks silent (see wall_clock)."""
        steady = clock.steady_for() >= settings.heartbeat_timeout
        lease = settings.heartbeat_timeout if steady else None
        async with engine.begin() as conn:
            for item in batch:
                dispatch, trace = item.value
                item.result = await starting_point(conn, dispatch.task, dispatch.attempt,
                                                   instance_id, key, lease, trace)

    # The attempts whose dispatches come while others are being claimed are claimed together.
    claim_together = GroupCommit(write_claims, key=lambda claimed: claimed[0].task.task_id)

    async def retry_later(dispatch: DispatchTask, error: TaskError, delay: float) -> None:
        """Tell the control plane and the orchestrator (which schedules the next attempt), in
        one publish: this attempt failed, try again. As with an outcome, only while the
        attempt is still this worker's, marked reported in the transaction that spans the
        publish: a cancel that comes meanwhile waits for the commit, and a crash before it
        leaves the lease to the sweep."""
        task = dispatch.task
        change = TaskStatusUpdate(task_id=task.task_id, service=name, status="retrying",
                                  attempt=dispatch.attempt, error=error, retry_in=delay)

        async def once() -> None:
            async with engine.begin() as conn:
                if not await reported(conn, task.task_id, dispatch.attempt, instance_id):
                    log.info("task %s: attempt %d failed, and was replaced or cancelled "
                             "meanwhile: no retry from here", task.task_id, dispatch.attempt)
                    return
                log.info("task %s: attempt %d failed, retrying in %.2f s", task.task_id,
                         dispatch.attempt, delay)
                await publish(broker, settings, TaskStatusMessage(
                    type=CONTROL_PLANE, publisher_id=instance_id, data=change), reports,
                    key=task.task_id, copy_to=(orchestrator,))

        await through_outages(settings, f"the retry of task {task.task_id}", once)

    def deliver(task_run: TaskRun, seq: int, event, step: str | None) -> None:
        try:
            task_run.deliver(seq, EventEnvelope.model_validate(event), step)
        except EventNotAccepted as exc:
            log.warning("event %d for task %s not delivered: %s", seq, task_run.task.task_id, exc)

    @subscribe(broker, settings, broadcast_topic(ns, name), None, quiet=True)
    async def on_broadcast(body: bytes) -> None:
        try:
            message = parse_message(body)
        except InvalidMessage as exc:
            log.warning("unreadable message on %s: %s", broadcast_topic(ns, name), exc)
            return
        telemetry.tag(message)
        match message:
            case SendEventMessage(data=sent) if sent.seq is not None:
                task_run = holding.get(sent.task_id)
                if task_run is not None and sent.task_id not in stopping:
                    # A task being paused or handed back takes it from its inbox on resuming.
                    deliver(task_run, sent.seq, sent.event, sent.step)
            case CancelTaskMessage(data=cancel):
                runner = runs.get(cancel.task_id)
                if runner is not None:
                    runner.cancel()
            case PauseTaskMessage(data=pause):
                runner, task_run = runs.get(pause.task_id), holding.get(pause.task_id)
                if runner is not None and task_run is not None:
                    stopping[pause.task_id] = "paused"
                    await task_run.checkpoint()  # what it has done so far, kept
                    runner.cancel()

    # The broker hands a replica as many dispatches as it has places (on Kafka, whose runs
    # are detached, each handler holds its dispatch until a place is free and the attempt is
    # claimed).
    @subscribe(broker, settings, own_topic, own_topic,
               concurrency=settings.max_concurrent_tasks)
    async def on_dispatch(body: bytes) -> None:
        try:
            message = parse_message(body)
            if not isinstance(message, DispatchTaskMessage):
                raise InvalidMessage(f"action {message.action.value!r} is not taken on {own_topic}")
        except InvalidMessage as exc:
            await reject(broker, settings, body=body, source_topic=own_topic,
                         error_type=exc.error_type, reason=str(exc), publisher_id=instance_id)
            return
        telemetry.tag(message)
        if draining:
            await asyncio.sleep(0.5)  # let a replica that is not stopping take it
            raise Redeliver(message.data.task.task_id)
        if not detached:
            await asyncio.shield(job_for(message.data)[0])
            return
        task_id, attempt = message.data.task.task_id, message.data.attempt
        if jobs.get(task_id, (0,))[0] >= attempt:
            return  # running here already (its message came again), or replaced by one that is
        await places.acquire()
        job, claimed = job_for(message.data)
        job.add_done_callback(lambda _: places.release())
        await asyncio.shield(claimed)

    def job_for(dispatch: DispatchTask) -> tuple[asyncio.Task, asyncio.Future]:
        """The run of this attempt: started here, or the one already running here; or none
        (a done future) when a later attempt of the task came here already.

        A run is not the handler's own: when the connection drops, FastStream cancels the
        handler but the run goes on (its reports are published once the broker is back), and
        the message, delivered again, waits for that run instead of starting another. The
        dispatch of an earlier attempt, come late (the orchestrator's sweep sends the next
        one while the first is still on its way), starts nothing: it would take the later
        attempt's place in `jobs`, and a copy of the later one's dispatch (the sweep sends
        one to every Kafka partition) would start that attempt a second time here.
        """
        task_id, attempt = dispatch.task.task_id, dispatch.attempt
        found = jobs.get(task_id)
        if found is not None and found[0] == attempt:
            return found[1], found[2]
        if found is not None and found[0] > attempt:
            log.info("attempt %d of task %s not run: attempt %d came here", attempt, task_id,
                     found[0])
            replaced = asyncio.get_running_loop().create_future()
            replaced.set_result(None)
            return replaced, replaced
        claimed = asyncio.get_running_loop().create_future()
        job = asyncio.create_task(run(dispatch, claimed))
        jobs[task_id] = (attempt, job, claimed)
        job.add_done_callback(lambda _: job_ended(task_id, attempt, job))
        return job, claimed

    def job_ended(task_id: str, attempt: int, job: asyncio.Task) -> None:
        """Remember a while (three heartbeat timeouts) that this attempt ran here, for a
        redelivery of its dispatch may still be on its way; but not the run itself: a
        finished asyncio task keeps the context it started in, the broker's message among
        it (at 150 tasks/s the service held 20 MB more while 30 s of them were kept). Each
        attempt that ended well is kept as one shared done future, and forgotten in order
        of ending rather than by a timer of its own: at 250 tasks/s a timer, a context and a
        future for each held 5 MB more."""
        nonlocal finished
        if jobs.get(task_id, (None, None))[1] is not job:
            return  # let go of (a later dispatch may run), or another attempt's now
        if not job.cancelled() and job.exception() is None:
            if finished is None:
                finished = job.get_loop().create_future()
                finished.set_result(None)
            jobs[task_id] = (attempt, finished, finished)
        # else kept whole (rare): its message, delivered again, fails as it did
        now = job.get_loop().time()
        ended_lately.append((now + 3 * settings.heartbeat_timeout, task_id, attempt))
        forget_ended(now)

    def forget_ended(now: float) -> None:
        """Forget the attempts that ended here longer ago than job_ended keeps them."""
        while ended_lately and ended_lately[0][0] <= now:
            _, task_id, attempt = ended_lately.popleft()
            found = jobs.get(task_id)
            if found is not None and found[0] == attempt and found[1].done():
                del jobs[task_id]

    def forget_job(task_id: str, job: asyncio.Future) -> None:
        if task_id in jobs and jobs[task_id][1] is job:
            del jobs[task_id]

    async def drain() -> None:
        """On SIGTERM: take no more tasks, let those running finish within the grace period,
        then checkpoint the rest and hand them back to the broker for another replica."""
        nonlocal draining
        draining = True
        if runs:
            log.info("stopping: %d tasks running, waiting up to %.1f s", len(runs),
                     settings.grace_period)
        # Runs that start meanwhile (claimed before the stop) get the same grace.
        deadline = asyncio.get_running_loop().time() + settings.grace_period
        while runs and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(runs.values()), timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
        handed_back = list(runs.items())
        for task_id, runner in handed_back:
            with telemetry.resumed(task_id, traces.get(task_id)):
                log.info("stopping: task %s handed back", task_id)
                stopping[task_id] = HANDED_BACK
                if (task_run := holding.get(task_id)) is not None:
                    with contextlib.suppress(Exception):  # the last checkpoint stands
                        await task_run.checkpoint()
                runner.cancel()
        # Each handler then hands its message back (or, on Kafka, each run publishes its
        # dispatch again); the broker stops once they have.
        await asyncio.gather(*(runner for _, runner in handed_back), return_exceptions=True)
        await asyncio.gather(*(job for _, job, _ in list(jobs.values())), return_exceptions=True)

    async def beat_forever() -> None:
        """Renew the leases of the tasks this instance holds, and tell the control plane it
        is alive and what it runs: two loops, so that a heartbeat message waiting out a
        broker outage never holds up the leases (the state store is still there, and a
        lease run out would have the orchestrator run the task again elsewhere)."""
        await asyncio.gather(renew_forever(), announce_forever())

    async def renew_forever() -> None:
        """Renew the leases in the state store, so that how late the orchestrator reads a
        heartbeat never costs a live worker its task (and, idle, forget what ended)."""
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            forget_ended(asyncio.get_running_loop().time())
            try:
                if running:  # an idle replica takes no write lock
                    async with engine.begin() as conn:
                        await renew(conn, instance_id, dict(running))
            except Exception as exc:  # the next beat tries again, well within the timeout
                log.warning("leases not renewed: %s", exc)

    async def announce_forever() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            beat = Heartbeat(
                service=name, instance_id=instance_id,
                running=[RunningTask(task_id=t, attempt=a) for t, a in running.items()],
                max_concurrent_tasks=settings.service_max_concurrent_tasks,
            )
            try:
                await emit(HeartbeatMessage(type=REGISTRY, publisher_id=instance_id, data=beat),
                           topic(ns, REGISTRY), instance_id)
            except Exception as exc:  # a missed beat is survivable; the next one may get through
                log.warning("heartbeat not sent: %s", exc)

    async def register() -> None:
        nonlocal heartbeats
        await declare_system_topics(broker, settings)
        registration = RegisterService(
            service=name, instance_id=instance_id, host=socket.gethostname(), pid=os.getpid(),
            workflow=settings.workflow, event_types=sorted(accepted), **described,
            max_concurrent_tasks=settings.service_max_concurrent_tasks,
        )
        await emit(RegisterServiceMessage(type=REGISTRY, publisher_id=instance_id,
                                          data=registration), topic(ns, REGISTRY), instance_id)
        heartbeats = asyncio.create_task(beat_forever())

    async def deregister() -> None:
        if heartbeats is not None:
            heartbeats.cancel()
            await asyncio.gather(heartbeats, return_exceptions=True)
        gone = DeregisterService(service=name, instance_id=instance_id)
        try:
            await emit(DeregisterServiceMessage(type=REGISTRY, publisher_id=instance_id,
                                                data=gone), topic(ns, REGISTRY), instance_id)
        except Exception as exc:
            log.warning("could not deregister %s: %s", instance_id, exc)

    async def connect() -> None:
        nonlocal engine, key
        engine = await database.connect(settings.state_url, settings.namespace)
        async with engine.begin() as conn:
            configured = settings.signing_key
            key = await checkpoints.signing_key(
                conn, configured.get_secret_value() if configured else None)

    async def disconnect() -> None:
        if engine is not None:
            await engine.dispose()

    app = FastStream(broker, logger=logging.getLogger("conveyor.app"),
                     on_startup=[connect], after_startup=[register],
                     on_shutdown=[drain, deregister], after_shutdown=[disconnect])
    return health.watched(app, settings)


def __getattr__(name: str) -> FastStream:
    # `faststream run conveyor.services.runtime.app:app` with CONVEYOR_SERVICE_NAME and
    # CONVEYOR_WORKFLOW set builds a workflow service from the environment.
    if name == "app":
        settings = load(RuntimeSettings)
        logs.configure(settings)  # as `conveyor serve` does before it calls create_app
        return create_app(settings)
    raise AttributeError(name)
