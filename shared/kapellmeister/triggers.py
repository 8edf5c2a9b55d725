"""Events as the way in: a definition's ``triggers`` start it from the EVENTS stream.

``nats pub events.day.requested '{"user": "ann"}'`` (or a CloudEvents JSON envelope,
unwrapped first) is stored durably in EVENTS, deduplicated there by ``Nats-Msg-Id``.
The conductors share one durable consumer on ``events.>`` (``conductor-triggers``,
created to deliver what is published from then on). For each event, every definition
whose latest version has a trigger matching the subject is started, with the trigger's
``input`` evaluated against ``${event.…}``, under the workflow id
``<definition>=<event id>``: the event id is its ``Nats-Msg-Id``, else the CloudEvents
``id`` (with a digest of its ``source``), else ``seq-<stream sequence>``. The id makes
the start idempotent, so a redelivery or a second publish of the same event starts
nothing new.

An event a trigger cannot use (not JSON, or an input the definition refuses) is recorded
in DEADLETTERS with the reason and changes nothing; the other triggers of the event still
start. The root span of a triggered workflow continues the event's ``traceparent``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg

from kapellmeister import tracing
from kapellmeister.deadletter import record_dead_letter
from kapellmeister.definitions import Definition, subject_matches
from kapellmeister.errors import KapellmeisterError
from kapellmeister.expressions import Compiled, Json
from kapellmeister.messages import WORKFLOW_ID_PATTERN
from kapellmeister.topology import EVENTS

if TYPE_CHECKING:
    from kapellmeister.conductor import Conductor

__all__ = [
    "ALL_EVENTS",
    "DURABLE",
    "Event",
    "filter_subjects",
    "on_event",
    "triggered",
    "unwrap",
    "workflow_id_for",
]

log = logging.getLogger("kapellmeister.triggers")

DURABLE = "conductor-triggers"
_decode = msgspec.json.Decoder().decode


class Event(msgspec.Struct, frozen=True):
    """An event as a trigger sees it: its id, subject and data (unwrapped)."""

    id: str
    subject: str
    data: Json


def unwrap(subject: str, headers: dict[str, str] | None, body: bytes, sequence: int) -> Event:
    """The event in a message: plain JSON data, or a CloudEvents JSON envelope's ``data``.

    Its id: the ``Nats-Msg-Id``, else the CloudEvents ``id`` (unique only per ``source``,
    so a digest of the source is added to it), else ``seq-<stream sequence>``.

    Raises:
        ValueError: the body is not JSON.
    """
    try:
        data: Any = _decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise ValueError(f"an event must be JSON: {exc}") from exc
    event_id = (headers or {}).get("Nats-Msg-Id", "")
    if isinstance(data, dict) and "specversion" in data and "id" in data:
        if not event_id:
            source = str(data.get("source", ""))
            event_id = str(data["id"])
            if source:
                event_id += "-" + hashlib.sha256(source.encode()).hexdigest()[:8]
        data = data.get("data")
    return Event(id=event_id or f"seq-{sequence}", subject=subject, data=data)


def workflow_id_for(definition: str, event_id: str) -> str:
    """``<definition>=<event id>`` (``=`` is in no definition name, so two definitions'
    ids never meet), or ``<definition>==<digest>`` where the event id would not fit a
    workflow id (1-128 of ``A-Z a-z 0-9 _ = -``)."""
    candidate = f"{definition}={event_id}"
    if WORKFLOW_ID_PATTERN.fullmatch(candidate):
        return candidate
    return f"{definition}=={hashlib.sha256(event_id.encode()).hexdigest()[:40]}"


ALL_EVENTS: Final = "events.>"


def filter_subjects(patterns: Iterable[str]) -> list[str]:
    """The consumer filters that take exactly the events ``patterns`` match.

    JetStream refuses overlapping filters: a pattern another one covers is dropped, and
    two that overlap without either covering the other (``events.*.joined`` and
    ``events.user.*``) fall back to ``events.>``.
    """
    unique = set(patterns)
    kept = sorted(p for p in unique if not any(o != p and _covers(o, p) for o in unique))
    if any(_overlap(a, b) for i, a in enumerate(kept) for b in kept[i + 1 :]):
        return [ALL_EVENTS]
    return kept


def _covers(wider: str, narrower: str) -> bool:
    """Whether every subject ``narrower`` matches, ``wider`` matches too."""
    wide, narrow = wider.split("."), narrower.split(".")
    for i, token in enumerate(wide):
        if token == ">":
            return len(narrow) > i
        if i >= len(narrow) or narrow[i] == ">":
            return False
        if token != "*" and (narrow[i] == "*" or token != narrow[i]):
            return False
    return len(narrow) == len(wide)


def _overlap(a: str, b: str) -> bool:
    """Whether some subject matches both patterns."""
    left, right = a.split("."), b.split(".")
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != "*" and y != "*" and x != y:
            return False
    return True


def triggered(definitions: list[Definition], subject: str) -> Iterator[tuple[Definition, Compiled]]:
    """Each definition one of whose triggers matches ``subject``, with that trigger's
    compiled input (the first matching trigger of a definition wins)."""
    for definition in definitions:
        for trigger, compiled in definition.triggers:
            if subject_matches(trigger.subject, subject):
                yield definition, compiled
                break


async def on_event(conductor: Conductor, msg: Msg) -> None:
    """Start what the event triggers, then ack it."""
    matches = await _matching(conductor, msg)
    if matches is None:
        await msg.nak(delay=1.0)  # back in a second, when the definitions can be re-read
        return
    if not matches:
        await msg.ack()
        return
    sequence = msg.metadata.sequence.stream
    try:
        event = unwrap(msg.subject, msg.headers, msg.data, sequence)
    except ValueError as exc:
        if await _dead_letter(conductor, msg, str(exc)):
            await msg.ack()
        return
    failed: list[str] = []
    for definition, compiled in matches:
        try:
            data = compiled.evaluate({"event": event.data})
            definition.validate_input(data)
        except KapellmeisterError as exc:
            reason = f"{definition.name}: {exc.message}"
            if not await _dead_letter(conductor, msg, reason, definition.name):
                failed.append(definition.name)
            continue
        try:
            await _start(conductor, definition, event, data, msg)
        except (TimeoutError, nats.errors.Error, KapellmeisterError) as exc:
            log.warning("%s not started from %s: %r", definition.name, event.id, exc)
            failed.append(definition.name)
    if not failed:
        await msg.ack()
        return
    # Some start did not happen (NATS away): the event comes back, and the starts that did
    # happen are found by their ids. On the last delivery, a dead letter says so.
    deliveries = msg.metadata.num_delivered
    if deliveries >= conductor.settings.max_deliver:
        reason = f"not started after {deliveries} deliveries: {', '.join(failed)}"
        if await _dead_letter(conductor, msg, reason, "+".join(failed)):
            await msg.ack()
        return
    await msg.nak(delay=min(2.0**deliveries, 60.0))


def _matches(conductor: Conductor, subject: str) -> list[tuple[Definition, Compiled]]:
    latest = [conductor.registry.get(name) for name in conductor.registry.names()]
    return list(triggered(latest, subject))


async def _matching(conductor: Conductor, msg: Msg) -> list[tuple[Definition, Compiled]] | None:
    """The definitions the event triggers; None: look again in a second.

    The consumer only takes what some trigger matches: a replica that matches nothing
    has most likely not seen a definition another one just registered, so it reads the
    definitions again (at most once a second; else the event comes back once, later).
    """
    matches = _matches(conductor, msg.subject)
    if matches:
        return matches
    if await conductor.definitions.reload_at_most_every(1.0):
        return _matches(conductor, msg.subject)
    return None if msg.metadata.num_delivered < 2 else []


async def _start(
    conductor: Conductor, definition: Definition, event: Event, data: Json, msg: Msg
) -> None:
    workflow_id = workflow_id_for(definition.name, event.id)
    state = await conductor.start_from(definition, workflow_id, data, msg.headers or {})
    with tracing.about({"workflow.id": workflow_id}, state.traceparent):
        log.info("%s started %s", event.subject, workflow_id)


async def _dead_letter(conductor: Conductor, msg: Msg, reason: str, about: str = "") -> bool:
    """Record the event as a dead letter for ``about`` (a definition); False if the
    record could not be stored (then the event is left to come back)."""
    log.warning("event %s not used: %s", msg.subject, reason)
    return await record_dead_letter(
        conductor.js,
        "conductor",
        reason,
        stream=EVENTS,
        subject=msg.subject,
        sequence=msg.metadata.sequence.stream,
        headers=dict(msg.headers or {}),
        data=msg.data,
        about=about,
    )
