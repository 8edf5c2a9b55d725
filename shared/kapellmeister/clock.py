"""The server's clock, for the facts no message stamps.

A fact from a stream carries the server's timestamp (its message's). A request (a start,
a signal, a terminate) has none, yet its time is compared with deadlines the server's
timers keep. So the conductor reads the server's time, never its own host's wall clock:
the ``ts`` of a stream-info reply, taken at start and again at every sweep, kept as an
anchor on this process's monotonic clock. ``now()`` is the anchor plus the monotonic time
since (the reply's round trip halved into it), so a host whose clock is minutes off
still times its facts right, and no request waits for a round trip.
"""

from __future__ import annotations

import datetime
import time

import msgspec
import nats.errors
from nats.aio.client import Client

from kapellmeister.messages import utc_text
from kapellmeister.topology import RESULTS

__all__ = ["ServerClock", "epoch_s", "server_now", "server_time"]


class _Info(msgspec.Struct):
    ts: str = ""


_decode_info = msgspec.json.Decoder(_Info).decode


async def server_time(nc: Client) -> datetime.datetime:
    """The server's time now, from a stream-info reply's ``ts`` (nats-server 2.10+)."""
    reply = await nc.request(f"$JS.API.STREAM.INFO.{RESULTS}", b"", timeout=5.0)
    stamp = _decode_info(reply.data).ts
    if not stamp:
        raise nats.errors.Error("the server's stream info carries no time (nats-server < 2.10)")
    return datetime.datetime.fromisoformat(stamp)


def epoch_s(text: str) -> float:
    """A saga time (`utc_text`) as Unix seconds."""
    return datetime.datetime.fromisoformat(text).timestamp()


async def server_now(nc: Client) -> str:
    """The server's time now as the saga's RFC 3339 UTC text."""
    return utc_text(await server_time(nc))


class ServerClock:
    """The server's time, read from a monotonic clock anchored at the last `sync`."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._anchor: tuple[datetime.datetime, float] | None = None
        self._last = ""

    async def sync(self) -> str:
        """Read the server's time (one request); returns it as text."""
        sent = time.monotonic()
        stamp = await server_time(self.nc)
        received = time.monotonic()
        self._anchor = (stamp, (sent + received) / 2)
        return utc_text(stamp)

    def now(self) -> str:
        """The server's time now, as text (`sync` must have run once); never earlier than
        what it said before, though a new anchor may be a little behind the last one."""
        assert self._anchor is not None, "sync() first"
        stamp, at = self._anchor
        now = utc_text(stamp + datetime.timedelta(seconds=time.monotonic() - at))
        self._last = max(now, self._last)
        return self._last
