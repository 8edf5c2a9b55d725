"""Fixtures for integration tests: agents and conductors in this process, on the test server."""

from __future__ import annotations

import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from services.agenda.handlers import activity
from services.conductor.__main__ import registry
from services.weather.handlers import report


@pytest.fixture
async def agents(nc, settings):
    """The weather and agenda agents, started."""
    started = [
        Agent("weather", [task("weather.report", report)], settings),
        Agent("agenda", [task("agenda.activity", activity)], settings),
    ]
    for agent in started:
        await agent.start(nc)
    yield started
    for agent in started:
        await agent.stop()


@pytest.fixture
async def conductor(nc, settings):
    conductor = Conductor(settings, registry())
    await conductor.start(nc)
    yield conductor
    await conductor.stop()


@pytest.fixture
async def stack(conductor, agents):
    """A conductor and both agents: plan_day runs end to end in this process."""
    return conductor


@pytest.fixture
async def two_conductors(nc, settings):
    """Two conductor replicas on the same server, sharing nothing but NATS."""
    definitions = registry()
    pair = (Conductor(settings, definitions), Conductor(settings, definitions))
    for conductor in pair:
        await conductor.start(nc)
    yield pair
    for conductor in pair:
        await conductor.stop()
