"""Schedules: start a workflow on a cron expression or every N seconds, durably.

A schedule is a key of the ``schedules`` bucket (its name) holding a `Schedule`: what to
start, when, and how far it has got (``last_tick``, ``next_tick``, Unix seconds). Every
conductor replica runs a `Scheduler`; whichever sees a tick due first starts its workflow
with the id ``<name>-<tick>`` (DESIGN.md). A start with an id that exists starts nothing,
so two replicas, or a replica that crashed after the start and before recording it, never
start a tick twice: the start comes first, then a compare-and-set records the tick.

After downtime the ticks missed are handled by the schedule's ``catch_up``:

- ``skip``: the missed ticks are not run; a tick is run only while it is on time (within
  `ON_TIME_S` of its moment);
- ``once``: the latest missed tick is run, once;
- ``all``: every missed tick is run, oldest first (at most `MAX_CATCH_UP` of them).

`due` decides which ticks to start and how the schedule moves on: pure, and tested alone.
Cron expressions are read by `cronsim` (five fields, or six with seconds first), in the
schedule's ``timezone`` (IANA name, UTC by default); ``every_s`` ticks fall on multiples of
it since the Unix epoch, so every replica computes the same ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import zoneinfo
from collections.abc import Awaitable, Callable
from typing import Annotated, Final, Literal

import msgspec
import nats.errors
from cronsim import CronSim, CronSimError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.definitions import WorkflowDef
from kapellmeister.errors import BadRequest, Conflict, ScheduleNotFound
from kapellmeister.expressions import Json
from kapellmeister.messages import NAME_PATTERN
from kapellmeister.store import read_bucket

__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAME",
    "MAX_CATCH_UP",
    "ON_TIME_S",
    "Firing",
    "Schedule",
    "ScheduleSpec",
    "Scheduler",
    "Schedules",
    "TickRefused",
    "due",
    "from_definition",
    "latest_ticks",
    "next_tick",
    "validate",
    "workflow_id_of",
]

SCHEDULES: Final = "schedules"
# A tick is on time while it is at most this late (a skip schedule still runs it).
ON_TIME_S: Final = 60
# An ``all`` schedule runs at most this many missed ticks (the newest of them).
MAX_CATCH_UP: Final = 1_000
# Each replica reads every schedule again this often (seconds), besides its watch.
REFRESH_S: Final = 30.0

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
# A schedule's name goes into subjects (conductor.schedules.get.<name>) and workflow ids.
SCHEDULE_NAME: Final = re.compile(NAME_PATTERN)


class ScheduleSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``conductor.schedules.create``: what to start, and when."""

    name: Name
    workflow: Name
    cron: str | None = None
    every_s: Annotated[int, msgspec.Meta(ge=1)] | None = None
    input: dict[str, Json] = {}
    catch_up: Literal["skip", "once", "all"] = "skip"
    timezone: str = "UTC"
    # The definition's version to start (None: the latest at each tick).
    version: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tenant: str = ""


