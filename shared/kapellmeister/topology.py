"""The streams, buckets and consumers kapellmeister uses, created idempotently at start.

Every setting is explicit here so that ``nats stream info`` shows what we chose on
purpose, and any service may create them: the first one to start wins, the others find
them as they are (a changed setting is applied with an update).

=========  ============  ==========  ========================================================
name       subjects      retention   why
=========  ============  ==========  ========================================================
EVENTS     events.>      limits      the public way in and out; kept 7 days for replay
TASKS      tasks.>       work queue  a task message lives until an agent acks it
RESULTS    results.>     work queue  a result lives until the conductor has applied it
           timers.>                  DELAY timers: scheduled messages that fire onto results.>
DEADLETTERS deadletter.> limits      messages nobody could handle, with the reason; 30 days
=========  ============  ==========  ========================================================

All dedupe by ``Nats-Msg-Id`` over a 10-minute window, which covers a crashed
conductor's redelivery (ack wait 30 s) with room to spare.

KV buckets: ``workflows`` (one key per workflow, 5 revisions kept so ``nats kv history``
shows the last steps), ``definitions``, ``tasks`` (the agent registry), ``leases``
(heartbeats of running attempts whose task has a ``response_timeout_s``; see
`kapellmeister.lease`), ``gathers`` (scatter-gather groups, `kapellmeister.gather`),
``workflow_index`` (workflows by status and name, `kapellmeister.index`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

__all__ = [
    "BUCKETS",
    "DEADLETTERS",
    "EVENTS",
    "RESULTS",
    "TASKS",
    "consumer_name",
    "ensure_buckets",
    "ensure_consumer",
    "ensure_streams",
]

log = logging.getLogger("kapellmeister.topology")
T = TypeVar("T")

EVENTS: Final = "EVENTS"
TASKS: Final = "TASKS"
RESULTS: Final = "RESULTS"
DEADLETTERS: Final = "DEADLETTERS"
DEDUPE_WINDOW_S: Final = 600.0
DAY_S: Final = 86_400.0

BUCKETS: Final = {
    "workflows": 5,
    "definitions": 64,
    "tasks": 1,
    "leases": 1,
    "gathers": 1,
    "tenants": 5,
    "workflow_index": 1,
    # Schedules (`kapellmeister.schedules`): a few revisions, for `nats kv history`.
    "schedules": 5,
    # Token buckets of rate-limited tasks (`kapellmeister.rates`).
    "rates": 1,
    # Semaphores of concurrency limits (`kapellmeister.slots`).
    "slots": 1,
    # Outputs of streamed FORK items until they are gathered (`kapellmeister.decider`).
    "fanout": 1,
}
# A lease outlives its attempt by at most a day (a crashed agent never deletes it); a
# scatter-gather group is kept a week.
_TTL_S: Final = {"leases": DAY_S, "gathers": 7 * DAY_S, "rates": DAY_S}
# Buckets whose messages may carry their own TTL: the marker a retention purge leaves
# in `workflows` goes by itself (nats-server 2.11+).
_MESSAGE_TTL: Final = frozenset({"workflows", "workflow_index"})
# How long that marker stays: `nats kv get` says "deleted" rather than "not found".
PURGE_MARKER_TTL_S: Final = DAY_S


def _streams(replicas: int) -> list[StreamConfig]:
    common = {
        "storage": StorageType.FILE,
        "num_replicas": replicas,
        "duplicate_window": DEDUPE_WINDOW_S,
        "discard": DiscardPolicy.OLD,
    }
    return [
        StreamConfig(
            name=EVENTS,
            subjects=["events.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=7 * DAY_S,
            description="Business events: the public way in and out",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=TASKS,
            subjects=["tasks.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=7 * DAY_S,
            description="Task requests for agents, one consumer per task name",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=RESULTS,
            # timers.> holds DELAY timers: scheduled messages JetStream publishes onto
            # results.<workflow_id> when they are due (nats-server 2.12+).
            subjects=["results.>", "timers.>"],
            allow_msg_schedules=True,
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=7 * DAY_S,
            description="Task results for the conductor",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=DEADLETTERS,
            subjects=["deadletter.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=30 * DAY_S,
            description="Messages no service could handle, with the reason",
            **common,  # type: ignore[arg-type]
        ),
    ]


async def ensure_streams(js: JetStreamContext, replicas: int = 1, *, owner: bool = False) -> None:
    """Create or update the streams with the settings above.

    A service whose NATS user may not create or update streams (an agent under the
    deploy permissions, where the conductor owns the topology) binds to them as they
    are: it waits for a missing one to be created, and leaves a different one alone.
    The ``owner`` (the conductor) does not wait for anyone: a refusal is raised.
    """
    for config in _streams(replicas):
        name = config.name or ""
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:
                # Another service created it between our look and our create.
                await js.update_stream(config)
            except _REFUSED as exc:
                if owner:
                    raise
                await _wait_for(f"stream {name}", functools.partial(js.stream_info, name), exc)
            continue
        current = info.config
        if (
            current.duplicate_window != config.duplicate_window
            or current.subjects != config.subjects
            or bool(current.allow_msg_schedules) != bool(config.allow_msg_schedules)
        ):
            try:
                await js.update_stream(config)
            except _REFUSED as exc:
                if owner:
                    raise
                log.warning("stream %s is not as this version would have it: %r", name, exc)


async def ensure_buckets(
    js: JetStreamContext,
    replicas: int = 1,
    *,
    owner: bool = False,
    names: Iterable[str] | None = None,
) -> dict[str, KeyValue]:
    """Create (or bind to) every KV bucket, or those ``names``; returns them by name
    (waits, like `ensure_streams`, for one this service may not create, unless it is the
    ``owner``)."""
    buckets: dict[str, KeyValue] = {}
    wanted = BUCKETS if names is None else {name: BUCKETS[name] for name in names}
    for name, history in wanted.items():
        try:
            buckets[name] = await js.key_value(name)
            if owner and name in _MESSAGE_TTL:
                await _allow_message_ttl(js, f"KV_{name}")
            continue
        except BucketNotFoundError:
            pass
        try:
            buckets[name] = await js.create_key_value(
                KeyValueConfig(
                    bucket=name,
                    history=history,
                    storage=StorageType.FILE,
                    replicas=replicas,
                    # Direct gets are answered by any replica without an API round trip.
                    direct=True,
                    ttl=_TTL_S.get(name),
                    description=f"kapellmeister {name}",
                    # nats-py's way to create the stream with allow_msg_ttl.
                    limit_marker_ttl=PURGE_MARKER_TTL_S if name in _MESSAGE_TTL else None,
                )
            )
        except _REFUSED as exc:
            if owner:
                raise
            buckets[name] = await _wait_for(
                f"bucket {name}", functools.partial(js.key_value, name), exc
            )
    return buckets


async def _allow_message_ttl(js: JetStreamContext, stream: str) -> None:
    """Turn on per-message TTLs on a bucket created before they were used."""
    config = (await js.stream_info(stream)).config
    if config.allow_msg_ttl:
        return
    try:
        await js.update_stream(dataclasses.replace(config, allow_msg_ttl=True))
    except _REFUSED as exc:
        log.warning("%s: cannot allow message TTLs (%r); purge markers stay", stream, exc)


# What a create or update this user may not make ends in: a permissions violation is
# an -ERR the request never hears of, so it times out; a JetStream refusal is an error.
_REFUSED = (TimeoutError, nats.errors.TimeoutError, ServiceUnavailableError, APIError)


async def _wait_for(what: str, look: Callable[[], Awaitable[T]], why: BaseException) -> T:
    """``look()`` until it finds what another service (the conductor) must create."""
    log.warning("cannot create %s (%r): waiting for the conductor to create it", what, why)
    waited = 0.0
    while True:
        try:
            return await look()
        except (NotFoundError, BucketNotFoundError):
            await asyncio.sleep(1.0)
            waited += 1.0
            if waited % 30 == 0:
                log.warning("still waiting for %s (%.0f s)", what, waited)


def consumer_name(subject: str) -> str:
    """A durable consumer name for a subject: dots are not allowed in names."""
    return subject.replace(".", "_").replace("*", "any").replace(">", "all")


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    subject: str | list[str],
    *,
    ack_wait_s: float,
    max_deliver: int,
    backoff_s: list[float] | None = None,
    max_ack_pending: int = 10_000,
    durable: str | None = None,
    new_only: bool = False,
) -> str:
    """Create or update the durable pull consumer for ``subject``; returns its name.

    ``subject`` may be a list (several non-overlapping filters; then ``durable`` is
    needed). ``durable`` names it (default: from the subject); ``new_only``: created, it
    delivers what is stored from then on, not the stream's history (a listener on
    EVENTS)."""
    subjects = [subject] if isinstance(subject, str) else subject
    if not durable:
        assert len(subjects) == 1, "several filters need a durable name"
        durable = consumer_name(subjects[0])
    config = ConsumerConfig(
        # The name as well: the create request's subject then carries the name and the
        # filter ($JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>), which NATS
        # permissions can restrict (an agent creates consumers on its own tasks only).
        name=durable,
        durable_name=durable,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW if new_only else DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        backoff=backoff_s,
        max_ack_pending=max_ack_pending,
    )
    await js.add_consumer(stream, config)
    return durable
