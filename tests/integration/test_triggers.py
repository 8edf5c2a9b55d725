"""Events start workflows: a definition's triggers, on a real nats-server.

Events are published as the ``nats`` CLI would (``nats pub events.… '<json>'``, with or
without ``Nats-Msg-Id``, plain or as a CloudEvents envelope)."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import msgspec
import nats.errors
import nats.js.errors
import pytest

from kapellmeister.conductor import Conductor
from kapellmeister.registry import DefinitionStore, Registry
from kapellmeister.topology import ensure_consumer
from services.conductor.__main__ import registry
from tests.support import (
    body,
    call,
    dead_letters,
    find_saga,
    stored_keys,
    stream_messages,
    wait_finished,
)

GREETING = {
    "name": "greeting",
    "input": {"user": "str"},
    "triggers": [
        {"subject": "events.user.*.joined", "input": {"user": "${event.user}"}},
    ],
    "tasks": [{"ref": "hold", "type": "WAIT"}],
    "output": {"user": "${workflow.input.user}"},
}


@pytest.fixture
async def conductor(nc, settings):
    conductor = Conductor(settings, Registry(registry().all()))
    await conductor.start(nc)
    reply = await call(nc, "conductor.definitions.register", GREETING)
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    yield conductor
    await conductor.stop()


async def settle(js) -> None:
    """Until the conductors' trigger consumer has acked every event it takes.

    It takes only the events some trigger matches (its filters); its ack floor, not its
    pending counts, says it is done: the server tells a consumer of a new message
    asynchronously, so just after a publish both counts can still read 0."""
    config = (await js.consumer_info("EVENTS", "conductor-triggers")).config
    last = 0
    for subject in config.filter_subjects or [config.filter_subject]:
        for msg in await stream_messages(js, "EVENTS", subject):
            last = max(last, msg.seq or 0)
    for _ in range(400):
        info = await js.consumer_info("EVENTS", "conductor-triggers")
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= last:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the trigger consumer did not ack up to {last}: {info}")


async def test_an_event_starts_its_workflow_once_by_its_id(nc, js, conductor):
    event = msgspec.json.encode({"user": "ann"})
    for _ in range(2):  # the same event published twice: stored once
        await js.publish("events.user.eu.joined", event, headers={"Nats-Msg-Id": "j-1"})
    await settle(js)
    assert await stored_keys(js, "workflows", "greeting=") == ["greeting=j-1"]
    state = body(await call(nc, "conductor.get.greeting=j-1"))
    assert (state["workflow"], state["status"], state["input"]) == (
        "greeting",
        "RUNNING",
        {"user": "ann"},
    )


async def test_a_cloudevents_envelope_is_unwrapped_and_its_id_dedupes(nc, js, conductor):
    envelope = {
        "specversion": "1.0",
        "id": "ce-7",
        "type": "user.joined",
        "source": "/signup",
        "datacontenttype": "application/json",
        "data": {"user": "bo"},
    }
    for n in range(2):  # two publishes, two message ids, one CloudEvents id
        await js.publish(
            "events.user.us.joined", msgspec.json.encode(envelope), headers={"X-N": str(n)}
        )
    await settle(js)
    # A CloudEvents id is unique per source: a digest of the source goes with it.
    workflow_id = f"greeting=ce-7-{hashlib.sha256(b'/signup').hexdigest()[:8]}"
    assert await stored_keys(js, "workflows", "greeting=") == [workflow_id]
    assert body(await call(nc, f"conductor.get.{workflow_id}"))["input"] == {"user": "bo"}


async def test_an_event_without_an_id_is_known_by_its_stream_sequence(nc, js, conductor):
    ack = await js.publish("events.user.x.joined", b'{"user": "cy"}')
    await settle(js)
    workflow_id = f"greeting=seq-{ack.seq}"
    assert await stored_keys(js, "workflows", "greeting=") == [workflow_id]
    await call(nc, f"conductor.signal.{workflow_id}.hold", {})
    state = (await wait_finished(js, [workflow_id], timeout=10))[workflow_id]
    assert (state["status"], state["output"]) == ("COMPLETED", {"user": "cy"})


async def test_events_nothing_listens_for_start_nothing(nc, js, conductor):
    await js.publish("events.user.eu.left", b'{"user": "ann"}', headers={"Nats-Msg-Id": "l-1"})
    await js.publish("events.user.joined", b'{"user": "ann"}', headers={"Nats-Msg-Id": "l-2"})
    await settle(js)
    assert await stored_keys(js, "workflows", "greeting=") == []
    # Not even delivered to a conductor: its consumer takes what some trigger matches.
    info = await js.consumer_info("EVENTS", "conductor-triggers")
    assert (info.config.filter_subject, info.delivered.stream_seq) == ("events.user.*.joined", 0)


async def test_an_event_a_trigger_cannot_use_is_a_dead_letter(nc, js, conductor):
    await js.publish("events.user.eu.joined", b"not json", headers={"Nats-Msg-Id": "bad-1"})
    await js.publish("events.user.eu.joined", b'{"name": "x"}', headers={"Nats-Msg-Id": "bad-2"})
    await settle(js)
    assert await stored_keys(js, "workflows", "greeting=") == []
    letters = await dead_letters(js, "deadletter.conductor")
    reasons = {base64.b64decode(letter["data_base64"]): letter["reason"] for letter in letters}
    assert "an event must be JSON" in reasons[b"not json"]
    assert reasons[b'{"name": "x"}'].startswith("greeting: invalid input for greeting")
    assert all(letter["stream"] == "EVENTS" for letter in letters)


async def test_the_trace_of_the_event_is_the_workflows(nc, js, conductor):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"Nats-Msg-Id": "t-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    await js.publish("events.user.eu.joined", b'{"user": "di"}', headers=headers)
    await settle(js)
    assert (await find_saga(js, "greeting=t-1") or {}).get("trace_id") == trace_id


class UnluckyConductor(Conductor):
    """Its starts fail (as with the KV store unreachable) ``failures`` times."""

    failures = 0

    async def start_workflow(self, fact, caller=None, started_ns=0):
        if self.failures > 0:
            self.failures -= 1
            raise nats.errors.TimeoutError
        return await super().start_workflow(fact, caller, started_ns)


async def unlucky(nc, settings, failures: int) -> UnluckyConductor:
    conductor = UnluckyConductor(settings, Registry(registry().all()))
    conductor.failures = failures
    await conductor.start(nc)
    reply = await call(nc, "conductor.definitions.register", GREETING)
    assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    return conductor


async def test_a_start_that_fails_is_retried_from_the_event(nc, js, settings):
    conductor = await unlucky(nc, settings, failures=1)
    try:
        await js.publish("events.user.eu.joined", b'{"user": "ed"}', headers={"Nats-Msg-Id": "r-1"})
        for _ in range(100):  # the nak's backoff is 2 s
            if await stored_keys(js, "workflows", "greeting="):
                break
            await asyncio.sleep(0.1)
    finally:
        await conductor.stop()
    assert await stored_keys(js, "workflows", "greeting=") == ["greeting=r-1"]


async def test_an_event_no_start_can_take_is_a_dead_letter_not_lost(nc, js, settings):
    conductor = await unlucky(nc, settings, failures=100)
    try:
        await js.publish("events.user.eu.joined", b'{"user": "fy"}', headers={"Nats-Msg-Id": "r-2"})
        letters = await dead_letters(js, "deadletter.conductor", timeout=30)
    finally:
        await conductor.stop()
    [letter] = letters
    assert letter["reason"] == "not started after 3 deliveries: greeting"
    assert base64.b64decode(letter["data_base64"]) == b'{"user": "fy"}'
    assert await stored_keys(js, "workflows", "greeting=") == []


async def test_without_triggers_there_is_no_consumer_and_filters_only_widen(nc, js, settings):
    """plan_day's events are not delivered to a conductor that has nothing to start."""
    first = Conductor(settings, Registry(registry().all()))  # the shipped: no triggers
    await first.start(nc)
    stale = Conductor(settings, Registry(registry().all()))  # a replica behind the others
    await stale.start(nc)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info("EVENTS", "conductor-triggers")
        await call(nc, "conductor.definitions.register", GREETING)
        left = {**GREETING, "name": "farewell"}
        left["triggers"] = [{"subject": "events.user.*.left", "input": {"user": "${event.user}"}}]
        await call(nc, "conductor.definitions.register", left)
        info = await js.consumer_info("EVENTS", "conductor-triggers")
        assert info.config.filter_subjects == ["events.user.*.joined", "events.user.*.left"]
        stale.registry = Registry(registry().all())  # it has seen neither, as if lagging
        await stale.sync_triggers()
        info = await js.consumer_info("EVENTS", "conductor-triggers")
        assert info.config.filter_subjects == ["events.user.*.joined", "events.user.*.left"]
    finally:
        await stale.stop()
        await first.stop()


