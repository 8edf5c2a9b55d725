"""Durable application listeners, backed by the EVENTS stream (real nats-server)."""

from __future__ import annotations

import asyncio

from kapellmeister.appevents import AppEvents
from tests.support import stream_messages


async def test_a_durable_listener_gets_each_event_and_survives_a_crash(nc, js, settings):
    first = AppEvents("shop")
    got: list[object] = []
    fails = {"left": 1}

    async def bill(payload: object) -> None:
        if fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("billing down")  # retried with backoff by the runtime
        got.append(payload)

    first.listen("order.placed", bill, durable=True)
    await first.start(nc, settings)
    first.emit("order.placed", {"order": 1})
    await first.drain()
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.05)
    assert got == [{"order": 1}]
    [stored] = await stream_messages(js, "EVENTS", "events.app.order.placed")
    assert stored.data == b'{"order":1}'
    # The process "dies" before the next event is handled; a new one takes over the
    # same durable consumer and gets it.
    await first.stop()
    await js.publish("events.app.order.placed", b'{"order": 2}', headers={"Nats-Msg-Id": "o2"})
    second = AppEvents("shop")
    later: list[object] = []

    async def bill_again(payload: object) -> None:
        later.append(payload)

    second.listen("order.placed", bill_again, name="bill", durable=True)
    await second.start(nc, settings)
    try:
        for _ in range(100):
            if later:
                break
            await asyncio.sleep(0.05)
    finally:
        await second.stop()
    assert later == [{"order": 2}]
    info = await js.consumer_info("EVENTS", "order_placed-shop_bill")
    assert info.num_ack_pending == 0 and info.num_pending == 0
