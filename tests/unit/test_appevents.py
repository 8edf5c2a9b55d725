"""Application events in one process: emit returns at once, listeners are isolated, every
switch works, a warning once for an event nobody hears, an error for a listener twice."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kapellmeister.appevents import AppEvents, DuplicateListener, Switches


class Recorder:
    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.got: list[object] = []

    async def __call__(self, payload: object) -> None:
        self.got.append(payload)


async def test_emit_returns_before_a_slow_listener_finishes():
    events = AppEvents("shop")
    released, finished = asyncio.Event(), asyncio.Event()

    async def slow(payload: object) -> None:
        await released.wait()
        finished.set()

    events.listen("order.placed", slow)
    events.emit("order.placed", {"order": 1})  # not awaited: it cannot block
    await asyncio.sleep(0)
    assert not finished.is_set()
    released.set()
    await events.drain()
    assert finished.is_set()


async def test_a_failing_listener_affects_neither_the_emitter_nor_the_others(caplog):
    events = AppEvents("shop")
    mail = Recorder("mail")

    async def broken(payload: object) -> None:
        raise RuntimeError("smtp down")

    events.listen("order.placed", broken)
    events.listen("order.placed", mail)
    events.emit("order.placed", {"order": 2})
    await events.drain()
    assert mail.got == [{"order": 2}]
    assert "listener 'broken' failed on 'order.placed'" in caplog.text
    assert "smtp down" in caplog.text


@pytest.mark.parametrize(
    ("switches", "heard"),
    [
        (Switches(), {"mail": 1, "bill": 1}),
        (Switches(events={"order.placed": False}), {"mail": 0, "bill": 0}),
        (Switches(listeners={"mail": False}), {"mail": 0, "bill": 1}),
        (Switches(pairs={"order.placed:bill": False}), {"mail": 1, "bill": 0}),
    ],
)
async def test_each_event_listener_and_pair_can_be_switched_off(switches, heard):
    events = AppEvents("shop", switches)
    mail, bill = Recorder("mail"), Recorder("bill")
    events.listen("order.placed", mail)
    events.listen("order.placed", bill)
    events.emit("order.placed", {})
    await events.drain()
    assert {"mail": len(mail.got), "bill": len(bill.got)} == heard


def test_switches_come_from_the_environment_and_a_config_file(tmp_path):
    config = tmp_path / "events.yaml"
    config.write_text("events: {order.placed: false}\npairs: {order.paid:bill: false}\n")
    switches = Switches.from_env(
        {
            "KAPELLMEISTER_EVENTS_CONFIG": str(config),
            "KAPELLMEISTER_LISTENERS_OFF": "mail, sms",
            "KAPELLMEISTER_EVENT_LISTENERS_OFF": "order.shipped:bill",
        }
    )
    assert not switches.on("order.placed")
    assert switches.on("order.paid") and not switches.on("order.paid", "bill")
    assert not switches.on("order.paid", "mail") and not switches.on("x", "sms")
    assert not switches.on("order.shipped", "bill") and switches.on("order.shipped", "audit")
    assert Switches.from_env({}) == Switches()


async def test_an_event_nobody_hears_is_a_warning_once(caplog):
    events = AppEvents("shop", Switches(listeners={"mail": False}))
    events.listen("order.paid", Recorder("mail"))  # registered, but switched off
    with caplog.at_level(logging.WARNING, logger="kapellmeister.appevents"):
        for _ in range(3):
            events.emit("order.lost", {})
            events.emit("order.paid", {})
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "shop: event 'order.lost' emitted with no listener",
        "shop: event 'order.paid' emitted with no listener",
    ]


def test_a_listener_registered_twice_for_an_event_is_an_error():
    events = AppEvents("shop")
    mail = Recorder("mail")
    events.listen("order.placed", mail)
    events.listen("order.paid", mail)  # another event: fine
    with pytest.raises(
        DuplicateListener, match=r"'mail' is already registered for 'order\.placed'"
    ):
        events.listen("order.placed", mail)
    with pytest.raises(DuplicateListener):
        events.listen("order.placed", Recorder("other"), name="mail")


def test_durable_listeners_whose_consumers_would_meet_are_refused():
    events = AppEvents("shop")
    events.listen("order.placed", Recorder("bill"), durable=True)
    with pytest.raises(DuplicateListener, match="share 'order_placed-shop_bill'"):
        events.listen("order_placed", Recorder("bill"), durable=True)


async def test_an_emit_before_start_warns_that_durable_listeners_miss_it(caplog):
    events = AppEvents("shop")
    events.listen("order.placed", Recorder("bill"), durable=True)
    with caplog.at_level(logging.WARNING, logger="kapellmeister.appevents"):
        events.emit("order.placed", {})
        events.emit("order.placed", {})
    assert [r.getMessage() for r in caplog.records] == [
        "shop: event 'order.placed' emitted before start(): its durable listeners miss it"
    ]
