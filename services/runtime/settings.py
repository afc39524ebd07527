"""Configuration of one workflow service replica."""

from pydantic import Field

from ..retries import RetryPolicy
from ..settings import Settings


class RuntimeSettings(Settings):
    service_name: str = Field(default="", description="the service's name (--name)")
    workflow: str = Field(default="", description="MODULE:ATTR of the workflow (or its factory)")
    max_concurrent_tasks: int = Field(default=32, ge=1, description="tasks this replica runs "
                                      "at once")
    service_max_concurrent_tasks: int | None = Field(
        default=None, ge=1, description="tasks of the service that run at once across all its "
        "replicas (the orchestrator holds the others back); unset: no limit")
    max_retries: int = Field(default=0, ge=0, le=100, description="attempts after a failed one")
    retry_backoff: float = Field(default=1.0, ge=0, description="seconds before the 1st retry")
    retry_backoff_max: float = Field(default=60.0, ge=0)
    not_retried: str = Field(default="", description="exception type names never retried, "
                             "comma-separated")
    step_timeout: float | None = Field(default=None, gt=0, description="seconds a step may run")
    task_timeout: float | None = Field(default=None, gt=0,
                                       description="seconds one attempt may run")
    grace_period: float = Field(default=10.0, ge=0, description="seconds a stopping replica "
                                "lets its tasks finish before it hands them back")

    def retry_policy(self, max_retries: int | None = None) -> RetryPolicy:
        """The service's policy; a task may ask for its own number of retries."""
        return RetryPolicy(
            max_retries=self.max_retries if max_retries is None else max_retries,
            backoff=self.retry_backoff,
            backoff_max=self.retry_backoff_max,
            not_retried=frozenset(n.strip() for n in self.not_retried.split(",") if n.strip()),
        )
