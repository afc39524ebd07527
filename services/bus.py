"""One code path over RabbitMQ and Kafka: building the FastStream broker, subscribing, publishing.

RabbitMQ: one durable topic exchange per namespace; a subscription is a durable queue
bound to the topic as routing key; messages are persistent and publisher-confirmed.
Kafka: the topic is the topic; a subscription is a consumer group; messages are keyed by
task id and offsets are committed after the handler has finished. What is each broker's own
is in rabbit_bus.py and kafka_bus.py, and a process imports only its broker's.
"""

import asyncio
import functools
import hashlib
import importlib
import logging
import os
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from faststream.exceptions import NackMessage
from faststream.message import StreamMessage
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from conveyor.contracts import MAX_MESSAGE_BYTES, MessageTooLarge, QueueMessage, encode, topic
from conveyor.contracts.topics import (
    CONTROL_PLANE,
    DEAD_LETTER,
    ORCHESTRATOR,
    QUERY,
    REGISTRY,
    REPORTS,
)

from . import telemetry, write_lock
from .settings import Settings

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker
    from faststream.rabbit import RabbitBroker

    Broker: TypeAlias = RabbitBroker | KafkaBroker
else:
    Broker = Any  # each broker's client is imported only where it is used (see _wire)
T = TypeVar("T")
Handler = Callable[[bytes], Awaitable[Any]]

_quiet = logging.getLogger("conveyor.broker")
_quiet.setLevel(logging.WARNING)


def _wire(settings: Settings) -> ModuleType:
    """The module of the broker in use, rabbit_bus or kafka_bus: a process imports the client
    library of its own broker only."""
    return _wire_of(settings.broker_kind)


def import_broker_client(settings: Settings) -> None:
    """Import the client library of the broker in use now rather than at the first broker
    made (`conveyor up` does, before it forks its parts)."""
    _wire(settings)


@functools.cache
def _wire_of(broker_kind: str) -> ModuleType:
    return importlib.import_module(f".{broker_kind}_bus", __package__)


def create_broker(settings: Settings, part: str, *, always_trace: bool = False,
                  middlewares: tuple = ()) -> Broker:
    """The FastStream broker for CONVEYOR_BROKER_URL, with every durability setting on,
    tracing the messages of `part` (see telemetry), and `middlewares` besides."""
    url = settings.require_broker_url()
    common: dict[str, Any] = {
        "logger": _quiet,
        "log_level": logging.DEBUG,
        "middlewares": (*telemetry.middlewares(settings, part, always=always_trace),
                        *middlewares),
        "graceful_timeout": 15.0,
        # Every handler takes the raw body alone and validates it itself (see subscribe):
        # FastDepends' injection and validation of that one argument cost a tenth of
        # FastStream's CPU per message consumed.
        "apply_types": False,
    }
    return _wire(settings).create(settings, url, common)


# The consumer groups of Conveyor's own topics: (message type, the part that consumes it).
SYSTEM_SUBSCRIPTIONS = [
    (CONTROL_PLANE, "recorder"),
    (CONTROL_PLANE, "orchestrator"),
    (REGISTRY, "control_plane"),
    (REGISTRY, "orchestrator"),
    (DEAD_LETTER, "control_plane"),
    (QUERY, "control_plane"),
]


# On RabbitMQ, the routing keys a group's queue is bound with besides its topic's: the
# recorder's queue takes what workflow services report behind the NEW_TASKs, in one FIFO, and
# the orchestrator's what it alone must hear. See reports_topic.
ALSO_BOUND: dict[tuple[str, str], tuple[str, ...]] = {
    (CONTROL_PLANE, "recorder"): (REPORTS,),
    (CONTROL_PLANE, "orchestrator"): (ORCHESTRATOR,),
}


def reports_topic(settings: Settings) -> str:
    """Where workflow services report to the control plane: streamed events, status changes,
    outcomes (and the orchestrator's status changes).

    On RabbitMQ a routing key of its own, which only the recorder's queue is bound with:
    the orchestrator is not handed every event and outcome only to drop it. On Kafka the
    front door itself: there a task's NEW_TASK, its reports and the queries about it share
    one partition (the task id is the key) and are read in order, so that a query sent after
    an outcome has arrived is answered after it is recorded; two topics would lose that.
    """
    return topic(settings.namespace, REPORTS if settings.broker_kind == "rabbit"
                 else CONTROL_PLANE)


def orchestrator_topic(settings: Settings) -> str:
    """Where a workflow service sends what the orchestrator must hear of what it reports (a
    failed attempt to retry, an end that held tasks wait for), as a copy of the report. On
    Kafka the orchestrator reads the reports on the front door already (see reports_topic)."""
    return topic(settings.namespace, ORCHESTRATOR if settings.broker_kind == "rabbit"
                 else CONTROL_PLANE)


def group_name(settings: Settings, message_type: str, part: str) -> str:
    """A consumer group's name; on RabbitMQ it is also the name of the group's queue."""
    return f"{settings.namespace}.{message_type}.{part}"


