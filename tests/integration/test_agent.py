"""The agent runtime against a real nats-server: micro endpoint, work queue, errors."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import msgspec
import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.errors import TaskError
from kapellmeister.topology import RESULTS
from services.weather.handlers import ReportRequest, report
from tests.support import assert_error, body, call, dead_letters, stream_messages


class Echo(msgspec.Struct):
    n: int


calls: list[int] = []


async def flaky(req: Echo) -> Echo:
    """Fails with a retryable error until the third call; terminal for n < 0."""
    calls.append(req.n)
    if req.n < 0:
        raise TaskError("negative", code="negative", retryable=False)
    if len(calls) < 3:
        raise RuntimeError("transient")
    return Echo(n=req.n + 1)


async def test_direct_request_answers_like_the_contract(nc, agents):
    reply = await call(nc, "weather.report", {"date": "2019-04-02"})
    assert body(reply) == msgspec.to_builtins(await report(ReportRequest(date="2019-04-02")))
    reply = await call(nc, "agenda.activity", {"datetime": "2026-11-23T10:00:00"})
    assert body(reply) == {"activity": "work"}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "malformed JSON"),
        ({"date": 20190402}, "Expected `str`"),
        ({}, "missing required field `date`"),
        ({"date": "2019-02-30"}, "2019-02-30"),
        ({"date": "tomorrow"}, "$.date"),
    ],
)
async def test_bad_input_is_a_400_and_the_service_keeps_serving(nc, agents, payload, fragment):
    error = assert_error(await call(nc, "weather.report", payload), 400, "bad_request")
    assert fragment in error["message"]
    assert body(await call(nc, "weather.report", {"date": "2019-04-02"}))["temperature"] > 0


async def test_micro_info_and_stats_count_requests_and_errors(nc, agents):
    await call(nc, "agenda.activity", {"datetime": "2026-11-23T10:00:00"})
    await call(nc, "agenda.activity", {"datetime": "nope"})
    info = body(await call(nc, "$SRV.INFO.agenda"))
    assert info["name"] == "agenda"
    assert [e["subject"] for e in info["endpoints"]] == ["agenda.activity"]
    stats = body(await call(nc, "$SRV.STATS.agenda"))
    endpoint = stats["endpoints"][0]
    assert (endpoint["num_requests"], endpoint["num_errors"]) == (2, 1)
    assert endpoint["last_error"].startswith("400:")
    pings = body(await call(nc, "$SRV.PING.weather"))
    assert pings["name"] == "weather"


async def test_tasks_register_their_schemas(js, agents):
    kv = await js.key_value("tasks")
    entry = msgspec.json.decode((await kv.get("weather.report")).value)
    assert entry["service"] == "weather"
    assert "date" in str(entry["input_schema"])
    assert "temperature" in str(entry["output_schema"])


async def _publish_task(js, task_name: str, workflow_id: str, data: bytes) -> None:
    request = (
        b'{"workflow_id":"%s","workflow":"t","ref":"r","task":"%s","attempt":1,"input":%s}'
        % (workflow_id.encode(), task_name.encode(), data)
    )
    await js.publish(f"tasks.{task_name}", request, headers={"Nats-Msg-Id": f"{workflow_id}:r:1"})


async def _results(js, workflow_id: str, count: int = 1, timeout: float = 15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = await stream_messages(js, RESULTS, f"results.{workflow_id}.>")
        if len(found) >= count:
            return [msgspec.json.decode(m.data or b"") for m in found]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no result for {workflow_id}")


async def test_work_queue_task_publishes_its_result_with_a_derived_msg_id(js, agents):
    await _publish_task(js, "agenda.activity", "wq1", b'{"datetime":"2026-11-21T12:00:00"}')
    [result] = await _results(js, "wq1")
    assert result["status"] == "COMPLETED"
    assert result["output"] == {"activity": "free"}
    assert result["worker"].startswith("agenda/")
    stored = await stream_messages(js, RESULTS, "results.wq1.>")
    assert stored[0].subject == "results.wq1.agenda.activity"  # the task's name in it
    assert (stored[0].headers or {})["Nats-Msg-Id"] == "wq1:r:1:result"
    tasks = await js.stream_info("TASKS")
    assert tasks.state.messages == 0  # acked, so gone from the work queue


async def test_invalid_task_input_fails_terminally_with_400(js, agents):
    await _publish_task(js, "agenda.activity", "wq2", b'{"datetime":"2026-13-45T00:00:00"}')
    [result] = await _results(js, "wq2")
    assert result["status"] == "FAILED"
    assert result["error"]["code"] == 400
    assert result["error"]["retryable"] is False


async def test_retryable_errors_are_redelivered_then_succeed(nc, js, settings):
    calls.clear()
    agent = Agent("flaky", [task("flaky.echo", flaky)], settings)
    await agent.start(nc)
    try:
        await _publish_task(js, "flaky.echo", "wq3", b'{"n":41}')
        [result] = await _results(js, "wq3", timeout=20)
    finally:
        await agent.stop()
    assert result["status"] == "COMPLETED"
    assert result["output"] == {"n": 42}
    assert calls == [41, 41, 41]


async def test_terminal_task_error_is_not_retried(nc, js, settings):
    calls.clear()
    agent = Agent("flaky", [task("flaky.echo", flaky)], settings)
    await agent.start(nc)
    try:
        await _publish_task(js, "flaky.echo", "wq4", b'{"n":-1}')
        [result] = await _results(js, "wq4")
        await asyncio.sleep(0.5)
    finally:
        await agent.stop()
    assert calls == [-1]
    assert result["error"]["type"] == "negative"
    assert result["error"]["retryable"] is False


async def test_undecodable_task_message_is_a_dead_letter_not_a_crash(nc, js, agents):
    await js.publish("tasks.agenda.activity", b"garbage", headers={"Nats-Msg-Id": "junk"})
    await _publish_task(js, "agenda.activity", "wq5", b'{"datetime":"2026-11-21T12:00:00"}')
    [result] = await _results(js, "wq5")
    assert result["status"] == "COMPLETED"
    [letter] = await dead_letters(js, "deadletter.agenda")
    assert letter["reason"].startswith("not a task request")
    assert (letter["stream"], letter["subject"]) == ("TASKS", "tasks.agenda.activity")
    assert base64.b64decode(letter["data_base64"]) == b"garbage"
    assert letter["headers"]["Nats-Msg-Id"] == "junk"
    assert (await js.stream_info("TASKS")).state.messages == 0  # terminated, not redelivered


slow_calls: list[int] = []


async def slow(req: Echo) -> Echo:
    """Runs for several ack waits: only in-progress acks keep it from being redelivered."""
    slow_calls.append(req.n)
    await asyncio.sleep(2.5)
    return Echo(n=req.n)


async def test_long_work_is_kept_alive_by_in_progress_acks(nc, js, settings):
    slow_calls.clear()
    quick = msgspec.structs.replace(settings, ack_wait_s=0.8)
    agent = Agent("slow", [task("slow.echo", slow)], quick)
    await agent.start(nc)
    try:
        await _publish_task(js, "slow.echo", "wq6", b'{"n":7}')
        [result] = await _results(js, "wq6", timeout=20)
        await asyncio.sleep(1.0)  # a redelivery, had there been one, would run by now
    finally:
        await agent.stop()
    assert result["status"] == "COMPLETED"
    assert slow_calls == [7]


counted: list[int] = []


async def counted_echo(req: Echo) -> Echo:
    counted.append(req.n)
    return req


async def test_a_result_waits_out_a_results_outage_without_running_again(nc, js, settings):
    """The RESULTS stream away for longer than max_deliver one-second naks (a leader
    election in a cluster): the agent keeps the task and publishes when it is back."""
    counted.clear()
    agent = Agent("patient", [task("patient.echo", counted_echo)], settings)
    await agent.start(nc)
    config = (await js.stream_info(RESULTS)).config
    try:
        # No stream takes results.> for a while: publishes get no responders.
        await js.update_stream(dataclasses.replace(config, subjects=["timers.>"]))
        await _publish_task(js, "patient.echo", "out1", b'{"n":7}')
        await asyncio.sleep(settings.max_deliver + 2.0)  # past every delivery's nak delay
        assert counted == [7]
        await js.update_stream(config)
        [result] = await _results(js, "out1")
    finally:
        await js.update_stream(config)
        await agent.stop()
    assert result["status"] == "COMPLETED" and result["output"] == {"n": 7}
    assert counted == [7]  # the handler ran once
    info = await js.consumer_info("TASKS", "tasks_patient_echo")
    assert info.num_redelivered == 0
