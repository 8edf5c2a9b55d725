"""deploy/nats: every configuration is valid, and its users are least privilege.

A nats-server runs ``deploy/nats/nats.conf`` on loopback (tests/deploy.py says what
differs), the four services run as processes under their own users, and each forbidden
action is refused by the server and changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer, find_binary
from tests import deploy
from tests.support import (
    body,
    call,
    event_stream,
    free_port,
    http_get,
    http_request,
    saga,
    wait_finished,
)

pytestmark = pytest.mark.e2e


class Secured(msgspec.Struct):
    url: str
    passwords: dict[str, str]
    health_ports: dict[str, int]


@pytest.mark.parametrize("config", deploy.NATS_CONFIGS, ids=lambda p: p.name)
def test_nats_server_accepts_every_configuration_in_deploy(config: Path) -> None:
    env = deploy.server_env(deploy.passwords(), NATS_SERVER_NAME="nats-1")
    checked = subprocess.run(
        [find_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert "is valid" in checked.stdout + checked.stderr


def test_a_configuration_without_the_passwords_in_its_environment_is_refused() -> None:
    """No password has a default: a server started without them does not start."""
    env = deploy.server_env({})
    config = deploy.DEPLOY / "nats" / "nats.conf"
    checked = subprocess.run(
        [find_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True
    )
    assert checked.returncode != 0
    assert "KAPELLMEISTER_" in checked.stderr


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """The deploy server and the four services under their own users, for this module."""
    root = tmp_path_factory.mktemp("secured")
    passwords = deploy.passwords()
    configs = deploy.nats_configs(root / "conf", root / "jetstream")
    server = EmbeddedServer(
        root / "server", config_file=configs / "nats.conf", env=deploy.server_env(passwords)
    )
    server.start()
    # As in the image: /livez and /readyz on a port of their own (on loopback here).
    ports = {name: free_port() for name in deploy.SERVICES}
    processes = [
        ServiceProcess(
            name,
            server.url,
            root / f"{name}.log",
            env=deploy.service_env(
                name,
                passwords,
                KAPELLMEISTER_HEALTH_PORT=str(ports[name]),
                KAPELLMEISTER_HEALTH_HOST="127.0.0.1",
            ),
        ).start()
        for name in deploy.SERVICES
    ]
    try:
        asyncio.run(_wait_for(server.url, passwords, processes))
        yield Secured(url=server.url, passwords=passwords, health_ports=ports)
    finally:
        for process in processes:
            process.stop()
        server.stop()


async def _wait_for(url: str, passwords: dict[str, str], processes: list[ServiceProcess]) -> None:
    nc = await nats.connect(url, user="client", password=passwords["client"])
    try:
        await wait_for_services(nc, list(deploy.SERVICES), processes=processes)
    finally:
        await nc.close()


class Session:
    """A connection as one user, with the errors the server sent it."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=1.0)
        self.errors = errors

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]

    async def refused(self, subject: str) -> None:
        """The server has said this user may not use ``subject``."""
        for _ in range(100):
            if any(subject.lower() in v.lower() for v in self.violations()):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {subject}: {self.errors}")

    async def publish_refused(self, subject: str, payload: bytes = b"{}") -> None:
        """A JetStream publish on ``subject`` gets no ack, and the server says why."""
        with pytest.raises((TimeoutError, nats.errors.Error)):
            await self.js.publish(subject, payload)
        await self.refused(subject)


@pytest.fixture
async def connect(secured: Secured) -> AsyncIterator[Any]:
    opened: list[Client] = []

    async def as_user(user: str, inbox_prefix: str | None = None) -> Session:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options: dict[str, Any] = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
        nc = await nats.connect(
            secured.url,
            user=user,
            password=secured.passwords[user],
            error_cb=on_error,
            name=f"test as {user}",
            **options,
        )
        opened.append(nc)
        return Session(nc, errors)

    yield as_user
    for nc in opened:
        await nc.close()


async def last_seq(session: Session, stream: str) -> int:
    return int((await session.js.stream_info(stream)).state.last_seq)


