"""The web UI (``kapellmeister ui``): workflows, their graphs and history, and the operator
actions, in a browser; an ASGI application over the public NATS API (`create_app`)."""

from kapellmeister.ui.app import create_app

__all__ = ["create_app"]
