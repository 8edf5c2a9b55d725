"""The agenda's actors: reactions to the events the workflows publish.

* ``ActivityChosen-Tally`` counts, per user, the activities plan_day chose
  (``events.activity.chosen``) and emits ``events.activity.tallied`` with the count.
  The count is kept in the KV bucket ``activity_counts``, idempotent by event id, so a
  redelivered event is not counted twice.
* ``ApprovalGranted-Notify`` is the approval's notification as an actor: on
  ``events.approval.granted`` it emits ``events.notification.sent`` for finance.
"""

from __future__ import annotations

import msgspec

from kapellmeister.actors import ActorContext, actor
from kapellmeister.gather import Counter

COUNTS = "activity_counts"


class ActivityChosen(msgspec.Struct, frozen=True):
    user: str
    activity: str
    workflow_id: str = ""


class Tallied(msgspec.Struct, frozen=True):
    user: str
    activity: str
    count: int


class ApprovalGranted(msgspec.Struct, frozen=True):
    workflow_id: str
    money: int


class Notification(msgspec.Struct, frozen=True):
    to: str
    text: str
    workflow_id: str


async def tally(event: ActivityChosen, ctx: ActorContext) -> Tallied:
    """One more activity chosen for this user."""
    counter = Counter(await ctx.bucket(COUNTS))
    count = await counter.add(event.user, ctx.event_id)
    return Tallied(user=event.user, activity=event.activity, count=count)


async def notify(event: ApprovalGranted) -> Notification:
    """Tell finance to pay."""
    return Notification(
        to="finance",
        text=f"pay {event.money} (approved in {event.workflow_id})",
        workflow_id=event.workflow_id,
    )


ACTORS = [
    actor(
        "ActivityChosen-Tally",
        "events.activity.chosen",
        tally,
        emits={Tallied: "events.activity.tallied"},
    ),
    actor(
        "ApprovalGranted-Notify",
        "events.approval.granted",
        notify,
        emits={Notification: "events.notification.sent"},
    ),
]
