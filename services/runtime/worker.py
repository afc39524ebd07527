"""Running one task under llama-index-workflows: its stream, its result, its error."""

import importlib
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python
from workflows import Workflow
from workflows.events import Event

from conveyor.contracts import EventEnvelope, TaskError


class WorkflowNotFound(ImportError):
    """MODULE:ATTR does not name a workflow."""


class ResultNotSerializable(TypeError):
    """The workflow's result or event cannot be sent as JSON."""


def load_workflow(spec: str) -> Workflow:
    """The workflow at MODULE:ATTR: a Workflow instance, or a zero-argument factory of one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise WorkflowNotFound(f"{spec!r} is not of the form MODULE:ATTR")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise WorkflowNotFound(f"cannot load {spec!r}: {exc}") from None
    if isinstance(found, type) and issubclass(found, Workflow):
        found = found()
    elif not isinstance(found, Workflow) and callable(found):
        found = found()
    if not isinstance(found, Workflow):
        raise WorkflowNotFound(f"{spec!r} is {type(found).__name__}, not a workflows.Workflow")
    return found


def envelope(event: Event) -> EventEnvelope:
    """An event as llama-index-workflows' servers serialize it."""
    cls = type(event)
    try:
        value = event.model_dump(mode="json")
    except PydanticSerializationError as exc:
        raise ResultNotSerializable(f"event {cls.__name__} cannot be sent as JSON: {exc}") from None
    return EventEnvelope(
        type=cls.__name__,
        types=[c.__name__ for c in cls.__mro__ if issubclass(c, Event) and c is not cls],
        qualified_name=f"{cls.__module__}.{cls.__name__}",
        value=value,
    )


def jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    try:
        return to_jsonable_python(result)
    except PydanticSerializationError as exc:
        raise ResultNotSerializable(
            f"result of type {type(result).__name__} cannot be sent as JSON: {exc}"
        ) from None


def describe(exc: BaseException) -> TaskError:
    return TaskError(type=type(exc).__name__, message=str(exc))