async def test_the_services_work_under_their_own_users(connect):
    client = await connect("client")
    nc, js = client.nc, client.js
    free_saturday = {"user": "ann", "datetime": "2026-11-21T12:00:00"}
    await call(nc, "conductor.start.plan_day", free_saturday, {"Workflow-Id": "sec-plan"})
    await call(nc, "conductor.start.approval", {"money": 10}, {"Workflow-Id": "sec-approve"})
    for ref in ("approval_1", "approval_2"):
        await call(nc, f"conductor.signal.sec-approve.{ref}", {"status": "ok", "approver": ref})
    order = {"drink": "beer", "style": "IPA"}
    await call(nc, "conductor.start.drinks", order, {"Workflow-Id": "sec-drink"})
    states = await wait_finished(js, ["sec-plan", "sec-approve", "sec-drink"], timeout=30)
    assert {wid: s["status"] for wid, s in states.items()} == dict.fromkeys(states, "COMPLETED")
    # The agenda's actors consumed and emitted their events under the agenda's user.
    assert await _stored_on(js, "events.activity.tallied") >= 1
    assert await _stored_on(js, "events.notification.sent") >= 1
    assert client.violations() == []


async def _stored_on(js, subject: str, timeout: float = 15.0) -> int:
    for _ in range(int(timeout / 0.1)):
        info = await js.stream_info("EVENTS", subjects_filter=subject)
        if info.state.messages:
            return int(info.state.messages)
        await asyncio.sleep(0.1)
    return 0


async def test_a_connection_without_credentials_is_refused(secured):
    """No no_auth_user: the server says so to a CONNECT without credentials (spoken
    by hand: nats-py leaks its socket when a connect is refused)."""
    host, port = secured.url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = await reader.readline()
        assert info.startswith(b"INFO ") and b'"auth_required":true' in info
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"-ERR 'Authorization Violation'"), answer


async def test_an_agent_cannot_write_the_workflows_bucket(connect):
    weather = await connect("weather", "_INBOX_weather")
    before = await last_seq(weather, "KV_workflows")
    await weather.publish_refused("$KV.workflows.forged", b'{"status": "COMPLETED"}')
    assert await last_seq(weather, "KV_workflows") == before


async def test_a_user_cannot_publish_tasks_or_results_or_write_kv(connect):
    client = await connect("client")
    tasks, results = await last_seq(client, "TASKS"), await last_seq(client, "RESULTS")
    for subject in ("tasks.weather.report", "results.sec-plan.weather.report", "$KV.tasks.x"):
        await client.publish_refused(subject)
    assert (await last_seq(client, "TASKS"), await last_seq(client, "RESULTS")) == (
        tasks,
        results,
    )


async def test_an_agent_cannot_read_another_agents_tasks(connect):
    weather = await connect("weather", "_INBOX_weather")
    # Pull from the agenda's consumer, make a consumer of its own on the agenda's
    # tasks, read the TASKS stream directly, or listen to the agenda's inbox.
    pull = "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks_agenda_activity"
    await weather.nc.publish(pull, b'{"batch": 1}', reply="_INBOX_weather.steal")
    await weather.refused(pull)
    with pytest.raises((TimeoutError, nats.errors.Error)):
        await weather.js.add_consumer(
            "TASKS",
            name="tasks_weather_steal",
            durable_name="tasks_weather_steal",
            filter_subject="tasks.agenda.activity",
        )
    await weather.refused("$JS.API.CONSUMER.CREATE.TASKS.tasks_weather_steal")
    with pytest.raises((TimeoutError, nats.errors.Error)):
        await weather.js.get_msg("TASKS", seq=1, direct=True)
    await weather.refused("$JS.API.DIRECT.GET.TASKS")
    await weather.nc.subscribe("_INBOX_agenda.>")
    await weather.refused("_INBOX_agenda.>")
    consumers = await weather.js.consumer_info("TASKS", "tasks_weather_report")
    assert consumers.config.filter_subject == "tasks.weather.report"


async def test_an_agent_cannot_publish_another_agents_results(connect):
    weather = await connect("weather", "_INBOX_weather")
    before = await last_seq(weather, "RESULTS")
    await weather.publish_refused("results.sec-plan.agenda.activity")
    assert await last_seq(weather, "RESULTS") == before


