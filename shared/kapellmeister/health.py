"""``/livez`` and ``/readyz`` over HTTP, for container health checks and probes.

``KAPELLMEISTER_HEALTH_PORT`` (and ``_HOST``) turn it on; every service serves:

* ``GET /livez``: 200 while the process's event loop answers (a loop stuck in a handler
  times the probe out, and the orchestrator restarts the container);
* ``GET /readyz``: 200 once the process is connected to NATS and every durable consumer
  it pulls from is bound (JetStream knows it), 503 otherwise. The body says which.

Consumers are known from the pull workers running in the process (`PullWorker`), so a
service needs no code of its own. A few lines of HTTP/1.0 on ``asyncio.start_server``:
two fixed paths need no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from kapellmeister.consumer import running_workers

__all__ = ["Readiness", "readiness", "serve_health"]

log = logging.getLogger("kapellmeister.health")

_CHECK_TIMEOUT_S = 2.0


class Readiness(msgspec.Struct, frozen=True):
    """What ``/readyz`` answers: ready or not, and each consumer's state."""

    ready: bool
    consumers: dict[str, str]
    reason: str = ""


async def readiness() -> Readiness:
    """Connected to NATS, and every running pull worker's consumer bound?"""
    workers = running_workers()
    if not workers:
        return Readiness(False, {}, "starting: no consumer bound yet")
    consumers: dict[str, str] = {}
    for worker in workers:
        consumers[f"{worker.stream}/{worker.durable}"] = await worker.bound(_CHECK_TIMEOUT_S)
    broken = [name for name, state in consumers.items() if state != "bound"]
    return Readiness(not broken, consumers, f"not bound: {', '.join(broken)}" if broken else "")


async def serve_health(host: str, port: int) -> asyncio.Server:
    """Serve ``/livez`` and ``/readyz`` on ``host:port`` until the server is closed."""
    server = await asyncio.start_server(_answer, host, port)
    log.info("health on http://%s:%d/livez and /readyz", host, port)
    return server


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), timeout=5.0)
        parts = request.decode("latin-1").split()
        path = parts[1] if len(parts) >= 2 and parts[0] in ("GET", "HEAD") else ""
        if path == "/livez":
            status, body = 200, b'{"live": true}'
        elif path == "/readyz":
            state = await readiness()
            status, body = (200 if state.ready else 503), msgspec.json.encode(state)
        else:
            status, body = 404, b'{"error": "GET /livez or /readyz"}'
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        head = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + (body if parts[:1] != ["HEAD"] else b""))
        await writer.drain()
    except (TimeoutError, ConnectionError) as exc:
        log.debug("health request dropped: %r", exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
