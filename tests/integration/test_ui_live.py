"""The web UI's live streams against a real nats-server: shared feeds, and a stop."""

from __future__ import annotations

import asyncio

from kapellmeister.ui.live import Streams, sse


async def test_pages_with_one_filter_share_one_subscription_and_one_query(nc):
    streams = Streams(lambda: nc, "changes.>")
    asked = 0

    async def rows() -> str:
        nonlocal asked
        asked += 1
        return sse("rows", f"rows {asked}")

    first, second = streams.rows("k", rows), streams.rows("k", rows)
    assert [await anext(first), await anext(second)] == [": live\n\n"] * 2
    assert list(streams.feeds) == ["k"] and streams.changes.subscribed
    for subject in ("changes.a", "changes.b", "changes.c"):
        await nc.publish(subject, b"")
    got = await asyncio.wait_for(asyncio.gather(anext(first), anext(second)), 5)
    assert list(got) == [sse("rows", "rows 1")] * 2  # three changes, one query, both pages
    assert asked == 1

    await first.aclose()
    assert streams.changes.subscribed  # the second page still listens
    await second.aclose()
    assert streams.feeds == {} and not streams.changes.subscribed


async def test_a_stop_ends_every_open_stream(nc):
    streams = Streams(lambda: nc, "changes.>")

    async def rows() -> str:
        return sse("rows", "")

    listing = streams.rows("k", rows)
    assert await anext(listing) == ": live\n\n"
    pending = asyncio.ensure_future(anext(listing))
    await asyncio.sleep(0.1)
    streams.stop()
    await asyncio.wait_for(asyncio.wait({pending}), 5)
    assert isinstance(pending.exception(), StopAsyncIteration)
    assert streams.feeds == {} and not streams.changes.subscribed


def test_event_data_is_one_line_of_json_whatever_the_text():
    assert sse("rows", "a\nb\r\nevent: saga\rdata: x") == (
        'event: rows\ndata: "a\\nb\\r\\nevent: saga\\rdata: x"\n\n'
    )
