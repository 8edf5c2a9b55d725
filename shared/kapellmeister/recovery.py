"""Re-driving a workflow after the dedupe window: publish only what is verifiably missing.

The conductor republishes freely while JetStream can still drop the copy: a replayed
fact, or the sweeper, within the streams' 10-minute dedupe window of the first publish.
Past it, a copy is stored, so a republished task would run twice. That happens when a
conductor crashed after publishing and before acking and none came back for ten minutes,
or when a dispatch was really lost (a server crash) and noticed late. There, each
command is first looked for where it would be stored, in this order:

1. the command itself: its ``Nats-Msg-Id`` on its subject (``tasks.<task>``,
   ``events.…``, ``timers.<workflow>.<ref>.<attempt>.<purpose>``);
2. anything waiting on ``results.<workflow_id>``: a result not applied yet will move
   the workflow on (an agent stores its result before it acks its task, so a task gone
   from TASKS has its result here or already applied);
3. the saga's revision: if it moved, a result was applied meanwhile; do nothing now.

Only what passed all three is republished. Child starts are idempotent by the child's id
and always go. "Past the window" is judged on the server's clock (the ``ts`` of a
stream-info reply) against the saga's ``updated_at``, which the server stamped too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kapellmeister.messages import (
    Command,
    NotifyParent,
    PublishEvent,
    RunTask,
    Saga,
    ScheduleTimer,
    StartWorkflow,
    TerminateWorkflow,
    utc_shift,
)
from kapellmeister.topology import DEDUPE_WINDOW_S, EVENTS, RESULTS, TASKS

__all__ = ["MARGIN_S", "Recovery", "is_old"]

# A publish older than this may have left the dedupe window (a fifth of it to spare).
MARGIN_S: Final = DEDUPE_WINDOW_S * 0.8


def is_old(state: Saga, now: str) -> bool:
    """Whether the saga's last write may be past the dedupe window at server time ``now``."""
    return state.updated_at < utc_shift(now, -MARGIN_S)


class Recovery:
    """Looks up stored message ids, one scan per subject per pass (``Recovery()`` anew)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._ids: dict[tuple[str, str], set[str]] = {}

    async def missing(
        self, state: Saga, commands: Sequence[Command], applying: int | None = None
    ) -> list[Command]:
        """Steps 1 and 2: the commands not found stored, none if a result is waiting.

        ``applying`` is the RESULTS sequence of the fact being applied now, if any: it
        waits on ``results.<workflow_id>`` (or ``.<task>``, an agent's) until acked, and
        does not count.
        """
        found: list[Command] = []
        for command in commands:
            where = _where(command)
            if where is None or command.msg_id not in await self.stored(*where):
                found.append(command)
        if not found:
            return found
        own, agents = f"results.{state.workflow_id}", f"results.{state.workflow_id}.>"
        if await self._waiting(own, applying) or await self._waiting(agents, applying):
            return []
        return found

    async def _waiting(self, subject: str, applying: int | None) -> bool:
        """Whether a message other than ``applying`` is stored on ``subject`` in RESULTS."""
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(RESULTS, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return False
            if msg.seq != applying:
                return True
            seq = (msg.seq or seq) + 1

    async def stored(self, stream: str, subject: str) -> set[str]:
        """The ``Nats-Msg-Id`` of every message stored in ``stream`` on ``subject``.

        Direct gets, one message after the other: they work on work-queue streams, where
        a second consumer on an agent's subject is not allowed. Remembered for this pass.
        """
        key = (stream, subject)
        if key in self._ids:
            return self._ids[key]
        ids: set[str] = set()
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            ids.add((msg.headers or {}).get("Nats-Msg-Id", f"seq:{msg.seq}"))
            seq = (msg.seq or seq) + 1
        self._ids[key] = ids
        return ids


def _where(command: Command) -> tuple[str, str] | None:
    """Where ``command``'s message is stored; None for one that is safe to repeat."""
    match command:
        case RunTask():
            return TASKS, f"tasks.{command.task}"
        case PublishEvent():
            return EVENTS, command.subject
        case ScheduleTimer():
            where = f"{command.workflow_id}.{command.ref}.{command.attempt}"
            return RESULTS, f"timers.{where}.{command.purpose}"
        case NotifyParent():
            return RESULTS, f"results.{command.parent.workflow_id}"
        case StartWorkflow() | TerminateWorkflow():
            return None  # idempotent by the workflow's id and state
    return None  # pragma: no cover - every command type is matched
