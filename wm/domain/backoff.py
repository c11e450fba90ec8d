"""The one backoff policy MWM retries with: exponential, capped, with jitter (``tenacity``). Pure.

Every layer that waits before trying again (the consumer runtime's retries of a handler, the local
runner's object-store calls, an export's delayed redelivery) computes its waits here, so they share one
shape: ``initial * 2**(n-1)`` before retry ``n``, at most ``maximum``, plus a random part of up to
``initial`` so that replicas (or tasks) that failed together do not all come back at the same instant.
"""

from __future__ import annotations

import tenacity


def delay_s(retry: int, initial: float, maximum: float) -> float:
    """The wait before retry number ``retry`` (1 for the first)."""
    wait = tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = retry
    return float(wait(state))