async def declare_system_topics(broker: Broker, settings: Settings) -> None:
    """Make sure nothing published to Conveyor's own topics is dropped, or lands on a topic
    made wrong, before a part or a client publishes to them.

    RabbitMQ discards a message no queue is bound for, so every part declares (idempotently)
    the durable queues of the control plane and the orchestrator. Kafka keeps a topic's
    messages for groups that join later, but a broker that makes a topic on its first publish
    (Apache Kafka's auto.create.topics.enable; tansu too) gives it its own number of
    partitions (1 on Apache Kafka, 4 on tansu), not CONVEYOR_KAFKA_PARTITIONS: so every part
    and client creates them first (a topic that exists is left as it is).
    """
    if settings.broker_kind == "kafka":
        await _wire(settings).create_topics(broker, settings, sorted({
            topic(settings.namespace, message_type) for message_type, _ in SYSTEM_SUBSCRIPTIONS}))
        return
    await _wire(settings).declare_group_queues(broker, settings, {
        group_name(settings, message_type, part): tuple(
            topic(settings.namespace, read)
            for read in (message_type, *ALSO_BOUND.get((message_type, part), ())))
        for message_type, part in SYSTEM_SUBSCRIPTIONS
    })


async def _raw_body(message: StreamMessage) -> bytes:
    return message.body


def subscribe(
    broker: Broker,
    settings: Settings,
    topic: str,
    group: str | None,
    *,
    concurrency: int = 1,
    quiet: bool = False,
) -> Callable[[Handler], Any]:
    """A subscription of `group` to `topic`; replicas that share a group share the work.

    With `group=None` the subscription is private to this process (a reply topic): on
    RabbitMQ a queue of its own that expires once unused, on Kafka a consumer outside any
    group.
    The handler receives the raw body and validates it itself, so that a malformed
    message is answered and dead-lettered rather than dropped by the framework. A handler
    that raises has the message delivered again; one that keeps raising on the same message
    (a poison message) has it dead-lettered with the reason, and the group moves on.
    A `quiet` topic is one no task's path runs through (see kafka_bus.QUIET_FETCH_WAIT_MS).
    `concurrency` is how many messages the subscription handles at once: on RabbitMQ its
    prefetch, on Kafka the messages its one consumer has in hand (kafka_bus.SeveralAtOnce).
    Handlers are entered in the order of delivery; those of one thing keep their order
    with services/ordering.
    """
    subscriber = _wire(settings).subscriber(broker, settings, topic, group, concurrency, quiet,
                                            _raw_body)
    if group is None:
        return subscriber
    return lambda handler: subscriber(_guarded(broker, settings, topic, handler))


POISON_AFTER = 5  # failures of one message before it is dead-lettered


class Redeliver(NackMessage):
    """Raised by a handler to hand its message back to the broker, to be delivered to
    another consumer of the group (a replica shutting down does so). Never poison, and
    logged as what it is, not as an error with a traceback."""

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    def __str__(self) -> str:
        return f"task {self.task_id} handed back to the broker"


def _guarded(broker: Broker, settings: Settings, topic: str, handler: Handler):
    failures: dict[str, int] = {}
    unreachable = unreachable_errors(settings)

    @functools.wraps(handler)
    async def guarded(body: bytes) -> Any:
        try:
            return await handler(body)
        except Redeliver:
            raise
        except unreachable as exc:
            # Not the message's fault, and not counted against it: it comes again once the
            # broker is back (its handler rolled its transaction back; see write_lock).
            _quiet.warning("handler on %s met an unreachable broker (%s: %s); its message "
                           "comes again", topic, type(exc).__name__, exc)
            await asyncio.sleep(1.0)
            raise
        except Exception as exc:
            key = hashlib.sha256(body).hexdigest()
            failures[key] = count = failures.get(key, 0) + 1
            if count < POISON_AFTER:
                _quiet.warning("handler on %s failed (%d of %d): %s: %s; delivering it again",
                               topic, count, POISON_AFTER, type(exc).__name__, exc)
                await asyncio.sleep(0.05 * 2 ** count)
                raise  # NACK: the broker delivers it again
            del failures[key]
            from .dead_letters import reject

            await reject(broker, settings, body=body, source_topic=topic,
                         error_type="PoisonMessage",
                         reason=f"its handler failed {count} times, last with "
                                f"{type(exc).__name__}: {exc}",
                         publisher_id=f"{topic}@{os.getpid()}")

    return guarded


# The topics no task's path runs through (the registry's heartbeats, dead letters): quiet,
# fetched from with a longer wait on Kafka (see kafka_bus.QUIET_FETCH_WAIT_MS).
QUIET_TOPICS = {REGISTRY, DEAD_LETTER}


def subscribe_system(broker: Broker, settings: Settings, message_type: str, part: str, *,
                     concurrency: int = 1):
    """The subscription of one Conveyor part to one of Conveyor's own topics; `concurrency`
    is how many of its messages the part handles at once (see subscribe)."""
    return subscribe(broker, settings, topic(settings.namespace, message_type),
                     group_name(settings, message_type, part), concurrency=concurrency,
                     quiet=message_type in QUIET_TOPICS)


