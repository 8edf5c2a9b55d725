"""The web UI's only way to act: requests to the conductor's public NATS API.

Every page and every button goes through `ConductorClient.call`, so the UI can do no more
than the API allows, and an action the API refuses shows the API's own error body.
"""

from __future__ import annotations

import msgspec
import nats.errors
from nats.aio.client import Client

__all__ = ["ApiError", "ConductorClient"]


class ApiError(Exception):
    """An error reply (or no reply): ``code`` and the contract's JSON error ``body``."""

    def __init__(self, code: int, kind: str, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message
        self.body = body or msgspec.json.encode(
            {"error": {"code": code, "type": kind, "message": message}}
        )


class _Error(msgspec.Struct):
    code: int = 500
    type: str = "internal"
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error = msgspec.field(default_factory=_Error)


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


class ConductorClient:
    """Requests on ``conductor.*`` over one NATS connection."""

    def __init__(self, nc: Client, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout

    async def call(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> bytes:
        """The reply's body; raises `ApiError` for an error reply, no responder or no reply."""
        try:
            reply = await self.nc.request(subject, payload, timeout=self.timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise ApiError(503, "unavailable", f"no conductor answers {subject}") from None
        except nats.errors.TimeoutError:
            raise ApiError(
                503, "unavailable", f"no reply on {subject} within {self.timeout:g} s"
            ) from None
        headers = reply.headers or {}
        if "Nats-Service-Error-Code" in headers:
            try:
                error = _decode_error(reply.data).error
            except msgspec.DecodeError:
                code = int(headers["Nats-Service-Error-Code"])
                raise ApiError(code, "error", headers.get("Nats-Service-Error", "")) from None
            raise ApiError(error.code, error.type, error.message, reply.data)
        return reply.data
