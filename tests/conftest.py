"""Fixtures: a real nats-server per test (free loopback port, temporary store), clients, settings.

``--nats-url nats://127.0.0.1:4222`` runs the same suite against an existing server
instead (tests use fresh workflow ids, so they do not collide). Every test starts from a
clean environment: no NATS_*, KAPELLMEISTER_* or OTEL_* variable leaks in.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from kapellmeister.config import Settings
from kapellmeister.server import EmbeddedServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nats-url", default=None, help="run against this server instead of a fresh one"
    )


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("NATS_", "KAPELLMEISTER_", "OTEL_")):
            monkeypatch.delenv(name)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "jetstream"


@pytest.fixture
def server(request: pytest.FixtureRequest, store_dir: Path) -> Iterator[EmbeddedServer | None]:
    """A nats-server of our own, stopped by PID at the end (None with --nats-url)."""
    if request.config.getoption("--nats-url"):
        yield None
        return
    embedded = EmbeddedServer(store_dir)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def nats_url(request: pytest.FixtureRequest, server: EmbeddedServer | None) -> str:
    url = request.config.getoption("--nats-url")
    if url:
        return str(url)
    assert server is not None
    return server.url


@pytest.fixture
def settings(nats_url: str) -> Settings:
    return Settings(nats_url=nats_url, ack_wait_s=5.0, sweep_interval_s=1.0, max_deliver=3)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url, name="tests")
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()
