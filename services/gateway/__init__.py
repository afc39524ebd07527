"""The HTTP gateway: the LlamaIndex workflow-server protocol over Conveyor tasks."""
