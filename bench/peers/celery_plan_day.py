"""plan_day as a Celery chain on Redis: a peer for bench/plan_day.py.

    .venv/bin/python bench/peers/celery_plan_day.py [--workflows N] [--concurrency C]
        [--sequential S] [--seed SEED] [--timeout SECONDS] [--pool prefork|threads|solo]
        [--worker-concurrency K] [--workers W] [--prefetch P]

Needs (``bash bench/peers/setup.sh``): Debian ``redis-server``; into .venv
``celery[redis]`` (not in pyproject.toml: only this benchmark uses it).

This module is both the Celery app (``celery -A bench.peers.celery_plan_day worker``)
and the script that drives it. The script starts a throwaway redis-server (broker and
result backend; no RDB, no AOF unless ``--redis-appendonly``), then ``--workers``
worker processes as deployed (``python -m celery ... worker``), then sends the
workflows.

The defaults, two worker processes with the ``solo`` pool (one task at a time each,
prefetch multiplier 4), were the fastest measured on the 2-core machine: the tasks do
no I/O, so a pool only adds hand-offs (one prefork worker of 2 or 4 children and the
``threads`` pool were slower, a third solo worker no faster).

A workflow is the chain ``agenda.s(when) | notify.s(user, workflow_id)``, the notify
task's id set to our workflow id (so its result is stored under that id). When the
agenda says "free", the agenda task replaces itself (``Task.replace``, Celery's way to
branch inside a chain) with the ``weather`` task, whose result, the chosen activity,
flows on to ``notify``; otherwise the agenda's answer flows on. So a busy hour costs two
tasks and a free one three, each a broker message and a stored result. ``notify``
returns the chosen event ``{user, activity, workflow_id}``: the result backend records
it under the workflow id.

Tasks are ``acks_late`` with ``task_reject_on_worker_lost``: a message is acked only
after its task ran, so a worker killed mid-task leaves it to be delivered again (on
Redis, after the broker's visibility timeout). The handlers are async; each worker
thread or process drives them on one long-lived event loop of its own rather than
paying ``asyncio.run`` per task.

A workflow is complete when its result reaches this process: the script subscribes
to the channel the Redis result backend publishes every stored result on
(``celery-task-meta-<task id>``) and decodes Celery's result meta, so thousands of
pending results cost one connection and no polling. RSS is the worker processes'
(parents and pool children) plus this client's; Redis's is in the note.

Prints one line, ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio
from celery import Celery, Task, chain  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.peers.servers import Chosen, RedisServer, Result, descendants, measure, stop_pid  # noqa: E402
from services.agenda.handlers import ActivityRequest, activity  # noqa: E402
from services.weather.handlers import ReportRequest, report  # noqa: E402

if TYPE_CHECKING:
    from bench.plan_day import Job

REDIS_ENV = "PLAN_DAY_CELERY_REDIS"
RESULT_PREFIX = "celery-task-meta-"
T = TypeVar("T")


# --- the app and its tasks (what the worker imports) ------------------------------------

app = Celery("plan_day")
_redis = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379")
app.conf.update(
    broker_url=f"{_redis}/0",
    result_backend=f"{_redis}/0",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

_loops = threading.local()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a handler on this thread's own event loop, made once."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coro)


@app.task(name="plan_day.agenda", bind=True)  # type: ignore[untyped-decorator]
def agenda_task(self: Task[Any, Any], when: str) -> str:
    busy = _run(activity(ActivityRequest(datetime=when))).activity
    if busy == "free":
        # Ends this task: the weather task takes its place in the chain.
        return self.replace(weather_task.s(when))  # type: ignore[no-any-return]
    return busy


@app.task(name="plan_day.weather")  # type: ignore[untyped-decorator]
def weather_task(when: str) -> str:
    weather = _run(report(ReportRequest(date=when)))
    return "code_for_fun" if weather.rain or weather.snow else "run"


@app.task(name="plan_day.notify")  # type: ignore[untyped-decorator]
def notify_task(chosen: str, user: str, workflow_id: str) -> Chosen:
    return Chosen(user=user, activity=chosen, workflow_id=workflow_id)


# --- the driver -----------------------------------------------------------------------------


class Results:
    """Futures for pending workflow ids, resolved from the result backend's channel."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[Chosen]] = {}

    def expect(self, workflow_id: str) -> asyncio.Future[Chosen]:
        future: asyncio.Future[Chosen] = asyncio.get_running_loop().create_future()
        self.pending[workflow_id] = future
        return future

    def on_message(self, channel: bytes, data: bytes) -> None:
        future = self.pending.get(channel.decode()[len(RESULT_PREFIX) :])
        if future is None or future.done():
            return
        meta = json.loads(data)
        if meta.get("status") == "SUCCESS":
            future.set_result(meta["result"])
        elif meta.get("status") in ("FAILURE", "REVOKED"):
            future.set_exception(RuntimeError(f"{meta['status']}: {meta.get('result')}"))

    async def listen(self, url: str, ready: asyncio.Event) -> None:
        client = redis.asyncio.Redis.from_url(url)
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(f"{RESULT_PREFIX}*")
            ready.set()
            async for message in pubsub.listen():
                if message["type"] == "pmessage":
                    self.on_message(message["channel"], message["data"])
        finally:
            await pubsub.aclose()
            await client.aclose()


