"""Conveyor: LlamaIndex workflows as broker-native microservices over RabbitMQ or Kafka."""

from .client import BlockingClient, Client, QueryFailed, TaskCancelled, TaskFailed, TaskOutcome

__all__ = [
    "BlockingClient",
    "Client",
    "QueryFailed",
    "TaskCancelled",
    "TaskFailed",
    "TaskOutcome",
]
