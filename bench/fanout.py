"""A huge fan-out: one workflow's dynamic FORK over 10,000 items.

    .venv/bin/python bench/fanout.py [--items 10000] [--max-parallel 200]

On an embedded nats-server with the conductor as a process (as deployed) and an agent
in this process (``fan.square``: n -> n², then ``fan.add_up`` sums the list), one
workflow fans out over ``--items`` numbers, ``--max-parallel`` at a time (a streamed
FORK: items' records leave the saga as they end). Sampled every 0.2 s while it runs:
the saga's KV value size and record count, and the conductor's RSS. Prints one table.
Only the processes started here are ended, by PID.
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

from bench.procfs import cpu_seconds, rss_kib
from kapellmeister.agent import Agent, task
from kapellmeister.config import Settings
from kapellmeister.processes import ServiceProcess, wait_for_services
from kapellmeister.server import EmbeddedServer
from tests.integration.test_fanout import add_up, fan_out, square

_encode = msgspec.json.Encoder().encode


async def main(items: int, parallel: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="kapellmeister-bench-fanout-"))
    server = EmbeddedServer(root / "nats")
    url = server.start()
    conductor = ServiceProcess("conductor", url, root / "conductor.log").start()
    nc = await nats.connect(url)
    agent = Agent(
        "fan", [task("fan.square", square), task("fan.add_up", add_up)], Settings(nats_url=url)
    )
    try:
        await wait_for_services(nc, ["conductor"], processes=[conductor])
        await agent.start(nc)
        pid = conductor.pid
        assert pid is not None
        spec = fan_out("wide", max_parallel=parallel)
        await nc.request("conductor.definitions.register", _encode(spec), timeout=10)
        numbers = list(range(items))
        input_bytes = len(_encode({"numbers": numbers}))
        rss_before = rss_kib(pid) or 0
        cpu_before = cpu_seconds({"c": pid})["c"]
        kv = await nc.jetstream().key_value("workflows")
        began = time.perf_counter()
        await nc.request(
            "conductor.start.wide",
            _encode({"numbers": numbers}),
            timeout=30,
            headers={"Workflow-Id": "wide-1"},
        )
        largest = records = 0
        rss_peak = rss_before
        while True:
            entry = await kv.get("wide-1")
            value = entry.value or b""
            largest = max(largest, len(value))
            state = msgspec.json.decode(value)
            records = max(records, len(state["tasks"]))
            rss_peak = max(rss_peak, rss_kib(pid) or 0)
            if state["status"] not in ("QUEUED", "RUNNING"):
                break
            await asyncio.sleep(0.2)
        seconds = time.perf_counter() - began
        cpu = cpu_seconds({"c": pid})["c"] - cpu_before
        final = len(value)
        fork = next(t for t in state["tasks"] if t["ref"] == "each_number")
        store = await nc.jetstream().object_store("payloads")
        gathered = (await store.get_info(fork["output"]["$payload"])).size
        rows = [
            ("items / max_parallel", f"{items} / {parallel}"),
            ("status", state["status"]),
            ("wall seconds", f"{seconds:.1f}"),
            ("items per second", f"{items / seconds:.0f}"),
            ("workflow input (bytes)", f"{input_bytes}"),
            ("saga KV value, largest (bytes)", f"{largest}"),
            ("saga KV value, at the end (bytes)", f"{final}"),
            ("saga records, most at once", f"{records}"),
            ("gathered outputs object (bytes)", f"{gathered}"),
            (
                "conductor RSS before / peak (MiB)",
                f"{rss_before / 1024:.1f} / {rss_peak / 1024:.1f}",
            ),
            ("conductor CPU seconds", f"{cpu:.1f}"),
        ]
        width = max(len(name) for name, _ in rows)
        print(f"{'huge fan-out'.ljust(width)}  value")
        for name, value_text in rows:
            print(f"{name.ljust(width)}  {value_text}")
    finally:
        await agent.stop()
        await nc.close()
        conductor.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--max-parallel", type=int, default=200)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.items, args.max_parallel)))
