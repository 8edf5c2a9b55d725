"""plan_day throughput and latency: kapellmeister against a hand-written JetStream ceiling.

    .venv/bin/python bench/plan_day.py [--workflows N] [--concurrency C] [--nats-url URL]

Unless ``--nats-url`` names a server, starts an embedded ``nats-server`` (JetStream, file
storage) on loopback in a temporary directory. Then, one after the other:

1. **kapellmeister**: the conductor, weather and agenda services as processes
   (``python -m services.<name>``). ``N`` plan_day workflows are started through
   ``conductor.start.plan_day`` requests, at most ``C`` requests in flight; a workflow
   is complete when its ``events.activity.chosen`` event arrives (each workflow
   publishes exactly one, after the CAS that completes it). Then 50 workflows one at a
   time. The services are stopped before the next part, so they cost nothing there.
2. **ceiling**: ``bench/ceiling.py`` as three processes (conductor, agenda, weather)
   doing the same work with the same JetStream operations and no framework, measured
   the same way (``ceil.start.plan_day``, ``ceil.events.activity.chosen``).

Inputs spread over 500 users and many dates: half at free weekend hours (so the weather
runs, rain and dry), half at random hours of any day (mostly busy). Every event's
activity is checked against the handlers. Throughput is N / (last completion - first
start); latency is start request sent to event received, in this process.

Everything is bounded: each part gives up after ``--timeout`` seconds (150 by default)
and says so. Only the
processes started here are ended, by PID; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer
from services.agenda.handlers import ActivityRequest, activity
from services.weather.handlers import ReportRequest, report

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procfs import cpu_seconds, machine_busy_seconds, rss_kib

HERE = Path(__file__).resolve().parent
CEILING = HERE / "ceiling.py"
# bench/ceiling.py's names (kept in step by hand: this script runs it, never imports it).
CEILING_STREAMS = ("CEIL_TASKS", "CEIL_RESULTS", "CEIL_EVENTS")
CEILING_BUCKET = "ceil_workflows"
CEILING_ROLES = ("conductor", "agenda", "weather")
SERVICES = ["conductor", "weather", "agenda"]
SEQUENTIAL = 50
WARMUP = 32


class Chosen(msgspec.Struct):
    workflow_id: str
    activity: str
    user: str = ""


_decode_chosen = msgspec.json.Decoder(Chosen).decode
_encode = msgspec.json.Encoder().encode


class GaveUp(Exception):
    """The run did not finish before the deadline."""


# --- the workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    user: str
    when: str
    expected: str


async def expected_activity(when: str) -> str:
    busy = (await activity(ActivityRequest(datetime=when))).activity
    if busy != "free":
        return busy
    weather = await report(ReportRequest(date=when))
    return "code_for_fun" if weather.rain or weather.snow else "run"


async def make_jobs(count: int, seed: int) -> list[Job]:
    """Half free weekend hours (weather runs), half any hour of any day (mostly busy)."""
    rng = random.Random(seed)
    first = date(2026, 1, 1)
    jobs = []
    for i in range(count):
        day = first + timedelta(days=rng.randrange(730))
        if i % 2 == 0:
            day += timedelta(days=(5 - day.weekday()) % 7 + rng.randrange(2))  # Sat or Sun
            hour = rng.choice([11, 12, 13, 14, 15, 19, 20, 21, 22, 23])
        else:
            hour = rng.randrange(24)
        when = f"{day.isoformat()}T{hour:02d}:{rng.randrange(60):02d}:00"
        jobs.append(Job(f"user-{rng.randrange(500)}", when, await expected_activity(when)))
    return jobs


# --- one system under test ------------------------------------------------------------------


@dataclass
class Target:
    name: str
    start_subject: str
    event_subject: str


@dataclass
class Outcome:
    throughput: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    seq_p50_ms: float = float("nan")
    seq_p99_ms: float = float("nan")
    completed: int = 0
    wrong: int = 0
    errors: int = 0
    note: str = ""
    starts_s: float = float("nan")
    # Cores busy during the throughput run: all processes of the machine, and ours.
    machine_cores: float = float("nan")
    our_cores: float = float("nan")
    cpu_ms_per_wf: dict[str, float] = field(default_factory=dict)
    rss_mib: float = float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


class Tracker:
    """Times when each workflow's event arrived; wakes whoever waits on one or on all."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs
        self.done: dict[str, float] = {}
        self.wrong = 0
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._all = asyncio.Event()
        self._expect = 0

    def expect(self, count: int) -> None:
        self._expect = count
        self._all.clear()
        self._check()

    def _check(self) -> None:
        if len(self.done) >= self._expect:
            self._all.set()

    async def on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        try:
            event = _decode_chosen(msg.data)
        except msgspec.DecodeError:
            return
        job = self.jobs.get(event.workflow_id)
        if job is None or event.workflow_id in self.done:
            return
        self.done[event.workflow_id] = now
        if event.activity != job.expected:
            self.wrong += 1
        waiter = self._waiters.pop(event.workflow_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)
        self._check()

    def waiter(self, workflow_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if workflow_id in self.done:
            future.set_result(self.done[workflow_id])
        else:
            self._waiters[workflow_id] = future
        return future

    async def wait_all(self, deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        try:
            await asyncio.wait_for(self._all.wait(), max(0.0, remaining))
        except TimeoutError:
            raise GaveUp(f"{len(self.done)} of {self._expect} completed") from None


async def start_one(nc: Client, target: Target, workflow_id: str, job: Job) -> bool:
    """Send one start request; False when it failed (error reply or timeout)."""
    payload = _encode({"user": job.user, "datetime": job.when})
    try:
        reply = await nc.request(
            target.start_subject, payload, timeout=30, headers={"Workflow-Id": workflow_id}
        )
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    return not (reply.headers and "Nats-Service-Error" in reply.headers)


async def run_target(
    nc: Client,
    target: Target,
    jobs: list[Job],
    concurrency: int,
    deadline: float,
    cpu_pids: dict[str, int],
) -> Outcome:
    """Warm up, then N workflows with ``concurrency`` start requests in flight, then 50
    one at a time."""
    run = f"{target.name[:4]}-{os.getpid()}-{int(time.time())}"
    ids = [f"{run}-{i}" for i in range(len(jobs))]
    warm_ids = [f"{run}-w{i}" for i in range(WARMUP)]
    seq_ids = [f"{run}-s{i}" for i in range(SEQUENTIAL)]
    by_id = dict(zip(ids, jobs, strict=True))
    by_id.update((w, jobs[i % len(jobs)]) for i, w in enumerate(warm_ids))
    by_id.update((s, jobs[-1 - i % len(jobs)]) for i, s in enumerate(seq_ids))
    tracker = Tracker(by_id)
    sub = await nc.subscribe(target.event_subject, cb=tracker.on_event)
    outcome = Outcome()
    try:
        # Warm-up: connections, consumers, caches.
        tracker.expect(WARMUP)
        await asyncio.gather(*(start_one(nc, target, i, by_id[i]) for i in warm_ids))
        await tracker.wait_all(deadline)

        # Throughput: N workflows, C start requests in flight.
        started: dict[str, float] = {}
        free = asyncio.Semaphore(concurrency)
        failures = 0

        async def start(workflow_id: str) -> None:
            nonlocal failures
            async with free:
                started[workflow_id] = time.perf_counter()
                if not await start_one(nc, target, workflow_id, by_id[workflow_id]):
                    failures += 1

        cpu_before = cpu_seconds(cpu_pids)
        busy_before, clock_before = machine_busy_seconds(), time.perf_counter()
        tracker.expect(WARMUP + len(ids) - failures)
        starters = asyncio.gather(*(start(i) for i in ids))
        try:
            await asyncio.wait_for(
                asyncio.shield(starters), max(0.0, deadline - time.perf_counter())
            )
        except TimeoutError:
            starters.cancel()
            raise GaveUp(f"start requests still running ({len(started)} sent)") from None
        outcome.errors = failures
        outcome.starts_s = time.perf_counter() - min(started.values())
        tracker.expect(WARMUP + len(ids) - failures)
        try:
            await tracker.wait_all(deadline)
        finally:
            cpu_after = cpu_seconds(cpu_pids)
            elapsed = time.perf_counter() - clock_before
            outcome.machine_cores = (machine_busy_seconds() - busy_before) / elapsed
            outcome.our_cores = (
                sum(cpu_after[n] - cpu_before[n] for n in cpu_before if n in cpu_after) / elapsed
            )
            done = [i for i in ids if i in tracker.done]
            outcome.completed = len(done)
            if done:
                last = max(tracker.done[i] for i in done)
                outcome.throughput = len(done) / (last - min(started.values()))
                latencies = [(tracker.done[i] - started[i]) * 1000 for i in done]
                outcome.p50_ms = percentile(latencies, 50)
                outcome.p99_ms = percentile(latencies, 99)
                outcome.cpu_ms_per_wf = {
                    name: (cpu_after[name] - cpu_before[name]) * 1000 / len(done)
                    for name in cpu_before
                    if name in cpu_after
                }

        # Latency: one workflow at a time.
        sequential = []
        for workflow_id in seq_ids:
            waiter = tracker.waiter(workflow_id)
            begin = time.perf_counter()
            if not await start_one(nc, target, workflow_id, by_id[workflow_id]):
                outcome.errors += 1
                waiter.cancel()
                continue
            remaining = max(0.0, deadline - time.perf_counter())
            try:
                end = await asyncio.wait_for(waiter, min(30.0, remaining))
            except TimeoutError:
                raise GaveUp(f"sequential workflow {workflow_id} did not complete") from None
            sequential.append((end - begin) * 1000)
        outcome.seq_p50_ms = percentile(sequential, 50)
        outcome.seq_p99_ms = percentile(sequential, 99)
    except GaveUp as exc:
        outcome.note = f"gave up: {exc}"
    finally:
        outcome.wrong = tracker.wrong
        await sub.unsubscribe()
    return outcome


# --- processes --------------------------------------------------------------------------


def rss_mib(pid: int | None) -> float:
    """VmRSS of a process in MiB (nan if it is gone)."""
    kib = rss_kib(pid) if pid is not None else None
    return float("nan") if kib is None else kib / 1024


def ceiling_process(role: str, url: str, log_path: Path, extra: Sequence[str]) -> ServiceProcess:
    """One role of bench/ceiling.py as a child process, ended by its PID."""
    argv = [sys.executable, str(CEILING), "--role", role, "--nats-url", url, *extra]
    return ServiceProcess(role, url, log_path, argv=argv)


async def wait_for_ceiling(nc: Client, process: ServiceProcess, timeout: float = 30.0) -> None:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            await nc.request(f"ceil.ping.{process.name}", b"", timeout=0.5)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if not process.alive() or time.perf_counter() > deadline:
                raise RuntimeError(
                    f"ceiling {process.name} did not start\n{process.log_tail()}"
                ) from None
            await asyncio.sleep(0.1)


# --- the two parts ----------------------------------------------------------------------


async def bench_kapellmeister(
    nc: Client, url: str, logs: Path, jobs: list[Job], args: argparse.Namespace, deadline: float
) -> Outcome:
    # Replicas: --conductors of the conductor, --agents of each agent.
    labelled: dict[str, ServiceProcess] = {}
    for name in SERVICES:
        count = args.conductors if name == "conductor" else args.agents
        for n in range(1, count + 1):
            label = name if count == 1 else f"{name}-{n}"
            labelled[label] = ServiceProcess(name, url, logs / f"{label}.log", env=args.service_env)
    services = list(labelled.values())
    try:
        for service in services:
            service.start()
        await wait_for_services(nc, SERVICES, timeout=60, processes=services)
        pids = {label: s.pid for label, s in labelled.items() if s.pid is not None}
        pids.update(args.extra_pids)
        outcome = await run_target(
            nc,
            Target("kapellmeister", "conductor.start.plan_day", "events.activity.chosen"),
            jobs,
            args.concurrency,
            deadline,
            pids,
        )
        outcome.rss_mib = rss_mib(services[0].pid)
        return outcome
    finally:
        for service in services:
            service.stop()


async def bench_ceiling(
    nc: Client, url: str, logs: Path, jobs: list[Job], args: argparse.Namespace, deadline: float
) -> Outcome:
    extra = ["--inflight", str(args.ceiling_inflight)]
    if args.ceiling_no_cache:
        extra.append("--no-cache")
    processes = [
        ceiling_process(role, url, logs / f"ceiling-{role}.log", extra) for role in CEILING_ROLES
    ]
    try:
        # The conductor first: it creates the streams the agents' consumers live on.
        for process in processes:
            process.start()
            await wait_for_ceiling(nc, process)
        pids = {p.name: p.pid for p in processes if p.pid is not None}
        pids.update(args.extra_pids)
        outcome = await run_target(
            nc,
            Target("ceiling", "ceil.start.plan_day", "ceil.events.activity.chosen"),
            jobs,
            args.concurrency,
            deadline,
            pids,
        )
        outcome.rss_mib = rss_mib(processes[0].pid)
        return outcome
    finally:
        for process in processes:
            process.stop()


async def delete_ceiling_topology(nc: Client) -> None:
    js = nc.jetstream()
    for name in CEILING_STREAMS:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
    with contextlib.suppress(Exception):
        await js.delete_key_value(CEILING_BUCKET)


PEERS = {
    "dbos": HERE / "peers" / "dbos_plan_day.py",
    "celery": HERE / "peers" / "celery_plan_day.py",
}


class PeerResult(msgspec.Struct):
    """A peer script's ``RESULT {json}`` line (bench/peers/servers.py)."""

    throughput: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    seq_p50_ms: float | None = None
    seq_p99_ms: float | None = None
    completed: int = 0
    wrong: int = 0
    errors: int = 0
    rss_mib: float | None = None
    note: str = ""


async def bench_peer(name: str, args: argparse.Namespace) -> Outcome:
    """Run bench/peers/<name>_plan_day.py (its own servers and workers) and read its line."""
    command = [
        sys.executable,
        str(PEERS[name]),
        *("--workflows", str(args.workflows), "--concurrency", str(args.concurrency)),
        *("--sequential", str(SEQUENTIAL), "--seed", str(args.seed)),
        *("--timeout", str(args.timeout)),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), args.timeout + 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        return Outcome(note=f"{name}: no result in {args.timeout + 120:.0f} s")
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 and not lines:
        last = (err.decode().strip().splitlines() or ["?"])[-1]
        return Outcome(note=f"not run ({last}); bash bench/peers/setup.sh installs it")
    found = msgspec.json.decode(lines[-1].removeprefix("RESULT "), type=PeerResult)

    def number(value: float | None) -> float:
        return float("nan") if value is None else value

    return Outcome(
        throughput=number(found.throughput),
        p50_ms=number(found.p50_ms),
        p99_ms=number(found.p99_ms),
        seq_p50_ms=number(found.seq_p50_ms),
        seq_p99_ms=number(found.seq_p99_ms),
        completed=found.completed,
        wrong=found.wrong,
        errors=found.errors,
        note=found.note,
        rss_mib=number(found.rss_mib),
    )


# --- the report ---------------------------------------------------------------------------


def _cell(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def print_report(results: dict[str, Outcome], args: argparse.Namespace) -> None:
    header = (
        "",
        "workflows/s",
        "x ceiling",
        "p50 ms",
        "p99 ms",
        "alone p50 ms",
        "alone p99 ms",
        "RSS MiB",
    )
    ceiling_rate = results["ceiling"].throughput if "ceiling" in results else float("nan")
    rows = [header] + [
        (
            name,
            _cell(o.throughput),
            _cell(o.throughput / ceiling_rate, 2),
            _cell(o.p50_ms),
            _cell(o.p99_ms),
            _cell(o.seq_p50_ms, 2),
            _cell(o.seq_p99_ms, 2),
            _cell(o.rss_mib),
        )
        for name, o in results.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(
        f"\nplan_day: N={args.workflows} workflows, C={args.concurrency} start requests in "
        f"flight, {SEQUENTIAL} sequential; {os.cpu_count()} CPUs"
    )
    for row in rows:
        print(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
    print(
        "RSS: the conductor process after the run (ceiling: its conductor; dbos: its app"
        " processes; celery: its workers and client)"
    )
    for name, o in results.items():
        if not o.cpu_ms_per_wf:  # a peer: its own script measured it
            problems = [
                f"{o.completed}/{args.workflows} completed"
                if o.completed != args.workflows
                else "",
                f"{o.wrong} wrong activities" if o.wrong else "",
                o.note,
            ]
            if any(problems):
                print(f"{name}: " + "; ".join(p for p in problems if p))
            continue
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in o.cpu_ms_per_wf.items())
        print(
            f"{name}: all start replies in {o.starts_s:.2f} s; cores busy "
            f"{o.our_cores:.2f} ours, {o.machine_cores:.2f} machine; "
            f"CPU ms per workflow: {cpu}"
        )
        problems = [
            f"{o.completed}/{args.workflows} completed" if o.completed != args.workflows else "",
            f"{o.wrong} wrong activities" if o.wrong else "",
            f"{o.errors} failed start requests" if o.errors else "",
            o.note,
        ]
        if o.machine_cores - o.our_cores > 0.25:
            problems.append(
                f"other processes used {o.machine_cores - o.our_cores:.2f} cores during the run"
                " (numbers are noisy)"
            )
        if any(problems):
            print(f"{name}: " + "; ".join(p for p in problems if p))


# --- main ---------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    jobs = await make_jobs(args.workflows, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kapellmeister-bench-"))
    server: EmbeddedServer | None = None
    results: dict[str, Outcome] = {}
    try:
        logs = tmp / "logs"
        logs.mkdir()
        url = args.nats_url
        args.extra_pids = {}
        if url is None:
            server = EmbeddedServer(tmp / "nats")
            url = server.start()
            if server.process is not None:
                args.extra_pids["nats-server"] = server.process.pid
        args.extra_pids["bench"] = os.getpid()
        nc = await nats.connect(servers=[url], name="bench-plan-day", connect_timeout=5)
        try:
            if "kapellmeister" in args.only:
                deadline = time.perf_counter() + args.timeout
                results["kapellmeister"] = await bench_kapellmeister(
                    nc, url, logs, jobs, args, deadline
                )
            if "ceiling" in args.only:
                if args.nats_url is not None:
                    await delete_ceiling_topology(nc)
                deadline = time.perf_counter() + args.timeout
                try:
                    results["ceiling"] = await bench_ceiling(nc, url, logs, jobs, args, deadline)
                finally:
                    if args.nats_url is not None:
                        await delete_ceiling_topology(nc)
            for peer in PEERS:
                if peer in args.only:
                    results[peer] = await bench_peer(peer, args)
        finally:
            await nc.drain()
        print_report(results, args)
        if args.keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="kapellmeister-bench-logs-"))
            shutil.copytree(logs, kept, dirs_exist_ok=True)
            print(f"logs kept in {kept}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [
        o
        for name, o in results.items()
        if name in ("kapellmeister", "ceiling")
        and (o.note or o.wrong or o.completed != args.workflows)
    ]
    return 1 if bad else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workflows", "-n", type=int, default=2000)
    parser.add_argument("--concurrency", "-c", type=int, default=2000)
    parser.add_argument("--nats-url", default=None, help="use this server; default: embedded")
    parser.add_argument(
        "--timeout", type=float, default=150.0, help="give up on a part after this many seconds"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["kapellmeister", "ceiling", *PEERS],
        default=["kapellmeister", "ceiling", *PEERS],
    )
    parser.add_argument("--conductors", type=int, default=1, help="conductor replicas")
    parser.add_argument("--agents", type=int, default=1, help="replicas of each agent")
    parser.add_argument("--ceiling-inflight", type=int, default=256)
    parser.add_argument(
        "--ceiling-no-cache", action="store_true", help="ceiling conductor: kv.get before each CAS"
    )
    parser.add_argument(
        "--service-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="environment for kapellmeister's services, e.g. KAPELLMEISTER_CONCURRENCY=256",
    )
    parser.add_argument("--keep-logs", action="store_true", help="copy the services' logs out")
    args = parser.parse_args(argv)
    if args.workflows < 1 or args.concurrency < 1:
        parser.error("--workflows and --concurrency must be at least 1")
    if any("=" not in item for item in args.service_env):
        parser.error("--service-env takes KEY=VALUE")
    args.service_env = dict(item.split("=", 1) for item in args.service_env)
    return args


def main() -> None:
    args = parse_args()
    try:
        import uvloop

        code = uvloop.run(amain(args))
    except ImportError:  # pragma: no cover
        code = asyncio.run(amain(args))
    sys.exit(code)


if __name__ == "__main__":
    main()
