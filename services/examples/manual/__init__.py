"""The scenarios of llama_deploy's manual-orchestration guide, as Conveyor scripts.

Run each in its own terminal, with CONVEYOR_BROKER_URL set (and the same CONVEYOR_STATE_URL
for the first three):

    python -m conveyor.services.examples.manual.deploy_core
    python -m conveyor.services.examples.manual.deploy_workflow
    python -m conveyor.services.examples.manual.deploy_nested
    python -m conveyor.services.examples.manual.run_with_client
    python -m conveyor.services.examples.manual.stream_events
    python -m conveyor.services.examples.manual.run_nested
"""
