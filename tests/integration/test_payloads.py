"""Large payloads by claim check against a real nats-server: a 5 MB value goes through a
workflow in the `payloads` Object Store bucket while the saga keeps a reference."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import pytest
from nats.js.errors import NotFoundError

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.payloads import MARKER, PAYLOADS
from kapellmeister.registry import Registry
from tests.support import assert_error, body, call, find_saga, wait_finished

MB = 1024 * 1024


class Make(msgspec.Struct):
    size: int


class Made(msgspec.Struct):
    blob: str
    count: int
    tag: str


class Measure(msgspec.Struct):
    blob: str


class Measured(msgspec.Struct):
    length: int
    sha256: str


def blob_of(size: int) -> str:
    """A blob that is not all one letter, the same for the same size."""
    return ("kapellmeister-" * (size // 14 + 1))[:size]


seen: list[int] = []


async def make(req: Make) -> Made:
    return Made(blob=blob_of(req.size), count=req.size, tag="small")


async def measure(req: Measure) -> Measured:
    seen.append(len(req.blob))
    return Measured(length=len(req.blob), sha256=hashlib.sha256(req.blob.encode()).hexdigest())


FLOW = {
    "name": "big_flow",
    "input": {"size": "int"},
    "retention_s": 3600,
    "tasks": [
        {
            "ref": "make",
            "type": "SIMPLE",
            "task": "blobs.make",
            "input": {"size": "${workflow.input.size}"},
        },
        {
            "ref": "measure",
            "type": "SIMPLE",
            "task": "blobs.measure",
            "input": {"blob": "${make.output.blob}"},
        },
    ],
    "output": {
        "length": "${measure.output.length}",
        "sha256": "${measure.output.sha256}",
        "count": "${make.output.count}",
        "blob": "${make.output.blob}",
    },
}

DIRECT = {
    "name": "measure_given",
    "input": {"blob": "any"},
    "tasks": [
        {
            "ref": "measure",
            "type": "SIMPLE",
            "task": "blobs.measure",
            "input": {"blob": "${workflow.input.blob}"},
        }
    ],
    "output": {"length": "${measure.output.length}"},
}


@pytest.fixture
async def stack(nc, settings):
    settings = msgspec.structs.replace(settings, sweep_grace_s=0.0)
    conductor = Conductor(settings, Registry())
    await conductor.start(nc)
    agent = Agent("blobs", [task("blobs.make", make), task("blobs.measure", measure)], settings)
    await agent.start(nc)
    for definition in (FLOW, DIRECT):
        reply = await call(nc, "conductor.definitions.register", definition)
        assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    seen.clear()
    yield conductor
    await agent.stop()
    await conductor.stop()


async def run(nc, js, workflow_id: str, size: int) -> dict[str, Any]:
    await call(nc, "conductor.start.big_flow", {"size": size}, {"Workflow-Id": workflow_id})
    return (await wait_finished(js, [workflow_id], timeout=60))[workflow_id]


async def object_names(js) -> set[str]:
    store = await js.object_store(PAYLOADS)
    try:
        return {info.name for info in await store.list(ignore_deletes=True)}
    except NotFoundError:
        return set()


async def test_a_5_mb_payload_goes_through_a_workflow_by_reference(nc, js, stack):
    size = 5 * MB
    state = await run(nc, js, "big-1", size)
    assert state["status"] == "COMPLETED", state.get("error")
    expected = blob_of(size)
    # The handler got the whole value, resolved from its reference.
    assert seen == [size]
    assert state["output"]["length"] == size
    assert state["output"]["sha256"] == hashlib.sha256(expected.encode()).hexdigest()
    # Small fields stay inline, where expressions reach them; the big one is a reference.
    assert state["output"]["count"] == size
    reference = state["output"]["blob"]
    digest = hashlib.sha256(msgspec.json.encode(expected)).hexdigest()
    assert reference == {
        MARKER: f"big-1/make/1/output/blob/{digest[:16]}",
        "bytes": size + 2,
        "sha256": digest,
    }
    make_record = next(t for t in state["tasks"] if t["ref"] == "make")
    assert make_record["output"]["tag"] == "small"
    assert make_record["output"]["blob"] == reference
    # The saga stays small: a reference, not 5 MB (twice).
    kv = await js.key_value("workflows")
    assert len((await kv.get("big-1")).value) < 8 * 1024
    assert reference[MARKER] in await object_names(js)
    # Too big to inline in one NATS message: a clear refusal, with what to do instead.
    error = assert_error(
        await call(nc, "conductor.get.big-1", {"inline": True}), 400, "bad_request"
    )
    assert "nats object get payloads" in error["message"]
    assert body(await call(nc, "conductor.get.big-1"))["output"]["blob"] == reference


async def test_a_payload_over_the_threshold_inlines_on_request(nc, js, stack):
    size = 200 * 1024  # over the 64 KiB threshold, well under a NATS message
    state = await run(nc, js, "mid-1", size)
    assert state["status"] == "COMPLETED"
    assert MARKER in state["output"]["blob"]
    inlined = body(await call(nc, "conductor.get.mid-1", {"inline": True}))
    assert inlined["output"]["blob"] == blob_of(size)
    assert inlined["tasks"][0]["output"]["blob"] == blob_of(size)
    assert_error(await call(nc, "conductor.get.mid-1", {"inline": "yes"}), 400, "bad_request")


async def test_a_small_payload_stays_inline(nc, js, stack):
    state = await run(nc, js, "small-1", 1000)
    assert state["output"]["blob"] == blob_of(1000)
    assert not any(n.startswith("small-1/") for n in await object_names(js))


async def test_a_reference_to_nothing_fails_the_task_clearly(nc, js, stack):
    ghost = {MARKER: "nowhere/at/all", "bytes": 10, "sha256": "00"}
    await call(nc, "conductor.start.measure_given", {"blob": ghost}, {"Workflow-Id": "ghost-1"})
    state = (await wait_finished(js, ["ghost-1"]))["ghost-1"]
    assert state["status"] == "FAILED"
    error = state["tasks"][0]["error"]
    assert error["code"] == 400
    assert "nowhere/at/all" in error["message"] and PAYLOADS in error["message"]
    assert seen == []  # the handler never ran


async def test_a_reference_the_client_stored_is_resolved_for_the_handler(nc, js, stack):
    store = await js.object_store(PAYLOADS)
    data = msgspec.json.encode(blob_of(3 * MB))
    await store.put("uploads/report.json", data)
    reference = {
        MARKER: "uploads/report.json",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    await call(nc, "conductor.start.measure_given", {"blob": reference}, {"Workflow-Id": "up-1"})
    state = (await wait_finished(js, ["up-1"], timeout=60))["up-1"]
    assert state["status"] == "COMPLETED", state.get("error")
    assert state["output"] == {"length": 3 * MB}
    # A reference whose object is not what it says is refused, not used.
    await store.put("uploads/changed.json", msgspec.json.encode("something else"))
    changed = {**reference, MARKER: "uploads/changed.json"}
    await call(nc, "conductor.start.measure_given", {"blob": changed}, {"Workflow-Id": "up-2"})
    state = (await wait_finished(js, ["up-2"]))["up-2"]
    assert state["status"] == "FAILED"
    assert "not the value its reference names" in state["tasks"][0]["error"]["message"]


async def test_an_expired_workflow_takes_its_payloads_with_it(nc, js, stack):
    brief = {**FLOW, "name": "brief_flow", "retention_s": 0.5}
    reply = await call(nc, "conductor.definitions.register", brief)
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    await call(nc, "conductor.start.brief_flow", {"size": 300 * 1024}, {"Workflow-Id": "gone-1"})
    await wait_finished(js, ["gone-1"])
    assert any(n.startswith("gone-1/make/1/output/blob/") for n in await object_names(js))
    for _ in range(100):
        await asyncio.sleep(0.2)
        await stack.sweep()
        if await find_saga(js, "gone-1") is None:
            break
    assert await find_saga(js, "gone-1") is None
    assert not any(n.startswith("gone-1/") for n in await object_names(js))


async def test_a_big_task_input_is_sent_by_reference_and_resolved(nc, js, stack):
    text = blob_of(300 * 1024)  # a start may carry it; a task message should not
    await call(nc, "conductor.start.measure_given", {"blob": text}, {"Workflow-Id": "in-1"})
    state = (await wait_finished(js, ["in-1"]))["in-1"]
    assert state["status"] == "COMPLETED", state.get("error")
    assert state["output"] == {"length": len(text)}
    assert seen == [len(text)]
    assert any(n.startswith("in-1/measure/1/input/blob/") for n in await object_names(js))


async def test_an_attempt_stored_again_with_other_content_overwrites_nothing(nc, js, stack):
    # A redelivered attempt whose handler gives another output: the first result's
    # reference (the one the saga kept) still names what it named.
    payloads = stack.payloads
    first = await payloads.spill(msgspec.json.encode({"blob": blob_of(100_000)}), "re-1/t/1/output")
    second = await payloads.spill(msgspec.json.encode({"blob": "x" * 100_000}), "re-1/t/1/output")
    assert first != second
    assert msgspec.json.decode(await payloads.resolve(first)) == {"blob": blob_of(100_000)}
    assert msgspec.json.decode(await payloads.resolve(second)) == {"blob": "x" * 100_000}
    # The same content again is the same object, not a second write.
    assert (
        await payloads.spill(msgspec.json.encode({"blob": blob_of(100_000)}), "re-1/t/1/output")
        == first
    )


async def test_a_reference_inside_a_stored_value_is_resolved_too(nc, js, stack):
    payloads = stack.payloads
    inner = await payloads.spill(
        msgspec.json.encode({"text": blob_of(90_000)}), "nest-1/a/1/output"
    )
    outer = b'{"parts": [' + inner + b', "' + blob_of(90_000).encode() + b'"]}'
    spilled = await payloads.spill(outer, "nest-1/b/1/input")
    assert msgspec.json.decode(await payloads.resolve(spilled)) == {
        "parts": [{"text": blob_of(90_000)}, blob_of(90_000)]
    }


async def test_payloads_of_workflows_gone_are_collected_and_uploads_are_not(nc, js, stack):
    text = blob_of(300 * 1024)
    await call(nc, "conductor.start.measure_given", {"blob": text}, {"Workflow-Id": "col-1"})
    await run(nc, js, "col-2", 200 * 1024)
    await wait_finished(js, ["col-1"])
    store = await js.object_store(PAYLOADS)
    await store.put("uploads/keep.json", msgspec.json.encode("mine"))
    names = await object_names(js)
    assert any(n.startswith("col-1/measure/1/input/") for n in names)
    assert any(n.startswith("col-2/make/1/output/") for n in names)
    kv = await js.key_value("workflows")
    await kv.purge("col-1")  # as if its retention ended, its own objects left behind
    await asyncio.sleep(1.1)  # older than the grace
    assert await stack.collect_payloads() >= 1
    names = await object_names(js)
    assert not any(n.startswith("col-1/") for n in names)
    assert any(n.startswith("col-2/") for n in names)  # its workflow is still there
    assert "uploads/keep.json" in names
