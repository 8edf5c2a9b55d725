"""Rate limits against a real nats-server: two agent replicas share one token bucket."""

from __future__ import annotations

import asyncio
import collections

import msgspec

from kapellmeister.agent import Agent, task
from kapellmeister.messages import TaskRequest
from kapellmeister.rates import Rate


class Job(msgspec.Struct):
    n: int
    customer: str = ""


class Runs(list[tuple[float, Job]]):
    """When each job's handler ran, as the agent saw it; `until` waits for a count."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def note(self, job: Job) -> None:
        self.append((asyncio.get_running_loop().time(), job))
        self.changed.set()

    async def until(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self) < count:
                self.changed.clear()
                await self.changed.wait()


def agents(settings, rate: Rate, runs: Runs, replicas: int = 2):
    async def run(job: Job) -> Job:
        runs.note(job)
        return job

    return [
        Agent("limited", [task("limited.run", run, rate=rate)], settings) for _ in range(replicas)
    ]


async def submit(js, jobs: list[Job]) -> None:
    for n, job in enumerate(jobs):
        request = TaskRequest(
            workflow_id=f"w{n}",
            workflow="limited",
            ref="run",
            task="limited.run",
            attempt=1,
            input=msgspec.Raw(msgspec.json.encode(job)),
        )
        await js.publish("tasks.limited.run", msgspec.json.encode(request))


# How early a run may seem, measured from this process (scheduling, two clocks).
TOLERANCE_S = 0.05


def earliest_allowed(rate: Rate, count: int) -> list[float]:
    """When the n-th run may start at the earliest, from the first: a burst of ``limit``
    at once, then one each ``per_s / limit`` seconds."""
    return [max(0, n + 1 - rate.limit) * rate.interval for n in range(count)]


def assert_within(times: list[float], rate: Rate) -> None:
    times = sorted(times)
    since = [t - times[0] for t in times]
    for ran, allowed in zip(since, earliest_allowed(rate, len(times)), strict=True):
        assert ran >= allowed - TOLERANCE_S, (since, earliest_allowed(rate, len(times)))
    # And not held back much longer than the limit asks.
    assert since[-1] <= earliest_allowed(rate, len(times))[-1] + 1.5, since


async def test_a_limit_holds_across_two_replicas(nc, js, settings):
    runs = Runs()
    started = agents(settings, Rate(limit=5, per_s=1.0), runs)
    for agent in started:
        await agent.start(nc)
    try:
        await submit(js, [Job(n=n) for n in range(20)])
        await runs.until(20)
    finally:
        for agent in started:
            await agent.stop()
    # A burst of 5, then 5 a second: the 20th runs 3 s after the first, not before.
    assert_within([t for t, _ in runs], Rate(limit=5, per_s=1.0))
    assert sorted(job.n for _, job in runs) == list(range(20))  # each ran once


async def test_a_keyed_limit_gives_each_key_its_own_budget(nc, js, settings):
    runs = Runs()
    started = agents(settings, Rate(limit=2, per_s=1.0, key="customer"), runs, replicas=1)
    for agent in started:
        await agent.start(nc)
    try:
        jobs = [Job(n=n, customer=c) for n in range(4) for c in ("acme", "globex", "initech")]
        await submit(js, jobs)
        await runs.until(12)
    finally:
        for agent in started:
            await agent.stop()
    by_customer: dict[str, list[float]] = collections.defaultdict(list)
    for t, job in runs:
        by_customer[job.customer].append(t)
    for times in by_customer.values():
        assert len(times) == 4
        assert_within(times, Rate(limit=2, per_s=1.0))
    first = min(t for t, _ in runs)
    # The three customers do not wait on each other: six ran at once.
    assert sum(1 for t, _ in runs if t < first + 0.5) >= 6


async def test_runs_start_in_the_order_they_were_queued(nc, js, settings):
    runs = Runs()
    started = agents(settings, Rate(limit=2, per_s=0.5), runs, replicas=1)  # 4 a second
    for agent in started:
        await agent.start(nc)
    try:
        await submit(js, [Job(n=n) for n in range(12)])
        await runs.until(12)
    finally:
        for agent in started:
            await agent.stop()
    assert [job.n for _, job in sorted(runs, key=lambda run: run[0])] == list(range(12))


async def test_tasks_waiting_for_their_slot_go_back_at_once_when_the_agent_stops(nc, js, settings):
    runs = Runs()
    rate = Rate(limit=1, per_s=1.0)
    first = agents(settings, rate, runs, replicas=1)[0]
    await first.start(nc)
    await submit(js, [Job(n=n) for n in range(6)])
    await runs.until(2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await first.stop()
    # Not held until the ack wait (5 s here): the waiters were put back, not waited on.
    assert loop.time() - began < 2.0
    second = agents(settings, rate, runs, replicas=1)[0]
    await second.start(nc)
    try:
        await runs.until(6)
    finally:
        await second.stop()
    assert sorted(job.n for _, job in runs) == list(range(6))  # each ran once, none lost
