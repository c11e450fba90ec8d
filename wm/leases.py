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

import structlog

from wm.errors import TransientError

log = structlog.get_logger("wm.leases")

RENEWALS_PER_LEASE = 3
"""A renewal every third of the lease: two may fail (a database blip) before the lease runs out."""


@contextlib.asynccontextmanager
async def renewed(renew: Callable[[], Awaitable[object]], lease_s: float, what: str) -> AsyncIterator[None]:
    """Call ``renew()`` every third of ``lease_s`` while the block runs.

    A renewal that fails on an outage is logged and tried at the next beat (the lease may still hold);
    the renewals stop when the block ends, however it ends.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(lease_s / RENEWALS_PER_LEASE)
            try:
                await renew()
            except TransientError as exc:
                log.warning("lease_not_renewed", what=what, error=str(exc))

    heartbeat = asyncio.create_task(beat())
    try:
        yield
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
