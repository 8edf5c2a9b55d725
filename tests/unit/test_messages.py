"""Wire messages evolve without breaking older replicas; hand-written requests reject typos."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from kapellmeister.messages import (
    Fact,
    ListRequest,
    Saga,
    TaskCompleted,
    TaskRecord,
    TaskRequest,
    TaskResult,
    utc_shift,
    utc_text,
)


def test_messages_between_services_ignore_unknown_fields():
    result = msgspec.json.decode(
        b'{"workflow_id":"w","ref":"r","attempt":1,"status":"COMPLETED","output":{"a":1},'
        b'"added_by_a_newer_agent":true}',
        type=TaskResult,
    )
    assert (result.workflow_id, result.output) == ("w", {"a": 1})
    request = msgspec.json.decode(
        b'{"workflow_id":"w","workflow":"p","ref":"r","task":"t.x","attempt":2,"input":{},'
        b'"priority":5}',
        type=TaskRequest,
    )
    assert request.attempt == 2
    saga = msgspec.json.decode(
        b'{"workflow_id":"w","workflow":"p","version":1,"status":"RUNNING","input":{},'
        b'"output":null,"tenant":"","created_at":"t","updated_at":"t","trace_id":"",'
        b'"error":null,"tasks":[],"future_field":[1]}',
        type=Saga,
    )
    assert (saga.tasks, saga.variables, saga.unpublished) == ((), {}, "")


CONTRACT_SAGA = {"workflow_id", "workflow", "version", "status", "input", "output", "tenant",
                 "created_at", "updated_at", "trace_id", "error", "tasks"}  # fmt: skip
CONTRACT_TASK = {"ref", "name", "type", "status", "attempt", "input", "output", "error",
                 "scheduled_at", "started_at", "ended_at"}  # fmt: skip


def test_a_saga_always_carries_the_contract_fields_and_omits_default_bookkeeping():
    task = TaskRecord(
        ref="a", name="t.a", type="SIMPLE", status="SCHEDULED", attempt=1, input=None,
        output=None, error=None, scheduled_at="t", started_at=None, ended_at=None,
    )  # fmt: skip
    saga = Saga(
        workflow_id="w", workflow="p", version=1, status="RUNNING", input={}, output=None,
        tenant="", created_at="t", updated_at="t", trace_id="", error=None, tasks=(task,),
    )  # fmt: skip
    written = msgspec.json.decode(msgspec.json.encode(saga))
    assert set(written) == CONTRACT_SAGA  # null and empty ones too: the contract says so
    assert set(written["tasks"][0]) == CONTRACT_TASK
    assert msgspec.json.decode(msgspec.json.encode(saga), type=Saga) == saga
    busy = msgspec.structs.replace(saga, unpublished="start", variables={"x": 1})
    assert {"unpublished", "variables"} <= set(msgspec.json.decode(msgspec.json.encode(busy)))


def test_facts_are_tagged_in_json():
    fact = TaskCompleted(workflow_id="w", ref="r", attempt=1, output=None, at="t")
    encoded = msgspec.json.encode(fact)
    assert b'"type":"TaskCompleted"' in encoded
    assert msgspec.json.decode(encoded, type=Fact) == fact


def test_a_list_request_rejects_a_typo():
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"statuss":"RUNNING"}', type=ListRequest)
    assert "statuss" in str(info.value)


def test_times_are_rfc3339_utc_with_milliseconds():
    moment = datetime.datetime(
        2026, 11, 23, 11, 2, 3, 456789, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
    )
    assert utc_text(moment) == "2026-11-23T10:02:03.456Z"
    assert utc_text(moment.replace(microsecond=0)) == "2026-11-23T10:02:03.000Z"


def test_utc_shift_moves_rfc3339_text_both_ways():
    assert utc_shift("2026-11-23T10:00:00.000Z", 90.5) == "2026-11-23T10:01:30.500Z"
    assert utc_shift("2026-11-23T10:00:00.000Z", -1) == "2026-11-23T09:59:59.000Z"