class Schedule(ScheduleSpec, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A schedule as stored and as the API answers: its spec and where it has got.
    (Unknown fields are ignored, so a newer replica's writes stay readable.)"""

    paused: bool = False
    # The version of the definition that brought it (None: made by the API).
    brought_by: int | None = None
    created_at: str = ""
    # The last tick handled (started, or skipped as missed), Unix seconds.
    last_tick: int | None = None
    next_tick: int = 0
    # The workflow id of the last tick started.
    last_started: str | None = None
    # Why the last tick could not start (its definition gone, its input no longer valid).
    last_error: str | None = None

    def spec(self) -> ScheduleSpec:
        return ScheduleSpec(**{f: getattr(self, f) for f in ScheduleSpec.__struct_fields__})


class Schedules(msgspec.Struct, frozen=True):
    schedules: list[Schedule]


class Firing(msgspec.Struct, frozen=True):
    """What a scheduler does for a schedule now: start ``ticks``, then record."""

    ticks: list[int]
    last_tick: int
    next_tick: int


def _zone(name: str) -> datetime.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"unknown timezone {name!r} (an IANA name, e.g. Europe/Paris)") from None


def validate(spec: ScheduleSpec) -> None:
    """Check what msgspec cannot: one of ``cron`` and ``every_s``, a cron expression that
    parses, a known timezone.

    Raises:
        BadRequest: saying which.
    """
    if (spec.cron is None) == (spec.every_s is None):
        raise BadRequest("a schedule has either `cron` or `every_s`, not both nor neither")
    zone = _zone(spec.timezone)
    if spec.cron is not None:
        try:
            CronSim(spec.cron, datetime.datetime(2000, 1, 1, tzinfo=zone))
        except CronSimError as exc:
            raise BadRequest(f"cron {spec.cron!r}: {exc}") from None


def next_tick(spec: ScheduleSpec, after: int) -> int:
    """The first tick strictly after ``after`` (Unix seconds)."""
    if spec.every_s is not None:
        return (after // spec.every_s + 1) * spec.every_s
    assert spec.cron is not None
    moment = datetime.datetime.fromtimestamp(after, _zone(spec.timezone))
    return int(next(CronSim(spec.cron, moment)).timestamp())


def latest_ticks(spec: ScheduleSpec, now: int, since: int, limit: int) -> list[int]:
    """The ticks from ``since`` to ``now`` (both included), newest first, at most
    ``limit``: however long ago ``since`` was, this costs at most ``limit`` steps."""
    if spec.every_s is not None:
        every = spec.every_s
        latest = now // every * every
        first = max(since, latest - (limit - 1) * every)
        first = -(-first // every) * every  # the first multiple at or after it
        return list(range(latest, first - 1, -every))
    assert spec.cron is not None
    # Backwards from just after now: ticks are whole seconds, so this includes now.
    moment = datetime.datetime.fromtimestamp(now + 1, _zone(spec.timezone))
    found: list[int] = []
    for earlier in CronSim(spec.cron, moment, reverse=True):
        tick = int(earlier.timestamp())
        if tick < since or len(found) == limit:
            break
        found.append(tick)
    return found


def due(schedule: Schedule, now: int) -> Firing | None:
    """The ticks to start now, by the schedule's catch-up policy (None: none is due)."""
    if schedule.paused or schedule.next_tick > now:
        return None
    missed = latest_ticks(schedule, now, schedule.next_tick, MAX_CATCH_UP)[::-1]
    upcoming = next_tick(schedule, now)
    if not missed:  # its timing changed under it: nothing of the old one is owed
        return Firing(ticks=[], last_tick=now, next_tick=upcoming)
    latest = missed[-1]
    match schedule.catch_up:
        case "all":
            ticks = missed
        case "once":
            ticks = [latest]
        case _:
            ticks = [latest] if now - latest <= ON_TIME_S else []
    return Firing(ticks=ticks, last_tick=latest, next_tick=upcoming)


def workflow_id_of(name: str, tick: int) -> str:
    return f"{name}-{tick}"


def from_definition(spec: WorkflowDef) -> list[ScheduleSpec]:
    """The schedules a definition brings, named: its own name, or ``<workflow>-<n>``."""
    several = len(spec.schedules) > 1
    return [
        ScheduleSpec(
            name=wanted.name or (f"{spec.name}-{n}" if several else spec.name),
            workflow=spec.name,
            cron=wanted.cron,
            every_s=wanted.every_s,
            input=wanted.input,
            catch_up=wanted.catch_up,
            timezone=wanted.timezone,
            tenant=wanted.tenant,
        )
        for n, wanted in enumerate(spec.schedules, 1)
    ]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Schedule).decode

log = logging.getLogger(__name__)


def _decoded(name: str, value: bytes | None) -> Schedule | None:
    """A stored schedule, or None (logged) for a value that is not one."""
    try:
        return _decode(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("schedule %s: stored value unreadable, skipped: %s", name, exc)
        return None


# Starts one tick's workflow: (schedule, workflow id) → its status; idempotent by id.
StartTick = Callable[[Schedule, str], Awaitable[str]]


class TickRefused(Exception):
    """A tick's workflow cannot start (its definition is gone, its input no longer fits
    it): the tick is recorded as handled, with the reason in ``last_error``."""


class Scheduler:
    """One replica's share of the schedules: the bucket followed by a watch (and read
    again every `REFRESH_S`, should the watch have missed something), due ticks started.
    Between ticks it reads nothing: the watch keeps each schedule's next tick."""

    def __init__(
        self,
        kv: KeyValue,
        start: StartTick,
        now: Callable[[], int],
        poll_s: float = 0.25,
    ) -> None:
        self.kv = kv
        self.start = start
        self.now = now
        self.poll_s = poll_s
        self.known: dict[str, Schedule] = {}
        # A schedule whose pass failed is tried again after a growing pause.
        self._failures: dict[str, tuple[int, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Load every schedule, then follow the bucket and fire what falls due."""
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._follow(), name="schedules watch"),
            asyncio.create_task(self._forever(), name="scheduler"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def refresh(self) -> None:
        """Read every schedule again."""
        found: dict[str, Schedule] = {}
        async for name, value in read_bucket(self.kv):
            if (schedule := _decoded(name, value)) is not None:
                found[name] = schedule
        self.known = found

    def _note(self, name: str, value: bytes | None) -> None:
        schedule = _decoded(name, value) if value else None
        if schedule is None:
            self.known.pop(name, None)
        else:
            self.known[name] = schedule

    async def _follow(self) -> None:
        """The bucket's changes into `known`; a watch that fails is made again."""
        while True:
            try:
                watcher = await self.kv.watchall()
                try:
                    while True:
                        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                            entry = await watcher.updates(timeout=60)
                            if entry is not None:
                                self._note(entry.key, entry.value if not entry.operation else None)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("schedules watch failed (%r); watching again", exc)
                await asyncio.sleep(1.0)

    async def _forever(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            if loop.time() - refreshed >= REFRESH_S:
                with contextlib.suppress(Exception):
                    await self.refresh()
                refreshed = loop.time()
            await self.tick()
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> int:
        """Start every due tick of every schedule; how many workflows it started. One
        schedule's failure (NATS, its definition) holds back neither the others nor
        itself for long: it is tried again after 0.5 s, doubling up to a minute."""
        loop = asyncio.get_running_loop()
        now = self.now()
        started = 0
        for name, schedule in list(self.known.items()):
            failures, retry_at = self._failures.get(name, (0, 0.0))
            if schedule.paused or schedule.next_tick > now or retry_at > loop.time():
                continue
            try:
                started += await self._fire(name)
            except Exception as exc:
                failures += 1
                pause = min(60.0, 0.5 * 2 ** (failures - 1))
                self._failures[name] = (failures, loop.time() + pause)
                log.warning(
                    "schedule %s: a pass failed (%r); again in %.1f s",
                    name,
                    exc,
                    pause,
                    exc_info=failures == 1,
                )
            else:
                self._failures.pop(name, None)
        return started

    async def _fire(self, name: str) -> int:
        """Start what is due for ``name``, recording each tick after its start by a
        compare-and-set: a pause or a delete stops it after the tick that runs, and a
        replica that lost the race stops at once (its starts were no-ops by id)."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            entry = None
        schedule = _decoded(name, entry.value) if entry is not None and entry.value else None
        if entry is None or schedule is None:
            self.known.pop(name, None)
            return 0
        self.known[name] = schedule
        firing = due(schedule, self.now())
        if firing is None:
            return 0
        revision = entry.revision
        if not firing.ticks:  # all missed, none to run: only moved on
            passed = msgspec.structs.replace(
                schedule, last_tick=firing.last_tick, next_tick=firing.next_tick
            )
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.kv.update(name, _encode(passed), last=revision)
                self.known[name] = passed
            return 0
        started = 0
        for tick in firing.ticks:
            moved = await self._start_one(schedule, firing, tick)
            try:
                revision = await self.kv.update(name, _encode(moved), last=revision)
            except KeyWrongLastSequenceError:
                break  # another replica recorded it, or it was paused or deleted
            started += moved.last_error is None
            schedule = self.known[name] = moved
        return started

    async def _start_one(self, schedule: Schedule, firing: Firing, tick: int) -> Schedule:
        """Start ``tick``'s workflow; the schedule moved past it (and past the missed
        ticks before it that are not run)."""
        workflow_id = workflow_id_of(schedule.name, tick)
        last: str | None = workflow_id
        error = None
        try:
            status = await self.start(schedule, workflow_id)
            log.info("schedule %s: tick %d started %s (%s)", schedule.name, tick, last, status)
        except TickRefused as exc:
            last, error = schedule.last_started, f"tick {tick} ({workflow_id}): {exc}"
            log.warning("schedule %s: %s", schedule.name, error)
        after = firing.next_tick if tick == firing.last_tick else next_tick(schedule, tick)
        return msgspec.structs.replace(
            schedule, last_tick=tick, next_tick=after, last_started=last, last_error=error
        )

    # --- the API's operations (conductor.schedules.*) ----------------------------------

    async def create(
        self, spec: ScheduleSpec, created_at: str, brought_by: int | None = None
    ) -> Schedule:
        """Store a new schedule, its first tick the next one from now; the same spec
        again returns the stored schedule.

        Raises:
            BadRequest: no or both of cron and every_s, a bad expression or timezone.
            Conflict: a schedule of that name exists with another spec.
        """
        validate(spec)
        schedule = Schedule(
            **msgspec.structs.asdict(spec),
            created_at=created_at,
            next_tick=next_tick(spec, self.now()),
            brought_by=brought_by,
        )
        try:
            await self.kv.create(spec.name, _encode(schedule))
        except KeyWrongLastSequenceError:
            stored = await self.get(spec.name)
            if stored.spec() != spec:
                raise Conflict(
                    f"a schedule named {spec.name!r} exists with another spec: delete it first"
                ) from None
            return stored
        self.known[spec.name] = schedule
        return schedule

    async def ensure(self, spec: ScheduleSpec, created_at: str, brought_by: int) -> Schedule:
        """A definition's schedule (its version ``brought_by``): `create` it, or bring the
        stored one to ``spec``, keeping its progress and pause (a new timing ticks from
        now). An older version's spec never replaces a newer one's (a replica whose
        registry lags behind)."""
        try:
            return await self.create(spec, created_at, brought_by)
        except Conflict:
            pass

        def updated(schedule: Schedule) -> dict[str, object]:
            if schedule.spec() == spec or (schedule.brought_by or 0) > brought_by:
                return {}
            fields: dict[str, object] = {**msgspec.structs.asdict(spec), "brought_by": brought_by}
            timing = ("cron", "every_s", "timezone")
            if any(getattr(schedule, f) != getattr(spec, f) for f in timing):
                fields["next_tick"] = next_tick(spec, self.now())
            return fields

        return await self._change(spec.name, updated)

    async def get(self, name: str) -> Schedule:
        """Raises: ScheduleNotFound."""
        return (await self._read(name))[0]

    async def _read(self, name: str) -> tuple[Schedule, int]:
        """The schedule and its revision. Raises: ScheduleNotFound."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return _decode(entry.value), entry.revision or 0

    async def list(self) -> Schedules:
        """Every schedule, by name, as stored now."""
        found = [_decode(value) async for _, value in read_bucket(self.kv)]
        return Schedules(schedules=sorted(found, key=lambda schedule: schedule.name))

    async def pause(self, name: str) -> Schedule:
        """No tick starts after this (a tick already starting may still do)."""
        return await self._change(
            name, lambda schedule: {} if schedule.paused else {"paused": True}
        )

    async def resume(self, name: str) -> Schedule:
        """Unpause: the ticks that fell while paused are not run; the next one is."""

        def resumed(schedule: Schedule) -> dict[str, object]:
            if not schedule.paused:
                return {}
            # The ticks that fell while paused are passed over, not owed.
            return {"paused": False, "next_tick": next_tick(schedule, self.now())}

        return await self._change(name, resumed)

    async def delete(self, name: str) -> Schedule:
        """Remove it; the reply is the schedule as it was. Raises: ScheduleNotFound."""
        schedule = await self.get(name)
        await self.kv.delete(name)
        self.known.pop(name, None)
        return schedule

    async def _change(self, name: str, change: Callable[[Schedule], dict[str, object]]) -> Schedule:
        for _ in range(5):
            schedule, revision = await self._read(name)
            fields = change(schedule)
            if not fields:
                return schedule
            changed = msgspec.structs.replace(schedule, **fields)
            try:
                await self.kv.update(name, _encode(changed), last=revision)
            except KeyWrongLastSequenceError:
                continue
            self.known[name] = changed
            return changed
        raise Conflict(f"schedule {name!r} kept changing; try again")
