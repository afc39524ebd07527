"""Write contracts/asyncapi.json: every topic and message of Conveyor, as AsyncAPI 3.0.

The channels, operations and RabbitMQ bindings are FastStream's own description of the
control plane, the orchestrator and a workflow service (built with the RabbitMQ broker,
the namespace `conveyor` and a service named `SERVICE`); each payload, which those apps
take as raw bytes to validate themselves, is replaced by the JSON Schema of the messages
that topic carries, from the contracts. Run after changing a subscription or a message;
`--check` only reports drift.
"""

import argparse
import json
import sys
import uuid
from pathlib import Path
from unittest import mock

from faststream.specification import AsyncAPI
from pydantic.json_schema import models_json_schema

from conveyor.contracts import TYPED_MESSAGES, Action

ASYNCAPI_FILE = Path(__file__).resolve().parent.parent / "contracts" / "asyncapi.json"
NAMESPACE, SERVICE = "conveyor", "SERVICE"
REF = "#/components/schemas/{model}"

# What each topic carries, by the topic's address.
CARRIED = {
    f"{NAMESPACE}.control_plane": [
        Action.NEW_TASK, Action.TASK_STREAM, Action.COMPLETED_TASK, Action.TASK_STATUS,
        Action.SEND_EVENT, Action.CANCEL_TASK, Action.PAUSE_TASK, Action.RESUME_TASK,
        Action.QUERY,
    ],
    f"{NAMESPACE}.registry": [
        Action.REGISTER_SERVICE, Action.HEARTBEAT, Action.DEREGISTER_SERVICE],
    f"{NAMESPACE}.query": [Action.QUERY],
    f"{NAMESPACE}.dead_letter": [Action.DEAD_LETTER],
    f"{NAMESPACE}.{SERVICE}": [Action.DISPATCH_TASK],
    f"{NAMESPACE}.{SERVICE}.broadcast": [
        Action.SEND_EVENT, Action.CANCEL_TASK, Action.PAUSE_TASK],
}
REPLIES = [Action.COMPLETED_TASK, Action.TASK_STREAM, Action.QUERY_RESULT]


def _brokers() -> list:
    from conveyor import Client
    from conveyor.services.control_plane.app import create_app as control_plane
    from conveyor.services.orchestrator.app import create_app as orchestrator
    from conveyor.services.runtime.app import create_app as runtime
    from conveyor.services.runtime.settings import RuntimeSettings
    from conveyor.services.settings import Settings, load

    common = {"broker_url": "amqp://guest:guest@localhost:5672/", "namespace": NAMESPACE}
    service = load(RuntimeSettings, **common, service_name=SERVICE,
                   workflow="conveyor.services.examples.echo:workflow")
    # Private queues are named with random ids: zeros here, for a document that is the same
    # every time it is made (a Client's reply topic is one of them: a workflow service's own,
    # for nested workflows, is subscribed only on its first call).
    with mock.patch("uuid.uuid4", return_value=uuid.UUID(int=0)):
        apps = [control_plane(load(Settings, **common)),
                orchestrator(load(Settings, **common)), runtime(service)]
        client = Client(settings=load(Settings, **common))
    return [app.broker for app in apps] + [client._broker]


def render() -> str:
    by_action = {m.model_fields["action"].default: m for m in TYPED_MESSAGES}
    _, definitions = models_json_schema(
        [(model, "validation") for model in TYPED_MESSAGES], ref_template=REF)
    document = json.loads(AsyncAPI(
        *_brokers(), title="Conveyor", version="1",
        description="Every topic Conveyor's parts subscribe to and the messages on it. "
        "Topics are `<namespace>.<message type>` (here the namespace `conveyor` and a "
        "workflow service `SERVICE`); on Kafka the address is the topic. Outcomes, "
        "streamed events and query results go to the `reply_to` topic a message names: "
        f"{', '.join(a.value for a in REPLIES)}. On RabbitMQ, workflow services report "
        f"streamed events, status changes and outcomes with the routing key "
        f"`{NAMESPACE}.reports`, which only the control plane's recorder queue is bound "
        f"with, and copy to `{NAMESPACE}.orchestrator` what the orchestrator must hear (a "
        "retry, an end that held tasks wait for); on Kafka both go to the front door.",
    ).to_specification().to_json())
    components = document["components"]
    components["schemas"] = definitions["$defs"]
    _add_bindings(document)
    for channel in document["channels"].values():
        address = channel["address"]
        carried = REPLIES if address.startswith(f"{NAMESPACE}.reply.") else CARRIED.get(address)
        if carried is None:
            raise ValueError(f"no contract says what {address!r} carries")
        for reference in channel["messages"].values():
            message = components["messages"][reference["$ref"].rsplit("/", 1)[1]]
            message["payload"] = {"oneOf": [
                {"$ref": REF.format(model=by_action[action].__name__)} for action in carried]}
            message["contentType"] = "application/json"
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _add_bindings(document: dict) -> None:
    """The routing keys a group's queue is bound with besides its topic's (made when the
    parts declare Conveyor's queues, not by a subscriber): workflow services' reports to
    the control plane, the copies of them the orchestrator must hear."""
    from conveyor.services.bus import ALSO_BOUND, group_name
    from conveyor.services.settings import Settings, load

    settings = load(Settings, broker_url="amqp://localhost", namespace=NAMESPACE)
    queues = {group_name(settings, message_type, part): keys
              for (message_type, part), keys in ALSO_BOUND.items()}
    for operation in document["operations"].values():
        channel = document["channels"][operation["channel"]["$ref"].rsplit("/", 1)[1]]
        keys = queues.get(channel["bindings"]["amqp"]["queue"]["name"], ())
        operation["bindings"]["amqp"]["cc"] += [f"{NAMESPACE}.{key}" for key in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if contracts/asyncapi.json is out of date")
    args = parser.parse_args(argv)
    wanted = render()
    current = ASYNCAPI_FILE.read_text(encoding="utf-8") if ASYNCAPI_FILE.exists() else None
    if args.check:
        if current != wanted:
            print(f"{'stale' if current else 'missing'}: {ASYNCAPI_FILE}; "
                  "run: python tools/export_asyncapi.py")
            return 1
        return 0
    if current != wanted:
        ASYNCAPI_FILE.write_text(wanted, encoding="utf-8")
        print(f"wrote: {ASYNCAPI_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
