"""The one periodic loop (``wm.service_layer.periodic.every``) background work runs in."""

from __future__ import annotations

import asyncio

import pytest

from wm.errors import Conflict, TransientError
from wm.service_layer.periodic import every

HOUR_S = 3600.0
"""An interval no test waits out: a loop that waited it would hit the test's guard instead."""


async def test_the_step_runs_every_interval_until_stop() -> None:
    stop, calls = asyncio.Event(), 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()

    async with asyncio.timeout(10):
        await every(0.01, stop, step, "test")
    assert calls == 3


async def test_stop_ends_the_wait_at_once() -> None:
    stop, calls = asyncio.Event(), 0

    async def step() -> None:
        nonlocal calls
        calls += 1

    loop = asyncio.create_task(every(HOUR_S, stop, step, "test"))
    await asyncio.sleep(0.05)
    stop.set()
    async with asyncio.timeout(10):
        await loop
    assert calls == 1, "ran at once, then waited for the interval or stop"


async def test_wait_first_waits_before_the_first_step() -> None:
    stop, calls = asyncio.Event(), 0

    async def step() -> None:
        nonlocal calls
        calls += 1

    loop = asyncio.create_task(every(HOUR_S, stop, step, "test", wait_first=True))
    await asyncio.sleep(0.05)
    stop.set()
    async with asyncio.timeout(10):
        await loop
    assert calls == 0


@pytest.mark.parametrize("error", [TransientError("down"), Conflict("lease lost"), RuntimeError("bug")])
async def test_a_failing_step_is_tried_again_at_the_next_interval(error: Exception) -> None:
    stop, calls = asyncio.Event(), 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise error
        stop.set()

    async with asyncio.timeout(10):
        await every(0.01, stop, step, "test")
    assert calls == 3, "the loop survived both failures"


async def test_a_step_with_more_work_runs_again_without_waiting() -> None:
    stop, calls = asyncio.Event(), 0

    async def step() -> bool:
        nonlocal calls
        calls += 1
        if calls == 4:
            stop.set()
        return True

    async with asyncio.timeout(10):
        await every(HOUR_S, stop, step, "test")
    assert calls == 4
