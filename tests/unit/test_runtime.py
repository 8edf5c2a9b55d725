"""The bounded shutdown of `run_service`: a stop that hangs is cut off, not waited for."""

from __future__ import annotations

import asyncio
import logging

from kapellmeister.runtime import _bounded


async def test_a_service_that_stops_in_time_is_left_to_finish(caplog):
    async def quick() -> None:
        await asyncio.sleep(0.01)

    service = asyncio.create_task(quick())
    await _bounded("svc", service, 5.0)
    assert service.done() and not service.cancelled()
    assert "not stopped" not in caplog.text


async def test_a_service_stuck_in_its_stop_is_cancelled_after_the_bound(caplog):
    # As a drain waiting on a NATS server that is gone.
    async def stuck() -> None:
        await asyncio.Event().wait()

    service = asyncio.create_task(stuck())
    with caplog.at_level(logging.WARNING, logger="kapellmeister"):
        await _bounded("svc", service, 0.2)
    assert service.cancelled()
    assert "svc: not stopped after 0 s (NATS unreachable?): exiting" in caplog.text


async def test_within_cuts_off_a_step_that_overruns_without_awaiting_it():
    from kapellmeister.runtime import within

    async def stuck() -> None:
        await asyncio.Event().wait()

    assert await within(asyncio.sleep(0.01), 5.0) is True
    assert await within(stuck(), 0.1) is False
