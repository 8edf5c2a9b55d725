"""deploy/k8s/: the Kubernetes manifests and the values for the NATS Helm chart, checked
without a cluster: parsed, and held against deploy/Dockerfile, deploy/nats/auth.conf and
the commands of deploy/k8s/README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
K8S = DEPLOY / "k8s"
SERVICES = ("conductor", "weather", "agenda", "brewery")
NAMESPACE = "kapellmeister"
# YAML in deploy/k8s that is not a Kubernetes object.
NOT_OBJECTS = {"kustomization.yaml", "nats-values.yaml"}
# A Kubernetes object left out of the kustomization on purpose: applying it would put
# placeholder passwords over the real ones.
EXAMPLES = {"secret.example.yaml"}


def as_dict(value: object) -> dict[str, Any]:
    assert isinstance(value, dict), value
    return value


def objects() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s, with the name of its file."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name not in NOT_OBJECTS:
            found += [(path.name, as_dict(doc)) for doc in yaml.safe_load_all(path.read_text())]
    return found


def the(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for _, o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def secret_keys(secret: dict[str, Any]) -> set[str]:
    return {*secret.get("data", {}), *secret.get("stringData", {})}


def values() -> dict[str, Any]:
    return as_dict(yaml.safe_load((K8S / "nats-values.yaml").read_text()))


def auth_conf() -> str:
    return (DEPLOY / "nats" / "auth.conf").read_text()


def auth_users() -> list[str]:
    return re.findall(r"user = (\w+)", auth_conf())


def auth_password_variables() -> dict[str, str]:
    """User to the environment variable auth.conf reads its password from."""
    return dict(re.findall(r"user = (\w+), password = \$(\w+)", auth_conf()))


def readme() -> str:
    return (K8S / "README.md").read_text()


def dockerfile_uid() -> int:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    [uid] = re.findall(r"useradd --uid (\d+)", dockerfile)
    assert re.search(rf"^USER {uid}$", dockerfile, re.MULTILINE)
    return int(uid)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


def secret_ref(var: dict[str, Any]) -> tuple[str, str]:
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_every_manifest_is_a_named_object_in_the_namespace():
    assert not list(K8S.glob("*.yml")), "name YAML files *.yaml"
    found = objects()
    assert found
    seen = set()
    for file, obj in found:
        assert isinstance(obj.get("apiVersion"), str), file
        assert isinstance(obj.get("kind"), str), file
        name = obj.get("metadata", {}).get("name")
        assert isinstance(name, str) and name, file
        if obj["kind"] == "Namespace":
            assert name == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, (file, name)
        assert (obj["kind"], name) not in seen, (file, name)
        seen.add((obj["kind"], name))


def test_the_kustomization_applies_every_manifest_but_the_example_secret():
    kustomization = as_dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_OBJECTS
    assert files >= EXAMPLES
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == files - EXAMPLES
    assert all((K8S / name).is_file() for name in listed)
    # What stays out is the Secret alone.
    assert {o["kind"] for file, o in objects() if file in EXAMPLES} == {"Secret"}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_as_its_own_nats_user(service: str):
    deployment = the("Deployment", service)
    pod = deployment["spec"]["template"]
    selector = as_dict(deployment["spec"]["selector"]["matchLabels"])
    assert selector.items() <= as_dict(pod["metadata"]["labels"]).items()
    [container] = pod["spec"]["containers"]
    assert container["image"] == f"kapellmeister/{service}:0.1.0"
    env = env_of(container)
    assert env["NATS_USER"]["value"] == service
    assert env["NATS_INBOX_PREFIX"]["value"] == f"_INBOX_{service}"
    assert env["OTEL_SERVICE_NAME"]["value"] == service
    name, key = secret_ref(env["NATS_PASSWORD"])
    assert key == service
    assert key in secret_keys(the("Secret", name))
    [source] = container["envFrom"]
    settings = the("ConfigMap", source["configMapRef"]["name"])["data"]
    assert {"NATS_URL", "KAPELLMEISTER_REPLICAS"} <= set(settings)
    assert not {"NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX"} & set(settings)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_probed_on_its_health_port(service: str):
    pod = the("Deployment", service)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    health_port = int(env_of(container)["KAPELLMEISTER_HEALTH_PORT"]["value"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == health_port, probe
    # SIGTERM, then KAPELLMEISTER_SHUTDOWN_S to finish, before the kill.
    [source] = container["envFrom"]
    settings = the("ConfigMap", source["configMapRef"]["name"])["data"]
    shutdown_s = float(settings.get("KAPELLMEISTER_SHUTDOWN_S", 8))
    assert pod["terminationGracePeriodSeconds"] > shutdown_s


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_runs_unprivileged_as_the_images_user(service: str):
    pod = the("Deployment", service)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    effective = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == dockerfile_uid()
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_the_conductor_serves_its_metrics_on_a_named_port():
    [container] = the("Deployment", "conductor")["spec"]["template"]["spec"]["containers"]
    port = int(env_of(container)["KAPELLMEISTER_METRICS_PORT"]["value"])
    assert {"name": "metrics", "containerPort": port} in container["ports"]


def test_the_services_reach_the_client_service_of_the_nats_release():
    [(release, namespace)] = re.findall(r"helm install (\S+) nats/nats -n (\S+)", readme())
    assert namespace == NAMESPACE
    settings = the("ConfigMap", "kapellmeister")["data"]
    # The chart names its client Service after the release when the release is `nats`.
    assert release == "nats"
    assert settings["NATS_URL"] == f"nats://{release}.{namespace}.svc:4222"
    assert settings["KAPELLMEISTER_REPLICAS"] == str(values()["config"]["cluster"]["replicas"])
    assert settings["KAPELLMEISTER_LOG_FORMAT"] == "json"
    assert settings["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")


def test_nats_is_a_cluster_of_three_with_jetstream_synced_to_a_volume():
    config = values()["config"]
    assert config["cluster"]["enabled"] is True
    assert config["cluster"]["replicas"] == 3
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert jetstream["merge"]["sync_interval"] == "always"
    assert config["monitor"]["enabled"] is True


def test_nats_includes_auth_conf_and_reads_every_password_from_the_secret():
    users = auth_users()
    assert sorted(users) == sorted(["conductor", "weather", "agenda", "brewery", "client", "admin"])
    variables = auth_password_variables()
    assert sorted(variables) == sorted(users)
    # auth.conf reaches the chart's ConfigMap by --set-file, under the name included.
    [included] = [v for k, v in values()["config"]["merge"].items() if k.endswith("$include")]
    [(key, path)] = re.findall(r"--set-file '?configMap\.merge\.data\.(\S+?)=(\S+?)'?\s", readme())
    assert included == "auth.conf"
    # Helm splits --set keys at dots: the file name's own dot is escaped.
    assert key == included.replace(".", "\\.")
    assert DEPLOY.parent / path == DEPLOY / "nats" / "auth.conf"
    # Each password, and only those, from the Secret the services use.
    env = values()["container"]["env"]
    assert {k for k in env if k.endswith("_PASSWORD")} == set(variables.values())
    for user, variable in variables.items():
        name, key = secret_ref(env[variable])
        assert name == "kapellmeister-nats-users"
        assert key == user
    assert secret_keys(the("Secret", "kapellmeister-nats-users")) == set(users)


def test_the_secret_is_made_of_passwords_nats_server_can_read():
    users = set(auth_users())
    # Letters and digits, starting with a letter: nats-server parses them as values.
    example = the("Secret", "kapellmeister-nats-users")["stringData"]
    for password in example.values():
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", password)
        assert password.lower().startswith("changeme")
    for text in (readme(), (K8S / "secret.example.yaml").read_text()):
        assert "create secret generic kapellmeister-nats-users" in text
        literals = re.findall(r'--from-literal=(\w+)="p\$\(openssl rand -hex \d+\)"', text)
        assert sorted(literals) == sorted(users)


def test_nats_box_speaks_as_the_client_user():
    env = values()["natsBox"]["container"]["env"]
    assert env["NATS_USER"] == "client"
    assert secret_ref(env["NATS_PASSWORD"]) == ("kapellmeister-nats-users", "client")


def test_the_ui_is_the_client_user_behind_a_cluster_ip_service():
    deployment = the("Deployment", "ui")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:2] == ["kapellmeister", "ui"]
    port = int(container["command"][container["command"].index("--port") + 1])
    assert container["image"] == "kapellmeister/conductor:0.1.0"  # the package, UI included
    env = env_of(container)
    assert env["NATS_USER"]["value"] == "client"
    assert secret_ref(env["NATS_PASSWORD"]) == ("kapellmeister-nats-users", "client")
    assert "client" in auth_users()
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {
            "path": "/healthz",
            "port": "http",
            # The UI answers loopback's names only: the kubelet would send the pod IP.
            "httpHeaders": [{"name": "Host", "value": "localhost"}],
        }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = the("Service", "ui")
    assert service["spec"]["type"] == "ClusterIP"  # no login: never exposed by itself
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]
