"""Leases that follow the work: short, and renewed while their holder is working.

A lease long enough for the slowest piece of work (an export of a large study to a slow PACS) keeps a
killed holder's work waiting that long too. A short lease, renewed every third of its length while the
holder runs, is taken over soon after the holder dies (within the lease and the sweep that looks for
expired ones) and never while it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from wm.service_layer.periodic import every

RENEWALS_PER_LEASE = 3
"""A renewal every third of the lease: two may fail (a database blip) before the lease runs out."""


@contextlib.asynccontextmanager
async def renewed(renew: Callable[[], Awaitable[object]], lease_s: float, what: str) -> AsyncIterator[None]:
    """Call ``renew()`` every third of ``lease_s`` while the block runs.

    A renewal that fails is logged (``lease_renewal_deferred`` on an outage) and tried at the next beat
    (the lease may still hold); the renewals stop when the block ends, however it ends.
    """

    async def beat() -> None:
        await renew()

    stop = asyncio.Event()
    interval_s = lease_s / RENEWALS_PER_LEASE
    heartbeat = asyncio.create_task(
        every(interval_s, stop, beat, "lease_renewal", wait_first=True, lease=what)
    )
    try:
        yield
    finally:
        stop.set()
        heartbeat.cancel()  # a renewal in flight is not waited for: the block's end gives the lease up
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
