"""End to end: the drinks GRAPH with the brewery agent and the conductor as processes."""

from __future__ import annotations

import asyncio

import pytest

from kapellmeister.processes import ServiceProcess, wait_for_services
from tests.support import call, wait_finished

pytestmark = pytest.mark.e2e


@pytest.fixture
async def brewery(nats_url, nc, tmp_path):
    processes = [
        ServiceProcess(name, nats_url, tmp_path / f"{name}.log").start()
        for name in ("brewery", "conductor")
    ]
    try:
        await wait_for_services(nc, ["brewery", "conductor"], processes=processes)
        yield
    finally:
        for process in processes:
            process.stop()


ORDERS = {
    "ipa": ({"drink": "beer", "style": "IPA"}, ""),
    "lager": ({"drink": "beer", "style": "lager"}, ""),
    "red": ({"drink": "wine", "style": "red"}, ""),
    "sober": ({"drink": "beer", "style": "IPA"}, "sober_bar"),
}


async def test_beer_and_wine_run_the_steps_their_order_needs(nc, js, brewery):
    for name, (order, tenant) in ORDERS.items():
        headers = {"Workflow-Id": f"drink-{name}", **({"Tenant": tenant} if tenant else {})}
        await call(nc, "conductor.start.drinks", order, headers)
    states = await wait_finished(js, [f"drink-{n}" for n in ORDERS], timeout=30)
    status = {n: {t["ref"]: t["status"] for t in states[f"drink-{n}"]["tasks"]} for n in ORDERS}
    output = {n: states[f"drink-{n}"]["output"] for n in ORDERS}
    assert all(states[f"drink-{n}"]["status"] == "COMPLETED" for n in ORDERS)
    assert output["ipa"] == {
        "beer": "bottled: wort of pale malt boiled with citra, fermented, dry-hopped for the IPA",
        "wine": None,
    }
    assert output["lager"]["beer"] == "bottled: wort of pale malt boiled with saaz, fermented"
    assert (status["lager"]["dry_hop"], status["ipa"]["dry_hop"]) == ("SKIPPED", "COMPLETED")
    assert output["red"] == {"beer": None, "wine": "wine from must of red grapes"}
    assert {status["red"][r] for r in ("malt", "hops", "mash", "boil", "bottle_beer")} == {
        "SKIPPED"
    }
    assert {status["ipa"][r] for r in ("harvest", "crush", "ferment_wine")} == {"SKIPPED"}
    # the tenant that never dry-hops
    assert status["sober"]["dry_hop"] == "SKIPPED"
    assert output["sober"]["beer"] == "bottled: wort of pale malt boiled with citra, fermented"


async def test_a_rerun_from_mash_runs_it_and_what_follows_keeping_malt_and_hops(nc, js, brewery):
    order = {"drink": "beer", "style": "IPA"}
    await call(nc, "conductor.start.drinks", order, {"Workflow-Id": "drink-again"})
    first = (await wait_finished(js, ["drink-again"], timeout=30))["drink-again"]
    await call(nc, "conductor.rerun.drink-again", {"task": "mash"})
    for _ in range(100):  # until the rerun has run through
        state = (await wait_finished(js, ["drink-again"], timeout=30))["drink-again"]
        attempts = {t["ref"]: t["attempt"] for t in state["tasks"]}
        if attempts.get("bottle_beer") == 2:
            break
        await asyncio.sleep(0.1)
    assert state["status"] == "COMPLETED" and state["output"] == first["output"]
    assert {r: attempts[r] for r in ("malt", "hops", "mash", "boil", "dry_hop", "bottle_beer")} == {
        "malt": 1,
        "hops": 1,
        "mash": 2,
        "boil": 2,
        "dry_hop": 2,
        "bottle_beer": 2,
    }
