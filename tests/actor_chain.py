"""A chain of three actors for the tests: ``python -m tests.actor_chain``.

``events.chain.started {n}`` → Started-Double emits ``events.chain.doubled {n: 2n}`` →
Doubled-Increment emits ``events.chain.incremented {n: 2n+1}`` → Incremented-Finish
emits ``events.chain.finished {n}``. ``FAULTS_CRASH_AT=after-publish:N`` plants a SIGKILL
before the process's Nth ack (see tests/faults/crashing_conductor.py).
"""

from __future__ import annotations

import os

import msgspec

from kapellmeister.actors import ActorSpec, actor, run_actors


class Number(msgspec.Struct):
    n: int


class Doubled(msgspec.Struct):
    n: int


class Incremented(msgspec.Struct):
    n: int


class Finished(msgspec.Struct):
    n: int


async def double(event: Number) -> Doubled:
    return Doubled(n=event.n * 2)


async def increment(event: Doubled) -> list[Incremented]:
    return [Incremented(n=event.n + 1)]


async def finish(event: Incremented) -> Finished:
    return Finished(n=event.n)


CHAIN: list[ActorSpec] = [
    actor(
        "Started-Double", "events.chain.started", double, emits={Doubled: "events.chain.doubled"}
    ),
    actor(
        "Doubled-Increment",
        "events.chain.doubled",
        increment,
        emits={Incremented: "events.chain.incremented"},
    ),
    actor(
        "Incremented-Finish",
        "events.chain.incremented",
        finish,
        emits={Finished: "events.chain.finished"},
    ),
]


if __name__ == "__main__":
    if "FAULTS_CRASH_AT" in os.environ:
        from tests.faults.crashing_conductor import plant

        plant(os.environ["FAULTS_CRASH_AT"])
    run_actors("chain", CHAIN)
