"""Scale figures: memory with workflows in flight, and a store of many finished ones.

    .venv/bin/python bench/scale.py [--in-flight 10000] [--finished 100000]

On an embedded nats-server (JetStream, file storage, a temporary directory):

1. the conductor alone (no agents): ``--in-flight`` plan_day workflows are started, each
   then waits for its agenda task; the conductor's RSS with all of them in flight;
2. the agents start: those complete, and more are started until ``--finished`` have
   completed; the conductor's RSS, and the size of the ``workflows`` bucket on disk
   (every revision it keeps: 5 per key) and of the ``workflow_index`` bucket;
3. with all of them stored: ``conductor.get`` of random workflows (p50/p99 of 200, one
   at a time) and ``conductor.list`` (newest 50; filtered by status; by status and
   workflow), each 5 times.

Prints one table. Only the processes started here are ended, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from bench.plan_day import make_jobs, percentile, rss_mib
from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer

_encode = msgspec.json.Encoder().encode


async def start_all(nc: Client, first: int, count: int, in_flight: int, seed: int) -> None:
    """Start ``count`` plan_day workflows ``scale-<n>``, ``in_flight`` requests at once."""
    jobs = await make_jobs(min(count, 5000), seed)
    room = asyncio.Semaphore(in_flight)

    async def one(n: int) -> None:
        job = jobs[n % len(jobs)]
        async with room:
            for _ in range(5):
                try:
                    await nc.request(
                        "conductor.start.plan_day",
                        _encode({"user": job.user, "datetime": job.when}),
                        timeout=30,
                        headers={"Workflow-Id": f"scale-{n}"},
                    )
                    return
                except nats.errors.TimeoutError:
                    continue

    await asyncio.gather(*(one(n) for n in range(first, first + count)))


async def count_done(nc: Client, total: int, timeout: float) -> float:
    """Seconds until ``total`` events.activity.chosen arrived (one per finished workflow)."""
    done = 0
    finished = asyncio.Event()

    async def seen(_msg: object) -> None:
        nonlocal done
        done += 1
        if done >= total:
            finished.set()

    sub = await nc.subscribe("events.activity.chosen", cb=seen)
    began = time.perf_counter()
    try:
        await asyncio.wait_for(finished.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return time.perf_counter() - began


async def timed(nc: Client, subject: str, payload: bytes, times: int) -> list[float]:
    found = []
    for _ in range(times):
        began = time.perf_counter()
        reply = await nc.request(subject, payload, timeout=60)
        found.append((time.perf_counter() - began) * 1000)
        assert "Nats-Service-Error" not in (reply.headers or {}), reply.data
    return found


async def amain(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kapellmeister-scale-"))
    server = EmbeddedServer(tmp / "nats")
    url = server.start()
    logs = tmp / "logs"
    conductor = ServiceProcess("conductor", url, logs / "conductor.log").start()
    agents = [ServiceProcess(name, url, logs / f"{name}.log") for name in ("weather", "agenda")]
    rows: list[tuple[str, str]] = []
    nc = await nats.connect(servers=[url], name="bench-scale")
    try:
        await wait_for_services(nc, ["conductor"], processes=[conductor])
        began = time.perf_counter()
        await start_all(nc, 0, args.in_flight, 256, args.seed)
        rows.append(
            (f"{args.in_flight:,} started (no agents yet)", f"{time.perf_counter() - began:.1f} s")
        )
        await asyncio.sleep(2.0)
        rows.append(
            (f"conductor RSS, {args.in_flight:,} in flight", f"{rss_mib(conductor.pid):.1f} MiB")
        )
        waiting = asyncio.create_task(count_done(nc, args.finished, args.timeout))
        for agent in agents:
            agent.start()
        await wait_for_services(nc, ["weather", "agenda"], processes=agents)
        await start_all(nc, args.in_flight, args.finished - args.in_flight, 2000, args.seed)
        took = await waiting
        rows.append(
            (f"{args.finished:,} finished", f"{took:.1f} s ({args.finished / took:,.0f}/s)")
        )
        await asyncio.sleep(2.0)
        rows.append(
            (f"conductor RSS, {args.finished:,} finished", f"{rss_mib(conductor.pid):.1f} MiB")
        )
        info = await nc.jetstream().stream_info("KV_workflows")
        rows.append(
            (
                "workflows bucket",
                f"{info.state.bytes / 2**20:,.1f} MiB, {info.state.messages:,} revisions",
            )
        )
        index = await nc.jetstream().stream_info("KV_workflow_index")
        rows.append(
            (
                "workflow_index bucket",
                f"{index.state.bytes / 2**20:,.1f} MiB, {index.state.messages:,} entries",
            )
        )
        ids = [f"scale-{random.randrange(args.finished)}" for _ in range(200)]
        gets = []
        for workflow_id in ids:
            gets += await timed(nc, f"conductor.get.{workflow_id}", b"", 1)
        rows.append(
            (
                "conductor.get p50 / p99",
                f"{percentile(gets, 50):.2f} / {percentile(gets, 99):.2f} ms",
            )
        )
        for label, query in (
            ("conductor.list newest 50", {"limit": 50}),
            ("conductor.list RUNNING", {"status": "RUNNING", "limit": 50}),
            (
                "conductor.list COMPLETED plan_day",
                {"status": "COMPLETED", "workflow": "plan_day", "limit": 50},
            ),
        ):
            lists = await timed(nc, "conductor.list", _encode(query), 5)
            rows.append(
                (f"{label} p50 / max", f"{percentile(lists, 50):,.0f} / {max(lists):,.0f} ms")
            )
    finally:
        await nc.drain()
        for process in [*agents, conductor]:
            process.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(label) for label, _ in rows)
    print("\nscale: plan_day on 1 conductor, 1 weather, 1 agenda; 2 CPUs")
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.finished < args.in_flight:
        parser.error("--finished must be at least --in-flight")
    try:
        import uvloop

        sys.exit(uvloop.run(amain(args)))
    except ImportError:  # pragma: no cover
        sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
