"""Topic names: every topic is `<namespace>.<message type>`, and only this module builds them."""

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
_NAME = re.compile(NAME_PATTERN)

CONTROL_PLANE = "control_plane"
REGISTRY = "registry"
QUERY = "query"
DEAD_LETTER = "dead_letter"
REPLY = "reply"
# What workflow services report for the control plane alone to record (streamed events,
# outcomes, status changes): the orchestrator does not read them.
REPORTS = "reports"
# What the orchestrator alone must hear from a workflow service: a failed attempt to retry,
# an ended task that others of its session or service wait for.
ORCHESTRATOR = "orchestrator"

# Message types that are Conveyor's own topics; no workflow service may take one as its name.
RESERVED = frozenset({CONTROL_PLANE, REGISTRY, QUERY, DEAD_LETTER, REPLY, REPORTS, ORCHESTRATOR})


class InvalidName(ValueError):
    """A namespace or service name that cannot be part of a topic."""


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise InvalidName(
            f"{what} {name!r} must start with a letter or digit and hold only letters, "
            "digits, '_' and '-' (at most 100 characters)"
        )
    return name


def topic(namespace: str, message_type: str) -> str:
    """The topic of one message type: `<namespace>.<message type>`."""
    return f"{namespace}.{message_type}"


def service_topic(namespace: str, service: str) -> str:
    """The topic a workflow service consumes its dispatched tasks from."""
    check_name(service, "service name")
    if service in RESERVED:
        raise InvalidName(f"service name {service!r} is reserved for Conveyor's own topics")
    return topic(namespace, service)


def reply_topic(namespace: str, client_id: str) -> str:
    """A client's private reply topic: outcomes and query answers for it arrive here."""
    return topic(namespace, f"{REPLY}.{client_id}")


def broadcast_topic(namespace: str, service: str) -> str:
    """The topic every instance of a service hears: events sent into its tasks."""
    return f"{service_topic(namespace, service)}.broadcast"
