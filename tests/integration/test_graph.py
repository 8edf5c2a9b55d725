"""A GRAPH on a real nats-server with agents: parallel steps, a condition, the output."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.registry import Registry
from tests.support import assert_error, call, wait_finished
from tests.unit.test_decider_graph import BREW

STEP_S = 0.3


def step(produces: str, value: str):
    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(STEP_S)
        return {produces: value}

    return handle


@pytest.fixture
async def brewery(nc, settings):
    steps = {
        "malt": ("malt", "pale"),
        "hops": ("hops", "citra"),
        "mash": ("wort", "sweet"),
        "boil": ("young_beer", "green"),
        "dry_hop": ("dry_hopped", "hoppy"),
        "bottle": ("beer", "bottled"),
    }
    agent = Agent(
        "brewery", [task(f"b.{name}", step(*made)) for name, made in steps.items()], settings
    )
    await agent.start(nc)
    conductor = Conductor(settings, Registry())
    await conductor.start(nc)
    reply = await call(
        nc,
        "conductor.definitions.register",
        {
            "name": "brew",
            "input": {"style": "str"},
            "tasks": BREW,
            "output": {"beer": "${brew.output.beer}"},
        },
    )
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    yield
    await conductor.stop()
    await agent.stop()


def seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


@pytest.mark.parametrize(("style", "dry_hop"), [("IPA", "COMPLETED"), ("lager", "SKIPPED")])
async def test_a_brew_runs_its_parallel_steps_together_and_its_condition(
    nc, js, brewery, style, dry_hop
):
    await call(nc, "conductor.start.brew", {"style": style}, {"Workflow-Id": f"brew-{style}"})
    state = (await wait_finished(js, [f"brew-{style}"], timeout=30))[f"brew-{style}"]
    assert (state["status"], state["output"]) == ("COMPLETED", {"beer": "bottled"})
    tasks = {t["ref"]: t for t in state["tasks"]}
    assert tasks["dry_hop"]["status"] == dry_hop
    assert tasks["bottle"]["input"]["dry_hopped"] == ("hoppy" if style == "IPA" else None)
    # malt and hops were dispatched in one decision and ran at the same time.
    malt, hops = tasks["malt"], tasks["hops"]
    assert malt["scheduled_at"] == hops["scheduled_at"]
    assert seconds(hops["started_at"]) < seconds(malt["ended_at"])
    assert seconds(malt["started_at"]) < seconds(hops["ended_at"])


async def test_tenants_switch_tasks_off_by_definition_and_by_kv(nc, js, brewery):
    definition = {
        "name": "brew_for",
        "input": {"style": "str"},
        "tasks": BREW,
        "output": {"beer": "${brew.output.beer}"},
        "tenants": {"sober_bar": {"skip": ["dry_hop"]}},
    }
    reply = await call(nc, "conductor.definitions.register", definition)
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    tenants = await js.key_value("tenants")
    await tenants.put("pub.brew_for", b'{"skip": ["hops"]}')
    for tenant in ("sober_bar", "pub", "other"):
        await call(
            nc,
            "conductor.start.brew_for",
            {"style": "IPA"},
            {"Workflow-Id": f"t-{tenant}", "Tenant": tenant},
        )
    states = await wait_finished(js, ["t-sober_bar", "t-pub", "t-other"], timeout=30)
    sober = {t["ref"]: t for t in states["t-sober_bar"]["tasks"]}
    assert (sober["dry_hop"]["status"], sober["dry_hop"]["reason"]) == (
        "SKIPPED",
        "switched off for tenant 'sober_bar'",
    )
    assert states["t-sober_bar"]["output"] == {"beer": "bottled"}
    assert states["t-sober_bar"]["switched_off"] == ["dry_hop"]
    pub = {t["ref"]: t["status"] for t in states["t-pub"]["tasks"]}
    assert (pub["hops"], pub["boil"], pub["bottle"]) == ("SKIPPED", "SKIPPED", "SKIPPED")
    assert states["t-pub"]["output"] == {"beer": None}
    other = {t["ref"]: t["status"] for t in states["t-other"]["tasks"]}
    assert other["dry_hop"] == "COMPLETED" and "switched_off" not in states["t-other"]


async def test_a_graph_with_a_cycle_is_refused_and_nothing_is_stored(nc, brewery):
    cyclic = {
        "name": "circular",
        "tasks": [
            {
                "ref": "g",
                "type": "GRAPH",
                "tasks": [
                    {
                        "ref": "a",
                        "type": "SIMPLE",
                        "task": "b.malt",
                        "requires": ["y"],
                        "produces": ["x"],
                    },
                    {
                        "ref": "b",
                        "type": "SIMPLE",
                        "task": "b.hops",
                        "requires": ["x"],
                        "produces": ["y"],
                    },
                ],
            }
        ],
    }
    refused = await call(nc, "conductor.definitions.register", cyclic)
    error = assert_error(refused, 400)
    assert "requires/produces form a cycle: a -> b -> a - at `tasks[0].tasks`" in error["message"]
    assert_error(await call(nc, "conductor.definitions.get.circular"), 404)
