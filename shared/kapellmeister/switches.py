"""Switches: events, listeners and event-listener pairs turned off by configuration.

The application-events seed asks that each event, each listener and each pair be
switchable without a code change. Application events (`kapellmeister.appevents`) read
them at each emit and delivery; processor actors (`kapellmeister.actors`, named
``<EventType>-<Listener>``) at start: a switched-off actor is not run, and its durable
consumer keeps its place, so switched on again within EVENTS' 7 days it takes up the
events it missed.

From the environment (comma-separated) or a YAML/JSON file::

    KAPELLMEISTER_EVENTS_OFF="order.placed,ActivityChosen"
    KAPELLMEISTER_LISTENERS_OFF="send_mail,Tally"
    KAPELLMEISTER_EVENT_LISTENERS_OFF="order.placed:bill,ApprovalGranted:Notify"
    KAPELLMEISTER_EVENTS_CONFIG=switches.yaml  # {"events": {…}, "listeners": {…}, "pairs": {…}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
import yaml

__all__ = ["Switches"]


class Switches(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What is turned off: events, listeners (by name), and ``event:listener`` pairs."""

    events: dict[str, bool] = {}
    listeners: dict[str, bool] = {}
    pairs: dict[str, bool] = {}

    def on(self, event: str, listener: str | None = None) -> bool:
        if not self.events.get(event, True):
            return False
        if listener is None:
            return True
        return self.listeners.get(listener, True) and self.pairs.get(f"{event}:{listener}", True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Switches:
        """Switches from ``KAPELLMEISTER_EVENTS_CONFIG`` (a file) and the ``…_OFF`` lists."""
        env = os.environ if environ is None else environ
        found: dict[str, dict[str, bool]] = {"events": {}, "listeners": {}, "pairs": {}}
        config = env.get("KAPELLMEISTER_EVENTS_CONFIG")
        if config:
            loaded = msgspec.convert(yaml.safe_load(Path(config).read_text()) or {}, cls)
            found = {k: dict(getattr(loaded, k)) for k in found}
        for variable, kind in (
            ("KAPELLMEISTER_EVENTS_OFF", "events"),
            ("KAPELLMEISTER_LISTENERS_OFF", "listeners"),
            ("KAPELLMEISTER_EVENT_LISTENERS_OFF", "pairs"),
        ):
            for name in filter(None, (n.strip() for n in env.get(variable, "").split(","))):
                found[kind][name] = False
        return cls(**found)
