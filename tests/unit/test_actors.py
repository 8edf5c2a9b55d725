"""Declaring an actor: its name, subject and what its returns mean."""

from __future__ import annotations

import msgspec
import pytest

from kapellmeister.actors import ActorContext, Emit, UnknownOutput, actor


class In(msgspec.Struct):
    n: int


class Out(msgspec.Struct):
    n: int


class Other(msgspec.Struct):
    n: int


async def handle(event: In) -> list[Out]:
    return [Out(n=event.n)]


def test_an_actor_is_named_event_type_dash_listener_and_listens_on_events():
    spec = actor("In-Echo", "events.in.*", handle, emits={Out: "events.out"})
    assert (spec.name, spec.subject, spec.input_type) == ("In-Echo", "events.in.*", In)
    with pytest.raises(ValueError, match="<EventType>-<Listener>"):
        actor("echo", "events.in", handle)
    with pytest.raises(ValueError, match="events"):
        actor("In-Echo", "tasks.in", handle)


def test_what_a_handler_returns_becomes_events_in_order():
    spec = actor("In-Echo", "events.in", handle, emits={Out: "events.out"})
    assert spec.outputs(None) == []
    assert spec.outputs(Out(n=1)) == [("events.out", b'{"n":1}')]
    assert spec.outputs([Out(n=1), Emit("events.x", {"a": 2})]) == [
        ("events.out", b'{"n":1}'),
        ("events.x", b'{"a":2}'),
    ]
    with pytest.raises(UnknownOutput, match="no subject for a Other"):
        spec.outputs([Other(n=1)])


def test_a_handler_may_take_the_context_and_must_type_its_event():
    async def with_context(event: In, ctx: ActorContext) -> None:
        return None

    async def untyped_context(event: In, ctx) -> None:
        return None

    async def untyped(event) -> None:
        return None

    assert actor("In-A", "events.in", with_context).wants_context
    assert actor("In-B", "events.in", untyped_context).wants_context  # counted, not hinted
    assert not actor("In-C", "events.in", handle).wants_context
    with pytest.raises(TypeError, match="must be"):
        actor("In-D", "events.in", untyped)
