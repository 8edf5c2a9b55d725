"""The workflow index: `conductor.list` reads what it returns, not every saga, and the
index follows the sagas, mends what it finds wrong and is rebuilt from them."""

from __future__ import annotations

import asyncio

import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.index import INDEX
from kapellmeister.registry import Registry
from tests.support import body, call, stored_keys, wait_finished

HELD = {"name": "held", "tasks": [{"ref": "hold", "type": "WAIT"}]}
INSTANT = {
    "name": "instant",
    "tasks": [{"ref": "set", "type": "SET_VARIABLE", "input": {"done": True}}],
}


@pytest.fixture
async def conductor(nc, settings):
    conductor = Conductor(settings, Registry())
    await conductor.start(nc)
    for definition in (HELD, INSTANT):
        reply = await call(nc, "conductor.definitions.register", definition)
        assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    await asyncio.wait_for(conductor.swept.wait(), 10)
    yield conductor
    await conductor.stop()


async def listed(nc, **query: object) -> list[str]:
    reply = await call(nc, "conductor.list", query)
    return [w["workflow_id"] for w in body(reply)["workflows"]]


async def start(nc, workflow: str, workflow_id: str) -> None:
    reply = await call(nc, f"conductor.start.{workflow}", {}, {"Workflow-Id": workflow_id})
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data


async def test_a_workflow_is_listed_under_its_status_as_it_changes(nc, js, conductor):
    await start(nc, "held", "h-1")
    assert await listed(nc, status="RUNNING") == ["h-1"]
    assert await listed(nc, status="COMPLETED") == []
    await call(nc, "conductor.signal.h-1.hold", {})
    await wait_finished(js, ["h-1"])
    assert await listed(nc, status="COMPLETED", workflow="held") == ["h-1"]
    assert await listed(nc, status="RUNNING") == []
    await conductor.index.flush(held=False)
    assert await stored_keys(js, INDEX) == ["s.COMPLETED.held.h-1"]  # the old key is gone


async def test_a_workflow_that_ends_at_once_costs_one_index_write(nc, js, conductor):
    writes = await nc.subscribe(f"$KV.{INDEX}.>")
    await start(nc, "instant", "i-1")
    await wait_finished(js, ["i-1"])
    await conductor.index.flush(held=False)
    seen = [(await writes.next_msg(timeout=2)).subject]
    with pytest.raises(TimeoutError):
        seen.append((await writes.next_msg(timeout=0.3)).subject)
    assert seen == [f"$KV.{INDEX}.s.COMPLETED.instant.i-1"]


async def test_list_reads_what_it_returns_not_every_workflow(nc, js, conductor):
    await start(nc, "held", "h-old")  # the only running one, first in the index
    await conductor.index.flush(held=False)
    ids = [f"n-{i:03}" for i in range(600)]
    for chunk in range(0, len(ids), 100):
        await asyncio.gather(*(start(nc, "instant", w) for w in ids[chunk : chunk + 100]))
    await wait_finished(js, ids)
    await conductor.index.flush(held=False)
    before = conductor.index.entries_read
    newest = await listed(nc, limit=5)
    assert len(newest) == 5 and set(newest) <= set(ids)
    # One window of 256 index entries at most, of the 601 stored.
    assert conductor.index.entries_read - before <= 256
    # A rare status is found however far back it lies, in one window sized from how
    # many keys match: JetStream sends that one entry and no other.
    before = conductor.index.entries_read
    assert await listed(nc, status="RUNNING") == ["h-old"]
    assert conductor.index.entries_read - before == 1
    everything = await listed(nc, workflow="instant", limit=1000)
    assert sorted(everything) == ids


async def test_a_stale_entry_is_not_listed_and_is_mended(nc, js, conductor):
    await start(nc, "instant", "i-2")
    await wait_finished(js, ["i-2"])
    index = await js.key_value(INDEX)
    # What a crossed flush could leave: the workflow also under a status it left.
    await index.put(
        "s.RUNNING.instant.i-2",
        b'{"workflow_id":"i-2","workflow":"instant",'
        b'"version":1,"status":"RUNNING","tenant":"","created_at":"",'
        b'"updated_at":""}',
    )
    assert await listed(nc, status="RUNNING") == []
    assert await listed(nc, status="COMPLETED") == ["i-2"]
    await conductor.index.flush(held=False)
    assert await stored_keys(js, INDEX) == ["s.COMPLETED.instant.i-2"]


async def test_reconcile_rebuilds_the_index_from_the_sagas(nc, js, conductor):
    await start(nc, "held", "h-2")
    await start(nc, "instant", "i-3")
    await wait_finished(js, ["i-3"])
    await conductor.index.flush(held=False)
    index = await js.key_value(INDEX)
    await index.purge("s.RUNNING.held.h-2")  # a note a crashed process never wrote
    await index.put(
        "s.COMPLETED.instant.gone",
        b'{"workflow_id":"gone","workflow":"instant",'
        b'"version":1,"status":"COMPLETED","tenant":"","created_at":"",'
        b'"updated_at":""}',
    )  # and one of a saga no longer stored
    assert await conductor.index.reconcile() == 2
    assert await stored_keys(js, INDEX) == ["s.COMPLETED.instant.i-3", "s.RUNNING.held.h-2"]
    assert await conductor.index.reconcile() == 0
    assert [e.workflow_id for e in await conductor.index.active()] == ["h-2"]


async def test_a_flush_that_cannot_write_keeps_its_notes(nc, js, conductor):
    await start(nc, "held", "h-3")  # noted, held a second as new
    await conductor.publisher.stop()  # as if NATS went away mid-flush
    with pytest.raises(Exception):  # noqa: B017 - whichever error nats-py gives
        await conductor.index.flush(held=False)
    assert "h-3" in conductor.index._notes
    await conductor.publisher.start()
    await conductor.index.flush(held=False)
    assert await stored_keys(js, INDEX) == ["s.RUNNING.held.h-3"]
