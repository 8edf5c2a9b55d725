"""The web UI's costs: pages, live updates, and many open pages.

    .venv/bin/python bench/ui.py [--workflows 1000] [--pages 20]

On an embedded nats-server with the conductor, the agents and ``kapellmeister ui`` as
processes (as deployed):

1. ``--workflows`` plan_day workflows are run to the end, and one approval waits;
2. page times, one request at a time (p50/p99 of 100 each): the list (newest 50), a
   plan_day's page, a definition's page;
3. live latency: with the approval's page stream open, the time from a signal's request
   to the page's ``saga`` event (p50/p99 of 50 approvals, two signals each, 0.25 s
   apart: writes closer than 0.1 s to the last one sent are coalesced);
4. ``--pages`` open list streams on one filter while 500 more workflows run: the index
   messages the UI takes, the rows events each page gets, and the UI's CPU.

Prints one table. Only the processes started here are ended, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from bench.plan_day import percentile
from bench.procfs import cpu_seconds
from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer
from tests.support import EventStream, event_stream, free_port, http_request, wait_finished

_encode = msgspec.json.Encoder().encode
FREE_SATURDAY = {"user": "ann", "datetime": "2026-11-21T12:00:00"}
DEFINITION = "/definitions/plan_day"


async def run_workflows(nc: Client, count: int, prefix: str) -> list[str]:
    """``count`` plan_day workflows, 50 requests at once, each waited for to the end."""
    room = asyncio.Semaphore(50)
    ids = [f"{prefix}-{n}" for n in range(count)]

    async def one(workflow_id: str) -> None:
        async with room:
            await nc.request(
                "conductor.start.plan_day",
                _encode(FREE_SATURDAY),
                timeout=30,
                headers={"Workflow-Id": workflow_id},
            )

    await asyncio.gather(*(one(i) for i in ids))
    await wait_finished(nc.jetstream(), ids, timeout=300)
    return ids


async def page_times(port: int, path: str, count: int = 100) -> tuple[float, float]:
    took = []
    for _ in range(count):
        began = time.perf_counter()
        status, _ = await http_request(port, "GET", path)
        took.append((time.perf_counter() - began) * 1000)
        assert status == 200, (path, status)
    return percentile(took, 50), percentile(took, 99)


async def live_latency(nc: Client, port: int, count: int = 50) -> tuple[float, float]:
    took = []
    for n in range(count):
        reply = await nc.request("conductor.start.approval", b'{"money": 1}', timeout=10)
        workflow_id = msgspec.json.decode(reply.data)["workflow_id"]
        async with event_stream(port, f"/live/workflows/{workflow_id}") as live:
            await live.next("saga")  # the state when the page opened
            for step in (1, 2):
                # A person's pace: the page is not in the middle of a burst of writes
                # (those are sent as one, up to 0.1 s later).
                await asyncio.sleep(0.25)
                began = time.perf_counter()
                signal = _encode({"status": "ok", "approver": f"a{n}"})
                await nc.request(f"conductor.signal.{workflow_id}.approval_{step}", signal)
                await _saga_with(live, f'data-ref=\\"approval_{step}\\" data-status=\\"COMPLETED')
                took.append((time.perf_counter() - began) * 1000)
    return percentile(took, 50), percentile(took, 99)


async def _saga_with(live: EventStream, text: str) -> None:
    while text not in await live.next("saga"):
        pass


async def many_pages(
    nc: Client, port: int, ui: ServiceProcess, pages: int
) -> tuple[int, float, float]:
    """Rows events per page and the UI's CPU seconds while 500 workflows run."""
    streams = [event_stream(port, "/live/workflows?workflow=plan_day") for _ in range(pages)]
    opened = [await stream.__aenter__() for stream in streams]
    counts = [0] * pages

    async def count(index: int, live: EventStream) -> None:
        while True:
            await live.next("rows", timeout=3600)
            counts[index] += 1

    readers = [asyncio.create_task(count(i, live)) for i, live in enumerate(opened)]
    assert ui.pid is not None
    cpu = cpu_seconds({"ui": ui.pid})["ui"]
    began = time.perf_counter()
    await run_workflows(nc, 500, "pages")
    await asyncio.sleep(1.5)  # the last index flush and the last redraw
    seconds = time.perf_counter() - began
    cpu = cpu_seconds({"ui": ui.pid})["ui"] - cpu
    for reader in readers:
        reader.cancel()
    for stream in streams:
        await stream.__aexit__(None, None, None)
    return min(counts), cpu, seconds


async def main(workflows: int, pages: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="kapellmeister-bench-ui-"))
    server = EmbeddedServer(root / "nats")
    url = server.start()
    port = free_port()
    services = [
        ServiceProcess(name, url, root / f"{name}.log").start()
        for name in ("conductor", "weather", "agenda")
    ]
    argv = [sys.executable, "-m", "kapellmeister.cli", "ui", "--port", str(port)]
    ui = ServiceProcess("ui", url, root / "ui.log", argv=argv).start()
    nc = await nats.connect(url)
    try:
        await wait_for_services(nc, ["conductor", "weather", "agenda"], processes=services)
        for _ in range(100):
            try:
                if (await http_request(port, "GET", "/healthz"))[0] == 200:
                    break
            except OSError:
                await asyncio.sleep(0.1)
        ids = await run_workflows(nc, workflows, "ui")
        rows = [
            ("list, newest 50 (p50 / p99 ms)", await page_times(port, "/")),
            ("a plan_day's page (p50 / p99 ms)", await page_times(port, f"/workflows/{ids[0]}")),
            (
                "its definition's page (p50 / p99 ms)",
                await page_times(port, "/definitions/plan_day"),
            ),
            ("signal to the page's update (p50 / p99 ms)", await live_latency(nc, port)),
        ]
        events, cpu, seconds = await many_pages(nc, port, ui, pages)
        print(f"{workflows:,} plan_day workflows stored; UI on its own process\n")
        for name, (p50, p99) in rows:
            print(f"{name:<46}{p50:>8.1f} / {p99:.1f}")
        print(f"{pages} open list pages, 500 workflows in {seconds:.1f} s:")
        print(f"{'  rows events per page (fewest)':<46}{events:>8}")
        print(f"{'  UI CPU seconds':<46}{cpu:>8.2f}")
    finally:
        await nc.close()
        ui.stop()
        for service in services:
            service.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=20)
    options = parser.parse_args()
    asyncio.run(main(options.workflows, options.pages))
