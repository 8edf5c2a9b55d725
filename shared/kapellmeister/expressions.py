"""The `${...}` expressions of definitions: parsed once at load, evaluated against a context.

A definition's strings may name data from the running workflow, as Netflix Conductor's do:
``${workflow.input.date}``, ``${report.output.items.0.name}``, ``${workflow.id}``. This
module owns their syntax and meaning, and nothing else: no I/O, no clock.

- A string that is exactly one ``${...}`` is a `Reference` and keeps the JSON type of
  what it names (a number stays a number, an object an object).
- Text around or between expressions makes an `Interpolation`, evaluated as text: strings
  go in as they are, other values as their compact JSON (``true``, ``3``, ``{"a":1}``,
  ``null``), the same text `switch_key` gives.
- A string with no expression is a `Constant`. ``$${`` writes a literal ``${``.

A path is dot-separated segments; the first names a root of the context (``workflow``,
a task ref, ``event``), a segment of ASCII digits indexes a list. A path that names
nothing (a missing key, an index out of range, a step into a scalar, a task that did not
run) evaluates to None, as in Conductor: evaluation never raises. Malformed syntax is
caught by `parse`, at load time, as an `ExpressionError`.

`compile_value` walks a whole JSON tree (a task's ``input``, a workflow's ``output``) once;
subtrees without expressions collapse to one `Constant`, returned as is when evaluated.
Evaluation shares, never copies, the values it takes from the context and from constants:
treat results as read-only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec

__all__ = [
    "Compiled",
    "Constant",
    "DictOf",
    "ExpressionError",
    "Interpolation",
    "Json",
    "ListOf",
    "Path",
    "Reference",
    "Template",
    "compile_value",
    "parse",
    "paths",
    "references",
    "resolve",
    "switch_key",
]

if TYPE_CHECKING:
    Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None
else:
    # msgspec cannot decode through a recursive alias (it sees ForwardRef('Json')), and
    # structs type their free-form fields with Json; Any decodes JSON to the same values.
    Json = Any
Path: TypeAlias = tuple[str, ...]

# `$${` must win over the `${` it contains, so it is tried first at each position.
_OPEN = re.compile(r"\$\$\{|\$\{")
# A segment is any run of characters that cannot be confused with the syntax around it.
_SEGMENT = re.compile(r"[^\s.${}\[\]]+")
_encoder = msgspec.json.Encoder()


class ExpressionError(ValueError):
    """A template is malformed: an unclosed ``${``, an empty path or a bad segment."""


class Constant(msgspec.Struct, frozen=True):
    """A value with no expression in it; evaluates to itself."""

    value: Json

    def evaluate(self, context: Mapping[str, Json]) -> Json:
        return self.value


class Reference(msgspec.Struct, frozen=True):
    """One ``${path}``: evaluates to the value the path names, with its JSON type."""

    path: Path

    @property
    def text(self) -> str:
        """The expression as a definition writes it, for error messages."""
        return "${" + ".".join(self.path) + "}"

    def evaluate(self, context: Mapping[str, Json]) -> Json:
        return resolve(context, self.path)


class Interpolation(msgspec.Struct, frozen=True):
    """Text with expressions in it; evaluates to a string."""

    parts: tuple[str | Reference, ...]

    def evaluate(self, context: Mapping[str, Json]) -> Json:
        return "".join(
            part if isinstance(part, str) else switch_key(resolve(context, part.path))
            for part in self.parts
        )


class ListOf(msgspec.Struct, frozen=True):
    """A JSON array with an expression somewhere inside."""

    items: tuple[Compiled, ...]

    def evaluate(self, context: Mapping[str, Json]) -> Json:
        return [item.evaluate(context) for item in self.items]


class DictOf(msgspec.Struct, frozen=True):
    """A JSON object with an expression somewhere inside; its keys are never templates."""

    items: tuple[tuple[str, Compiled], ...]

    def evaluate(self, context: Mapping[str, Json]) -> Json:
        return {key: item.evaluate(context) for key, item in self.items}


Template: TypeAlias = Constant | Reference | Interpolation
Compiled: TypeAlias = Constant | Reference | Interpolation | ListOf | DictOf


def parse(template: str) -> Template:
    """Parse one string of a definition.

    Returns:
        A `Reference` when the string is exactly one ``${...}``, a `Constant` (the text
        with ``$${`` unescaped) when it has no expression, else an `Interpolation`.

    Raises:
        ExpressionError: an unclosed ``${``, an empty path or a bad segment.
    """
    parts: list[str | Reference] = []
    text: list[str] = []
    position = 0
    while (found := _OPEN.search(template, position)) is not None:
        text.append(template[position : found.start()])
        if found.group() == "$${":
            text.append("${")
            position = found.end()
            continue
        close = template.find("}", found.end())
        if close < 0:
            raise ExpressionError(
                f"unclosed '${{' at position {found.start()} in template {template!r}"
            )
        reference = Reference(_parse_path(template, found.start(), template[found.end() : close]))
        if literal := "".join(text):
            parts.append(literal)
        text.clear()
        parts.append(reference)
        position = close + 1
    text.append(template[position:])
    if literal := "".join(text):
        parts.append(literal)
    if not parts:
        return Constant("")
    if len(parts) == 1:
        only = parts[0]
        return Constant(only) if isinstance(only, str) else only
    return Interpolation(tuple(parts))


def _parse_path(template: str, start: int, inner: str) -> Path:
    where = f"at position {start} in template {template!r}"
    path = inner.strip()
    if not path:
        raise ExpressionError(f"empty path in '${{{inner}}}' {where}")
    segments = tuple(path.split("."))
    for segment in segments:
        if not segment:
            raise ExpressionError(f"empty segment in path {path!r} {where}")
        if not _SEGMENT.fullmatch(segment):
            hint = " (index a list as items.0, not items[0])" if "[" in segment else ""
            raise ExpressionError(
                f"bad segment {segment!r} in path {path!r} {where}: a segment may not hold "
                f"whitespace, '$', '{{', '}}', '[' or ']'{hint}"
            )
    return segments


def resolve(context: Mapping[str, Json], path: Path) -> Json:
    """Return the value `path` names in `context`, or None when it names nothing."""
    current: Json = context.get(path[0])
    for segment in path[1:]:
        if isinstance(current, dict):
            current = current.get(segment)
        elif isinstance(current, list) and segment.isascii() and segment.isdecimal():
            index = int(segment)
            current = current[index] if index < len(current) else None
        else:
            return None
    return current


def compile_value(value: Json) -> Compiled:
    """Parse every string in a JSON tree, once, keeping dict keys as they are.

    A subtree without expressions becomes one `Constant`; when nothing in it needed
    unescaping, it holds the very object given, so evaluating it costs nothing.

    Raises:
        ExpressionError: a string in the tree is a malformed template.
    """
    if isinstance(value, str):
        return parse(value)
    if isinstance(value, list):
        items = tuple(compile_value(item) for item in value)
        if all(isinstance(item, Constant) for item in items):
            values = [item.value for item in items if isinstance(item, Constant)]
            same = all(new is old for new, old in zip(values, value, strict=True))
            return Constant(value if same else values)
        return ListOf(items)
    if isinstance(value, dict):
        pairs = tuple((key, compile_value(item)) for key, item in value.items())
        if all(isinstance(item, Constant) for _, item in pairs):
            mapping = {key: item.value for key, item in pairs if isinstance(item, Constant)}
            same = all(mapping[key] is item for key, item in value.items())
            return Constant(value if same else mapping)
        return DictOf(pairs)
    return Constant(value)


def _references(compiled: Compiled) -> Iterator[Reference]:
    match compiled:
        case Reference():
            yield compiled
        case Interpolation(parts=parts):
            yield from (part for part in parts if isinstance(part, Reference))
        case ListOf(items=items):
            for item in items:
                yield from _references(item)
        case DictOf(items=pairs):
            for _, item in pairs:
                yield from _references(item)
        case Constant():
            pass


def paths(compiled: Compiled) -> tuple[Path, ...]:
    """Every path a template or compiled value names, once each, in order of appearance."""
    return tuple(dict.fromkeys(reference.path for reference in _references(compiled)))


def references(compiled: Compiled) -> frozenset[str]:
    """The roots a template or compiled value names (``workflow``, task refs, ``event``)."""
    return frozenset(reference.path[0] for reference in _references(compiled))


def switch_key(value: Json) -> str:
    """The text of a value as a SWITCH case key, and as interpolated into a string.

    Strings are as they are (``"ok"`` gives ``ok``); anything else is its compact JSON
    (``true``, ``3``, ``1.5``, ``null``, ``{"a":1}``).
    """
    if isinstance(value, str):
        return value
    return _encoder.encode(value).decode()
