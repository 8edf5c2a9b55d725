"""JetStream publishes with their acks pipelined: what the hot path publishes through.

nats-py's ``js.publish`` is a request: per message it draws a NUID and two random bytes
from the OS, sets up a future with a done callback and an ``asyncio.wait_for`` timer,
and parses the ack with the json module into a dataclass. A profile of the conductor
under load put that at about an eighth of its CPU. Here one subscription takes every
ack (``<inbox>.<n>``, a counter, no randomness), each publish waits on a bare future,
one timer task a second fails the overdue ones, and msgspec decodes the ack.

nats-py's ``nc.publish`` then builds the header block key by key (a regex match, a
strip, a translate and five bytearray extends per header): a tenth of a conductor's
CPU. Here the ``HPUB`` command is one formatted string. What nats-py checks is still
checked, more cheaply: the subjects have no whitespace, a header name is a token
(checked once per name, and names are the code's constants), and a header value needing
nats-py's cleaning (padding, CR or LF) goes through ``nc.publish`` as before, as does
anything while the client is not plainly connected.

Errors are nats-py's, so callers handle both alike: a refusal is a
`nats.js.errors.APIError` (`WrongLastSequence`, a subclass, for a failed
compare-and-set), no stream a `nats.errors.NoRespondersError`, no ack in time a
`nats.errors.TimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Mapping, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["PubAck", "Publisher", "WrongLastSequence"]

# JSStreamWrongLastSequenceErrF and its constant form: a compare-and-set lost.
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class PubAck(msgspec.Struct, frozen=True):
    stream: str
    seq: int
    duplicate: bool = False


class _Error(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Reply(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _Error | None = None


_decode = msgspec.json.Decoder(_Reply).decode

# nats-py's own rules (`nats.aio.client`): what a subject must not hold, what a header
# name must be.
_NOT_IN_SUBJECT = re.compile(r"[ \t\r\n]")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header names found good: the few the code uses (bounded, should a caller vary them).
_good_names: set[str] = set()


def _hpub(subject: str, reply: str, headers: Mapping[str, str], payload: bytes) -> bytes | None:
    """The ``HPUB`` command for one message, or None where nats-py must clean or refuse
    something (a bad subject or header name, a value with padding or a line break)."""
    lines = []
    for name, value in headers.items():
        if name not in _good_names:
            if not _HEADER_NAME.fullmatch(name) or len(_good_names) >= 256:
                return None
            _good_names.add(name)
        if "\r" in value or "\n" in value or value.strip() != value:
            return None
        lines.append(f"{name}: {value}\r\n")
    if not subject or _NOT_IN_SUBJECT.search(subject):
        return None
    head = f"NATS/1.0\r\n{''.join(lines)}\r\n".encode()
    size = len(head)
    return b"%s\r\n%s%s\r\n" % (
        f"HPUB {subject} {reply} {size} {size + len(payload)}".encode(),
        head,
        payload,
    )


def _ack(reply: _Reply) -> PubAck:
    """The ack in ``reply``, or the error it says as nats-py would raise it."""
    if reply.error is not None:
        error = reply.error
        if error.err_code in _WRONG_LAST_SEQUENCE:
            raise WrongLastSequence(error.description)
        # nats-py's own classes by code: 400 BadRequestError, 503 ServiceUnavailable…
        nats.js.errors.APIError.from_error(msgspec.structs.asdict(error))
    return PubAck(stream=reply.stream, seq=reply.seq, duplicate=reply.duplicate)


class WrongLastSequence(nats.js.errors.KeyWrongLastSequenceError):
    """The subject's last sequence was not the one expected: someone wrote first."""


class Publisher:
    """Publishes to JetStream on ``nc`` and awaits each ack, many in flight at once."""

    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = ""
        self._counter = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future[_Reply], float]] = {}
        self._sub: Subscription | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
        self._reaper = asyncio.create_task(self._reap(), name="publisher timeouts")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None  # a publish from now on fails at once, it waits on nothing
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self._waiting.clear()

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Store ``payload`` on ``subject``; its ack.

        Raises:
            WrongLastSequence: a ``Nats-Expected-Last-Subject-Sequence`` did not hold.
            nats.errors.ConnectionClosedError: the publisher is not started, or stopped.
            nats.js.errors.APIError: any other refusal (a duplicate is not one).
            nats.errors.NoRespondersError: no stream takes ``subject``.
            nats.errors.TimeoutError: no ack within ``timeout`` (default: the publisher's).
        """
        if self._sub is None:
            raise nats.errors.ConnectionClosedError()  # not started, or stopped
        token = str(next(self._counter))
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        self._waiting[token] = (future, deadline)
        try:
            await self._send(subject, f"{self._prefix}.{token}", payload, headers)
            reply = await future
        finally:
            self._waiting.pop(token, None)
        return _ack(reply)

    async def publish_all(
        self, messages: Sequence[tuple[str, bytes, Mapping[str, str] | None]]
    ) -> list[PubAck | Exception]:
        """Store each ``(subject, payload, headers)``, all in flight at once; each one's
        ack or error (as `publish` would raise it), in order. Cheaper than as many
        `publish` calls gathered: one wait, no task per message."""
        if self._sub is None:
            raise nats.errors.ConnectionClosedError()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._timeout
        tokens: list[str] = []
        futures: list[asyncio.Future[_Reply]] = []
        try:
            for subject, payload, headers in messages:
                token = str(next(self._counter))
                future: asyncio.Future[_Reply] = loop.create_future()
                self._waiting[token] = (future, deadline)
                tokens.append(token)
                futures.append(future)
                await self._send(subject, f"{self._prefix}.{token}", payload, headers)
            replies = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        outcomes: list[PubAck | Exception] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                outcomes.append(reply)
                continue
            try:
                outcomes.append(_ack(reply))
            except nats.errors.Error as exc:
                outcomes.append(exc)
        return outcomes

    async def _send(
        self, subject: str, reply: str, payload: bytes, headers: Mapping[str, str] | None
    ) -> None:
        nc = self._nc
        command = None
        # Connected, not draining, in size: the cases where nc.publish only sends.
        if headers and nc.is_connected and not nc.is_draining and len(payload) <= nc.max_payload:
            command = _hpub(subject, reply, headers, payload)
        if command is None:
            await nc.publish(subject, payload, reply=reply, headers=dict(headers or {}) or None)
            return
        # What nc.publish does after its checks: queue the command, count it, and wake
        # the flusher unless a flush is already due.
        await nc._send_command(command)
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        waiting = self._waiting.get(token)
        if waiting is None or waiting[0].done():
            return  # came after its timeout
        future = waiting[0]
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.errors.NoRespondersError())
            return
        try:
            future.set_result(_decode(msg.data))
        except msgspec.DecodeError as exc:
            future.set_exception(nats.js.errors.APIError(description=f"not an ack: {exc}"))

    async def _reap(self) -> None:
        """Fail what waited past its deadline: one timer for every publish in flight."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for future, deadline in list(self._waiting.values()):
                if deadline <= now and not future.done():
                    future.set_exception(nats.errors.TimeoutError())
