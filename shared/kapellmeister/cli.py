"""The ``kapellmeister`` command: a thin client of the public NATS API, plus ``serve`` and ``demo``.

Every client command sends exactly what the ``nats`` CLI would (``nats req conductor.get.<id>``)
and prints the JSON reply; an error reply prints its JSON body on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence

import msgspec
import nats.errors

from kapellmeister.config import Settings
from kapellmeister.runtime import connect

__all__ = ["main", "request"]

SERVICES = ("conductor", "weather", "agenda")


async def request(
    settings: Settings,
    subject: str,
    payload: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> bytes:
    """One request over NATS; raises `SystemExit(1)` with the error body on an error reply."""
    nc = await connect(settings, "kapellmeister-cli")
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        print(f"no service answers {subject}: is it running?", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await nc.drain()
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        print(reply.data.decode(), file=sys.stderr)
        raise SystemExit(1)
    return reply.data


def _pretty(data: bytes) -> str:
    return msgspec.json.format(data, indent=2).decode()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kapellmeister", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a service (as python -m services.<name>)")
    serve.add_argument("service", choices=SERVICES)
    commands.add_parser("demo", help="embedded NATS + the three services + a few plan_day runs")
    start = commands.add_parser("start", help="start a workflow: conductor.start.<name>")
    start.add_argument("workflow")
    start.add_argument("input", nargs="?", default="{}", help="the input as JSON")
    start.add_argument("--id", help="the workflow id (Workflow-Id): makes the start idempotent")
    start.add_argument("--version", type=int, help="the definition version (Workflow-Version)")
    start.add_argument("--tenant", help="the tenant (Tenant header)")
    get = commands.add_parser("get", help="a workflow's saga state: conductor.get.<id>")
    get.add_argument("workflow_id")
    listing = commands.add_parser("list", help="workflows, newest first: conductor.list")
    listing.add_argument("--status")
    listing.add_argument("--workflow")
    listing.add_argument("--limit", type=int, default=20)
    for command in (start, get, listing):
        command.add_argument("--json", action="store_true", help="compact JSON output")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kapellmeister`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        importlib.import_module(f"services.{args.service}.__main__").main()
        return
    if args.command == "demo":
        from kapellmeister.demo import run_demo

        run_demo(Settings.from_env(), embedded="NATS_URL" not in os.environ)
        return
    settings = Settings.from_env()
    if args.command == "start":
        headers = {
            k: str(v)
            for k, v in (
                ("Workflow-Id", args.id),
                ("Workflow-Version", args.version),
                ("Tenant", args.tenant),
            )
            if v is not None
        }
        reply = asyncio.run(
            request(settings, f"conductor.start.{args.workflow}", args.input.encode(), headers)
        )
    elif args.command == "get":
        reply = asyncio.run(request(settings, f"conductor.get.{args.workflow_id}"))
    else:
        query = {
            k: v
            for k, v in (
                ("status", args.status),
                ("workflow", args.workflow),
                ("limit", args.limit),
            )
            if v is not None
        }
        reply = asyncio.run(request(settings, "conductor.list", msgspec.json.encode(query)))
    print(reply.decode() if args.json else _pretty(reply))


if __name__ == "__main__":
    main()
