"""Running one task under llama-index-workflows: its stream, its result, its error."""

import importlib
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python
from workflows import Workflow
from workflows.events import Event
from workflows.plugins import BasicRuntime
from workflows.runtime.types.plugin import RegisteredWorkflow

from conveyor.contracts import EventEnvelope, TaskError


class WorkflowNotFound(ImportError):
    """MODULE:ATTR does not name a workflow."""


class ResultNotSerializable(TypeError):
    """The workflow's result or event cannot be sent as JSON."""


class KeptRegistrations(BasicRuntime):
    """llama-index-workflows' own runtime, keeping each workflow's registration.

    BasicRuntime finds no registration kept (`get_registered` is None), so every run
    registers its workflow again, twice: the run function built and every step wrapped,
    about a tenth of an echo workflow's run here. A service's workflow, loaded once, keeps
    its steps; this runtime registers it once, at its first run, and keeps it (and so the
    workflow) for as long as the process runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._kept: dict[int, RegisteredWorkflow] = {}  # by the workflow's id

    def register(self, workflow: Workflow) -> RegisteredWorkflow:
        self._kept[id(workflow)] = registered = super().register(workflow)
        return registered

    def get_registered(self, workflow: Workflow) -> RegisteredWorkflow | None:
        registered = self._kept.get(id(workflow))
        return registered if registered is not None and registered.workflow is workflow else None


def load_workflow(spec: str) -> Workflow:
    """The workflow at MODULE:ATTR: a Workflow instance, or a zero-argument factory of one.
    Made here, it runs on KeptRegistrations (unless it names a runtime of its own)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise WorkflowNotFound(f"{spec!r} is not of the form MODULE:ATTR")
    with KeptRegistrations().registering():
        return _made(spec, module_name, attr)


def _made(spec: str, module_name: str, attr: str) -> Workflow:
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
