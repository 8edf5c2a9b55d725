"""Claim-check references without a server: what is one, and finding them in a value."""

from __future__ import annotations

from kapellmeister.messages import Json
from kapellmeister.payloads import MARKER, is_reference, references


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
