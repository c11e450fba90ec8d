"""Every N seconds until stop: the one loop MWM's background work runs in.

Sweeps (expired leases, due redeliveries, due buckets, due job checks), a lease's heartbeat and the pull
export client's poll all run a step at a fixed interval until their process stops. One helper keeps them
alike where it matters: the wait ends at once when ``stop`` is set (a drain never waits out an interval),
and a step that fails never ends the loop: an outage (``TransientError``) or another expected error
(``MwmError``: a lease lost, a conflict) is a warning and the next interval tries again; anything else is a
bug, logged with its traceback, and the loop goes on too, since a sweep that stops silently is how leases
stop being taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from wm.errors import MwmError, TransientError

log = structlog.get_logger("wm.service_layer.periodic")

Step = Callable[[], Awaitable[bool | None]]
"""One run of the periodic work; ``True`` when more is waiting, so the next run starts without a pause."""


async def every(
    interval_s: float,
    stop: asyncio.Event,
    step: Step,
    what: str,
    *,
    wait_first: bool = False,
    **context: object,
) -> None:
    """Run ``step`` every ``interval_s`` seconds until ``stop`` is set (at once, unless ``wait_first``).

    A step that returns ``True`` is run again at once; one that raises is logged as ``<what>_deferred``
    (an outage) or ``<what>_failed`` (a bug), with ``context``, and run again after the interval.
    """
    if wait_first and await stopped_within(stop, interval_s):
        return
    while not stop.is_set():
        try:
            more = await step()
        except TransientError as exc:
            log.warning(f"{what}_deferred", error=str(exc), **context)
            more = False
        except MwmError as exc:
            log.warning(f"{what}_failed", error=str(exc), **context)
            more = False
        except Exception as exc:
            log.exception(f"{what}_failed", error=repr(exc), **context)
            more = False
        if not more and await stopped_within(stop, interval_s):
            return


async def stopped_within(stop: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` seconds for ``stop``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout_s)
    return stop.is_set()
