"""The `conveyor` command: run each part, publish tasks, look at tasks and services."""

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from conveyor import running
from conveyor.contracts import InvalidName
from conveyor.services import logs
from conveyor.services.settings import ConfigurationError, load

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Conveyor: LlamaIndex workflows as broker-native microservices.")
tasks_app = typer.Typer(no_args_is_help=True, help="Look at tasks and dead letters.")
app.add_typer(tasks_app, name="tasks")
console = Console()
errors = Console(stderr=True, soft_wrap=True)


def fail(reason: object) -> None:
    # Clients that never connected are reported again as "unclosed" when collected at exit;
    # the reason below says all there is to say.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    errors.print(f"conveyor: {reason}", markup=False, highlight=False)
    raise typer.Exit(1)


def _serve(make_app: Callable[[], Any]) -> None:
    """Build a FastStream app and run it until SIGINT/SIGTERM; one line and exit 1 on failure."""
    try:
        logs.configure(load())
        faststream_app = make_app()
    except (ConfigurationError, InvalidName, ImportError) as exc:
        fail(exc)
    faststream_app.after_startup(running.settle_heap)
    async def run() -> None:
        try:
            await faststream_app.run()
        except Exception:
            # A part that failed to start still closes what it opened, so that the
            # reason stays the last line printed.
            with suppress(Exception):
                await faststream_app.broker.stop()
            raise

    try:
        running.run(run())
    except (ConfigurationError, InvalidName) as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        fail(f"cannot run: {type(exc).__name__}: {exc}")


@app.command("control-plane")
def control_plane() -> None:
    """Run the control plane: task records, event logs, registry, dead letters, queries."""
    from conveyor.services.control_plane.app import create_app

    _serve(create_app)


@app.command()
def orchestrator() -> None:
    """Run the orchestrator: dispatches each task to its service."""
    from conveyor.services.orchestrator.app import create_app

    _serve(create_app)


@app.command()
def serve(
    workflow: Annotated[str, typer.Argument(help="MODULE:ATTR of a Workflow or its factory")],
    name: Annotated[str, typer.Option("--name", help="the service's name")],
    max_concurrent_tasks: Annotated[
        int | None, typer.Option(help="tasks this replica runs at once")] = None,
    service_max_concurrent_tasks: Annotated[
        int | None, typer.Option(help="tasks of the service that run at once across all its "
                                 "replicas")] = None,
) -> None:
    """Run a workflow service: one replica of the workflow at MODULE:ATTR."""
    from conveyor.services.runtime.app import create_app
    from conveyor.services.runtime.settings import RuntimeSettings

    def make():
        overrides: dict[str, Any] = {"workflow": workflow, "service_name": name}
        if max_concurrent_tasks is not None:
            overrides["max_concurrent_tasks"] = max_concurrent_tasks
        if service_max_concurrent_tasks is not None:
            overrides["service_max_concurrent_tasks"] = service_max_concurrent_tasks
        return create_app(load(RuntimeSettings, **overrides))

    _serve(make)


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="address to listen on [default: 127.0.0.1]")]
    = None,
    port: Annotated[int | None, typer.Option(help="port to listen on [default: 8080]")] = None,
) -> None:
    """Run the HTTP gateway: the LlamaIndex workflow server's protocol over Conveyor tasks."""
    import uvicorn

    from conveyor.services.gateway.app import create_app, gateway_client
    from conveyor.services.gateway.settings import GatewaySettings

    overrides = {"gateway_host": host, "gateway_port": port}
    try:
        settings = load(GatewaySettings, **{k: v for k, v in overrides.items() if v is not None})
        logs.configure(settings)
        settings.require_broker_url()
    except ConfigurationError as exc:
        fail(exc)

    async def run() -> None:
        client = gateway_client(settings)
        try:
            await client.start()
        except Exception:
            with suppress(Exception):
                await client.close()
            raise
        # Conveyor's logging stays in charge (log_config=None); a stream still open at
        # SIGTERM gets a few seconds, not forever.
        server = uvicorn.Server(uvicorn.Config(
            create_app(settings, client), host=settings.gateway_host,
            port=settings.gateway_port, log_config=None, timeout_graceful_shutdown=5))
        running.settle_heap()  # its broker client started and its app built, as in _serve
        try:
            await server.serve()
        finally:
            await client.close()
        if not server.started:
            raise RuntimeError(f"nothing listens on {settings.gateway_host}:"
                               f"{settings.gateway_port} (see the log above)")

    try:
        running.run(run())
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        fail(f"cannot run: {type(exc).__name__}: {exc}")


