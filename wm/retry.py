"""Bounded retries with exponential backoff, for transient failures (``wm.errors.TransientError``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import structlog

from wm.config import RetrySettings
from wm.domain.backoff import delay_s
from wm.errors import TransientError

log = structlog.get_logger("wm.retry")

T = TypeVar("T")


def backoff_delays(settings: RetrySettings) -> Iterator[float]:
    """The waits between ``settings.attempts`` attempts: doubling from the first delay up to the largest,
    with jitter (``wm.domain.backoff``, the policy every layer shares)."""
    for retry in range(1, settings.attempts):
        yield delay_s(retry, settings.initial_delay_s, settings.max_delay_s)


async def retrying(operation: Callable[[], Awaitable[T]], settings: RetrySettings, what: str) -> T:
    """``operation()``, retried on ``TransientError`` with backoff; the last attempt's error propagates."""
    for delay in backoff_delays(settings):
        try:
            return await operation()
        except TransientError as exc:
            log.warning("retrying", what=what, delay_s=delay, error=str(exc))
            await asyncio.sleep(delay)
    return await operation()
