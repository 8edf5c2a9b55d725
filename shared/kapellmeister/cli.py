"""The ``kapellmeister`` command: a thin client of the public NATS API, plus local tools.

Every client command sends exactly what the ``nats`` CLI would (``nats req conductor.get.<id>``)
and prints the reply: readable for people by default, the reply itself with ``--json``. An
error reply prints its JSON body on stderr and exits 1. ``serve`` and ``demo`` run services;
``check`` checks a definition file without a server (or against the agents' registered
tasks with ``--online``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import msgspec
import nats
import nats.errors
import yaml
from nats.aio.client import Client
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError, NotFoundError

from kapellmeister.config import Settings
from kapellmeister.deadletter import DeadLetter
from kapellmeister.store import read_bucket
from kapellmeister.topology import DEADLETTERS, EVENTS

__all__ = ["main", "request"]

SERVICES = ("conductor", "weather", "agenda")
# A task's output is cut to this many characters in the readable `get` (all of it with --json).
_CELL = 60


async def _connect(settings: Settings) -> Client:
    """Connect once, without the services' endless reconnects: a CLI should fail, not hang."""

    async def quiet(exc: Exception) -> None:
        pass  # the failure is reported once, below

    try:
        return await nats.connect(
            name="kapellmeister-cli",
            allow_reconnect=False,
            connect_timeout=5,
            error_cb=quiet,
            **settings.connect_options(),
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"cannot connect to NATS at {settings.nats_url}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def request(
    settings: Settings,
    subject: str,
    payload: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> bytes:
    """One request over NATS; raises `SystemExit(1)` with the error body on an error reply."""
    nc = await _connect(settings)
    try:
        reply = await nc.request(subject, payload, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        print(f"no service answers {subject}: is it running?", file=sys.stderr)
        raise SystemExit(1) from None
    except nats.errors.TimeoutError:
        print(f"no reply on {subject} within {timeout:g} s", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await nc.drain()
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        print(reply.data.decode(), file=sys.stderr)
        raise SystemExit(1)
    return reply.data


# --- what a person reads ---------------------------------------------------------------
# Views of the replies with just the fields shown; unknown fields are ignored, so a newer
# conductor's replies still print.


class _Failure(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Task(msgspec.Struct):
    ref: str
    type: str = ""
    status: str = ""
    attempt: int = 1
    output: Any = None
    error: _Failure | None = None


class _Saga(msgspec.Struct):
    workflow_id: str = ""
    workflow: str = ""
    version: int = 0
    status: str = ""
    output: Any = None
    error: _Failure | None = None
    tasks: list[_Task] = []


class _Summary(msgspec.Struct):
    workflow_id: str
    workflow: str = ""
    version: int = 0
    status: str = ""
    tenant: str = ""
    created_at: str = ""
    updated_at: str = ""


class _Summaries(msgspec.Struct):
    workflows: list[_Summary] = []


class _Schedule(msgspec.Struct):
    name: str
    workflow: str = ""
    cron: str | None = None
    every_s: int | None = None
    timezone: str = "UTC"
    catch_up: str = ""
    version: int | None = None
    paused: bool = False
    next_tick: int = 0
    last_tick: int | None = None
    last_started: str | None = None
    last_error: str | None = None


class _Schedules(msgspec.Struct):
    schedules: list[_Schedule] = []


class _DefinitionName(msgspec.Struct):
    name: str
    version: int = 0
    versions: list[int] = []
    description: str = ""


class _DefinitionNames(msgspec.Struct):
    definitions: list[_DefinitionName] = []


def _pretty(data: bytes) -> str:
    return msgspec.json.format(data, indent=2).decode()


def _compact(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _value(value: Any) -> str:
    """A value on one line; ``-`` for none yet."""
    return "-" if value is None else _compact(value)


def _cut(text: str, width: int = _CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _failure(error: _Failure) -> str:
    return f"{error.type}: {error.message}"


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _show_saga(data: bytes) -> str:
    """A workflow in a few lines: what it is, where it is, then one line per task."""
    saga = msgspec.json.decode(data, type=_Saga)
    lines = [
        f"workflow  {saga.workflow_id}",
        f"name      {saga.workflow} v{saga.version}",
        f"status    {saga.status}",
        f"output    {_value(saga.output)}",
        f"error     {_failure(saga.error) if saga.error else '-'}",
    ]
    if saga.tasks:
        rows = [["ref", "type", "status", "attempt", "output or error"]]
        rows += [
            [
                t.ref,
                t.type,
                t.status,
                str(t.attempt),
                _cut(_failure(t.error) if t.error else _value(t.output)),
            ]
            for t in saga.tasks
        ]
        lines += ["tasks", *_table(rows, indent="  ")]
    return "\n".join(lines)


def _show_list(data: bytes) -> str:
    found = msgspec.json.decode(data, type=_Summaries).workflows
    if not found:
        return "no workflows"
    rows = [["workflow_id", "workflow", "status", "tenant", "created_at", "updated_at"]]
    rows += [
        [
            w.workflow_id,
            f"{w.workflow} v{w.version}",
            w.status,
            w.tenant or "-",
            w.created_at,
            w.updated_at,
        ]
        for w in found
    ]
    return "\n".join(_table(rows))


def _show_registered(data: bytes) -> str:
    registered = msgspec.json.decode(data, type=_DefinitionName)
    return f"registered {registered.name} v{registered.version}"


def _show_definitions(data: bytes) -> str:
    found = msgspec.json.decode(data, type=_DefinitionNames).definitions
    if not found:
        return "no definitions"
    rows = [["name", "latest", "versions", "description"]]
    rows += [
        [d.name, f"v{d.version}", ",".join(map(str, d.versions)) or "-", d.description]
        for d in found
    ]
    return "\n".join(_table(rows))


# --- the requests each client command sends -------------------------------------------------


class _Call(NamedTuple):
    """A request as ``nats req`` would send it."""

    subject: str
    payload: bytes = b""
    headers: dict[str, str] | None = None


def _headers(*pairs: tuple[str, object]) -> dict[str, str] | None:
    """The headers whose value is given, as text; None when there are none."""
    headers = {name: str(value) for name, value in pairs if value is not None}
    return headers or None


def _start(args: argparse.Namespace) -> _Call:
    headers = _headers(
        ("Workflow-Id", args.id),
        ("Workflow-Version", args.version),
        ("Tenant", args.tenant),
        ("Priority", args.priority),
    )
    return _Call(f"conductor.start.{args.workflow}", args.input.encode(), headers)


def _get(args: argparse.Namespace) -> _Call:
    body = b'{"inline": true}' if args.inline else b""
    return _Call(f"conductor.get.{args.workflow_id}", body)


def _list(args: argparse.Namespace) -> _Call:
    query = {
        "status": args.status,
        "workflow": args.workflow,
        "limit": args.limit,
        "tenant": args.tenant,
        "since": args.since,
        "until": args.until,
    }
    return _Call(
        "conductor.list", msgspec.json.encode({k: v for k, v in query.items() if v is not None})
    )


def _signal(args: argparse.Namespace) -> _Call:
    return _Call(f"conductor.signal.{args.workflow_id}.{args.task_ref}", args.output.encode())


def _terminate(args: argparse.Namespace) -> _Call:
    body: dict[str, Any] = {} if args.reason is None else {"reason": args.reason}
    if args.compensate:
        body["compensate"] = True
    return _Call(f"conductor.terminate.{args.workflow_id}", msgspec.json.encode(body))


def _retry(args: argparse.Namespace) -> _Call:
    return _Call(f"conductor.retry.{args.workflow_id}", b"")


def _rerun(args: argparse.Namespace) -> _Call:
    return _Call(f"conductor.rerun.{args.workflow_id}", msgspec.json.encode({"task": args.task}))


def _pause(args: argparse.Namespace) -> _Call:
    return _Call(f"conductor.pause.{args.workflow_id}", b"")


def _resume(args: argparse.Namespace) -> _Call:
    return _Call(f"conductor.resume.{args.workflow_id}", b"")


def _register(args: argparse.Namespace) -> _Call:
    return _Call("conductor.definitions.register", msgspec.json.encode(_load(Path(args.file))))


def _definition(args: argparse.Namespace) -> _Call:
    return _Call(
        f"conductor.definitions.get.{args.name}",
        headers=_headers(("Workflow-Version", args.version)),
    )


def _definitions(args: argparse.Namespace) -> _Call:
    return _Call("conductor.definitions.list", b"{}")


def _schedule_create(args: argparse.Namespace) -> _Call:
    try:
        data = msgspec.json.decode(args.input)
    except msgspec.DecodeError as exc:
        print(f"--input is not JSON: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    spec: dict[str, Any] = {
        "name": args.name,
        "workflow": args.workflow,
        "input": data,
        "catch_up": args.catch_up,
        "timezone": args.timezone,
    }
    if args.cron is not None:
        spec["cron"] = args.cron
    if args.every is not None:
        spec["every_s"] = args.every
    if args.version is not None:
        spec["version"] = args.version
    if args.tenant:
        spec["tenant"] = args.tenant
    return _Call("conductor.schedules.create", msgspec.json.encode(spec))


def _schedule_call(args: argparse.Namespace) -> _Call:
    if args.schedules_command == "list":
        return _Call("conductor.schedules.list", b"{}")
    return _Call(f"conductor.schedules.{args.schedules_command}.{args.name}")


def _when(tick: int | None) -> str:
    if not tick:
        return "-"
    return datetime.datetime.fromtimestamp(tick, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show_schedule(data: bytes) -> str:
    schedule = msgspec.json.decode(data, type=_Schedule)
    rows = [
        ("schedule", schedule.name),
        ("starts", schedule.workflow + (f" v{schedule.version}" if schedule.version else "")),
        ("when", _timing(schedule)),
        ("catch up", schedule.catch_up),
        ("paused", "yes" if schedule.paused else "no"),
        ("next tick", _when(schedule.next_tick)),
        ("last tick", _when(schedule.last_tick)),
        ("last started", schedule.last_started or "-"),
    ]
    if schedule.last_error:
        rows.append(("last error", schedule.last_error))
    return "\n".join(_table(rows))


def _timing(schedule: _Schedule) -> str:
    if schedule.cron:
        return f"cron {schedule.cron} ({schedule.timezone})"
    return f"every {schedule.every_s} s"


def _show_schedules(data: bytes) -> str:
    found = msgspec.json.decode(data, type=_Schedules).schedules
    if not found:
        return "no schedules"
    rows = [["name", "workflow", "when", "paused", "next tick", "last started"]]
    rows += [
        [
            s.name,
            s.workflow,
            _timing(s),
            "yes" if s.paused else "no",
            _when(s.next_tick),
            s.last_started or "-",
        ]
        for s in found
    ]
    return "\n".join(_table(rows))


def _load(path: Path) -> Any:
    """A YAML or JSON file as plain data (JSON is YAML); exits 1 when it cannot be read."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _client(args: argparse.Namespace) -> None:
    """Send the command's request and print the reply."""
    call: _Call = args.call(args)
    reply = asyncio.run(request(Settings.from_env(), *call))
    show: Callable[[bytes], str] = args.show
    print(reply.decode() if args.json else show(reply))


# --- the commands that are not requests ----------------------------------------------


def _serve(args: argparse.Namespace) -> None:
    importlib.import_module(f"services.{args.service}.__main__").main()


def _demo(args: argparse.Namespace) -> None:
    from kapellmeister.demo import run_demo

    ui_port = args.ui_port if args.ui else None
    run_demo(Settings.from_env(), embedded="NATS_URL" not in os.environ, ui_port=ui_port)


async def _dead_letters(settings: Settings) -> list[tuple[int, DeadLetter]]:
    """Every record in the DEADLETTERS stream, oldest first, with its sequence."""
    nc = await _connect(settings)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(DEADLETTERS)
        except NotFoundError:
            return []
        found: list[tuple[int, DeadLetter]] = []
        seq = info.state.first_seq
        while seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(DEADLETTERS, seq=seq, next=True, subject="deadletter.>")
            except NotFoundError:
                break
            found.append((msg.seq or seq, msgspec.json.decode(msg.data or b"", type=DeadLetter)))
            seq = (msg.seq or seq) + 1
        return found
    finally:
        await nc.drain()


def _dlq(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    letters = asyncio.run(_dead_letters(settings))
    if args.dlq_command == "list":
        if args.json:
            print(
                msgspec.json.encode(
                    [{"seq": seq, **msgspec.to_builtins(d)} for seq, d in letters]
                ).decode()
            )
            return
        rows = [("seq", "at", "service", "subject", "reason")]
        rows += [(str(seq), d.at, d.service, d.subject, _cut(d.reason)) for seq, d in letters]
        print("\n".join(_table(rows)))
        return
    chosen = [d for seq, d in letters if seq == args.seq]
    if not chosen:
        print(f"no dead letter with sequence {args.seq}", file=sys.stderr)
        raise SystemExit(1)
    asyncio.run(_replay(settings, args.seq, chosen[0]))


async def _replay(settings: Settings, seq: int, letter: DeadLetter) -> None:
    """Publish a dead letter's original message again, to where it was going."""
    nc = await _connect(settings)
    try:
        headers = dict(letter.headers)
        # A new message id, or JetStream would drop the replay as the original's duplicate.
        headers["Nats-Msg-Id"] = f"{headers.get('Nats-Msg-Id', 'dlq')}:replay:{seq}"
        ack = await nc.jetstream().publish(
            letter.subject, base64.b64decode(letter.data_base64), headers=headers
        )
        print(f"replayed dead letter {seq} to {letter.subject} ({ack.stream} #{ack.seq})")
    finally:
        await nc.drain()


async def _tail(settings: Settings, subject: str, replay: bool, count: int) -> None:
    """Print each event on ``subject`` as ``<subject> <data>``, as it is stored (and, with
    ``replay``, those already kept first); stop after ``count`` if it is set."""
    nc = await _connect(settings)
    try:
        subscription = await nc.jetstream().subscribe(
            subject,
            stream=EVENTS,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
        )
        seen = 0
        async for msg in subscription.messages:
            print(f"{msg.subject} {msg.data.decode(errors='replace')}", flush=True)
            seen += 1
            if count and seen >= count:
                break
    finally:
        await nc.close()  # a reader: nothing to flush (a drain would wait on the consumer)


def _events(args: argparse.Namespace) -> None:
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a tail
        asyncio.run(_tail(Settings.from_env(), args.subject, args.all, args.count))


def _graph(args: argparse.Namespace) -> None:
    """Draw a definition (a file, or one registered) or a workflow with its statuses."""
    from kapellmeister.definitions import compile_definition, load_definition, parse_definition
    from kapellmeister.drawing import to_dot, to_mermaid
    from kapellmeister.errors import InvalidDefinition

    settings = Settings.from_env()
    statuses: dict[str, str] | None = None
    headers: dict[str, str] = {}
    name = args.target
    if args.workflow:
        saga = msgspec.json.decode(
            asyncio.run(request(settings, f"conductor.get.{args.workflow}")), type=_Saga
        )
        statuses = {t.ref: t.status for t in saga.tasks}
        name, headers = saga.workflow, {"Workflow-Version": str(saga.version)}
    try:
        path = Path(name) if name else None
        if path is not None and path.is_file():
            definition = load_definition(path)
        elif name:
            raw = asyncio.run(request(settings, f"conductor.definitions.get.{name}", b"", headers))
            definition = compile_definition(parse_definition(raw))
        else:
            print("name a definition (a file or a registered name) or --workflow", file=sys.stderr)
            raise SystemExit(2)
    except InvalidDefinition as exc:
        print(exc.message, file=sys.stderr)
        raise SystemExit(1) from None
    drawn = (
        to_dot(definition, statuses) if args.format == "dot" else to_mermaid(definition, statuses)
    )
    print(drawn, end="")
    if args.svg:
        from kapellmeister.ui.svg import to_svg

        # The web UI's drawing: no Graphviz needed.
        Path(args.svg).write_text(to_svg(definition, statuses), encoding="utf-8")
        print(f"wrote {args.svg}", file=sys.stderr)


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _ui(args: argparse.Namespace) -> None:
    """Serve the web UI until Ctrl-C or SIGTERM."""
    import uvicorn

    from kapellmeister.logs import setup_logging
    from kapellmeister.ui.app import create_app

    settings = Settings.from_env()
    setup_logging("ui", settings.log_level, settings.log_format)
    if args.host not in _LOOPBACK:
        print(
            f"warning: the UI has no login; on {args.host} anyone who reaches it can act "
            "on workflows (put an authenticating proxy in front, named by --allow-host)",
            file=sys.stderr,
        )
    app = create_app(settings, allowed_hosts=args.allow_host or [])
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"kapellmeister ui on http://{shown}:{args.port}/ (NATS {settings.nats_url})", flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.stop()  # open pages' streams end, so the shutdown does not wait
            super().handle_exit(sig, frame)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on these, then raises the signal again for the handler
    # it found: ours, so that a stop is exit 0, not death by signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    Server(config).run()


async def _registered_tasks(settings: Settings) -> dict[str, Any]:
    """Every entry of the ``tasks`` bucket (what the agents registered), by task name."""
    nc = await _connect(settings)
    try:
        kv = await nc.jetstream().key_value("tasks")
        tasks: dict[str, Any] = {}
        async for _, value in read_bucket(kv):
            registration = msgspec.json.decode(value)
            tasks[registration["name"]] = registration
        return tasks
    except BucketNotFoundError:
        print("no tasks bucket: no agent has started on this server", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await nc.drain()


def _check(args: argparse.Namespace) -> None:
    """Static checks of a definition file: each problem as ``path: message``, exit 1 if any."""
    try:
        # Imported here so that every other command works without the checker.
        from kapellmeister.checker import check_file
    except ImportError as exc:
        print(f"check is not available: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    path = Path(args.file)
    online = asyncio.run(_registered_tasks(Settings.from_env())) if args.online else None
    try:
        problems = check_file(path, online)
    except OSError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        print(_compact({"problems": [{"path": p.path, "message": p.message} for p in problems]}))
    else:
        for problem in problems:
            print(f"{problem.path}: {problem.message}")
    if problems:
        raise SystemExit(1)
    if not args.json:
        definition = _load(path)
        print(f"ok: {definition.get('name')} v{definition.get('version')}")


# --- the parser ----------------------------------------------------------------------


def _client_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    call: Callable[[argparse.Namespace], _Call],
    show: Callable[[bytes], str] = _pretty,
) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=summary)
    command.add_argument("--json", action="store_true", help="the reply as compact JSON")
    command.set_defaults(handler=_client, call=call, show=show)
    return command


def _add_workflow_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    start = _client_command(commands, "start", "start a workflow: conductor.start.<name>", _start)
    start.add_argument("workflow")
    start.add_argument("input", nargs="?", default="{}", help="the input as JSON")
    start.add_argument("--id", help="the workflow id (Workflow-Id): makes the start idempotent")
    start.add_argument("--version", type=int, help="the definition version (Workflow-Version)")
    start.add_argument("--tenant", help="the tenant (Tenant header)")
    start.add_argument(
        "--priority",
        type=int,
        help="0-99, higher first among work waiting for a concurrency slot (Priority header)",
    )
    get = _client_command(
        commands, "get", "a workflow's saga state: conductor.get.<id>", _get, _show_saga
    )
    get.add_argument("workflow_id")
    get.add_argument(
        "--inline", action="store_true", help="with the payloads it refers to, inlined"
    )
    listing = _client_command(
        commands, "list", "workflows, newest first: conductor.list", _list, _show_list
    )
    listing.add_argument("--status")
    listing.add_argument("--workflow")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--tenant")
    listing.add_argument("--since", help="created at or after (RFC 3339; no offset is UTC)")
    listing.add_argument("--until", help="created before (RFC 3339)")
    signal = _client_command(
        commands,
        "signal",
        "complete a WAIT task: conductor.signal.<id>.<ref>",
        _signal,
        _show_saga,
    )
    signal.add_argument("workflow_id")
    signal.add_argument("task_ref")
    signal.add_argument("output", nargs="?", default="{}", help="the task's output as JSON")
    terminate = _client_command(
        commands, "terminate", "end a workflow: conductor.terminate.<id>", _terminate, _show_saga
    )
    terminate.add_argument("workflow_id")
    terminate.add_argument("--reason")
    terminate.add_argument(
        "--compensate", action="store_true", help="undo the completed tasks before ending"
    )
    retry = _client_command(
        commands,
        "retry",
        "run a failed workflow's failed task again: conductor.retry.<id>",
        _retry,
        _show_saga,
    )
    retry.add_argument("workflow_id")
    rerun = _client_command(
        commands,
        "rerun",
        "run a finished workflow again from a task: conductor.rerun.<id>",
        _rerun,
        _show_saga,
    )
    rerun.add_argument("workflow_id")
    rerun.add_argument("task", help="the task ref to run again from (and all downstream)")
    for name, call, what in (
        ("pause", _pause, "dispatch nothing new"),
        ("resume", _resume, "go on from where the results got to"),
    ):
        command = _client_command(
            commands, name, f"{what}: conductor.{name}.<id>", call, _show_saga
        )
        command.add_argument("workflow_id")


def _add_definitions_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    group = commands.add_parser("definitions", help="workflow definitions: register, get, list")
    definitions = group.add_subparsers(dest="definitions_command", required=True)
    register = _client_command(
        definitions,
        "register",
        "register a YAML or JSON definition: conductor.definitions.register",
        _register,
        _show_registered,
    )
    register.add_argument("file")
    get = _client_command(
        definitions, "get", "a definition: conductor.definitions.get.<name>", _definition
    )
    get.add_argument("name")
    get.add_argument("--version", type=int, help="this version (Workflow-Version), not the latest")
    _client_command(
        definitions,
        "list",
        "every definition: conductor.definitions.list",
        _definitions,
        _show_definitions,
    )


def _add_schedules_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    group = commands.add_parser("schedules", help="start workflows on a cron or an interval")
    schedules = group.add_subparsers(dest="schedules_command", required=True)
    create = _client_command(
        schedules,
        "create",
        "a schedule: conductor.schedules.create",
        _schedule_create,
        _show_schedule,
    )
    create.add_argument("name", help="its name; each tick starts <name>-<tick>")
    create.add_argument("workflow")
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='e.g. "0 3 * * *" (six fields: seconds first)')
    when.add_argument("--every", type=int, metavar="SECONDS")
    create.add_argument("--input", default="{}", help="the workflow input as JSON")
    create.add_argument("--catch-up", choices=["skip", "once", "all"], default="skip")
    create.add_argument("--timezone", default="UTC", help="the cron's IANA timezone")
    create.add_argument("--version", type=int, help="start this version, not the latest")
    create.add_argument("--tenant")
    _client_command(
        schedules,
        "list",
        "every schedule: conductor.schedules.list",
        _schedule_call,
        _show_schedules,
    )
    for name, summary in (
        ("get", "one schedule"),
        ("pause", "stop its ticks"),
        ("resume", "tick again (the paused ticks are not run)"),
        ("delete", "remove it"),
    ):
        command = _client_command(
            schedules,
            name,
            f"{summary}: conductor.schedules.{name}.<name>",
            _schedule_call,
            _show_schedule,
        )
        command.add_argument("name")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kapellmeister",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a service (as python -m services.<name>)")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(handler=_serve)
    demo = commands.add_parser("demo", help="embedded NATS + the three services + a few runs")
    demo.add_argument(
        "--ui", action="store_true", help="then leave it running with the web UI, until Ctrl-C"
    )
    demo.add_argument("--ui-port", type=int, default=8090, help="the web UI's port (8090)")
    demo.set_defaults(handler=_demo)
    _add_workflow_commands(commands)
    _add_definitions_commands(commands)
    _add_schedules_commands(commands)
    check = commands.add_parser("check", help="static checks of a definition file")
    check.add_argument("file")
    check.add_argument(
        "--online", action="store_true", help="also check against the tasks agents registered"
    )
    check.add_argument("--json", action="store_true", help='{"problems": [{"path", "message"}]}')
    check.set_defaults(handler=_check)
    dlq = commands.add_parser("dlq", help="dead letters: list them, replay one")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_commands.add_parser("list", help="every dead letter, oldest first")
    dlq_list.add_argument("--json", action="store_true", help="the records as JSON")
    dlq_replay = dlq_commands.add_parser("replay", help="publish a dead letter's message again")
    dlq_replay.add_argument("seq", type=int, help="its sequence, as `dlq list` shows")
    dlq.set_defaults(handler=_dlq)
    graph = commands.add_parser("graph", help="draw a definition or a workflow (Mermaid, DOT)")
    graph.add_argument("target", nargs="?", default="", help="a definition file or name")
    graph.add_argument("--workflow", help="draw this workflow, coloured by task status")
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    graph.add_argument("--svg", help="also write the drawing as SVG here")
    graph.set_defaults(handler=_graph)
    ui = commands.add_parser("ui", help="the web UI: workflows, their graphs and history")
    ui.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback only)")
    ui.add_argument("--port", type=int, default=8090, help="default: 8090")
    ui.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a name it is reached by besides loopback's (a proxy's); repeatable",
    )
    ui.set_defaults(handler=_ui)
    events = commands.add_parser("events", help="the EVENTS stream")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    tail = events_commands.add_parser("tail", help="print events as they are stored")
    tail.add_argument("subject", nargs="?", default="events.>", help="default: events.>")
    tail.add_argument("--all", action="store_true", help="first the events already kept")
    tail.add_argument("--count", type=int, default=0, help="stop after this many")
    events.set_defaults(handler=_events)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kapellmeister`` command."""
    args = _parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
