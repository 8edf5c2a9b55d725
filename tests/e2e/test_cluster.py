"""A three-node cluster from deploy/nats/cluster.conf, on loopback, with R3 everything.

The production shape in small: three nats-server processes routed to each other, the
services under their own users with KAPELLMEISTER_REPLICAS=3 and all three nodes in
NATS_URL. Workflows keep being started while the node leading the saga bucket is
SIGKILLed and later restarted: every start that was answered completes, once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer
from tests import deploy
from tests.support import expected_activity, free_port, wait_finished

pytestmark = pytest.mark.e2e

NODES = ("nats-1", "nats-2", "nats-3")


class Cluster:
    def __init__(self, root: Path, passwords: dict[str, str]) -> None:
        routes = {name: free_port() for name in NODES}
        self.nodes: dict[str, EmbeddedServer] = {}
        for name in NODES:
            configs = deploy.nats_configs(root / name / "conf", root / name / "jetstream")
            self.nodes[name] = EmbeddedServer(
                root / name,
                config_file=configs / "cluster.conf",
                env=deploy.server_env(passwords, NATS_SERVER_NAME=name),
                # The file's cluster port and routes name hosts nats-1..3 on 6222: here,
                # three ports on loopback.
                args=[
                    "--cluster",
                    f"nats://127.0.0.1:{routes[name]}",
                    "--routes",
                    ",".join(f"nats://127.0.0.1:{port}" for port in routes.values()),
                ],
            )

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes.values())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, str]]]:
    passwords = deploy.passwords()
    cluster = Cluster(tmp_path, passwords)
    cluster.start()
    try:
        yield cluster, passwords
    finally:
        cluster.stop()


async def until_three_peers(js: nats.js.JetStreamContext) -> None:
    """JetStream places an R3 stream once all three nodes have joined its meta group."""
    for _ in range(300):
        try:
            await js.add_stream(StreamConfig(name="PROBE", subjects=["probe"], num_replicas=3))
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        await js.delete_stream("PROBE")
        return
    raise AssertionError("the three nodes did not form a JetStream cluster")


async def test_workflows_complete_while_a_node_is_killed_and_restarted(cluster, tmp_path):
    nodes, passwords = cluster
    servers = nodes.urls.split(",")
    admin = await nats.connect(servers, user="admin", password=passwords["admin"])
    client = await nats.connect(
        servers, user="client", password=passwords["client"], reconnect_time_wait=0.2
    )
    processes: list[ServiceProcess] = []
    try:
        await until_three_peers(admin.jetstream())
        for name in ("conductor", "weather", "agenda"):
            # A short ack wait: what was in flight on the dead node comes back sooner.
            env = deploy.service_env(
                name, passwords, KAPELLMEISTER_REPLICAS="3", KAPELLMEISTER_ACK_WAIT_S="5"
            )
            processes.append(
                ServiceProcess(name, nodes.urls, tmp_path / f"{name}.log", env=env).start()
            )
        await wait_for_services(client, ["conductor", "weather", "agenda"], processes=processes)
        info = await admin.jetstream().stream_info("KV_workflows")
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader in NODES
        leader = nodes.nodes[info.cluster.leader]

        accepted: dict[str, str] = {}
        progress = {30: asyncio.Event(), 60: asyncio.Event()}
        starting = asyncio.create_task(start_workflows(client, accepted, 90, progress))
        await progress[30].wait()
        leader.kill()  # the node leading the saga bucket, mid-stream
        await progress[60].wait()
        moved = await admin.jetstream().stream_info("KV_workflows")
        assert moved.cluster is not None and moved.cluster.leader not in (None, info.cluster.leader)
        leader.start()
        await starting
        states = await wait_finished(client.jetstream(), list(accepted), timeout=90)
        for workflow_id, when in accepted.items():
            state = states[workflow_id]
            assert state["status"] == "COMPLETED", state
            assert state["output"] == {"activity": await expected_activity(when)}
            assert all(task["attempt"] == 1 for task in state["tasks"]), state["tasks"]
        # The restarted node is a current replica of the saga bucket again.
        for _ in range(200):
            again = await admin.jetstream().stream_info("KV_workflows")
            peers = (
                {r.name: r.current for r in (again.cluster.replicas or [])} if again.cluster else {}
            )
            if peers.get(info.cluster.leader):
                break
            await asyncio.sleep(0.1)
        assert peers.get(info.cluster.leader), peers
    finally:
        for process in processes:
            process.stop()
        await client.close()
        await admin.close()


async def start_workflows(
    nc: Client, accepted: dict[str, str], count: int, progress: dict[int, asyncio.Event]
) -> None:
    """Start ``count`` plan_day workflows, a few a second; a start that gets no answer
    (its node just died) is sent again under the same id, which makes it idempotent.
    ``progress[n]`` is set once ``n`` are accepted."""
    for n in range(count):
        workflow_id = f"cluster-{n}"
        when = f"2026-11-{21 + n % 7}T{8 + n % 12:02d}:00:00"
        payload = msgspec.json.encode({"user": f"u{n}", "datetime": when})
        for _ in range(100):
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                reply = await nc.request(
                    "conductor.start.plan_day",
                    payload,
                    timeout=2.0,
                    headers={"Workflow-Id": workflow_id},
                )
                if "Nats-Service-Error" not in (reply.headers or {}):
                    accepted[workflow_id] = when
                    if len(accepted) in progress:
                        progress[len(accepted)].set()
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"{workflow_id} never accepted")
        await asyncio.sleep(0.05)