async def test_a_replica_that_has_not_seen_a_new_trigger_reloads_before_dropping(
    nc, js, settings, monkeypatch
):
    """Another replica registered a triggered definition and widened the consumer; this
    conductor has not seen the definition yet when the event reaches it."""
    conductor = Conductor(settings, Registry(registry().all()))
    await conductor.start(nc)
    try:
        # It misses what its watch brings, as a replica behind the others would.
        monkeypatch.setattr(conductor.definitions, "_add", lambda key, value: None)
        other = DefinitionStore(
            await js.key_value("definitions"), await js.key_value("tasks"), Registry()
        )
        await other.register(msgspec.json.encode(GREETING))  # as the other replica did
        await ensure_consumer(
            js,
            "EVENTS",
            ["events.user.*.joined"],
            ack_wait_s=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            durable="conductor-triggers",
            new_only=True,
        )
        await asyncio.sleep(0.5)  # its watch has brought the definition, and it missed it
        monkeypatch.undo()
        assert "greeting" not in conductor.registry.names()
        await conductor.sync_triggers()  # it pulls on the filters it finds
        await js.publish("events.user.eu.joined", b'{"user": "di"}', headers={"Nats-Msg-Id": "r-1"})
        state = None
        for _ in range(100):
            state = await find_saga(js, "greeting=r-1")
            if state is not None:
                break
            await asyncio.sleep(0.05)
        assert state is not None and state["input"] == {"user": "di"}
        assert "greeting" in conductor.registry.names()  # read again, not followed
    finally:
        await conductor.stop()
