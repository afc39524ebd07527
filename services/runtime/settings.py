"""Configuration of one workflow service replica."""

from pydantic import Field

from ..settings import Settings


class RuntimeSettings(Settings):
    service_name: str = Field(default="", description="the service's name (--name)")
    workflow: str = Field(default="", description="MODULE:ATTR of the workflow (or its factory)")
    max_concurrent_tasks: int = Field(default=16, ge=1)
