"""A chain of three actors for the tests: ``python -m tests.actor_chain``.

``events.chain.started {n}`` → Started-Double emits ``events.chain.doubled {n: 2n}`` →
Doubled-Increment emits ``events.chain.incremented {n: 2n+1}`` → Incremented-Finish
emits ``events.chain.finished {n}``. ``CHAIN_CRASH_ON=<subject>`` plants a SIGKILL
right before the process acks a message on that subject: after the actor that got it
published what it returned.
"""

from __future__ import annotations

import os
import signal

import msgspec
from nats.aio.msg import Msg

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


def crash_on(subject: str) -> None:
    """SIGKILL this process right before it acks a message on ``subject``."""
    ack = Msg.ack

    async def crash_then_ack(self: Msg) -> None:
        if self.subject == subject:
            os.kill(os.getpid(), signal.SIGKILL)
        await ack(self)

    Msg.ack = crash_then_ack  # type: ignore[method-assign]


if __name__ == "__main__":
    if "CHAIN_CRASH_ON" in os.environ:
        crash_on(os.environ["CHAIN_CRASH_ON"])
    run_actors("chain", CHAIN)
