"""Conveyor: LlamaIndex workflows as broker-native microservices over RabbitMQ or Kafka."""

from .client import BlockingClient, Client, QueryFailed, TaskCancelled, TaskFailed, TaskOutcome
from .contracts import MessageTooLarge
from .deploy import deploy_core, deploy_workflow
from .remote import RemoteWorkflow, remote_workflow
from .services.bus import PublishFailed

__all__ = [
    "BlockingClient",
    "Client",
    "MessageTooLarge",
    "PublishFailed",
    "QueryFailed",
    "RemoteWorkflow",
    "TaskCancelled",
    "TaskFailed",
    "TaskOutcome",
    "deploy_core",
    "deploy_workflow",
    "remote_workflow",
]
