"""Throwaway PostgreSQL and Redis servers for the peer benchmarks, and how both are measured.

Each server lives in its own temporary directory, listens on a free loopback port, and
is ended by the PID this module started it with (SIGINT, then SIGKILL), after which the
directory is removed. Nothing here touches a system-wide cluster or service.

As root, PostgreSQL refuses to run; initdb and postgres then run as the ``postgres`` OS
user (``subprocess`` with ``user=``, so the PID we hold is the postmaster's own, not a
wrapper's), and the directory is handed to that user. The binaries come from Debian's
packages: ``postgresql`` (``/usr/lib/postgresql/<version>/bin``) and ``redis-server``;
``bench/peers/setup.sh`` installs both.

``measure`` is the part both peer scripts share: it runs the same phases as
``bench/plan_day.py`` (warm-up, N workflows with at most C in flight, S one at a time)
through a peer's ``run_one(workflow_id, job) -> activity`` and fills a ``Result``, printed
as one ``RESULT {json}`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict

from bench.procfs import cpu_seconds, machine_busy_seconds, rss_kib

if TYPE_CHECKING:
    from bench.plan_day import Job

__all__ = [
    "Chosen",
    "MissingBinary",
    "PostgresServer",
    "RedisServer",
    "Result",
    "ServerFailed",
    "descendants",
    "free_port",
    "measure",
    "pss_mib",
    "rss_mib",
    "stop_pid",
]

PG_USER = "postgres"


class Chosen(TypedDict):
    """What a peer's plan_day ends with: the event kapellmeister's publishes."""

    user: str
    activity: str
    workflow_id: str


class MissingBinary(RuntimeError):
    """A server binary is not installed; the message names the Debian package."""


class ServerFailed(RuntimeError):
    """A server did not start or become ready in time; the message quotes its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _postgres_bin(name: str) -> Path:
    """The newest installed PostgreSQL major version's ``name`` binary."""
    found = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not found:
        raise MissingBinary(
            f"PostgreSQL's {name} is not under /usr/lib/postgresql/*/bin: "
            "apt-get install -y postgresql (or run bench/peers/setup.sh)"
        )
    return found[-1]


