"""The saga on a real nats-server: compensations in reverse order, then the failure workflow."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kapellmeister.agent import Agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.definitions import compile_definition, parse_definition
from kapellmeister.errors import TaskError
from kapellmeister.registry import Registry
from tests.support import body, call, saga, wait_finished


class Booking(msgspec.Struct):
    what: str


class Booked(msgspec.Struct):
    id: str


class Cancel(msgspec.Struct):
    booking: str


class Cancelled(msgspec.Struct):
    cancelled: str


CALLS: list[str] = []


async def book(req: Booking) -> Booked:
    CALLS.append(f"book {req.what}")
    if req.what == "payment":
        raise TaskError("card declined", code="declined", retryable=False)
    return Booked(id=f"{req.what}-1")


async def cancel(req: Cancel) -> Cancelled:
    CALLS.append(f"cancel {req.booking}")
    return Cancelled(cancelled=req.booking)


TRIP = """
name: trip
failure: trip_failed
tasks:
  - ref: flight
    type: SIMPLE
    task: book.make
    input: {what: flight}
    compensate:
      {ref: cancel_flight, type: SIMPLE, task: book.cancel, input: {booking: "${flight.output.id}"}}
  - ref: hotel
    type: SIMPLE
    task: book.make
    input: {what: hotel}
    compensate:
      {ref: cancel_hotel, type: SIMPLE, task: book.cancel, input: {booking: "${hotel.output.id}"}}
  - {ref: pay, type: SIMPLE, task: book.make, input: {what: payment}}
"""

TRIP_FAILED = """
name: trip_failed
input: {workflow_id: str, workflow: str, status: str, error: any, input: any}
tasks:
  - ref: tell
    type: EVENT
    subject: events.trip.failed
    input: {id: "${workflow.input.workflow_id}"}
output: {about: "${workflow.input.workflow_id}", why: "${workflow.input.error.message}"}
"""


@pytest.fixture
async def booking(nc, settings):
    agent = Agent("book", [task("book.make", book), task("book.cancel", cancel)], settings)
    await agent.start(nc)
    conductor = Conductor(
        settings, Registry([compile_definition(parse_definition(t)) for t in (TRIP, TRIP_FAILED)])
    )
    await conductor.start(nc)
    CALLS.clear()
    yield conductor
    await conductor.stop()
    await agent.stop()


async def test_a_failed_trip_cancels_hotel_then_flight_then_runs_the_failure_workflow(
    nc, js, booking
):
    await call(nc, "conductor.start.trip", {}, {"Workflow-Id": "trip-1"})
    state = (await wait_finished(js, ["trip-1"], timeout=20))["trip-1"]
    assert state["status"] == "FAILED"
    assert "card declined" in state["error"]["message"]
    assert CALLS == [
        "book flight",
        "book hotel",
        "book payment",
        "cancel hotel-1",
        "cancel flight-1",
    ]
    shown = {t["ref"]: t["status"] for t in state["tasks"]}
    assert (shown["cancel_hotel"], shown["cancel_flight"], shown["pay"]) == (
        "COMPLETED",
        "COMPLETED",
        "FAILED",
    )
    failure = (await wait_finished(js, ["trip-1-failure"]))["trip-1-failure"]
    assert failure["status"] == "COMPLETED"
    assert failure["output"] == {"about": "trip-1", "why": state["error"]["message"]}


async def test_terminate_with_compensation(nc, js, booking):
    definitions = Registry(
        [
            compile_definition(
                parse_definition(
                    TRIP.replace(
                        "{ref: pay, type: SIMPLE, task: book.make, input: {what: payment}}",
                        "{ref: wait_ok, type: WAIT}",
                    ).replace("name: trip", "name: trip2")
                )
            )
        ]
    )
    booking.registry.add(definitions.get("trip2"))
    await call(nc, "conductor.start.trip2", {}, {"Workflow-Id": "trip-2"})
    for _ in range(100):
        if any(t["ref"] == "wait_ok" for t in (await saga(js, "trip-2"))["tasks"]):
            break
        await asyncio.sleep(0.05)
    reply = body(
        await call(nc, "conductor.terminate.trip-2", {"reason": "off", "compensate": True})
    )
    assert reply["status"] == "RUNNING" and reply["compensating"]["status"] == "TERMINATED"
    state = (await wait_finished(js, ["trip-2"], timeout=20))["trip-2"]
    assert state["status"] == "TERMINATED"
    assert CALLS[-2:] == ["cancel hotel-1", "cancel flight-1"]
