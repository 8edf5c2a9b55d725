"""Retention: finished workflows past their definition's ``retention_s`` (or the
setting's) are removed from KV by the sweeper; running ones never are."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.index import INDEX
from kapellmeister.registry import Registry
from tests.support import assert_error, body, call, find_saga, stored_keys, wait_finished


def held(name: str, retention_s: float | None) -> dict[str, object]:
    """A workflow that waits for a signal: it ends when the test says."""
    definition: dict[str, object] = {"name": name, "tasks": [{"ref": "hold", "type": "WAIT"}]}
    if retention_s is not None:
        definition["retention_s"] = retention_s
    return definition


async def started(nc, workflow: str, workflow_id: str, *, finish: bool) -> None:
    await call(nc, f"conductor.start.{workflow}", {}, {"Workflow-Id": workflow_id})
    if finish:
        await call(nc, f"conductor.signal.{workflow_id}.hold", {})


async def gone(js, workflow_id: str, timeout: float = 15.0) -> bool:
    for _ in range(int(timeout / 0.1)):
        if await find_saga(js, workflow_id) is None:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.fixture
async def conductor(nc, settings):
    settings = msgspec.structs.replace(settings, retention_s=2.0, sweep_grace_s=0.0)
    conductor = Conductor(settings, Registry())
    await conductor.start(nc)
    for definition in (held("brief", 1.0), held("defaulted", None)):
        reply = await call(nc, "conductor.definitions.register", definition)
        assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    yield conductor
    await conductor.stop()


async def test_a_finished_workflow_goes_after_its_retention_and_a_running_one_stays(
    nc, js, conductor
):
    await started(nc, "brief", "brief-done", finish=True)
    await started(nc, "brief", "brief-running", finish=False)
    assert (await wait_finished(js, ["brief-done"]))["brief-done"]["status"] == "COMPLETED"
    assert await gone(js, "brief-done")
    # Every revision is gone: only the purge marker is left on its subject, and it has a TTL.
    info = await js.stream_info("KV_workflows", subjects_filter="$KV.workflows.brief-done")
    assert info.state.subjects == {"$KV.workflows.brief-done": 1}
    assert info.config.allow_msg_ttl
    marker = await js.get_last_msg("KV_workflows", "$KV.workflows.brief-done")
    assert (marker.headers or {})["KV-Operation"] == "PURGE"
    assert "Nats-TTL" in (marker.headers or {})  # the marker goes too, in a day
    assert_error(await call(nc, "conductor.get.brief-done"), 404)
    await conductor.index.flush(held=False)  # and so is its index entry
    assert await stored_keys(js, INDEX) == ["s.RUNNING.brief.brief-running"]
    await asyncio.sleep(2.0)  # two more sweeps
    assert body(await call(nc, "conductor.get.brief-running"))["status"] == "RUNNING"


async def test_the_setting_is_the_default_and_a_definition_may_keep_longer(nc, js, conductor):
    await started(nc, "defaulted", "default-done", finish=True)  # the setting's 2 s
    await wait_finished(js, ["default-done"])
    assert await gone(js, "default-done")
    longer = {**held("kept", 3600.0)}
    await call(nc, "conductor.definitions.register", longer)
    await started(nc, "kept", "kept-done", finish=True)
    await wait_finished(js, ["kept-done"])
    await asyncio.sleep(3.5)  # past the setting's 2 s, and a sweep
    assert (await find_saga(js, "kept-done")) is not None


async def test_an_expired_id_is_free_again(nc, js, conductor):
    await started(nc, "brief", "again", finish=True)
    first = (await wait_finished(js, ["again"]))["again"]
    assert await gone(js, "again")
    reply = await call(nc, "conductor.start.brief", {}, {"Workflow-Id": "again"})
    assert body(reply)["status"] == "RUNNING"  # a new workflow under the old id
    second = body(await call(nc, "conductor.get.again"))
    assert (second["status"], second["created_at"] > first["created_at"]) == ("RUNNING", True)


async def test_a_retention_must_be_positive(nc, conductor):
    reply = await call(nc, "conductor.definitions.register", held("bad", 0))
    assert_error(reply, 400)
