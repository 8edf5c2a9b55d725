"""The pure parts of triggers: subject matching, unwrapping, ids, the input mapping."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kapellmeister.definitions import compile_definition, parse_definition, subject_matches
from kapellmeister.errors import InvalidDefinition
from kapellmeister.triggers import filter_subjects, triggered, unwrap, workflow_id_for


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("events.day.requested", "events.day.requested", True),
        ("events.day.requested", "events.day.requested.x", False),
        ("events.*.requested", "events.day.requested", True),
        ("events.*.requested", "events.day.x.requested", False),
        ("events.day.>", "events.day.requested", True),
        ("events.day.>", "events.day.a.b", True),
        ("events.day.>", "events.day", False),
        ("events.>", "events.anything", True),
    ],
)
def test_subjects_match_as_nats_matches_them(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


def test_plain_json_is_the_data_and_the_message_id_the_id():
    event = unwrap("events.a", {"Nats-Msg-Id": "m-1"}, b'{"x": 1}', 9)
    assert (event.id, event.subject, event.data) == ("m-1", "events.a", {"x": 1})
    assert unwrap("events.a", None, b'{"x": 1}', 9).id == "seq-9"


def test_a_cloudevents_envelope_gives_its_data_and_its_id():
    body = b'{"specversion": "1.0", "id": "c-1", "type": "t", "source": "s", "data": [1]}'
    assert unwrap("events.a", {}, body, 3).id == f"c-1-{hashlib.sha256(b's').hexdigest()[:8]}"
    assert unwrap("events.a", {}, body, 3).data == [1]
    assert unwrap("events.a", {"Nats-Msg-Id": "m-2"}, body, 3).id == "m-2"  # ours first


def test_not_json_is_refused():
    with pytest.raises(ValueError, match="an event must be JSON"):
        unwrap("events.a", {}, b"{nope", 1)


def test_a_workflow_id_is_the_definition_and_the_event_id_or_a_digest():
    # "=" is in no definition name: plan + day-42 and plan-day + 42 do not meet.
    assert workflow_id_for("plan", "day-42") != workflow_id_for("plan-day", "42")
    assert workflow_id_for("greeting", "j-1") == "greeting=j-1"
    odd = workflow_id_for("greeting", "urn:uuid:1/2")
    assert odd.startswith("greeting==") and len(odd) == len("greeting==") + 40
    assert odd == workflow_id_for("greeting", "urn:uuid:1/2")  # deterministic
    assert len(workflow_id_for("g", "x" * 200)) <= 128


def definition(triggers):
    return compile_definition(
        parse_definition(
            {
                "name": "d",
                "input": {"user": "str"},
                "triggers": triggers,
                "tasks": [{"ref": "w", "type": "WAIT"}],
            }
        )
    )


def test_a_definition_is_triggered_by_its_first_matching_trigger():
    d = definition(
        [
            {"subject": "events.a.*", "input": {"user": "${event.u}"}},
            {"subject": "events.a.>", "input": {"user": "${event.v}"}},
        ]
    )
    [(found, compiled)] = list(triggered([d], "events.a.b"))
    assert found is d
    assert compiled.evaluate({"event": {"u": "ann", "v": "bo"}}) == {"user": "ann"}
    assert list(triggered([d], "events.b")) == []


def test_a_trigger_may_name_only_the_event_and_only_events_subjects():
    with pytest.raises(InvalidDefinition, match=r"may name only \$\{event"):
        definition([{"subject": "events.a", "input": {"user": "${workflow.id}"}}])
    with pytest.raises(InvalidDefinition, match="triggers"):
        definition([{"subject": "tasks.a", "input": {}}])
    with pytest.raises(InvalidDefinition):
        definition([{"subject": "events.>.a", "input": {}}])


TOKENS = st.sampled_from(["a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(TOKENS, min_size=1, max_size=3))
    if draw(st.booleans()):
        tokens.append(">")
    return ".".join(["events", *tokens])


@given(
    st.lists(patterns(), max_size=5),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
)
def test_filters_take_every_event_a_trigger_matches_and_never_overlap(found, tokens):
    filters = filter_subjects(found)
    subject = ".".join(["events", *tokens])
    if any(subject_matches(p, subject) for p in found):
        assert any(subject_matches(f, subject) for f in filters)
    # JetStream refuses overlapping filters: no subject matches two of them.
    assert sum(subject_matches(f, subject) for f in filters) <= 1
    assert (filters == []) == (found == [])


def test_a_covered_pattern_is_dropped_and_a_crossing_pair_falls_back_to_all():
    assert filter_subjects(["events.user.*.joined", "events.user.eu.joined"]) == [
        "events.user.*.joined"
    ]
    assert filter_subjects(["events.a", "events.b.>", "events.b.c"]) == ["events.a", "events.b.>"]
    assert filter_subjects(["events.*.joined", "events.user.*"]) == ["events.>"]
