"""contracts/asyncapi.json: generated from the FastStream apps, checked in, never stale."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "export_asyncapi", ROOT / "tools" / "export_asyncapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_asyncapi = _load_tool()


def test_the_checked_in_asyncapi_document_matches_the_apps_and_contracts():
    assert export_asyncapi.ASYNCAPI_FILE.read_text() == export_asyncapi.render()


def test_every_topic_a_part_subscribes_to_is_a_channel_with_json_messages():
    document = json.loads(export_asyncapi.render())
    assert document["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in document["channels"].values()}
    assert {"conveyor.control_plane", "conveyor.registry", "conveyor.query",
            "conveyor.dead_letter", "conveyor.SERVICE", "conveyor.SERVICE.broadcast"} <= addresses
    for message in document["components"]["messages"].values():
        assert message["contentType"] == "application/json"
        assert all(ref["$ref"].startswith("#/components/schemas/")
                   for ref in message["payload"]["oneOf"])


def test_the_front_door_takes_a_new_task_with_its_fields():
    document = json.loads(export_asyncapi.render())
    (front,) = [c for c in document["channels"].values()
                if c["address"] == "conveyor.control_plane"
                and c["bindings"]["amqp"]["queue"]["name"].endswith(".recorder")]
    message = document["components"]["messages"][
        next(iter(front["messages"].values()))["$ref"].rsplit("/", 1)[1]]
    assert {"$ref": "#/components/schemas/NewTaskMessage"} in message["payload"]["oneOf"]
    new_task = document["components"]["schemas"]["NewTask"]
    assert {"service", "input", "reply_to", "task_id"} <= set(new_task["properties"])
