"""NATS micro endpoints whose handlers return bytes or raise; errors become replies here.

This is the one place where exceptions turn into the contract's error replies: headers
``Nats-Service-Error`` / ``Nats-Service-Error-Code`` and the JSON body
``{"error": {"code", "type", "message"}}``. Our errors keep their code;
``msgspec.ValidationError`` and malformed JSON are 400 with msgspec's path message;
anything else is a 500 ``internal``, logged with its traceback, and the service keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.micro.request import Request
from nats.micro.service import Service

from kapellmeister.errors import ErrorDetail, KapellmeisterError, error_reply
from kapellmeister.runtime import within

__all__ = ["EndpointHandler", "add_endpoint", "error_detail", "stop_service"]

log = logging.getLogger("kapellmeister.micro")

EndpointHandler = Callable[[Request], Awaitable[bytes]]


def error_detail(exc: BaseException) -> ErrorDetail:
    """The reply code, slug and message for an exception."""
    if isinstance(exc, KapellmeisterError):
        return exc.body()
    if isinstance(exc, msgspec.ValidationError):
        return ErrorDetail(code=400, type="bad_request", message=str(exc))
    if isinstance(exc, msgspec.DecodeError):
        return ErrorDetail(code=400, type="bad_request", message=f"malformed JSON: {exc}")
    return ErrorDetail(code=500, type="internal", message=f"internal error: {type(exc).__name__}")


async def add_endpoint(
    service: Service, name: str, subject: str, handler: EndpointHandler, concurrency: int = 64
) -> None:
    """Serve ``handler`` on ``subject`` as endpoint ``name`` of ``service``.

    Requests are handled concurrently, up to ``concurrency`` at once per endpoint: nats-py
    awaits an endpoint's handler inside its subscription loop, which would otherwise
    serialise every request behind the previous one's round trips to JetStream.
    """
    room = asyncio.Semaphore(max(1, concurrency))
    running: set[asyncio.Task[None]] = set()

    async def handle(request: Request) -> None:
        started = time.perf_counter_ns()
        try:
            body = await handler(request)
        except Exception as exc:
            detail = error_detail(exc)
            if detail.code >= 500:
                log.exception("%s failed on %s", name, request.subject)
            # nats-py counts an error only when its handler raises, but raising loses the
            # JSON body; so we reply ourselves and keep `nats micro stats` honest by hand.
            endpoint._num_errors += 1
            endpoint._last_error = f"{detail.code}:{detail.message}"
            headers, payload = error_reply(detail)
            await request.respond(payload, headers=headers)
            return
        finally:
            room.release()
            endpoint._processing_time += time.perf_counter_ns() - started
            endpoint._average_processing_time = endpoint._processing_time // max(
                1, endpoint._num_requests
            )
        await request.respond(body)

    async def serve(request: Request) -> None:
        await room.acquire()  # a full endpoint holds back its subscription: backpressure
        task = asyncio.create_task(handle(request))
        running.add(task)
        task.add_done_callback(running.discard)

    await service.add_endpoint(name=name, subject=subject, handler=serve)
    endpoint = service._endpoints[-1]


async def stop_service(service: Service, timeout_s: float = 5.0) -> None:
    """Stop ``service``, for at most ``timeout_s``: nats-py drains its discovery
    subscriptions by joining their pending queues, without a bound, and a drain stuck
    there must not keep a stopping process (or a test) waiting for ever."""
    if not await within(service.stop(), timeout_s):
        name = service.info().name
        log.warning("micro service %s did not stop in %.0f s; left behind", name, timeout_s)
