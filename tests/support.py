"""Helpers the integration and end-to-end tests share: requests as the nats CLI sends them."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import KeyNotFoundError, NotFoundError

from kapellmeister.messages import TERMINAL
from kapellmeister.processes import ServiceProcess
from kapellmeister.store import read_bucket
from services.agenda.handlers import ActivityRequest
from services.agenda.handlers import activity as agenda_activity
from services.weather.handlers import ReportRequest
from services.weather.handlers import report as weather_report


def encode(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else msgspec.json.encode(payload)


async def call(
    nc: Client,
    subject: str,
    payload: Any = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Msg:
    """A request exactly as `nats req <subject> '<json>'` sends it."""
    return await nc.request(subject, encode(payload), timeout=timeout, headers=headers)


def body(msg: Msg) -> Any:
    return msgspec.json.decode(msg.data)


def assert_error(msg: Msg, code: int, kind: str | None = None) -> dict[str, Any]:
    """The reply is a NATS micro error with this code: headers and JSON body agree."""
    headers = msg.headers or {}
    assert headers.get("Nats-Service-Error-Code") == str(code), (headers, msg.data)
    assert headers.get("Nats-Service-Error")
    error = body(msg)["error"]
    assert error["code"] == code
    assert error["message"] == headers["Nats-Service-Error"]
    if kind is not None:
        assert error["type"] == kind
    return dict(error)


async def find_saga(js: JetStreamContext, workflow_id: str) -> dict[str, Any] | None:
    """The workflow's KV value, as `nats kv get workflows <id>` shows it (None if absent)."""
    kv = await js.key_value("workflows")
    try:
        entry = await kv.get(workflow_id)
    except KeyNotFoundError:
        return None
    return dict(msgspec.json.decode(entry.value or b"{}"))


async def stored_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """The keys of a KV bucket that start with ``prefix``, sorted (``nats kv ls``)."""
    kv = await js.key_value(bucket)
    return sorted([key async for key, _ in read_bucket(kv) if key.startswith(prefix)])


async def saga(js: JetStreamContext, workflow_id: str) -> dict[str, Any]:
    state = await find_saga(js, workflow_id)
    assert state is not None, f"no workflow {workflow_id}"
    return state


async def wait_finished(
    js: JetStreamContext, workflow_ids: list[str], timeout: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Poll the workflows bucket until every workflow is terminal; their states."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    states: dict[str, dict[str, Any]] = {}
    pending = list(workflow_ids)
    while pending:
        for workflow_id in list(pending):
            state = await find_saga(js, workflow_id)
            if state is not None and state["status"] in TERMINAL:
                states[workflow_id] = state
                pending.remove(workflow_id)
        if pending:
            if loop.time() > deadline:
                raise AssertionError(f"{len(pending)} workflows not finished, e.g. {pending[:3]}")
            await asyncio.sleep(0.1)
    return states


async def expected_activity(when: str) -> str:
    """What plan_day must choose for this datetime, from the agents' own handlers."""
    planned = (await agenda_activity(ActivityRequest(datetime=when))).activity
    if planned != "free":
        return planned
    weather = await weather_report(ReportRequest(date=when))
    return "code_for_fun" if weather.rain or weather.snow else "run"


async def stream_messages(js: JetStreamContext, stream: str, subject: str) -> list[RawStreamMsg]:
    """Every message stored in ``stream`` on ``subject`` (direct gets: works on work queues too)."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return []
    messages: list[RawStreamMsg] = []
    seq = info.state.first_seq
    while seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        messages.append(msg)
        seq = (msg.seq or seq) + 1
    return messages


async def dead_letters(
    js: JetStreamContext, subject: str, timeout: float = 10.0, count: int = 1
) -> list[dict[str, Any]]:
    """The dead-letter records on ``subject`` once there are ``count`` (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await stream_messages(js, "DEADLETTERS", subject)
        if len(found) >= count or loop.time() > deadline:
            return [dict(msgspec.json.decode(m.data or b"{}")) for m in found]
        await asyncio.sleep(0.05)


def days(count: int) -> list[tuple[str, str]]:
    """``count`` (user, datetime) inputs covering weekdays, weekends and every hour."""
    start = datetime.datetime(2026, 11, 16)
    return [
        (f"user{i}", (start + datetime.timedelta(hours=7 * i + 3)).strftime("%Y-%m-%dT%H:%M:%S"))
        for i in range(count)
    ]


def free_days(count: int) -> list[tuple[str, str]]:
    """``count`` inputs at hours the agenda says are free, so each workflow asks the weather."""
    first_saturday = datetime.datetime(2026, 1, 3, 12)
    return [
        (f"free{i}", (first_saturday + datetime.timedelta(weeks=i)).strftime("%Y-%m-%dT%H:%M:%S"))
        for i in range(count)
    ]


async def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET ``http://127.0.0.1:<port><path>``: its status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), msgspec.json.decode(body)


def free_port() -> int:
    """A TCP port free on loopback now (for a server to take)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Stack:
    """Services as child processes (``python -m services.<name>`` unless ``argv`` says),
    each ended by its own PID; ``env`` goes to every one, with what `start` adds."""

    def __init__(self, nats_url: str, logs: Path, env: Mapping[str, str] | None = None) -> None:
        self.nats_url = nats_url
        self.logs = logs
        self.env = dict(env or {})
        self.processes: list[ServiceProcess] = []

    def start(
        self,
        name: str,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> ServiceProcess:
        index = sum(p.name == name for p in self.processes)
        process = ServiceProcess(
            name,
            self.nats_url,
            self.logs / f"{name}-{index}.log",
            {**self.env, **(env or {})},
            argv=argv,
        )
        self.processes.append(process.start())
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


async def http_request(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to ``127.0.0.1:<port>`` with exactly these headers (``Host``
    as a browser on loopback sends it, unless given): the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = {"Host": f"127.0.0.1:{port}", "Connection": "close", "Content-Length": str(len(body))}
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in {**sent, **(headers or {})}.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, rest = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


class EventStream:
    """A Server-Sent Events response, read event by event."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def next(self, event: str, containing: str = "", timeout: float = 15.0) -> str:
        """The data of the next ``event`` whose data contains ``containing``."""
        async with asyncio.timeout(timeout):
            while True:
                name, data = "", []
                while (line := (await self.reader.readline()).decode()) not in ("\r\n", "\n"):
                    assert line, "the stream ended"
                    if line.startswith("event: "):
                        name = line.removeprefix("event: ").strip()
                    elif line.startswith("data: "):
                        data.append(line.removeprefix("data: ").rstrip("\r\n"))
                text = "\n".join(data)
                if name == event and containing in text:
                    return text


@contextlib.asynccontextmanager
async def event_stream(port: int, path: str) -> AsyncIterator[EventStream]:
    """GET ``path`` as an EventSource would; the stream is open once this yields."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # HTTP/1.0: the body comes as it is, until the server closes (no chunked framing).
    head = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
    writer.write(head.encode() + b"\r\n")
    await writer.drain()
    try:
        status = (await reader.readline()).split()[1]
        assert status == b"200", status
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the response's headers
        # The stream's first line: what it follows is subscribed to by now.
        assert (await asyncio.wait_for(reader.readline(), 15)).startswith(b": live")
        assert await reader.readline() == b"\n"
        yield EventStream(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
