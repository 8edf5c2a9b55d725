"""A task's ``when``: a condition on earlier outputs, nestable with ``all`` and ``any``.

::

    when:
      all:
        - {value: "${order.output.drink}", op: "==", to: beer}
        - any:
            - {value: "${recipe.output.style}", op: in, to: [IPA, NEIPA]}
            - {exists: "${recipe.output.dry_hop_g}"}

A comparison is ``{value, op, to}`` with ``op`` one of ``==``, ``!=``, ``in``, ``<``,
``>``; ``value`` and ``to`` are expressions or constants. ``{exists: "${…}"}`` holds when
the path names a value (not null). ``all: []`` holds, ``any: []`` does not. Evaluation
never raises, as expressions never do: ``==`` is JSON equality (``true`` is not ``1``);
``in`` is membership in a list, or a substring of a string; ``<`` and ``>`` compare two
numbers or two strings and are false for anything else. Malformed conditions are caught
when the definition is compiled, with the path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from kapellmeister.errors import InvalidDefinition
from kapellmeister.expressions import (
    Compiled,
    ExpressionError,
    Json,
    Path,
    Reference,
    compile_value,
    paths,
)

__all__ = ["OPERATORS", "Condition", "compile_condition"]

OPERATORS: Final = ("==", "!=", "in", "<", ">")


class Condition(Protocol):
    def holds(self, context: Mapping[str, Json]) -> bool: ...

    def paths(self) -> Iterator[Path]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _All:
    parts: tuple[Condition, ...]

    def holds(self, context: Mapping[str, Json]) -> bool:
        return all(part.holds(context) for part in self.parts)

    def paths(self) -> Iterator[Path]:
        for part in self.parts:
            yield from part.paths()


@dataclasses.dataclass(frozen=True, slots=True)
class _Any:
    parts: tuple[Condition, ...]

    def holds(self, context: Mapping[str, Json]) -> bool:
        return any(part.holds(context) for part in self.parts)

    def paths(self) -> Iterator[Path]:
        for part in self.parts:
            yield from part.paths()


@dataclasses.dataclass(frozen=True, slots=True)
class _Compare:
    value: Compiled
    op: str
    to: Compiled

    def holds(self, context: Mapping[str, Json]) -> bool:
        return _compare(self.value.evaluate(context), self.op, self.to.evaluate(context))

    def paths(self) -> Iterator[Path]:
        yield from paths(self.value)
        yield from paths(self.to)


@dataclasses.dataclass(frozen=True, slots=True)
class _Exists:
    value: Compiled

    def holds(self, context: Mapping[str, Json]) -> bool:
        return self.value.evaluate(context) is not None

    def paths(self) -> Iterator[Path]:
        yield from paths(self.value)


def _same(a: Json, b: Json) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _number(value: Json) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compare(value: Json, op: str, to: Json) -> bool:
    match op:
        case "==":
            return _same(value, to)
        case "!=":
            return not _same(value, to)
        case "in":
            if isinstance(to, list):
                return any(_same(value, item) for item in to)
            return isinstance(to, str) and isinstance(value, str) and value in to
        case "<" | ">":
            if not (_number(value) and _number(to)) and not (
                isinstance(value, str) and isinstance(to, str)
            ):
                return False
            return bool(value < to) if op == "<" else bool(value > to)  # type: ignore[operator]
    return False  # pragma: no cover - compile_condition admits only OPERATORS


def compile_condition(raw: Json, where: str) -> Condition:
    """A ``when`` tree compiled once, at load.

    Raises:
        InvalidDefinition: not one of the four forms, an unknown ``op``, or a malformed
            expression; the message names the path.
    """
    if not isinstance(raw, dict) or len(raw) == 0:
        raise InvalidDefinition(f"a condition is an object - at `{where}`")
    try:
        if set(raw) == {"all"} or set(raw) == {"any"}:
            kind = next(iter(raw))
            parts = raw[kind]
            if not isinstance(parts, list):
                raise InvalidDefinition(f"`{kind}` takes a list - at `{where}.{kind}`")
            compiled = tuple(
                compile_condition(part, f"{where}.{kind}[{i}]") for i, part in enumerate(parts)
            )
            return _All(compiled) if kind == "all" else _Any(compiled)
        if set(raw) == {"exists"}:
            value = compile_value(raw["exists"])
            if not isinstance(value, Reference):
                raise InvalidDefinition(f"`exists` takes one ${{…}} - at `{where}.exists`")
            return _Exists(value)
        if set(raw) == {"value", "op", "to"}:
            if raw["op"] not in OPERATORS:
                raise InvalidDefinition(
                    f"op {raw['op']!r} is not one of {', '.join(OPERATORS)} - at `{where}.op`"
                )
            return _Compare(compile_value(raw["value"]), str(raw["op"]), compile_value(raw["to"]))
    except ExpressionError as exc:
        raise InvalidDefinition(f"{exc} - at `{where}`") from exc
    raise InvalidDefinition(
        f"a condition is {{all: […]}}, {{any: […]}}, {{exists: ${{…}}}} or "
        f"{{value, op, to}}, not {sorted(raw)} - at `{where}`"
    )
