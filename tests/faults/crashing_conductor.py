"""The conductor with a crash planted in it: ``python -m tests.faults.crashing_conductor``.

``FAULTS_CRASH_AT`` says where the process SIGKILLs itself, as a power cut would:

* ``after-write:N``: right after the Nth saga write of a fact other than a start landed
  (compare-and-set done), before publishing what was decided;
* ``after-publish:N``: right before the process's Nth ack, so after what the message
  decided was published (a task result's commands, or a triggering event's starts).

Everything else is the shipped conductor (``services.conductor``), unchanged.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from nats.aio.msg import Msg

from kapellmeister.conductor import Conductor
from kapellmeister.decider import Decision
from kapellmeister.messages import Fact, Started
from services.conductor.__main__ import main


def _countdown(n: int) -> Any:
    """A callable that SIGKILLs this process on its ``n``th call."""
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)

    return tick


def plant(where: str) -> None:
    point, _, count = where.partition(":")
    tick = _countdown(int(count))
    if point == "after-write":
        apply = Conductor._apply

        async def apply_then_crash(self: Conductor, fact: Fact) -> tuple[Decision, bool]:
            decision, wrote = await apply(self, fact)
            if wrote and not isinstance(fact, Started):  # starts stay answered
                tick()
            return decision, wrote

        Conductor._apply = apply_then_crash  # type: ignore[method-assign]
    elif point == "after-publish":
        ack = Msg.ack

        async def crash_then_ack(self: Msg) -> None:
            tick()
            await ack(self)

        Msg.ack = crash_then_ack  # type: ignore[method-assign]
    else:
        raise SystemExit(f"FAULTS_CRASH_AT: unknown point {point!r}")


if __name__ == "__main__":
    plant(os.environ["FAULTS_CRASH_AT"])
    main()
