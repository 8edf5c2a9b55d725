"""Workflow definitions by name and version: in memory, and versioned in the KV store.

`Registry` is the compiled definitions a conductor decides with. `DefinitionStore` keeps
it in step with the ``definitions`` bucket (one key per version, ``<name>.<version>``,
the value the definition's JSON), so every replica serves what any replica registered:

* `register` checks a definition (parse, compile, the static checker against the agents'
  registered tasks and the other definitions) and stores it; a version is immutable, so
  registering the same version with other content is a 409, and the same content again
  is a no-op;
* a watcher adds what other replicas register; a lookup that misses reads the bucket
  once more before saying 404, so a start right after a register elsewhere works.

A running workflow keeps the version it started with: every version stays loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kapellmeister.checker import Problem, SubWorkflows, check, problems_message
from kapellmeister.definitions import (
    Concurrency,
    Definition,
    SimpleTask,
    SubWorkflowTask,
    compile_definition,
    parse_definition,
)
from kapellmeister.errors import Conflict, DefinitionNotFound, InvalidDefinition
from kapellmeister.store import read_bucket

__all__ = ["DefinitionStore", "DefinitionSummaries", "DefinitionSummary", "Registry"]

log = logging.getLogger("kapellmeister.registry")
_encode = msgspec.json.Encoder().encode


class Registry:
    """Compiled definitions by ``(name, version)``."""

    def __init__(self, definitions: Iterable[Definition] = ()) -> None:
        self._versions: dict[str, dict[int, Definition]] = {}
        for definition in definitions:
            self.add(definition)

    def add(self, definition: Definition) -> None:
        self._versions.setdefault(definition.name, {})[definition.version] = definition

    def get(self, name: str, version: int | None = None) -> Definition:
        """The definition ``name`` at ``version`` (default: the latest).

        Raises:
            DefinitionNotFound: no such name, or no such version of it.
        """
        versions = self._versions.get(name)
        if not versions:
            raise DefinitionNotFound(f"no workflow definition named {name!r}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise DefinitionNotFound(f"{name!r} has no version {version} (known: {known})")
        return versions[version]

    def names(self) -> list[str]:
        return sorted(self._versions)

    def all(self) -> list[Definition]:
        """Every version of every definition."""
        return [d for versions in self._versions.values() for d in versions.values()]

    def versions(self, name: str) -> list[int]:
        return sorted(self._versions.get(name, {}))

    def sub_workflows(self, name: str) -> list[str] | None:
        """The workflows the latest ``name`` starts as SUB_WORKFLOWs (None: unknown name)."""
        if name not in self._versions:
            return None
        latest = self.get(name)
        return [
            n.task.workflow for n in latest.nodes.values() if isinstance(n.task, SubWorkflowTask)
        ]


class DefinitionSummary(msgspec.Struct, frozen=True):
    name: str
    version: int
    versions: list[int]
    description: str


class DefinitionSummaries(msgspec.Struct, frozen=True):
    definitions: list[DefinitionSummary]


def key_of(name: str, version: int) -> str:
    return f"{name}.{version}"


class DefinitionStore:
    """The ``definitions`` bucket behind a `Registry`."""

    def __init__(self, kv: KeyValue, tasks: KeyValue, registry: Registry) -> None:
        self.kv = kv
        self.tasks = tasks
        self.registry = registry
        self._watch: asyncio.Task[None] | None = None
        self._loaded: set[str] = set()
        # Called after a definition is added to the registry (registered or followed).
        self.on_change: Callable[[], None] | None = None
        self._reloaded = 0.0

    async def start(self, shipped: Iterable[Definition] = ()) -> None:
        """Store the shipped definitions that are not stored yet, load all, then follow."""
        for definition in shipped:
            try:
                await self.kv.create(
                    key_of(definition.name, definition.version), _encode(definition.spec)
                )
            except KeyWrongLastSequenceError:
                stored = await self.kv.get(key_of(definition.name, definition.version))
                if stored.value != _encode(definition.spec):
                    log.warning(
                        "%s v%d differs from the registered one; serving the registered",
                        definition.name,
                        definition.version,
                    )
        await self.reload()
        self._watch = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def reload(self) -> None:
        """Read every stored definition into the registry."""
        self._reloaded = time.monotonic()
        async for key, value in read_bucket(self.kv):
            self._add(key, value)

    async def reload_at_most_every(self, seconds: float) -> bool:
        """`reload`, unless it ran in the last ``seconds``; whether it ran."""
        if time.monotonic() - self._reloaded < seconds:
            return False
        await self.reload()
        return True

    async def _follow(self) -> None:
        watcher = await self.kv.watchall(include_history=False)
        try:
            async for entry in watcher:
                if entry is not None and entry.value:
                    self._add(entry.key, entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _add(self, key: str, value: bytes) -> None:
        # A stored version never changes: compile each key once, though the follower
        # replays every current value at start and a miss reads the bucket again.
        if key in self._loaded:
            return
        try:
            self.registry.add(compile_definition(parse_definition(value)))
        except InvalidDefinition as exc:  # stored by a newer conductor, say
            log.warning("definition %s is not loadable here: %s", key, exc.message)
        else:
            self._changed()
        self._loaded.add(key)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def get(self, name: str, version: int | None = None) -> Definition:
        """Like `Registry.get`, reading the bucket again before a 404."""
        try:
            return self.registry.get(name, version)
        except DefinitionNotFound:
            await self.reload()
            return self.registry.get(name, version)

    async def raw(self, name: str, version: int | None = None) -> bytes:
        """The stored JSON of a definition (latest unless ``version``)."""
        definition = await self.get(name, version)
        entry = await self.kv.get(key_of(definition.name, definition.version))
        return entry.value or b""

    def summaries(self) -> DefinitionSummaries:
        found = []
        for name in self.registry.names():
            latest = self.registry.get(name)
            found.append(
                DefinitionSummary(
                    name=name,
                    version=latest.version,
                    versions=self.registry.versions(name),
                    description=latest.spec.description,
                )
            )
        return DefinitionSummaries(definitions=found)

    async def register(self, data: bytes) -> Definition:
        """Check and store a definition (YAML or JSON).

        Raises:
            InvalidDefinition: it does not parse, compile or pass the checker (every
                problem with its path); nothing is stored.
            Conflict: this version is registered already with other content.
        """
        definition = compile_definition(parse_definition(data))
        problems = check(
            definition, await self._task_registrations(), self._sub_workflows(definition)
        )
        problems += self._limit_conflicts(definition)
        if problems:
            raise InvalidDefinition(problems_message(definition.name, problems))
        encoded = _encode(definition.spec)
        key = key_of(definition.name, definition.version)
        try:
            await self.kv.create(key, encoded)
        except KeyWrongLastSequenceError:
            stored = await self.kv.get(key)
            if stored.value != encoded:
                versions = self.registry.versions(definition.name) or [definition.version]
                raise Conflict(
                    f"{definition.name} version {definition.version} is registered with other "
                    f"content; versions are immutable: register version {max(versions) + 1}"
                ) from None
        self.registry.add(definition)
        self._loaded.add(key)
        self._changed()
        return definition

    def _limit_conflicts(self, definition: Definition) -> list[Problem]:
        """A task name has one concurrency limit (its semaphore is the name's): a SIMPLE
        task limited otherwise than in another definition's latest version is refused."""
        problems: list[Problem] = []
        elsewhere: dict[str, tuple[Concurrency, str]] = {}
        for name in self.registry.names():
            if name == definition.name:
                continue
            other = self.registry.get(name)
            for node in other.nodes.values():
                if isinstance(node.task, SimpleTask) and node.task.concurrency is not None:
                    elsewhere[node.task.task] = (node.task.concurrency, f"{name} v{other.version}")
        for node in definition.nodes.values():
            task = node.task
            if not isinstance(task, SimpleTask) or task.concurrency is None:
                continue
            known = elsewhere.get(task.task)
            if known is not None and known[0] != task.concurrency:
                limit, where = known
                problems.append(
                    Problem(
                        f"{node.path}.concurrency",
                        f"task {task.task!r} is limited to {limit.limit}"
                        f"{f' per {limit.key}' if limit.key else ''} in {where}: a task name "
                        "has one concurrency limit",
                    )
                )
        return problems

    def _sub_workflows(self, definition: Definition) -> SubWorkflows:
        def lookup(name: str) -> list[str] | None:
            if name == definition.name:
                return Registry([definition]).sub_workflows(name)
            return self.registry.sub_workflows(name)

        return lookup

    async def _task_registrations(self) -> dict[str, dict[str, Any]]:
        """Every agent task registration in the ``tasks`` bucket, by task name."""
        return {key: msgspec.json.decode(value) async for key, value in read_bucket(self.tasks)}
