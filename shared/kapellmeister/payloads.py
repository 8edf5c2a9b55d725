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
- Object names derive from the attempt (``<workflow_id>/<ref>/<attempt>/output/<field>``),
  so a redelivered attempt writes the same objects again, not new ones.
- The saga keeps the references; ``conductor.get`` can inline them, and the sweeper
  deletes a workflow's objects with its saga when its retention ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Final, cast

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.object_store import ObjectStore

from kapellmeister.errors import BadRequest
from kapellmeister.expressions import Json

__all__ = [
    "MARKER",
    "PAYLOADS",
    "Payloads",
    "ensure_payloads",
    "is_reference",
    "references",
]

PAYLOADS: Final = "payloads"
MARKER: Final = "$payload"
# A value's encoding spilled at most this far below the threshold is not worth an object.
_SMALLEST: Final = 1024

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
            sizes = {key: len(_encode(item)) for key, item in value.items()}
            kept = dict(value)
            total = len(encoded)
            for key in sorted(sizes, key=lambda k: -sizes[k]):
                if total <= self.threshold or sizes[key] < _SMALLEST:
                    break
                reference = await self._put(f"{name}/{key}", _encode(value[key]))
                kept[key] = reference
                total -= sizes[key] - len(_encode(reference))
            if total <= self.threshold:
                return _encode(kept)
        return _encode(await self._put(name, encoded))

    async def resolve(self, encoded: bytes) -> bytes:
        """``encoded`` (JSON) with every reference replaced by the value it names."""
        if not _contains_marker(encoded):
            return encoded
        value: Json = _decode(encoded)
        if not any(True for _ in references(value)):
            return encoded
        return _encode(await self._resolved(value))

    async def _resolved(self, value: Json) -> Json:
        if is_reference(value):
            assert isinstance(value, dict)
            return cast(Json, _decode(await self.fetch(value)))
        if isinstance(value, dict):
            return {key: await self._resolved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [await self._resolved(item) for item in value]
        return value

    async def fetch(self, reference: dict[str, Json]) -> bytes:
        """The JSON a reference names, checked against its digest.

        Raises:
            BadRequest: no such object (removed, or never stored), or it is not what the
                reference says.
        """
        name = str(reference[MARKER])
        try:
            data = (await (await self.store()).get(name)).data or b""
        except NotFoundError:
            raise BadRequest(f"payload {name!r} is not in the {PAYLOADS} bucket") from None
        if hashlib.sha256(data).hexdigest() != reference.get("sha256", ""):
            raise BadRequest(f"payload {name!r} is not the value its reference names")
        return data

    async def delete(self, value: Json) -> int:
        """Delete the objects of every reference in ``value``; how many there were."""
        count = 0
        for reference in references(value):
            try:
                await (await self.store()).delete(str(reference[MARKER]))
                count += 1
            except (NotFoundError, BadRequestError):
                continue  # gone already
        return count

    async def _put(self, name: str, data: bytes) -> dict[str, Json]:
        await (await self.store()).put(name, data)
        return {MARKER: name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
