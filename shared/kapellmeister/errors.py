"""Every error kapellmeister raises or replies with, and its NATS micro code.

The tree::

    KapellmeisterError                 code        status
    ├── BadRequest                     bad_request   400
    │   └── InvalidDefinition          invalid_definition 400
    ├── NotFound                       not_found     404
    │   ├── WorkflowNotFound           workflow_not_found 404
    │   ├── DefinitionNotFound         definition_not_found 404
    │   └── ScheduleNotFound           schedule_not_found 404
    ├── Conflict                       conflict      409
    ├── Unavailable                    unavailable   503
    └── TaskError                      task_error    500 (or what the handler says)

A handler raises `TaskError` to say how its failure should be treated: `retryable=False`
makes it terminal (the conductor records it and does not retry), `retry_after` asks for
a later redelivery. These are the fields of Temporal's ``ApplicationError`` and arq's
``Retry(defer=...)``. The agent runtime is the one place that turns errors into replies.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = [
    "BadRequest",
    "Conflict",
    "DefinitionNotFound",
    "ErrorBody",
    "ErrorDetail",
    "InvalidDefinition",
    "KapellmeisterError",
    "NotFound",
    "ScheduleNotFound",
    "TaskError",
    "Unavailable",
    "WorkflowNotFound",
    "error_reply",
]


class ErrorDetail(msgspec.Struct, frozen=True):
    """The `error` member of an error reply body."""

    code: int
    type: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """The JSON body of every error reply: ``{"error": {"code", "type", "message"}}``."""

    error: ErrorDetail


class KapellmeisterError(Exception):
    """Base of every error kapellmeister raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> ErrorDetail:
        return ErrorDetail(code=self.status, type=self.code, message=self.message)


class BadRequest(KapellmeisterError):
    """The request is malformed or fails validation; nothing was changed."""

    code = "bad_request"
    status = 400


class InvalidDefinition(BadRequest):
    """A workflow definition does not parse or fails a static check."""

    code = "invalid_definition"


class NotFound(KapellmeisterError):
    code = "not_found"
    status = 404


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"


class DefinitionNotFound(NotFound):
    code = "definition_not_found"


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"


class Conflict(KapellmeisterError):
    """The request is valid but not in the workflow's current state."""

    code = "conflict"
    status = 409


class Unavailable(KapellmeisterError):
    """A dependency (NATS, JetStream) did not answer in time; try again."""

    code = "unavailable"
    status = 503


class TaskError(KapellmeisterError):
    """Raised by a task handler to fail its task, saying whether to retry.

    Args:
        message: what went wrong, recorded in the saga state.
        code: a stable slug for the failure (``"card_declined"``).
        retryable: False makes the failure terminal: no redelivery, no retry.
        retry_after: seconds to wait before the next delivery when retryable.
    """

    status = 500

    def __init__(
        self,
        message: str,
        *,
        code: str = "task_error",
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.error_code = code
        self.retryable = retryable
        self.retry_after = retry_after

    def body(self) -> ErrorDetail:
        status = 500 if self.retryable else 422
        return ErrorDetail(code=status, type=self.error_code, message=self.message)


def error_reply(detail: ErrorDetail) -> tuple[dict[str, str], bytes]:
    """Return the NATS micro error headers and JSON body for an error.

    A header value is one line, so the message is folded to one (YAML parse errors come
    with several) and the body says exactly what the header says.
    """
    detail = msgspec.structs.replace(detail, message=" ".join(detail.message.split()))
    headers = {
        "Nats-Service-Error": detail.message,
        "Nats-Service-Error-Code": str(detail.code),
    }
    return headers, msgspec.json.encode(ErrorBody(error=detail))
