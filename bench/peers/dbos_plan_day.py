"""plan_day on DBOS Transact for Python with PostgreSQL: a peer for bench/plan_day.py.

    .venv/bin/python bench/peers/dbos_plan_day.py [--workflows N] [--concurrency C]
        [--sequential S] [--seed SEED] [--timeout SECONDS] [--processes P]
        [--dbos-threads T] [--dbos-pool-size K] [--pg-setting NAME=VALUE ...]

Needs (``bash bench/peers/setup.sh``): Debian ``postgresql``; into .venv ``dbos`` and
``psycopg[binary]`` (not in pyproject.toml: only this benchmark uses them).

The workflow is an async ``@DBOS.workflow()`` calling three async ``@DBOS.step()``s, each
checkpointed in PostgreSQL: ``agenda`` (the agenda handler), ``weather`` (the weather
handler, only when the user is free) and ``notify``, whose output, the chosen event
``{user, activity, workflow_id}``, is the recorded event and the workflow's result. Steps
call the very handlers kapellmeister's services run.

Each workflow is started with ``DBOS.start_workflow_async`` under
``SetWorkflowID(<our id>)`` (a repeated start attaches to the same workflow instead of
running it twice); it is complete when ``handle.get_result()`` returns, i.e. after DBOS
has written its SUCCESS status. DBOS is a library and runs where it is called:

* ``--processes P`` (default 4): P app processes, each running DBOS on the same system
  database, as a 2-core deployment would run several app processes to get past the GIL.
  This script is then only the load generator: it sends each start request down an app
  process's stdin (round robin) and reads the result back from its stdout, as
  kapellmeister's bench sends start requests to the conductor.
* ``--processes 0``: DBOS in this process, which is also the load generator.

The defaults (4 processes of at most 4 DBOS executor threads) were the fastest measured
on the 2-core machine; DBOS's own defaults (unbounded executor threads, pool of 20) are
``--processes 0 --dbos-threads 0``. The script starts a
throwaway PostgreSQL cluster with stock durability settings (``--pg-setting`` changes
them) and removes it at the end. ``rss_mib`` is the DBOS processes' RSS; the note also
gives PostgreSQL's and the driver's, and the CPU spent per workflow by each.

Prints one line, ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from dbos import DBOS, DBOSConfig, SetWorkflowID

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.peers.servers import Chosen, PostgresServer, Result, descendants, measure  # noqa: E402
from services.agenda.handlers import ActivityRequest, activity  # noqa: E402
from services.weather.handlers import ReportRequest, report  # noqa: E402

if TYPE_CHECKING:
    from bench.plan_day import Job

SYSTEM_DATABASE = "plan_day_dbos"


# --- the workflow --------------------------------------------------------------------------


@DBOS.step(name="agenda")
async def agenda_step(when: str) -> str:
    return (await activity(ActivityRequest(datetime=when))).activity


@DBOS.step(name="weather")
async def weather_step(when: str) -> bool:
    """True when it rains or snows."""
    weather = await report(ReportRequest(date=when))
    return weather.rain or weather.snow


@DBOS.step(name="notify")
async def notify_step(user: str, chosen: str, workflow_id: str) -> Chosen:
    # The step's output is checkpointed: that row is the durable record of the event.
    return Chosen(user=user, activity=chosen, workflow_id=workflow_id)


@DBOS.workflow(name="plan_day")
async def plan_day(user: str, when: str) -> Chosen:
    chosen = await agenda_step(when)
    if chosen == "free":
        chosen = "code_for_fun" if await weather_step(when) else "run"
    return await notify_step(user, chosen, DBOS.workflow_id or "")


def checked(event: Chosen, workflow_id: str, job: Job) -> str:
    """The event's activity, once it is known to be this workflow's event."""
    if event["workflow_id"] != workflow_id or event["user"] != job.user:
        raise RuntimeError(f"event of another workflow: {event}")
    return event["activity"]


async def run_here(workflow_id: str, job: Job) -> str:
    """Start the workflow in this process under our id and wait for its result."""
    with SetWorkflowID(workflow_id):
        handle = await DBOS.start_workflow_async(plan_day, job.user, job.when)
    return checked(await handle.get_result(), workflow_id, job)


# --- the run -------------------------------------------------------------------------------


def dbos_config(url: str, args: argparse.Namespace) -> DBOSConfig:
    config: DBOSConfig = {
        "name": "plan_day_bench",
        "system_database_url": f"{url}/{SYSTEM_DATABASE}",
        "log_level": "WARNING",
    }
    if args.dbos_pool_size is not None:
        config["sys_db_pool_size"] = args.dbos_pool_size
    if args.dbos_threads:
        config["max_executor_threads"] = args.dbos_threads
    return config


async def launch(url: str, args: argparse.Namespace) -> None:
    DBOS(config=dbos_config(url, args))
    # Creates the system database and its tables (the first time), then DBOS's threads.
    await asyncio.to_thread(DBOS.launch)


# --- --processes P: DBOS in P app processes, fed start requests over pipes -----------------


class Request(msgspec.Struct):
    id: str
    user: str
    when: str


class Reply(msgspec.Struct):
    id: str
    event: Chosen | None = None
    error: str = ""


async def serve(url: str, args: argparse.Namespace) -> None:
    """An app process: one request per stdin line, one reply per stdout line; EOF ends it."""
    await launch(url, args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    decode, encode = msgspec.json.Decoder(Request).decode, msgspec.json.Encoder().encode
    tasks: set[asyncio.Task[None]] = set()

    async def handle(request: Request) -> None:
        try:
            with SetWorkflowID(request.id):
                handle = await DBOS.start_workflow_async(plan_day, request.user, request.when)
            reply = Reply(request.id, event=await handle.get_result())
        except Exception as exc:
            reply = Reply(request.id, error=f"{type(exc).__name__}: {exc}")
        writer.write(encode(reply) + b"\n")

    writer.write(b"READY\n")
    try:
        while line := await reader.readline():
            task = asyncio.create_task(handle(decode(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        await asyncio.to_thread(DBOS.destroy, workflow_completion_timeout_sec=0)


class App:
    """One app process as the driver sees it: a pipe to write requests, futures to await."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[str, asyncio.Future[Chosen]] = {}
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(Reply).decode
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str, args: argparse.Namespace, log: Path) -> App:
        argv = [sys.executable, __file__, "--serve", url]
        for flag, value in (
            ("--dbos-threads", args.dbos_threads),
            ("--dbos-pool-size", args.dbos_pool_size),
        ):
            if value is not None:
                argv += [flag, str(value)]
        with log.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=PIPE, stdout=PIPE, stderr=err, limit=1 << 20
            )
        app = cls(process)
        assert process.stdout is not None
        if await asyncio.wait_for(process.stdout.readline(), 60) != b"READY\n":
            text = await asyncio.to_thread(log.read_text, errors="replace")
            raise RuntimeError(f"app process did not start: {text[-2000:]}")
        app.reader = asyncio.create_task(app._read())
        return app

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            reply = self._decode(line)
            future = self.pending.pop(reply.id, None)
            if future is None or future.done():
                continue
            if reply.event is None:
                future.set_exception(RuntimeError(reply.error))
            else:
                future.set_result(reply.event)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(RuntimeError("app process exited"))

    async def run(self, workflow_id: str, job: Job) -> Chosen:
        future: asyncio.Future[Chosen] = asyncio.get_running_loop().create_future()
        self.pending[workflow_id] = future
        assert self.process.stdin is not None
        self.process.stdin.write(self._encode(Request(workflow_id, job.user, job.when)) + b"\n")
        try:
            return await future
        finally:
            self.pending.pop(workflow_id, None)

    async def stop(self) -> None:
        """Close its stdin (DBOS shuts down, the process exits); kill it by PID if it hangs."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self.reader is not None:
            self.reader.cancel()


# --- the driver ------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, pg: PostgresServer, pids: list[int]) -> Result:
    # Here rather than at the top: the app processes import this module and have no use
    # for bench.plan_day's nats-py and kapellmeister, which would only add to their RSS.
    from bench.plan_day import make_jobs, percentile

    jobs = await make_jobs(args.workflows, args.seed)
    deadline = time.perf_counter() + args.timeout
    url = await asyncio.to_thread(pg.start)
    apps: list[App] = []
    try:
        if args.processes == 0:
            await launch(url, args)
            run_one, app_pids = run_here, [os.getpid()]
        else:
            # The first app process creates the system database; then the others start.
            for index in range(args.processes):
                apps.append(await App.start(url, args, pg.dir / f"app{index}.log"))
                pids.append(apps[-1].process.pid)
            app_pids = [app.process.pid for app in apps]
            turn = itertools.count()

            async def run_one(workflow_id: str, job: Job) -> str:
                event = await apps[next(turn) % len(apps)].run(workflow_id, job)
                return checked(event, workflow_id, job)

        # With app processes, this one is only the load generator ("driver").
        driver = {"driver": [os.getpid()]} if apps else {}
        return await measure(
            run_one,
            jobs,
            name="dbos",
            concurrency=args.concurrency,
            sequential=args.sequential,
            deadline=deadline,
            groups=lambda: {"dbos": app_pids, "postgres": descendants(pg.pid), **driver},
            rss_groups=("dbos",),
            percentile=percentile,
        )
    finally:
        if args.processes == 0:
            await asyncio.to_thread(DBOS.destroy, workflow_completion_timeout_sec=0)
        for app in apps:
            await app.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workflows", "-n", type=int, default=2000)
    parser.add_argument("--concurrency", "-c", type=int, default=256)
    parser.add_argument("--sequential", "-s", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=150.0, help="give up after this")
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="P app processes fed over pipes (default 4); 0: DBOS in this process",
    )
    parser.add_argument(
        "--pg-setting",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a PostgreSQL setting, e.g. synchronous_commit=off (default: stock settings)",
    )
    parser.add_argument(
        "--dbos-pool-size", type=int, default=None, help="sys_db_pool_size (DBOS default 20)"
    )
    parser.add_argument(
        "--dbos-threads",
        type=int,
        default=4,
        help="max_executor_threads per process (default 4); 0: DBOS's default, unbounded",
    )
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workflows < 1 or args.concurrency < 1 or args.sequential < 0 or args.processes < 0:
        parser.error("--workflows and --concurrency must be at least 1")
    if any("=" not in item for item in args.pg_setting):
        parser.error("--pg-setting takes NAME=VALUE")
    args.pg_setting = dict(item.split("=", 1) for item in args.pg_setting)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve is not None:
        asyncio.run(serve(args.serve, args))
        return
    pg = PostgresServer(args.pg_setting)
    pids: list[int] = []
    # A last resort if a thread hangs past the deadline: end what we started and exit.
    watchdog = threading.Timer(args.timeout + 60, _give_up, (pg, pids))
    watchdog.daemon = True
    watchdog.start()
    result = Result()
    try:
        result = asyncio.run(amain(args, pg, pids))
    except Exception as exc:
        result.add_note(f"failed: {type(exc).__name__}: {exc}"[:500])
    finally:
        watchdog.cancel()
        pg.stop()
    print(result.line(), flush=True)
    sys.exit(0 if result.completed == args.workflows and not result.wrong else 1)


def _give_up(pg: PostgresServer, pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pg.stop()
    print(Result(note="hard timeout: the run hung past --timeout + 60 s").line(), flush=True)
    os._exit(2)


if __name__ == "__main__":
    main()