async def test_an_agent_started_before_the_conductor_waits_for_its_streams(tmp_path):
    """An agent may not create streams or buckets: it waits for the conductor to."""
    passwords = deploy.passwords()
    configs = deploy.nats_configs(tmp_path / "conf", tmp_path / "jetstream")
    env = deploy.server_env(passwords)
    with EmbeddedServer(tmp_path / "server", config_file=configs / "nats.conf", env=env) as server:
        weather = ServiceProcess(
            "weather",
            server.url,
            tmp_path / "weather.log",
            deploy.service_env("weather", passwords),
        ).start()
        processes = [weather]
        nc = await nats.connect(server.url, user="client", password=passwords["client"])
        try:
            for _ in range(300):
                if b"waiting for the conductor" in weather.log_path.read_bytes():
                    break
                await asyncio.sleep(0.1)
            assert b"waiting for the conductor" in weather.log_path.read_bytes()
            processes.append(
                ServiceProcess(
                    "conductor",
                    server.url,
                    tmp_path / "conductor.log",
                    deploy.service_env("conductor", passwords),
                ).start()
            )
            await wait_for_services(nc, ["conductor", "weather"], processes=processes)
            reply = await nc.request("weather.report", b'{"date": "2019-04-02"}', timeout=5)
            assert set(msgspec.json.decode(reply.data)) == {"rain", "temperature", "snow"}
            admin = await nats.connect(server.url, user="admin", password=passwords["admin"])
            try:  # and it pulls its tasks: its consumer is bound
                for _ in range(100):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        info = await admin.jetstream().consumer_info(
                            "TASKS", "tasks_weather_report"
                        )
                        break
                    await asyncio.sleep(0.1)
                assert info.num_waiting >= 1  # a pull request of the agent's is waiting
            finally:
                await admin.close()
        finally:
            await nc.close()
            for process in processes:
                process.stop()


async def test_each_service_is_ready_with_every_consumer_bound(secured):
    """What the image's HEALTHCHECK and the Kubernetes readiness probe ask."""
    expected = {
        "conductor": {"RESULTS/results_all"},  # no trigger in the shipped definitions
        "weather": {"TASKS/tasks_weather_report"},
        "agenda": {
            "TASKS/tasks_agenda_activity",
            "EVENTS/ActivityChosen-Tally",
            "EVENTS/ApprovalGranted-Notify",
        },
        "brewery": {f"TASKS/tasks_brewery_{step}" for step in BREWERY_STEPS},
    }
    for name, port in secured.health_ports.items():
        status, body = await http_get(port, "/readyz")
        assert (status, body["ready"]) == (200, True), (name, body)
        assert body["consumers"] == dict.fromkeys(expected[name], "bound"), name
        assert (await http_get(port, "/livez"))[0] == 200


BREWERY_STEPS = (
    "malt", "hops", "mash", "boil", "dry_hop", "bottle_beer", "harvest", "crush", "ferment_wine"
)  # fmt: skip


async def test_the_web_ui_works_as_the_client_user(secured, connect, tmp_path):
    """As deploy/compose.yaml runs it: the list and a workflow live, and an action."""
    port = free_port()
    ui = ServiceProcess(
        "ui",
        secured.url,
        tmp_path / "ui.log",
        env={"NATS_USER": "client", "NATS_PASSWORD": secured.passwords["client"]},
        argv=[sys.executable, "-m", "kapellmeister.cli", "ui", "--port", str(port)],
    ).start()
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                if (await http_request(port, "GET", "/healthz"))[0] == 200:
                    break
            await asyncio.sleep(0.1)
        client = await connect("client")
        async with event_stream(port, "/live/workflows?workflow=approval") as listed:
            await call(
                client.nc, "conductor.start.approval", {"money": 3}, {"Workflow-Id": "sec-ui"}
            )
            rows = msgspec.json.decode(await listed.next("rows", "sec-ui"))
            assert 'data-workflow-id="sec-ui"' in rows
        async with event_stream(port, "/live/workflows/sec-ui") as live:
            form = b"task=approval_1&output=%7B%22status%22%3A%22ok%22%7D"
            status, reply = await http_request(
                port,
                "POST",
                "/workflows/sec-ui/signal",
                {
                    "Accept": "application/json",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Origin": f"http://127.0.0.1:{port}",
                },
                form,
            )
            assert status == 200, reply
            waiting = 'data-ref="approval_2" data-status="IN_PROGRESS"'
            async with asyncio.timeout(15):
                while waiting not in msgspec.json.decode(await live.next("saga"))["parts"]["graph"]:
                    pass
        assert (await saga(client.js, "sec-ui"))["tasks"][0]["output"] == {"status": "ok"}
    finally:
        ui.stop()
    assert "violation" not in ui.log_tail(100_000).lower()


async def test_payload_references_work_under_the_users(connect):
    client = await connect("client")
    nc, js = client.nc, client.js
    store = await js.object_store("payloads")
    data = msgspec.json.encode("2019-04-02")
    await store.put("secured/date.json", data)
    reference = {
        "$payload": "secured/date.json",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    # The weather agent reads the object under its own user, for the handler.
    by_reference = await call(nc, "weather.report", {"date": reference})
    assert "Nats-Service-Error" not in (by_reference.headers or {}), by_reference.data
    assert body(by_reference) == body(await call(nc, "weather.report", {"date": "2019-04-02"}))
    assert client.violations() == []