def _redis_bin() -> Path:
    found = shutil.which("redis-server")
    if found is None:
        raise MissingBinary(
            "redis-server is not on PATH: apt-get install -y redis-server "
            "(or run bench/peers/setup.sh)"
        )
    return Path(found)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_pid(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 15
) -> None:
    """End a process we started: ``sig``, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)


class _Server:
    """Common life cycle: a temp dir, one process, stop by PID, remove the dir."""

    name = "server"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"kapellmeister-peer-{self.name}-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerFailed(f"{self.name} is not running")
        return self.process.pid

    def _stop_process(self) -> None:
        if self.process is not None:
            stop_pid(self.process)

    def stop(self) -> None:
        """Stop the server (by its PID) and remove its directory; safe to call twice."""
        try:
            self._stop_process()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> _Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PostgresServer(_Server):
    """A PostgreSQL cluster in a temp dir, trust auth, on 127.0.0.1 and a socket in the dir.

    Args:
        settings: extra ``-c name=value`` server settings, e.g. ``synchronous_commit=off``.
            By default the cluster is as durable as a stock one (fsync, synchronous commit).
    """

    name = "postgres"

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        self.initdb = _postgres_bin("initdb")
        self.postgres = _postgres_bin("postgres")
        super().__init__()
        self.settings = dict(settings or {})
        self.data = self.dir / "data"
        # initdb and postgres refuse to run as root.
        self._run_as = PG_USER if os.geteuid() == 0 else None
        if self._run_as is not None:
            try:
                entry = pwd.getpwnam(PG_USER)
            except KeyError:
                raise MissingBinary(
                    f"no {PG_USER!r} OS user to run PostgreSQL as: apt-get install -y postgresql"
                ) from None
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        """The server's SQLAlchemy URL (psycopg 3 driver), without a database name."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> str:
        """initdb, start postgres and wait until it accepts connections; returns the URL."""
        with self.log.open("ab") as log:
            done = subprocess.run(
                [
                    str(self.initdb),
                    "-D",
                    str(self.data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    # Only initdb's own final fsync of the new files; the server's
                    # durability settings stay the defaults.
                    "--no-sync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                user=self._run_as,
                group=self._run_as,
            )
        if done.returncode != 0:
            raise ServerFailed(f"initdb failed:\n{_tail(self.log)}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            **self.settings,
        }
        argv = [str(self.postgres), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=self._run_as,
                group=self._run_as,
            )
        self._wait_ready(timeout)
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        # postmaster.pid's 8th line turns to "ready" once connections are accepted.
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerFailed(f"postgres exited:\n{_tail(self.log)}")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        raise ServerFailed(f"postgres not ready after {timeout} s:\n{_tail(self.log)}")

    def _stop_process(self) -> None:
        # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint, exit.
        if self.process is not None:
            stop_pid(self.process, signal.SIGINT, grace=20)


class RedisServer(_Server):
    """A redis-server on 127.0.0.1, no RDB snapshots, no AOF unless ``appendonly``."""

    name = "redis"

    def __init__(self, appendonly: bool = False) -> None:
        self.binary = _redis_bin()
        super().__init__()
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> str:
        """Start redis-server and wait until it answers PING; returns the URL."""
        argv = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"redis-server exited:\n{_tail(self.log)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self.url
            time.sleep(0.05)
        raise ServerFailed(f"redis-server not ready after {timeout} s:\n{_tail(self.log)}")


# --- measuring processes -------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from /proc/<pid>/stat's parent field)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss_mib(pids: Iterable[int]) -> float:
    """Sum of VmRSS over ``pids`` in MiB (processes that are gone count 0)."""
    return sum(rss_kib(pid) or 0 for pid in pids) / 1024


def pss_mib(pids: Iterable[int]) -> float:
    """Sum of the proportional set size over ``pids`` in MiB: shared pages (PostgreSQL's
    shared buffers, a prefork pool's copy-on-write pages) are split among their users
    rather than counted once per process as RSS does."""
    total_kib = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


# --- the measurement -------------------------------------------------------------------------

# bench/plan_day.py's warm-up size (its WARMUP), kept in step by hand.
WARMUP = 32

RunOne = Callable[[str, "Job"], Awaitable[str]]
"""Run one plan_day workflow under this id to completion; return the chosen activity."""

Groups = Callable[[], dict[str, list[int]]]
"""The processes to account CPU and RSS to, by name (e.g. worker, postgres, client)."""

Percentile = Callable[[Sequence[float], float], float]


@dataclass
class Result:
    """The ``RESULT`` line's fields; nan where a phase did not run."""

    throughput: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    seq_p50_ms: float = math.nan
    seq_p99_ms: float = math.nan
    completed: int = 0
    wrong: int = 0
    errors: int = 0
    rss_mib: float = math.nan
    note: str = ""

    def line(self) -> str:
        """``RESULT {json}``; JSON has no NaN, so a phase that did not run is null."""
        fields = {
            k: (None if math.isnan(v) else round(v, 2)) if isinstance(v, float) else v
            for k, v in asdict(self).items()
        }
        return "RESULT " + json.dumps(fields)

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


class _Tally:
    """Counts one phase's outcomes; the first error's text goes into the note."""

    def __init__(self) -> None:
        self.wrong = 0
        self.errors = 0
        self.first_error = ""

    async def run(self, run_one: RunOne, workflow_id: str, job: Job) -> bool:
        try:
            chosen = await run_one(workflow_id, job)
        except Exception as exc:
            self.errors += 1
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:200]
            return False
        if chosen != job.expected:
            self.wrong += 1
        return True


async def _bounded(aws: Sequence[asyncio.Future[bool]], deadline: float) -> int:
    """Wait for ``aws`` until ``deadline``; cancel and count those still pending."""
    if not aws:
        return 0
    _done, pending = await asyncio.wait(aws, timeout=max(0.0, deadline - time.perf_counter()))
    for future in pending:
        future.cancel()
    return len(pending)


def _cpu_by_group(groups: Groups) -> dict[str, dict[int, float]]:
    """CPU seconds so far of each process of each group, by pid."""
    return {name: cpu_seconds({pid: pid for pid in pids}) for name, pids in groups().items()}


def _cpu_spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    # A process that started during the run (a new connection's backend) counts from 0.
    return {
        name: sum(cpu - before.get(name, {}).get(pid, 0.0) for pid, cpu in pids.items())
        for name, pids in after.items()
    }


async def _throughput(
    run_one: RunOne,
    jobs: Sequence[Job],
    run: str,
    concurrency: int,
    deadline: float,
    groups: Groups,
    result: Result,
    tally: _Tally,
    percentile: Percentile,
) -> bool:
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    free = asyncio.Semaphore(concurrency)

    async def one(workflow_id: str, job: Job) -> bool:
        async with free:
            started[workflow_id] = time.perf_counter()
            ok = await tally.run(run_one, workflow_id, job)
            if ok:
                ended[workflow_id] = time.perf_counter()
            return ok

    cpu_before = _cpu_by_group(groups)
    busy_before, clock_before = machine_busy_seconds(), time.perf_counter()
    futures = [asyncio.ensure_future(one(f"{run}-{i}", job)) for i, job in enumerate(jobs)]
    left = await _bounded(futures, deadline)
    elapsed = time.perf_counter() - clock_before
    machine_cores = (machine_busy_seconds() - busy_before) / elapsed
    spent = _cpu_spent(cpu_before, _cpu_by_group(groups))
    if left:
        result.add_note(f"gave up in the throughput run: {left} of {len(jobs)} not done")
    result.completed = len(ended)
    if ended:
        result.throughput = len(ended) / (max(ended.values()) - min(started.values()))
        latencies = [(ended[i] - started[i]) * 1000 for i in ended]
        result.p50_ms = percentile(latencies, 50)
        result.p99_ms = percentile(latencies, 99)
        per_wf = ", ".join(f"{k} {v * 1000 / len(ended):.2f}" for k, v in spent.items())
        result.add_note(
            f"CPU ms per workflow: {per_wf}; cores busy {sum(spent.values()) / elapsed:.2f} "
            f"ours, {machine_cores:.2f} machine"
        )
    return not left


async def _sequential(
    run_one: RunOne, jobs: Sequence[Job], run: str, count: int, deadline: float, tally: _Tally
) -> tuple[list[float], str]:
    latencies: list[float] = []
    for i in range(count):
        remaining = min(30.0, deadline - time.perf_counter())
        job = jobs[-1 - i % len(jobs)]
        begin = time.perf_counter()
        try:
            ok = await asyncio.wait_for(tally.run(run_one, f"{run}-s{i}", job), max(0.0, remaining))
        except TimeoutError:
            return latencies, f"gave up in the sequential run after {i}"
        if ok:
            latencies.append((time.perf_counter() - begin) * 1000)
    return latencies, ""


async def measure(
    run_one: RunOne,
    jobs: Sequence[Job],
    *,
    name: str,
    concurrency: int,
    sequential: int,
    deadline: float,
    groups: Groups,
    rss_groups: Sequence[str],
    percentile: Percentile,
) -> Result:
    """Warm up, run ``jobs`` with ``concurrency`` in flight, then ``sequential`` alone.

    The phases and ids are bench/plan_day.py's: ``WARMUP`` workflows first (not counted),
    then the throughput run, then the sequential one on the jobs taken from the end.
    Throughput is completed / (last completion - first start); latency is from just
    before ``run_one`` is called to its return, in this process. The note gives the CPU
    milliseconds per workflow of each group, the cores busy (ours and the whole
    machine's) during the throughput run, and each group's memory after the run.

    Args:
        groups: the processes to account CPU and memory to, by name, asked for again at
            each reading so that processes started meanwhile are counted.
        rss_groups: the groups whose RSS adds up to ``rss_mib`` (the orchestrator's
            processes, not the database's); the others are in the note only.
        deadline: ``time.perf_counter()`` value after which the run gives up and says so
            in the note; whatever completed by then is still reported.
        percentile: bench/plan_day.py's, passed in so that this module (which the Celery
            worker imports) does not import nats-py and kapellmeister.
    """
    run = f"{name}-{os.getpid()}-{int(time.time())}"
    result = Result()
    tally = _Tally()
    warm = [
        asyncio.ensure_future(tally.run(run_one, f"{run}-w{i}", jobs[i % len(jobs)]))
        for i in range(WARMUP)
    ]
    if await _bounded(warm, deadline):
        result.add_note("gave up in the warm-up")
        return result
    if tally.errors or tally.wrong:
        result.add_note(f"warm-up: {tally.errors} errors, {tally.wrong} wrong")
    tally = _Tally()
    if await _throughput(
        run_one, jobs, run, concurrency, deadline, groups, result, tally, percentile
    ):
        latencies, gave_up = await _sequential(run_one, jobs, run, sequential, deadline, tally)
        result.seq_p50_ms = percentile(latencies, 50)
        result.seq_p99_ms = percentile(latencies, 99)
        if gave_up:
            result.add_note(gave_up)
    result.wrong, result.errors = tally.wrong, tally.errors
    if tally.first_error:
        result.add_note(f"first error: {tally.first_error}")
    memory = {name: (rss_mib(pids), pss_mib(pids)) for name, pids in groups().items()}
    result.rss_mib = sum(memory[name][0] for name in rss_groups if name in memory)
    result.add_note(
        "after the run, MiB RSS (PSS): "
        + ", ".join(f"{k} {rss:.1f} ({pss:.1f})" for k, (rss, pss) in memory.items())
    )
    return result
