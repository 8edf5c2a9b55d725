"""A service stops on SIGTERM: at once with NATS up, within its bound with NATS down."""

from __future__ import annotations

import asyncio

import pytest

from kapellmeister.processes import ServiceProcess, wait_for_services

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", ["conductor", "agenda"])
async def test_sigterm_with_nats_up_drains_and_exits_0(nats_url, nc, tmp_path, name):
    process = ServiceProcess(name, nats_url, tmp_path / f"{name}.log").start()
    try:
        await wait_for_services(nc, [name], processes=[process])
    finally:
        code = process.stop(timeout=20)
    assert code == 0, process.log_tail()
    assert "not stopped after" not in process.log_tail()


@pytest.mark.parametrize("name", ["conductor", "agenda"])
async def test_sigterm_with_nats_down_exits_within_its_bound(nats_url, nc, server, tmp_path, name):
    # A drain waits on the server; with the server gone it must not wait for ever. The
    # service gets KAPELLMEISTER_SHUTDOWN_S, then exits 0 anyway (its work is redelivered).
    env = {"KAPELLMEISTER_SHUTDOWN_S": "2"}
    process = ServiceProcess(name, nats_url, tmp_path / f"{name}.log", env).start()
    try:
        await wait_for_services(nc, [name], processes=[process])
        server.kill()
        # SIGTERM, then SIGKILL after 15 s: a return code of -9 would mean it hung.
        code = process.stop(timeout=15)
    finally:
        process.stop()
        server.start()  # for the test client's own goodbye
        for _ in range(100):  # until the test client has reconnected
            if nc.is_connected and nc.stats["reconnects"]:
                break
            await asyncio.sleep(0.1)
    assert code == 0, process.log_tail()
    assert "disconnected from NATS" in process.log_tail()
