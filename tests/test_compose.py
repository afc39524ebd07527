"""compose.yaml without a Docker engine: valid Compose, real commands, real settings, a
healthcheck for every service; and the README's table of settings."""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from opentelemetry.sdk import environment_variables as otel_variables
from typer.testing import CliRunner
from workflows import Workflow

from conveyor.cli import app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.services.runtime.settings import RuntimeSettings
from conveyor.services.runtime.worker import load_workflow
from conveyor.services.settings import load

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
# What `docker compose up` must start, on RabbitMQ; the kafka profile has a twin of each.
EXPECTED_PARTS = {"control-plane", "orchestrator", "gateway", "echo", "slow", "counter",
                  "greeter", "outer"}
# Services that may have no healthcheck, each with the reason. None may, today.
NO_HEALTHCHECK: dict[str, str] = {}
OTEL_VARIABLES = {value for name, value in vars(otel_variables).items()
                  if name.startswith("OTEL_")}


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def conveyor_services() -> dict[str, dict]:
    """The services built from the project's Dockerfile, i.e. the Conveyor parts."""
    return {name: spec for name, spec in compose()["services"].items() if "build" in spec}


PARTS = sorted(conveyor_services())  # both profiles'
RABBIT_PARTS = sorted(n for n, spec in conveyor_services().items()
                      if spec["profiles"] == ["rabbitmq"])


def broker_of(spec: dict) -> str:
    """The compose service of a part's broker: its profile's."""
    return {"rabbitmq": "rabbitmq", "kafka": "kafka"}[spec["profiles"][0]]


