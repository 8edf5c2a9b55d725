"""/livez and /readyz: what a container health check and Kubernetes probes ask."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.health import serve_health
from services.weather.handlers import report
from tests.support import http_get


@pytest.fixture
async def health() -> AsyncIterator[int]:
    server = await serve_health("127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_live_at_once_ready_only_with_a_bound_consumer(nc, js, settings, health):
    assert await http_get(health, "/livez") == (200, {"live": True})
    status, body = await http_get(health, "/readyz")
    assert (status, body["ready"], body["reason"]) == (
        503,
        False,
        "starting: no consumer bound yet",
    )
    agent = Agent("weather", [task("weather.report", report)], settings)
    await agent.start(nc)
    try:
        status, body = await http_get(health, "/readyz")
        assert (status, body["consumers"]) == (200, {"TASKS/tasks_weather_report": "bound"})
        # Its consumer deleted under it (an operator's mistake): not ready, and why.
        await js.delete_consumer("TASKS", "tasks_weather_report")
        status, body = await http_get(health, "/readyz")
        assert (status, body["consumers"]) == (
            503,
            {"TASKS/tasks_weather_report": "consumer missing"},
        )
        assert body["reason"] == "not bound: TASKS/tasks_weather_report"
    finally:
        await agent.stop()
    assert (await http_get(health, "/readyz"))[0] == 503  # stopped: nothing bound


async def test_not_ready_while_nats_is_away(nc, settings, server, health):
    agent = Agent("weather", [task("weather.report", report)], settings)
    await agent.start(nc)
    try:
        assert (await http_get(health, "/readyz"))[0] == 200
        server.kill()
        for _ in range(100):
            if not nc.is_connected:
                break
            await asyncio.sleep(0.05)
        status, body = await http_get(health, "/readyz")
        assert (status, body["consumers"]) == (
            503,
            {"TASKS/tasks_weather_report": "NATS disconnected"},
        )
        assert (await http_get(health, "/livez"))[0] == 200  # alive all the same: do not restart it
    finally:
        server.start()
        for _ in range(200):
            if nc.is_connected:
                break
            await asyncio.sleep(0.05)
        await agent.stop()


async def test_anything_else_is_a_404(health):
    assert (await http_get(health, "/metrics"))[0] == 404