async def publish(
    broker: Broker,
    settings: Settings,
    message: QueueMessage,
    topic: str,
    *,
    key: str | None = None,
    partition: int | None = None,
    copy_to: tuple[str, ...] = (),
) -> None:
    """Publish durably: confirmed by RabbitMQ, or acknowledged by all Kafka replicas.

    `copy_to` delivers the same message to more topics: on RabbitMQ in the same publish
    (the CC header: one message, one confirm, routed with every key), on Kafka as more
    sends in flight beside the first.

    `partition` pins a Kafka message to one partition: for topics every instance reads
    whole (a broadcast), which are read from partition 0. While the broker is unreachable
    (restarting, connection dropped) the publish is retried with backoff for
    CONVEYOR_PUBLISH_TIMEOUT seconds, then fails with PublishFailed: a message may be sent
    twice (every handler takes duplicates), never silently lost. Inside a transaction that
    holds SQLite's write lock it is tried once, and fails as the broker's client failed
    (see write_lock).
    """
    body = encode(message)
    if len(body) > MAX_MESSAGE_BYTES:  # every consumer would refuse it: refused here, unsent
        raise MessageTooLarge(
            f"{message.action.value} of {len(body)} bytes is over the limit of "
            f"{MAX_MESSAGE_BYTES} bytes; not sent to {topic}")

    async def send() -> None:
        await _send(broker, settings, body, message.id, topic, key, partition, copy_to)

    if write_lock.held():  # tried once: the caller's transaction rolls back if it fails
        await send()
        return
    await through_outages(settings, f"{message.action.value} to {topic}", send)


async def through_outages(settings: Settings, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`, tried again with backoff while it finds the broker unreachable, for
    CONVEYOR_PUBLISH_TIMEOUT seconds; then PublishFailed, naming `what` was not sent.

    For a transaction that publishes (see write_lock): each try rolls back when the broker
    is unreachable, and the next begins anew, so the state store is not locked meanwhile.
    """
    try:
        # The first try goes without building a retrier: a publish seldom meets an outage.
        return await attempt()
    except Exception as exc:
        if not _unreachable(exc, settings):
            raise
        _quiet.warning("publish failed (%s: %s); retrying", type(exc).__name__, exc)
    try:
        async for retry in AsyncRetrying(
            stop=stop_after_delay(settings.publish_timeout),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.2),
            retry=retry_if_exception(functools.partial(_unreachable, settings=settings)),
            before_sleep=_retrying,
        ):
            with retry:
                result = await attempt()
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise PublishFailed(
            f"could not publish {what}: the broker was unreachable for "
            f"{settings.publish_timeout:g} s (CONVEYOR_PUBLISH_TIMEOUT); last error: "
            f"{type(last).__name__}: {last}"
        ) from last
    return result


async def publish_to_any_replica(broker: Broker, settings: Settings, message: QueueMessage,
                                 topic: str, *, key: str) -> None:
    """Publish a dispatch for whichever live replica of its service reads it first.

    On Kafka, by its key it would go to one partition, and there wait for that partition's
    consumer: when that replica is dead or stopping, until the group has moved the partition
    (the session timeout and seconds more). So a copy goes to every partition: a live replica
    takes one at once, and the other copies are skipped wherever they arrive (replicas claim
    an attempt once). A topic made with fewer partitions than CONVEYOR_KAFKA_PARTITIONS
    refuses the copies for the others: this fails only if every copy failed. On RabbitMQ the
    queue hands the one message to any consumer.
    """
    if settings.broker_kind != "kafka":
        await publish(broker, settings, message, topic, key=key)
        return
    sent = await asyncio.gather(*(
        publish(broker, settings, message, topic, key=key, partition=partition)
        for partition in range(settings.kafka_partitions)), return_exceptions=True)
    if all(isinstance(result, BaseException) for result in sent):
        raise sent[0]


def unreachable_errors(settings: Settings) -> tuple[type[BaseException], ...]:
    """What a lost or not yet restored connection to the broker in use raises; anything
    else is not retried."""
    return (ConnectionError, *_wire(settings).UNREACHABLE)


class PublishFailed(ConnectionError):
    """The broker stayed unreachable for CONVEYOR_PUBLISH_TIMEOUT: the message was not sent."""


def _unreachable(exc: BaseException, settings: Settings) -> bool:
    """Worth another try: the broker's client lost its connection (not a publish that has
    waited out its timeout already)."""
    return isinstance(exc, unreachable_errors(settings)) and not isinstance(exc, PublishFailed)


def _retrying(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    _quiet.warning("publish failed (%s: %s); retrying in %.1f s", type(error).__name__, error,
                   state.upcoming_sleep)


async def _send(broker: Broker, settings: Settings, body: bytes, message_id: str, topic: str,
                key: str | None, partition: int | None, copy_to: tuple[str, ...] = ()) -> None:
    await _wire(settings).send(broker, settings, body, message_id, topic, key, partition,
                               copy_to)
