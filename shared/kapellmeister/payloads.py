"""Large payloads by claim check: big values live in the ``payloads`` Object Store
bucket, and messages and sagas carry a reference to them.

A reference is a small JSON object::

    {"$payload": "<object name>", "bytes": 5242880, "sha256": "<hex of the JSON>"}

- **Spilling** (`Payloads.spill`): a task's encoded output (by its agent) or input (by
  the conductor) longer than the threshold (``KAPELLMEISTER_PAYLOAD_THRESHOLD``) has its
  biggest top-level fields stored as objects, each replaced by its reference, until the
  rest fits; a value that is not an object, or whose small fields alone are too big, is
  stored whole. Small fields stay inline, so expressions still reach them
  (``${make.output.count}``) and a spilled field passes on as its reference
  (``${make.output.blob}``).
- **Resolving** (`Payloads.resolve`): an agent replaces every reference in a task's
  input by the value it names before the handler sees it; handlers never see one.
- Object names derive from the attempt and the content
  (``<workflow_id>/<ref>/<attempt>/output/<field>/<sha256 prefix>``), and an object is
  never overwritten (a reader of it would wait for ever on chunks purged under it): the
  same content is the same object, other content (a redelivered attempt whose handler
  gave another output) another one, so a reference keeps naming what it named.
- The saga keeps the references; ``conductor.get`` can inline them. A workflow's own
  objects go when its retention ends (`Payloads.delete_owned`), and those of workflows
  that no longer exist are collected hourly (`Payloads.collect`).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, cast

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.object_store import ObjectStore

from kapellmeister.errors import BadRequest
from kapellmeister.expressions import Json
from kapellmeister.messages import PAYLOAD_MARKER, WORKFLOW_ID_PATTERN

__all__ = [
    "MARKER",
    "PAYLOADS",
    "Payloads",
    "ensure_payloads",
    "is_reference",
    "references",
]

PAYLOADS: Final = "payloads"
MARKER: Final = PAYLOAD_MARKER
# A value's encoding spilled at most this far below the threshold is not worth an object.
_SMALLEST: Final = 1024
# A reference's JSON, about (a name of a few tokens, its size, its sha256).
_REFERENCE_BYTES: Final = 200
# References inside referenced values are resolved this deep at most.
_DEEPEST: Final = 8
# A fetch may take this long, and a second more per this many bytes.
_FETCH_S: Final = 30.0
_FETCH_RATE: Final = 1_000_000

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def is_reference(value: Json) -> bool:
    """Whether ``value`` is a claim-check reference."""
    return isinstance(value, dict) and isinstance(value.get(MARKER), str)


def references(value: Json) -> Iterator[dict[str, Json]]:
    """Every reference inside ``value``."""
    if is_reference(value):
        assert isinstance(value, dict)
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def _contains_marker(encoded: bytes) -> bool:
    return b'"$payload"' in encoded


class Payloads:
    """The ``payloads`` bucket as one service sees it, bound when first needed (a service
    that never meets a big value never touches it)."""

    def __init__(self, js: JetStreamContext, threshold: int, replicas: int = 1) -> None:
        self.js = js
        self.threshold = threshold
        self.replicas = replicas
        self._store: ObjectStore | None = None

    async def store(self) -> ObjectStore:
        if self._store is None:
            self._store = await ensure_payloads(self.js, self.replicas)
        return self._store

    async def spill(self, encoded: bytes, name: str) -> bytes:
        """``encoded`` (JSON) as it is if it fits the threshold; else with its biggest
        fields (or itself) stored under ``name`` and replaced by references."""
        if len(encoded) <= self.threshold:
            return encoded
        value: Json = _decode(encoded)
        if isinstance(value, dict) and not is_reference(value):
            fields = _fields_to_spill(value, len(encoded), self.threshold)
            if fields:
                kept = dict(value)
                for key in fields:
                    kept[key] = await self._put(f"{name}/{key}", _encode(value[key]))
                return _encode(kept)
        return _encode(await self._put(name, encoded))

    async def resolve(self, encoded: bytes, workflow_id: str = "") -> bytes:
        """``encoded`` (JSON) with every reference replaced by the value it names (and
        any reference inside that, in turn), for workflow ``workflow_id``."""
        if not _contains_marker(encoded):
            return encoded
        value: Json = _decode(encoded)
        if not any(True for _ in references(value)):
            return encoded
        return _encode(await self._resolved(value, 0, workflow_id))

    async def _resolved(self, value: Json, depth: int, workflow_id: str) -> Json:
        if is_reference(value):
            assert isinstance(value, dict)
            if depth >= _DEEPEST:
                raise BadRequest(f"payload references nest deeper than {_DEEPEST}")
            found = cast(Json, _decode(await self.fetch(value, workflow_id)))
            return await self._resolved(found, depth + 1, workflow_id)
        if isinstance(value, dict):
            return {k: await self._resolved(v, depth, workflow_id) for k, v in value.items()}
        if isinstance(value, list):
            return [await self._resolved(v, depth, workflow_id) for v in value]
        return value

    async def exists(self, name: str) -> bool:
        """Whether object ``name`` is stored (and not deleted)."""
        try:
            await (await self.store()).get_info(name)
        except NotFoundError:
            return False
        return True

    async def fetch(self, reference: dict[str, Json], workflow_id: str = "") -> bytes:
        """The JSON a reference names, checked against its digest (which only the list a
        streamed FORK of ``workflow_id`` gathered may lack: its content is known once it
        is written, after the decision that named it).

        Raises:
            BadRequest: no such object (removed, or never stored), or it is not what the
                reference says.
            TimeoutError: the bucket did not deliver it in time (a retry may).
        """
        name = str(reference[MARKER])
        size = reference.get("bytes")
        seconds = _FETCH_S + (size / _FETCH_RATE if isinstance(size, int) else _FETCH_S)
        buffer = io.BytesIO()
        try:
            async with asyncio.timeout(seconds):
                await (await self.store()).get(name, writeinto=buffer)
        except NotFoundError:
            raise BadRequest(f"payload {name!r} is not in the {PAYLOADS} bucket") from None
        data = buffer.getvalue()
        digest = reference.get("sha256")
        if digest is None and not (workflow_id and _gathered_by(name, workflow_id)):
            raise BadRequest(f"payload reference {name!r} has no sha256")
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise BadRequest(f"payload {name!r} is not the value its reference names")
        return data

    async def sizes(self, value: Json) -> int:
        """How many bytes the references in ``value`` name, as they say (or as stored)."""
        total = 0
        for reference in references(value):
            size = reference.get("bytes")
            if not isinstance(size, int):
                try:
                    size = (await (await self.store()).get_info(str(reference[MARKER]))).size
                except NotFoundError:
                    size = 0
            total += size or 0
        return total

    async def delete_owned(self, workflow_id: str, value: Json) -> int:
        """Delete the objects ``value`` refers to that workflow ``workflow_id`` wrote
        (named under ``<workflow_id>/``: not a client's upload, not another's)."""
        count = 0
        for reference in references(value):
            name = str(reference[MARKER])
            if _owner(name) == workflow_id and await self._delete(name):
                count += 1
        return count

    async def collect(self, exists: Callable[[str], Awaitable[bool]], before: str) -> int:
        """Delete the objects written before ``before`` by workflows that no longer exist
        (a finished one past its retention, its reruns' and retried attempts' objects
        included). Objects not named by kapellmeister are left alone."""
        cutoff = _moment(before)
        assert cutoff is not None, before
        store = await self.store()
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:
            return 0  # an empty bucket
        owned: dict[str, list[str]] = {}
        for info in infos:
            owner = _owner(info.name or "")
            written = _moment(info.mtime or "")
            if owner is not None and written is not None and written < cutoff:
                owned.setdefault(owner, []).append(info.name or "")
        count = 0
        for owner, names in owned.items():
            if await exists(owner):
                continue
            for name in names:
                count += await self._delete(name)
        return count

    async def _delete(self, name: str) -> bool:
        try:
            await (await self.store()).delete(name)
        except (NotFoundError, BadRequestError):
            return False  # gone already
        return True

    async def put_once(self, name: str, data: bytes) -> None:
        """Store ``data`` as object ``name`` unless it exists (a name whose content is
        fixed once decided, such as a streamed FORK's gathered outputs)."""
        if not await self.exists(name):
            await (await self.store()).put(name, data)

    async def _put(self, name: str, data: bytes) -> dict[str, Json]:
        """Store ``data`` under ``name`` and its digest, unless it is stored already: an
        object is never overwritten (a reader of it would wait for ever on its chunks),
        and a redelivered attempt with another output writes another object."""
        digest = hashlib.sha256(data).hexdigest()
        named = f"{name}/{digest[:16]}"
        await self.put_once(named, data)
        return {MARKER: named, "bytes": len(data), "sha256": digest}


def _fields_to_spill(value: dict[str, Json], size: int, threshold: int) -> list[str]:
    """The fields to store, biggest first, so that the rest fits; none if it cannot."""
    sizes = {key: len(_encode(item)) for key, item in value.items()}
    chosen: list[str] = []
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        if size <= threshold or sizes[key] < _SMALLEST:
            break
        chosen.append(key)
        size -= sizes[key] - _REFERENCE_BYTES
    return chosen if size <= threshold else []


def _moment(text: str) -> datetime.datetime | None:
    """An RFC 3339 time, whatever its fraction of a second (nats-py writes micro-,
    the server nanoseconds)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    zone = match["zone"] or "Z"
    fraction = (match["fraction"] or ".0")[:7]
    return datetime.datetime.fromisoformat(
        match["seconds"] + fraction + ("+00:00" if zone == "Z" else zone)
    )


_RFC3339: Final = re.compile(
    r"(?P<seconds>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?P<fraction>\.\d+)?"
    r"(?P<zone>Z|[+-]\d\d:\d\d)?"
)


def _gathered_by(name: str, workflow_id: str) -> bool:
    """Whether ``name`` is the list a streamed FORK of ``workflow_id`` gathered."""
    parts = name.split("/")
    return len(parts) == 5 and _owner(name) == workflow_id and parts[4] == "items"


def _owner(name: str) -> str | None:
    """The workflow that wrote an object (``<workflow_id>/<ref>/<attempt>/input|output…``),
    or None for a name kapellmeister does not give."""
    parts = name.split("/")
    if len(parts) < 5 or not parts[2].isdigit() or parts[3] not in {"input", "output"}:
        return None
    return parts[0] if WORKFLOW_ID_PATTERN.fullmatch(parts[0]) else None


async def ensure_payloads(js: JetStreamContext, replicas: int = 1) -> ObjectStore:
    """The ``payloads`` Object Store bucket, created if missing."""
    try:
        return await js.object_store(PAYLOADS)
    except NotFoundError:
        pass
    try:
        return await js.create_object_store(
            PAYLOADS,  # nats-py takes the name from here, over the config's
            config=ObjectStoreConfig(
                bucket=PAYLOADS,
                description="kapellmeister payloads above the threshold (claim checks)",
                storage=StorageType.FILE,
                replicas=replicas,
            ),
        )
    except BadRequestError:
        return await js.object_store(PAYLOADS)  # another service created it meanwhile
