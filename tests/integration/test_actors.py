"""Processor actors and scatter-gather on a real nats-server."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kapellmeister.actors import Actors, Emit, actor
from kapellmeister.errors import TaskError
from kapellmeister.gather import GATHERS, Counter, Gather
from kapellmeister.switches import Switches
from kapellmeister.topology import ensure_buckets, ensure_streams
from tests.actor_chain import CHAIN
from tests.support import dead_letters, stream_messages


async def subjects(js, subject: str) -> list[Any]:
    return [
        msgspec.json.decode(m.data or b"") for m in await stream_messages(js, "EVENTS", subject)
    ]


async def until(check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "not in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def chain(nc, settings):
    actors = Actors("chain", CHAIN, settings)
    await actors.start(nc)
    yield actors
    await actors.stop()


async def test_a_chain_of_actors_turns_one_event_into_its_downstream_events(nc, js, chain):
    await js.publish("events.chain.started", b'{"n": 5}', headers={"Nats-Msg-Id": "c-1"})

    async def finished() -> bool:
        return bool(await subjects(js, "events.chain.finished"))

    await until(finished)
    assert await subjects(js, "events.chain.doubled") == [{"n": 10}]
    assert await subjects(js, "events.chain.incremented") == [{"n": 11}]
    assert await subjects(js, "events.chain.finished") == [{"n": 11}]
    [done] = await stream_messages(js, "EVENTS", "events.chain.finished")
    # Each id derives from the input's: a redelivery would publish the same ids again.
    assert (done.headers or {})[
        "Nats-Msg-Id"
    ] == "c-1:Started-Double:0:Doubled-Increment:0:Incremented-Finish:0"


class Order(msgspec.Struct):
    item: str
    quantity: int


FLAKY: dict[str, int] = {"left": 1}


async def reserve(order: Order) -> list[Emit]:
    if order.item == "broken":
        raise TaskError("no such item", retryable=False)
    if order.item == "flaky" and FLAKY["left"] > 0:
        FLAKY["left"] -= 1
        raise RuntimeError("warehouse busy")
    return [Emit(f"events.stock.{order.item}", {"reserved": order.quantity})] * 2


async def test_failures_retry_then_dead_letter_and_bad_input_is_refused(nc, js, settings):
    FLAKY["left"] = 1
    actors = Actors("shop", [actor("Order-Reserve", "events.order.placed", reserve)], settings)
    await actors.start(nc)
    try:
        for n, body in enumerate(
            [b'{"item": "flaky", "quantity": 2}', b'{"item": "broken", "quantity": 1}', b"{}"]
        ):
            await js.publish("events.order.placed", body, headers={"Nats-Msg-Id": f"o-{n}"})

        async def reserved() -> bool:
            return len(await subjects(js, "events.stock.flaky")) == 2

        await until(reserved)  # the retry after one failure (backoff 1 s)
        await until(lambda: _count(js, "deadletter.Order-Reserve", 2))
        letters = await dead_letters(js, "deadletter.Order-Reserve")
    finally:
        await actors.stop()
    reasons = sorted(letter["reason"] for letter in letters)
    assert "no such item" in reasons[0]
    assert reasons[1].startswith("not a Order:")
    assert await subjects(js, "events.stock.broken") == []


async def _count(js, subject: str, count: int) -> bool:
    return len(await stream_messages(js, "DEADLETTERS", subject)) >= count


@pytest.fixture
async def gathers(js):
    await ensure_streams(js)
    return (await ensure_buckets(js))[GATHERS]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32), redeliveries=st.integers(0, 60))
async def test_exactly_one_of_fifty_gatherers_completes_the_group(gathers, seed, redeliveries):
    gather = Gather(gathers)
    rng = random.Random(seed)
    group = f"g-{seed}-{redeliveries}"
    parts = [f"p{i}" for i in range(50)]
    arrivals = parts + [rng.choice(parts) for _ in range(redeliveries)]
    rng.shuffle(arrivals)
    answers = await asyncio.gather(*(gather.arrive(group, part, 50) for part in arrivals))
    completers = {part for part, yes in zip(arrivals, answers, strict=True) if yes}
    assert len(completers) == 1
    state = await gather.state(group)
    assert state is not None
    assert sorted(state.parts) == sorted(parts)
    assert completers == {state.completer}
    # A late redelivery of any part gets the same answer as before, and a part beyond
    # the set (a scatter redone under new ids) completes nothing.
    assert await gather.arrive(group, state.completer, 50) is True
    assert await gather.arrive(group, next(p for p in parts if p != state.completer), 50) is False
    assert await gather.arrive(group, "p-extra", 50) is False


async def test_any_text_names_a_group_or_a_counter(gathers):
    assert await Gather(gathers).arrive("order:7 / ann", "a", 1) is True
    assert await Gather(gathers).arrive("order:7 / ann", "a", 1) is True
    counter = Counter(gathers)
    assert [await counter.add("ann b", "e1"), await counter.add("ann_b", "e1")] == [1, 1]
    assert await counter.add("ann b", "e2") == 2
    assert await counter.add("ann b", "e1") == 1  # a redelivery gets its first count back


@pytest.mark.parametrize(
    "switches",
    [
        Switches(listeners={"Increment": False}),
        Switches(events={"Doubled": False}),
        Switches(pairs={"Doubled:Increment": False}),
    ],
    ids=["listener", "event", "pair"],
)
async def test_a_switched_off_actor_does_not_run_and_the_others_do(nc, js, settings, switches):
    actors = Actors("chain", CHAIN, settings, switches)
    assert actors.switched_off == ["Doubled-Increment"]
    await actors.start(nc)
    try:
        await js.publish("events.chain.started", b'{"n": 5}', headers={"Nats-Msg-Id": "s-1"})

        async def doubled() -> bool:
            return bool(await subjects(js, "events.chain.doubled"))

        await until(doubled)
        await asyncio.sleep(0.5)  # time enough for the chain to go on, were it on
        assert await subjects(js, "events.chain.doubled") == [{"n": 10}]
        assert await subjects(js, "events.chain.incremented") == []
        consumers = {c.name for c in await js.consumers_info("EVENTS")}
        assert "Started-Double" in consumers and "Doubled-Increment" not in consumers
    finally:
        await actors.stop()
