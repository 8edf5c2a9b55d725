"""deploy/compose.yaml and deploy/Dockerfile, read as docker would (docker is not needed).

A YAML load, then what `docker compose up` relies on: the NATS server runs the deploy
configuration with the passwords auth.conf reads, each service connects as its own user
with its own inbox, can be scaled, waits for a healthy NATS, and the image checks /readyz.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from kapellmeister.server import find_binary
from tests import deploy

COMPOSE: dict[str, Any] = yaml.safe_load((deploy.DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (deploy.DEPLOY / "Dockerfile").read_text()
AUTH = (deploy.DEPLOY / "nats" / "auth.conf").read_text()
_DEFAULT = re.compile(r"^\$\{(\w+):-([^}]*)\}$")


def default_of(value: str) -> tuple[str, str]:
    """``${NAME:-default}`` → (NAME, default); every secret in the file has this shape."""
    found = _DEFAULT.match(value)
    assert found, f"not ${{NAME:-default}}: {value}"
    return found.group(1), found.group(2)


def test_it_has_nats_jaeger_nats_box_the_ui_and_the_four_services() -> None:
    assert set(SERVICES) == {"nats", "jaeger", "nats-box", "ui", *deploy.SERVICES}


def test_nats_runs_the_deploy_configuration_on_file_storage() -> None:
    nats = SERVICES["nats"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    assert "./nats:/etc/nats:ro" in nats["volumes"]
    assert any(v.endswith(":/data") for v in nats["volumes"])  # store_dir of nats.conf
    assert "store_dir: /data" in (deploy.DEPLOY / "nats" / "nats.conf").read_text()
    assert "js-enabled-only" in " ".join(nats["healthcheck"]["test"])


def test_nats_gets_every_password_auth_conf_reads_and_they_parse() -> None:
    wanted = set(re.findall(r"password = \$(\w+)", AUTH))
    env = SERVICES["nats"]["environment"]
    assert set(env) == wanted == {f"KAPELLMEISTER_{u.upper()}_PASSWORD" for u in deploy.USERS}
    defaults = {}
    for name, value in env.items():
        variable, default = default_of(value)
        assert variable == name
        defaults[name] = default
    # The laptop defaults are valid as nats-server reads them (a string, not a number).
    checked = subprocess.run(
        [find_binary(), "-t", "-c", str(deploy.DEPLOY / "nats" / "nats.conf")],
        env={**deploy.server_env({}), **defaults},
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("name", deploy.SERVICES)
def test_each_service_is_its_own_user_with_its_own_inbox(name: str) -> None:
    service = SERVICES[name]
    assert service["build"] == {
        "context": "..",
        "dockerfile": "deploy/Dockerfile",
        "args": {"SERVICE": name},
    }
    assert (deploy.DEPLOY / service["build"]["context"] / "services" / name).is_dir()
    env = service["environment"]
    assert (env["NATS_URL"], env["NATS_USER"]) == ("nats://nats:4222", name)
    assert env["NATS_INBOX_PREFIX"] == f"_INBOX_{name}"
    # The same variable (and default) the server's user reads.
    variable = f"KAPELLMEISTER_{name.upper()}_PASSWORD"
    assert default_of(env["NATS_PASSWORD"]) == default_of(SERVICES["nats"]["environment"][variable])
    assert env["OTEL_SERVICE_NAME"] == name
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"


@pytest.mark.parametrize("name", deploy.SERVICES)
def test_each_service_scales_and_waits_for_a_healthy_nats(name: str) -> None:
    service = SERVICES[name]
    # --scale needs no fixed container name and no host port.
    assert "container_name" not in service and "ports" not in service
    assert service["depends_on"]["nats"] == {"condition": "service_healthy"}
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_nats_box_is_the_client_user_ready_for_the_nats_cli() -> None:
    box = SERVICES["nats-box"]
    assert box["image"].startswith("natsio/nats-box:")
    env = box["environment"]
    assert (env["NATS_URL"], env["NATS_USER"]) == ("nats://nats:4222", "client")
    client = SERVICES["nats"]["environment"]["KAPELLMEISTER_CLIENT_PASSWORD"]
    assert default_of(env["NATS_PASSWORD"]) == default_of(client)


def test_jaeger_takes_otlp_and_shows_its_ui() -> None:
    jaeger = SERVICES["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])


def test_the_image_runs_as_a_user_and_checks_readyz_on_its_health_port() -> None:
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) == 2  # build stage, then the image
    runtime = DOCKERFILE.split("\nFROM ")[-1]  # the last stage is the image
    assert re.search(r"^USER 10001$", runtime, re.M)
    assert "useradd --uid 10001" in runtime
    port = re.search(r"KAPELLMEISTER_HEALTH_PORT=(\d+)", runtime)
    assert port is not None
    assert f"EXPOSE {port.group(1)}" in runtime
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", runtime, re.M | re.S)
    assert healthcheck is not None
    assert f"http://127.0.0.1:{port.group(1)}/readyz" in healthcheck.group(1)
    assert 'exec python -m services.\\"$SERVICE\\"' in runtime


def test_the_ui_is_the_client_user_on_this_machine_only_with_links_to_jaeger() -> None:
    ui = SERVICES["ui"]
    assert ui["command"][:2] == ["kapellmeister", "ui"]
    port = ui["command"][ui["command"].index("--port") + 1]
    assert ui["ports"] == [f"127.0.0.1:{port}:{port}"]  # published on loopback only
    env = ui["environment"]
    assert (env["NATS_URL"], env["NATS_USER"]) == ("nats://nats:4222", "client")
    client = SERVICES["nats"]["environment"]["KAPELLMEISTER_CLIENT_PASSWORD"]
    assert default_of(env["NATS_PASSWORD"]) == default_of(client)
    jaeger_port = SERVICES["jaeger"]["ports"][0].split(":")[0]
    assert env["KAPELLMEISTER_TRACE_URL"] == f"http://localhost:{jaeger_port}/trace/{{trace_id}}"
    # Its own health check: the image's asks /readyz of a service, which the UI is not.
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(ui["healthcheck"]["test"])
    assert ui["read_only"] is True and ui["cap_drop"] == ["ALL"]
