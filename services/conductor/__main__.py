"""The conductor: ``python -m services.conductor`` (the container entrypoint).

Serves the shipped definitions in ``definitions/`` beside this file, plus any directory
named by ``KAPELLMEISTER_DEFINITIONS`` (colon-separated).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from kapellmeister import (
    Conductor,
    Registry,
    Settings,
    connect,
    disconnect,
    load_definitions,
    run_service,
)

DEFINITIONS = Path(__file__).parent / "definitions"


def registry(extra: str = "") -> Registry:
    """The shipped definitions and those in the ``extra`` directories."""
    directories = [DEFINITIONS, *(Path(d) for d in extra.split(os.pathsep) if d)]
    return Registry(d for directory in directories for d in load_definitions(directory))


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    nc = await connect(settings, "conductor")
    conductor = Conductor(settings, registry(settings.definitions))
    await conductor.start(nc)
    await stop.wait()
    await conductor.stop()
    await disconnect(nc)


def main() -> None:
    run_service("conductor", serve)


if __name__ == "__main__":
    main()
