"""Conveyor: LlamaIndex workflows as broker-native microservices over RabbitMQ or Kafka."""

from .client import BlockingClient, Client, QueryFailed, TaskCancelled, TaskFailed, TaskOutcome
from .remote import RemoteWorkflow, remote_workflow

__all__ = [
    "BlockingClient",
    "Client",
    "QueryFailed",
    "RemoteWorkflow",
    "TaskCancelled",
    "TaskFailed",
    "TaskOutcome",
    "remote_workflow",
]