def worker_argv(args: argparse.Namespace, index: int) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.peers.celery_plan_day",
        "worker",
        "--pool",
        args.pool,
        "--concurrency",
        str(args.worker_concurrency),
        "--prefetch-multiplier",
        str(args.prefetch),
        "--loglevel",
        "WARNING",
        "--hostname",
        f"plan_day{index}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if args.pool == "prefork":
        argv.append("-Ofair")
    return argv


async def amain(args: argparse.Namespace, servers: Servers) -> Result:
    # Here rather than at the top: the worker imports this module and has no use for
    # bench.plan_day's nats-py and kapellmeister, which would only add to its RSS.
    from bench.plan_day import make_jobs, percentile

    jobs = await make_jobs(args.workflows, args.seed)
    deadline = time.perf_counter() + args.timeout
    url = await asyncio.to_thread(servers.start, args)
    app.conf.update(broker_url=f"{url}/0", result_backend=f"{url}/0")
    results = Results()
    ready = asyncio.Event()
    listener = asyncio.create_task(results.listen(f"{url}/0", ready))
    await asyncio.wait_for(ready.wait(), 10)

    async def run_one(workflow_id: str, job: Job) -> str:
        future = results.expect(workflow_id)
        try:
            chain(
                agenda_task.s(job.when),
                notify_task.s(job.user, workflow_id).set(task_id=workflow_id),
            ).apply_async()
            event = await future
        finally:
            results.pending.pop(workflow_id, None)
        if event["workflow_id"] != workflow_id or event["user"] != job.user:
            raise RuntimeError(f"event of another workflow: {event}")
        return event["activity"]

    def groups() -> dict[str, list[int]]:
        workers = [pid for w in servers.workers for pid in descendants(w.pid)]
        return {"workers": workers, "client": [os.getpid()], "redis": [servers.redis.pid]}

    try:
        return await measure(
            run_one,
            jobs,
            name="celery",
            concurrency=args.concurrency,
            sequential=args.sequential,
            deadline=deadline,
            groups=groups,
            percentile=percentile,
            rss_groups=("workers", "client"),
        )
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


class Servers:
    """What the script started: redis-server and the worker processes, ended by PID."""

    def __init__(self, appendonly: bool) -> None:
        self.redis = RedisServer(appendonly=appendonly)
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self, args: argparse.Namespace) -> str:
        """Start redis-server, then the workers pointed at it; returns Redis's URL."""
        url = self.redis.start()
        env = {**os.environ, REDIS_ENV: url, "PYTHONPATH": str(ROOT)}
        for index in range(args.workers):
            with (self.redis.dir / f"worker{index}.log").open("ab") as log:
                self.workers.append(
                    subprocess.Popen(
                        worker_argv(args, index),
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        return url

    def stop(self) -> None:
        # Pool children end with their parent on a warm shutdown; any left are ended too.
        children = [pid for w in self.workers for pid in descendants(w.pid) if pid != w.pid]
        for worker in self.workers:
            stop_pid(worker, grace=15)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.redis.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workflows", "-n", type=int, default=2000)
    parser.add_argument("--concurrency", "-c", type=int, default=256)
    parser.add_argument("--sequential", "-s", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=150.0, help="give up after this")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--pool", choices=["prefork", "threads", "solo"], default="solo", help="worker pool"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=2, help="pool size per worker (default 2)"
    )
    parser.add_argument(
        "--prefetch", type=int, default=4, help="worker_prefetch_multiplier (Celery default 4)"
    )
    parser.add_argument(
        "--redis-appendonly", action="store_true", help="AOF on, fsync every second"
    )
    args = parser.parse_args()
    if args.workflows < 1 or args.concurrency < 1 or args.sequential < 0 or args.workers < 1:
        parser.error("--workflows, --concurrency and --workers must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    servers = Servers(args.redis_appendonly)
    # A last resort if something hangs past the deadline: stop what we started and exit.
    watchdog = threading.Timer(args.timeout + 60, _give_up, (servers,))
    watchdog.daemon = True
    watchdog.start()
    result = Result()
    try:
        result = asyncio.run(amain(args, servers))
    except Exception as exc:
        result.add_note(f"failed: {type(exc).__name__}: {exc}"[:500])
    finally:
        watchdog.cancel()
        servers.stop()
    print(result.line(), flush=True)
    sys.exit(0 if result.completed == args.workflows and not result.wrong else 1)


def _give_up(servers: Servers) -> None:
    servers.stop()
    print(Result(note="hard timeout: the run hung past --timeout + 60 s").line(), flush=True)
    os._exit(2)


if __name__ == "__main__":
    main()
