"""deploy/: the compose file wires every service to NATS and to Jaeger, and the image is
small and unprivileged (checked without docker: parsed and read)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
SERVICES = ("conductor", "weather", "agenda", "brewery")


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_every_service_reaches_nats_and_exports_its_traces_to_jaeger():
    services = compose()["services"]
    assert {"nats", "jaeger", *SERVICES} <= set(services)
    for name in SERVICES:
        service = services[name]
        env = service["environment"]
        assert env["NATS_URL"] == "nats://nats:4222"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert env["OTEL_SERVICE_NAME"] == name
        assert service["build"]["args"] == {"SERVICE": name}
        assert (DEPLOY.parent / service["build"]["context"].removeprefix("../")).is_dir()
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert {"nats", "jaeger"} <= set(service["depends_on"])


def test_jaeger_takes_otlp_and_shows_its_ui_and_nats_keeps_jetstream_on_disk():
    services = compose()["services"]
    jaeger = services["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])
    nats = services["nats"]
    assert "--jetstream" in nats["command"]
    store = nats["command"][nats["command"].index("--store_dir") + 1]
    assert any(volume.endswith(f":{store}") for volume in nats["volumes"])


def test_the_image_is_multi_stage_and_runs_unprivileged():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2
    [user] = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user not in {"0", "root"}
    assert 'python -m services.\\"$SERVICE\\"' in dockerfile
