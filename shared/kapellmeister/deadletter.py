"""Dead letters: fire-and-forget messages that cannot be handled, kept with the reason.

A message nobody can answer (a task or result that does not decode) must neither crash
the service nor vanish: it is recorded on ``deadletter.<service>`` in the DEADLETTERS
stream, with the reason, where it came from and its bytes, then terminated so JetStream
stops redelivering it. The record's ``Nats-Msg-Id`` is derived from the original's
stream and sequence, so a redelivery before the term lands records it once.
"""

from __future__ import annotations

import base64
import logging

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from kapellmeister.runtime import utc_now

__all__ = ["DeadLetter", "dead_letter", "record_dead_letter"]

log = logging.getLogger("kapellmeister.deadletter")
_encode = msgspec.json.Encoder().encode


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """What ``nats stream view DEADLETTERS`` shows for each message set aside."""

    service: str
    reason: str
    stream: str
    subject: str
    sequence: int
    headers: dict[str, str]
    data_base64: str
    at: str


async def record_dead_letter(
    js: JetStreamContext,
    service: str,
    reason: str,
    *,
    stream: str,
    subject: str,
    sequence: int,
    headers: dict[str, str],
    data: bytes,
    about: str = "",
) -> bool:
    """Publish a dead-letter record; False if it could not be stored.

    Its ``Nats-Msg-Id`` names the original message, the service and ``about`` (which of
    the service's uses of it failed), so a redelivered failure is recorded once while
    two services, or two triggers, failing on one message each get their record."""
    record = DeadLetter(
        service=service,
        reason=reason,
        stream=stream,
        subject=subject,
        sequence=sequence,
        headers=headers,
        data_base64=base64.b64encode(data).decode(),
        at=utc_now(),
    )
    msg_id = f"dlq:{stream}:{sequence}:{service}" + (f":{about}" if about else "")
    log.error("dead letter %s from %s: %s", msg_id, subject, reason)
    try:
        await js.publish(f"deadletter.{service}", _encode(record), headers={"Nats-Msg-Id": msg_id})
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("dead letter %s not recorded (%s)", msg_id, exc)
        return False
    return True


async def dead_letter(js: JetStreamContext, msg: Msg, service: str, reason: str) -> None:
    """Record ``msg`` as a dead letter, then terminate it (no more redeliveries).

    If the record cannot be stored the message is left unacked: it comes back and is
    recorded then.
    """
    meta = msg.metadata
    if await record_dead_letter(
        js,
        service,
        reason,
        stream=meta.stream,
        subject=msg.subject,
        sequence=meta.sequence.stream,
        headers=dict(msg.headers or {}),
        data=msg.data,
    ):
        await msg.term()
