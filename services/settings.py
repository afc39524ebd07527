"""Configuration shared by every Conveyor part, read once from `CONVEYOR_*` variables."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import check_name


class ConfigurationError(RuntimeError):
    """Configuration that cannot work; the text says which setting and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    broker_url: str | None = Field(
        default=None, description="amqp://... selects RabbitMQ, kafka://host:port[,...] Kafka"
    )
    namespace: str = "conveyor"
    state_url: str = f"sqlite:///{Path.cwd() / 'conveyor.db'}"
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_timeout: float = Field(default=10.0, gt=0)
    publish_timeout: float = Field(default=30.0, gt=0, description="seconds a publish keeps "
                                   "retrying while the broker is unreachable before it fails")
    rabbit_queue_type: Literal["classic", "quorum"] = Field(
        default="classic", description="quorum: replicated queues, for a RabbitMQ cluster")
    prefetch: int = Field(
        default=32, ge=1, description="messages the control plane and the orchestrator each "
        "handle at once from the front door (the control plane from its query topic too); "
        "one task's, one session's still one at a time, in order")
    kafka_partitions: int = Field(default=4, ge=1)
    kafka_idempotence: bool = False
    kafka_fetch_wait_ms: int = Field(
        default=10, ge=1, description="longest a Kafka consumer's fetch waits for data: on "
        "the embedded broker a longer wait slows every hop; Apache Kafka answers a waiting "
        "fetch as data arrives, and can take more (fewer idle fetches)")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per log line")
    ttl_completed: float = Field(default=7 * 86400, gt=0, description="seconds a completed "
                                 "task, its events and checkpoint are kept")
    ttl_failed: float = Field(default=30 * 86400, gt=0)
    ttl_cancelled: float = Field(default=7 * 86400, gt=0)
    cleanup_interval: float = Field(default=60.0, gt=0, description="seconds between sweeps "
                                    "for tasks past their TTL")
    health_file: str | None = Field(
        default=None, description="a file the part touches every heartbeat interval while "
        "its event loop runs and its broker connection is up, for container healthchecks")
    signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC key of stored checkpoints; generated once and kept with the state",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_name(cls, value: str) -> str:
        return check_name(value, "CONVEYOR_NAMESPACE")

    @property
    def ttls(self) -> dict[str, float]:
        """Seconds a finished task is kept, by its final status."""
        return {"completed": self.ttl_completed, "failed": self.ttl_failed,
                "cancelled": self.ttl_cancelled}

    @property
    def broker_kind(self) -> Literal["rabbit", "kafka"]:
        url = self.require_broker_url()
        if url.startswith(("amqp://", "amqps://")):
            return "rabbit"
        if url.startswith("kafka://"):
            return "kafka"
        raise ConfigurationError(
            f"CONVEYOR_BROKER_URL {url!r} must start with amqp:// (RabbitMQ) or kafka:// (Kafka)"
        )

    def require_broker_url(self) -> str:
        if not self.broker_url:
            raise ConfigurationError(
                "CONVEYOR_BROKER_URL is not set: use amqp://user:pass@host:5672/ or "
                "kafka://host:9092 (or `conveyor up`, which starts a broker)"
            )
        return self.broker_url

    @property
    def kafka_servers(self) -> list[str]:
        return self.require_broker_url().removeprefix("kafka://").split(",")


def load(settings_class: type[Settings] = Settings, **overrides) -> Settings:
    """Read settings, turning a validation failure into a one-line ConfigurationError."""
    from pydantic import ValidationError

    try:
        return settings_class(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = "CONVEYOR_" + "_".join(str(p) for p in first["loc"]).upper()
        raise ConfigurationError(f"{name}: {first['msg']}") from None