@app.command()
def up(
    services: Annotated[
        list[str] | None,
        typer.Option("--service", help="NAME=MODULE:ATTR to serve (repeatable); default: examples"),
    ] = None,
) -> None:
    """Run everything on this machine: a broker if none is configured, and every part."""
    from conveyor.up import run_everything

    try:
        code = run_everything(services or [])
    except ConfigurationError as exc:
        fail(exc)
    raise typer.Exit(code)


def _client_call(action: Callable[[Any], Any]) -> Any:
    from conveyor.client import Client

    async def go():
        try:
            async with Client() as client:
                return await action(client)
        except (ConfigurationError, TimeoutError) as exc:
            fail(exc)
        except Exception as exc:
            if isinstance(exc, typer.Exit):
                raise
            fail(f"{type(exc).__name__}: {exc}")

    return running.run(go())


def _print_line(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")
    sys.stdout.flush()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@app.command()
def publish(
    service: Annotated[str, typer.Argument(help="the workflow service to run")],
    input: Annotated[str, typer.Option("--input", help="the start event's fields, as JSON")] = "{}",
    session: Annotated[str | None, typer.Option("--session", help="session id")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", help="idempotency key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait and print the result")] = False,
    stream: Annotated[bool, typer.Option(
        "--stream", help="print each event as a JSON line as it comes, then the result")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most")] = None,
) -> None:
    """Publish a NEW_TASK; print its task id, or with --wait its result."""
    try:
        arguments = json.loads(input)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    if not isinstance(arguments, dict):
        fail("--input must be a JSON object of the start event's fields")
    from conveyor.client import TaskFailed

    async def go(client):
        new_id = await client.run_nowait(service, session_id=session, task_id=task_id, **arguments)
        if stream:
            async with asyncio.timeout(timeout):
                async for item in client.stream(new_id):
                    _print_line({"index": item.index, "event": item.event.model_dump()})
        elif not wait:
            return new_id
        try:
            return await client.result(new_id, timeout=timeout)
        except TaskFailed as exc:
            fail(exc)

    result = _client_call(go)
    if wait or stream:
        _print_json(result)
    else:
        sys.stdout.write(f"{result}\n")


@app.command("services")
def list_services() -> None:
    """List registered services and their instances with liveness."""
    found = _client_call(lambda client: client.list_services())
    table = Table("service", "instance", "alive", "running", "last heartbeat")
    for service in found:
        if not service["instances"]:
            table.add_row(service["name"], "-", "-", "-", "-")
        for instance in service["instances"]:
            table.add_row(service["name"], instance["instance_id"],
                          "yes" if instance["alive"] else "no", str(instance["running"]),
                          instance["last_heartbeat"] or "-")
    console.print(table)


@tasks_app.command("list")
def tasks_list(
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    status: Annotated[str | None, typer.Option(help="only this status")] = None,
    session: Annotated[str | None, typer.Option(help="only this session")] = None,
    owner: Annotated[str | None, typer.Option(help="only those this publisher_id started")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
) -> None:
    """List tasks, newest first."""
    found = _client_call(lambda client: client.list_tasks(
        service=service, status=status, session_id=session, owner=owner, limit=limit))
    table = Table("task", "service", "status", "attempts", "created", "error")
    for task in found:
        error = task["error"] or {}
        table.add_row(task["task_id"], task["service"], task["status"], str(task["attempts"]),
                      task["created_at"] or "-", error.get("type", ""))
    console.print(table)


@tasks_app.command("show")
def tasks_show(task_id: str) -> None:
    """Show one task's record as JSON."""
    found = _client_call(lambda client: client.get_task(task_id))
    if found is None:
        fail(f"no task {task_id!r}")
    _print_json(found)


@tasks_app.command("checkpoint")
def tasks_checkpoint(task_id: str) -> None:
    """Show a task's last checkpoint: attempt, steps taken, size in bytes, when."""
    found = _client_call(lambda client: client.checkpoint(task_id))
    if found is None:
        fail(f"task {task_id!r} has no checkpoint")
    _print_json(found)


@tasks_app.command("events")
def tasks_events(
    task_id: str,
    after: Annotated[int, typer.Option(help="only the events after this index")] = -1,
) -> None:
    """Print a task's streamed events as JSON lines, from the durable log and then live."""

    async def go(client):
        async for item in client.stream(task_id, after=after):
            _print_line({"index": item.index, "event": item.event.model_dump()})

    _client_call(go)


@tasks_app.command("send-event")
def tasks_send_event(
    task_id: str,
    event_type: Annotated[str, typer.Argument(help="the event's type, e.g. HumanResponseEvent")],
    value: Annotated[str, typer.Option("--value", help="the event's fields, as JSON")] = "{}",
) -> None:
    """Send an event into a running task (human in the loop)."""
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as exc:
        fail(f"--value is not JSON: {exc}")
    seq = _client_call(lambda client: client.send_event(
        task_id, {"type": event_type, "value": fields}))
    sys.stdout.write(f"sent as event {seq} of task {task_id}\n")


def _steer(call: Callable[[Any], Any], done: str, nothing_to_do: str) -> None:
    sys.stdout.write((done if _client_call(call) else nothing_to_do) + "\n")


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: str,
    reason: Annotated[str, typer.Option(help="why, kept with the task")] = "cancelled by request",
) -> None:
    """Cancel a task (and its inner tasks): queued, it never starts; running, it stops."""
    _steer(lambda client: client.cancel(task_id, reason=reason),
           f"cancelled {task_id}", f"{task_id} had already ended")


@tasks_app.command("delete")
def tasks_delete(task_id: str) -> None:
    """Delete an ended task's record, event log and checkpoint now rather than at its TTL."""
    if not _client_call(lambda client: client.delete_task(task_id)):
        fail(f"no task {task_id!r}")
    sys.stdout.write(f"deleted {task_id}\n")


@tasks_app.command("pause")
def tasks_pause(task_id: str) -> None:
    """Pause a task: its worker checkpoints and lets go of it until `tasks resume`."""
    _steer(lambda client: client.pause(task_id),
           f"paused {task_id}", f"{task_id} had ended or was paused already")


@tasks_app.command("resume")
def tasks_resume(task_id: str) -> None:
    """Resume a paused task from its last checkpoint."""
    _steer(lambda client: client.resume(task_id),
           f"resumed {task_id}", f"{task_id} was not paused")


@tasks_app.command("pending")
def tasks_pending() -> None:
    """Per service, how many tasks are queued, running, retrying or paused."""
    found = _client_call(lambda client: client.pending_work())
    table = Table("service", "queued", "running", "retrying", "paused")
    for service, counts in sorted(found.items()):
        table.add_row(service, *(str(counts.get(s, 0))
                                 for s in ("queued", "running", "retrying", "paused")))
    console.print(table)


@tasks_app.command("dead-letters")
def tasks_dead_letters(limit: Annotated[int, typer.Option(help="at most this many")] = 50) -> None:
    """List dead letters, newest first: what was rejected and why."""
    found = _client_call(lambda client: client.dead_letters(limit=limit))
    table = Table("received", "topic", "error", "reason", "task")
    for letter in found:
        table.add_row(letter["received_at"] or "-", letter["topic"], letter["error_type"] or "",
                      letter["reason"], letter["task_id"] or "")
    console.print(table)


def main() -> None:
    app()
