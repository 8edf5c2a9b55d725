"""Claim-check references without a server: what is one, and finding them in a value."""

from __future__ import annotations

from kapellmeister.messages import Json
from kapellmeister.payloads import (
    MARKER,
    _fields_to_spill,
    _moment,
    _owner,
    is_reference,
    references,
)


def test_a_reference_is_an_object_naming_a_payload():
    assert is_reference({MARKER: "w/a/1/output", "bytes": 3, "sha256": "ab"})
    assert not is_reference({MARKER: 3})
    assert not is_reference({"payload": "w/a/1/output"})
    assert not is_reference("$payload")


def test_references_are_found_at_any_depth_and_not_inside_one_another():
    first: Json = {MARKER: "a", "bytes": 1, "sha256": "x"}
    second: Json = {MARKER: "b", "bytes": 1, "sha256": "y", "extra": {MARKER: "c"}}
    value: Json = {"top": first, "list": [1, {"deep": second}], "plain": {"n": 1}}
    assert list(references(value)) == [first, second]
    assert list(references([1, "two", None])) == []


def test_only_names_kapellmeister_gives_have_an_owner():
    assert _owner("w-1/make/1/output/blob/0123456789abcdef") == "w-1"
    assert _owner("w-1/make/2/input/0123456789abcdef") == "w-1"
    assert _owner("uploads/report.json") is None
    assert _owner("w-1/make/x/output/blob") is None
    assert _owner("w 1/make/1/output/blob") is None


def test_times_of_any_precision_compare():
    micro = _moment("2026-11-23T19:07:41.873312+00:00")
    nano = _moment("2026-11-23T19:07:41.873312999Z")
    milli = _moment("2026-11-23T19:07:41.874Z")
    assert micro is not None and nano is not None and milli is not None
    assert micro == nano < milli
    assert _moment("yesterday") is None


def test_the_biggest_fields_go_until_the_rest_fits():
    value: dict[str, Json] = {"big": "x" * 50_000, "mid": "y" * 20_000, "small": 1}
    assert _fields_to_spill(value, 70_030, 30_000) == ["big"]
    assert _fields_to_spill(value, 70_030, 10_000) == ["big", "mid"]
    # Small fields alone too big: nothing is spilled field by field (all goes whole).
    many: dict[str, Json] = {str(n): "z" * 500 for n in range(100)}
    assert _fields_to_spill(many, 51_000, 10_000) == []