def environment(spec: dict) -> dict[str, str]:
    """A service's environment, in either of Compose's forms (mapping or KEY=VALUE list)."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_words(spec: dict) -> list[str]:
    command = spec.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def resolve(words: list[str]) -> tuple[list[str], Any, list[str]]:
    """Split `conveyor a b --x y` into the subcommand path, its command object, its arguments."""
    command = typer.main.get_command(app)  # typer may vendor click: no isinstance checks
    path: list[str] = []
    rest = list(words)
    while rest and rest[0] in (getattr(command, "commands", None) or {}):
        path.append(rest.pop(0))
        command = command.commands[path[-1]]
    return path, command, rest


def test_compose_file_is_valid_against_the_compose_spec():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail(
            "check-jsonschema is not installed, so compose.yaml cannot be validated: "
            "pip install check-jsonschema",
            pytrace=False,
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"compose.yaml does not validate against the compose-spec:\n{result.stdout}{result.stderr}"
    )


def test_every_conveyor_part_is_a_service_built_from_the_one_dockerfile():
    services = conveyor_services()
    assert EXPECTED_PARTS <= set(services), f"missing: {EXPECTED_PARTS - set(services)}"
    for name, spec in services.items():
        build = spec["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (ROOT / context).resolve() == ROOT, f"{name} builds from {context!r}"
        assert dockerfile == "Dockerfile", f"{name} builds from {dockerfile!r}"
        assert (ROOT / dockerfile).is_file()


@pytest.mark.parametrize("name", PARTS)
def test_each_part_waits_for_healthy_broker_and_state_store(name):
    everything = compose()["services"]
    depends_on = everything[name].get("depends_on") or {}
    for needed in (broker_of(everything[name]), "postgres"):
        assert needed in depends_on, f"{name} does not depend on {needed}"
        assert depends_on[needed].get("condition") == "service_healthy"
        assert "healthcheck" in everything[needed], f"{needed} has no healthcheck"
    assert everything[name].get("restart") == "unless-stopped"


@pytest.mark.parametrize("name", sorted(compose()["services"]))
def test_every_service_has_a_healthcheck(name):
    spec = compose()["services"][name]
    if name in NO_HEALTHCHECK:
        assert "healthcheck" not in spec, f"{name} has one now: drop it from NO_HEALTHCHECK"
        return
    test = (spec.get("healthcheck") or {}).get("test")
    assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
    if "CONVEYOR_HEALTH_FILE" in " ".join(test):
        # The part must be told where to touch it (test_health.py runs the check itself).
        assert environment(spec).get("CONVEYOR_HEALTH_FILE", "").startswith("/"), name


@pytest.mark.parametrize("name", PARTS)
def test_each_command_is_a_real_conveyor_command(name):
    words = command_words(conveyor_services()[name])
    assert words, f"{name} has no command, so it would only print `conveyor --help`"
    assert words[0] == "conveyor", f"{name} runs {words[0]!r}, not conveyor"
    path, command, arguments = resolve(words[1:])
    assert path, f"{name}: {words[1:2]} is not a conveyor command"

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"conveyor {' '.join(path)} --help:\n{result.output}"

    # The arguments must parse as that command's (no unknown options, none missing).
    context = command.make_context(" ".join(["conveyor", *path]), list(arguments))
    if path == ["serve"]:
        assert isinstance(load_workflow(context.params["workflow"]), Workflow)
        assert context.params["name"]


def settings_the_code_reads() -> set[str]:
    prefix = RuntimeSettings.model_config["env_prefix"].upper()
    return {prefix + field.upper()
            for settings in (RuntimeSettings, GatewaySettings) for field in settings.model_fields}


def test_every_conveyor_and_otel_variable_is_a_setting_the_code_reads():
    known = settings_the_code_reads()
    used = {(name, key) for name, spec in compose()["services"].items()
            for key in environment(spec) if key.startswith(("CONVEYOR_", "OTEL_"))}
    assert used, "compose.yaml sets no CONVEYOR_* variable"
    # OTEL_* are read by the OpenTelemetry SDK (OTEL_EXPORTER_OTLP_ENDPOINT by Conveyor too).
    unknown = sorted(f"{name}: {key}" for name, key in used
                     if key not in known and key not in OTEL_VARIABLES)
    assert not unknown, f"not settings of any part ({sorted(known)}): {unknown}"


def test_the_readme_lists_every_setting_the_code_reads():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("\n## ", readme.index(
        "## Configuration") + 1)]
    listed = set(re.findall(r"`(CONVEYOR_[A-Z_]+)`", table))
    assert not settings_the_code_reads() - listed, "missing from README's Configuration table"


@pytest.mark.parametrize("name", ["gateway", "gateway-kafka"])
def test_the_dashboard_links_traces_to_the_jaeger_ui_compose_publishes(name, monkeypatch):
    everything = compose()["services"]
    for key, value in environment(everything[name]).items():
        monkeypatch.setenv(key, value)
    settings = load(GatewaySettings)
    assert settings.broker_url  # the shared environment is kept beside the gateway's own
    jaeger = urlsplit(settings.jaeger_ui_url or "")
    assert jaeger.hostname == "localhost", "the address is opened by a browser on the host"
    assert f"{jaeger.port}:{jaeger.port}" in everything["jaeger"]["ports"]


@pytest.mark.parametrize("name", PARTS)
def test_each_part_environment_is_valid_configuration(name, monkeypatch):
    everything = compose()["services"]
    env = environment(everything[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load(RuntimeSettings)
    broker = broker_of(everything[name])
    assert settings.broker_kind == {"rabbitmq": "rabbit", "kafka": "kafka"}[broker]
    # The broker and the state store are reached by their compose service names.
    hosts = [urlsplit(settings.state_url).hostname]
    hosts += ([urlsplit(settings.broker_url).hostname] if broker == "rabbitmq" else
              [urlsplit(f"//{server}").hostname for server in settings.kafka_servers])
    assert set(hosts) == {broker, "postgres"}, f"{name}: {hosts}"
    # Spans go to Jaeger's OTLP/HTTP port, which Jaeger opens.
    assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://jaeger:4318", name
    assert environment(everything["jaeger"]).get("COLLECTOR_OTLP_ENABLED") == "true"


# The kafka profile

def test_rabbitmq_is_the_default_profile_and_kafka_profile_swaps_the_broker():
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "rabbitmq"
    everything = compose()["services"]
    assert everything["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert everything["kafka"]["profiles"] == ["kafka"]
    assert "healthcheck" in everything["kafka"]
    for name, spec in conveyor_services().items():
        assert spec["profiles"] in (["rabbitmq"], ["kafka"]), f"{name}: {spec['profiles']}"
    # Shared by both: the state store and Jaeger.
    assert "profiles" not in everything["postgres"] and "profiles" not in everything["jaeger"]


def test_the_parts_on_kafka_are_the_parts_on_rabbitmq():
    assert set(EXPECTED_PARTS) <= set(RABBIT_PARTS)
    assert set(PARTS) - set(RABBIT_PARTS) == {f"{name}-kafka" for name in RABBIT_PARTS}


@pytest.mark.parametrize("name", RABBIT_PARTS)
def test_each_part_has_a_kafka_twin_with_the_same_command_healthcheck_and_settings(name):
    everything = compose()["services"]
    rabbit, kafka = everything[name], everything[f"{name}-kafka"]
    assert kafka["profiles"] == ["kafka"] and rabbit["profiles"] == ["rabbitmq"]
    assert command_words(kafka) == command_words(rabbit)
    assert kafka["healthcheck"] == rabbit["healthcheck"]
    assert "rabbitmq" not in kafka["depends_on"]
    # Only the broker differs (the environment of each is checked above).
    differs = {"CONVEYOR_BROKER_URL", "CONVEYOR_KAFKA_IDEMPOTENCE"}
    rabbit_env, kafka_env = environment(rabbit), environment(kafka)
    assert {k: v for k, v in rabbit_env.items() if k not in differs} == {
        k: v for k, v in kafka_env.items() if k not in differs}
