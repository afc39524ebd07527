"""What a workflow service tells the control plane about its workflow when it registers:
the JSON Schemas of its start, stop and other events and its graph, for the gateway to
serve without ever importing the workflow."""

import logging
from typing import Any

from workflows import Workflow
from workflows.events import Event
from workflows.representation.build import get_workflow_representation

from .task_run import accepted_events

log = logging.getLogger("conveyor.runtime")


def describe_workflow(workflow: Workflow) -> dict[str, Any]:
    """start_schema, stop_schema, event_schemas (one per event type) and graph."""
    kinds: list[type[Event]] = [*workflow.events, *accepted_events(workflow).values()]
    unique = list(dict.fromkeys(kinds))
    try:
        graph = get_workflow_representation(workflow).model_dump(mode="json")
    except Exception as exc:  # a graph the library cannot draw still leaves a service
        log.warning("no graph of the workflow: %s: %s", type(exc).__name__, exc)
        graph = None
    return {
        "start_schema": workflow.start_event_class.model_json_schema(),
        "stop_schema": workflow.stop_event_class.model_json_schema(),
        "event_schemas": [kind.model_json_schema() for kind in unique],
        "graph": graph,
    }
