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
    "next_tick",
    "validate",
    "workflow_id_of",
]

SCHEDULES: Final = "schedules"
# A tick is on time while it is at most this late (a skip schedule still runs it).
ON_TIME_S: Final = 60
# An ``all`` schedule runs at most this many missed ticks (the newest of them).
MAX_CATCH_UP: Final = 1_000

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


class Schedule(ScheduleSpec, frozen=True, kw_only=True):
    """A schedule as stored and as the API answers: its spec and where it has got."""

    paused: bool = False
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


def due(schedule: Schedule, now: int) -> Firing | None:
    """The ticks to start now, by the schedule's catch-up policy (None: none is due)."""
    if schedule.paused or schedule.next_tick > now:
        return None
    missed: list[int] = []
    tick = schedule.next_tick
    while tick <= now:
        missed.append(tick)
        if len(missed) > MAX_CATCH_UP:
            missed.pop(0)
        tick = next_tick(schedule, tick)
    latest = missed[-1]
    match schedule.catch_up:
        case "all":
            ticks = missed
        case "once":
            ticks = [latest]
        case _:
            ticks = [latest] if now - latest <= ON_TIME_S else []
    return Firing(ticks=ticks, last_tick=latest, next_tick=tick)


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

# Starts one tick's workflow: (schedule, workflow id) → its status; idempotent by id.
StartTick = Callable[[Schedule, str], Awaitable[str]]


class TickRefused(Exception):
    """A tick's workflow cannot start (its definition is gone, its input no longer fits
    it): the tick is recorded as handled, with the reason in ``last_error``."""


class Scheduler:
    """One replica's share of the schedules: the bucket followed by a watch, due ticks
    started. Between ticks it reads nothing: the watch keeps each schedule's next tick."""

    def __init__(
        self,
        kv: KeyValue,
        start: StartTick,
        now: Callable[[], int],
        every_s: float = 0.25,
    ) -> None:
        self.kv = kv
        self.start = start
        self.now = now
        self.every_s = every_s
        self.known: dict[str, Schedule] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Load every schedule, then follow the bucket and fire what falls due."""
        async for name, value in read_bucket(self.kv):
            self.known[name] = _decode(value)
        self._tasks = [
            asyncio.create_task(self._follow(), name="schedules watch"),
            asyncio.create_task(self._forever(), name="scheduler"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self) -> None:
        watcher = await self.kv.watchall()
        try:
            while True:
                with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                    entry = await watcher.updates(timeout=60)
                    if entry is None:
                        continue
                    if entry.value and entry.operation is None:
                        self.known[entry.key] = _decode(entry.value)
                    else:
                        self.known.pop(entry.key, None)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a pass that fails is tried again next time
                log.exception("scheduler pass failed")
            await asyncio.sleep(self.every_s)

    async def tick(self) -> int:
        """Start every due tick of every schedule; how many workflows it started."""
        now = self.now()
        started = 0
        for name, schedule in list(self.known.items()):
            if not schedule.paused and schedule.next_tick <= now:
                started += await self._fire(name)
        return started

    async def _fire(self, name: str) -> int:
        """Start what is due for ``name``, then record it (compare-and-set: a replica
        that lost the race finds it recorded, and its starts were no-ops by id)."""
        for _ in range(5):
            try:
                entry = await self.kv.get(name)
            except KeyNotFoundError:
                self.known.pop(name, None)
                return 0
            if not entry.value:
                return 0
            schedule = self.known[name] = _decode(entry.value)
            firing = due(schedule, self.now())
            if firing is None:
                return 0
            last, error = schedule.last_started, None
            for tick in firing.ticks:
                workflow_id = workflow_id_of(schedule.name, tick)
                try:
                    status = await self.start(schedule, workflow_id)
                except TickRefused as exc:
                    error = f"tick {tick} ({workflow_id}): {exc}"
                    log.warning("schedule %s: %s", name, error)
                    continue
                last = workflow_id
                log.info("schedule %s: tick %d started %s (%s)", name, tick, last, status)
            moved = msgspec.structs.replace(
                schedule,
                last_tick=firing.last_tick,
                next_tick=firing.next_tick,
                last_started=last,
                last_error=error,
            )
            try:
                await self.kv.update(name, _encode(moved), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # another replica recorded it, or the schedule changed: again
            self.known[name] = moved
            return len(firing.ticks)
        return 0

    # --- the API's operations (conductor.schedules.*) ----------------------------------

    async def create(self, spec: ScheduleSpec, created_at: str) -> Schedule:
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

    async def ensure(self, spec: ScheduleSpec, created_at: str) -> Schedule:
        """`create`, or bring a stored schedule to ``spec`` (a definition's schedule after
        a new version): its progress and pause are kept; a new timing ticks from now."""
        try:
            return await self.create(spec, created_at)
        except Conflict:
            pass

        def updated(schedule: Schedule) -> dict[str, object]:
            if schedule.spec() == spec:
                return {}
            fields: dict[str, object] = msgspec.structs.asdict(spec)
            timing = ("cron", "every_s", "timezone")
            if any(getattr(schedule, f) != getattr(spec, f) for f in timing):
                fields["next_tick"] = next_tick(spec, self.now())
            return fields

        return await self._change(spec.name, updated)

    async def get(self, name: str) -> Schedule:
        """Raises: ScheduleNotFound."""
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return _decode(entry.value)

    async def list(self) -> Schedules:
        """Every schedule, by name, as stored now."""
        found = [_decode(value) async for _, value in read_bucket(self.kv)]
        return Schedules(schedules=sorted(found, key=lambda schedule: schedule.name))

    async def pause(self, name: str) -> Schedule:
        return await self._change(name, lambda schedule: {"paused": True})

    async def resume(self, name: str) -> Schedule:
        """Unpause: the ticks that fell while paused are not run; the next one is."""

        def resumed(schedule: Schedule) -> dict[str, object]:
            if not schedule.paused:
                return {}
            now = self.now()
            return {"paused": False, "last_tick": now, "next_tick": next_tick(schedule, now)}

        return await self._change(name, resumed)

    async def delete(self, name: str) -> Schedule:
        """Remove it; the reply is the schedule as it was. Raises: ScheduleNotFound."""
        schedule = await self.get(name)
        await self.kv.delete(name)
        self.known.pop(name, None)
        return schedule

    async def _change(self, name: str, change: Callable[[Schedule], dict[str, object]]) -> Schedule:
        for _ in range(5):
            try:
                entry = await self.kv.get(name)
            except KeyNotFoundError:
                entry = None
            if entry is None or not entry.value:
                raise ScheduleNotFound(f"no schedule named {name!r}")
            schedule = _decode(entry.value)
            fields = change(schedule)
            if not fields:
                return schedule
            changed = msgspec.structs.replace(schedule, **fields)
            try:
                await self.kv.update(name, _encode(changed), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            self.known[name] = changed
            return changed
        raise Conflict(f"schedule {name!r} kept changing; try again")
