"""Who may open an association with the DICOM gateway: called AE title mappings and calling-AE allow-lists.

The gateway answers a called AE title only when it is mapped to at least one application; the mapping's
``allowed_callers`` then name the calling AE titles (each optionally pinned to a host) that may send to
it, and an empty list admits any caller. `admit` is the pure decision; `CachedDirectory` keeps mappings for
a short TTL so an association does not cost a database query (a changed mapping takes effect within the
TTL), and serves the last known mapping while the database is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from schemas.applications import AeTitleMapping
from wm.errors import TransientError

__all__ = ["REJECT", "AeTitleDirectory", "CachedDirectory", "Rejection", "admit"]

DEFAULT_TTL_S = 2.0


class AeTitleDirectory(Protocol):
    """Where AE title mappings come from (`wm.registry.Registry` satisfies it)."""

    async def mapping(self, ae_title: str) -> AeTitleMapping | None:
        """The mapping of ``ae_title``, or None when it is not mapped."""
        ...


class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ: result, source and diagnostic (PS3.8 9.3.4), and the reason we log."""

    result: int
    source: int
    diagnostic: int
    reason: str


class REJECT:
    """The association rejections the gateway sends (never bare numbers at call sites)."""

    CALLED_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x07, "called AE title not recognised")
    """Rejected-permanent, service-user: no mapping for the called AE title."""
    CALLING_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x03, "calling AE title not recognised")
    """Rejected-permanent, service-user: the caller is not on the AE title's allow-list."""
    TEMPORARY_CONGESTION = Rejection(0x02, 0x03, 0x01, "AE title mappings unavailable")
    """Rejected-transient, service-provider (presentation): the mappings cannot be read right now."""


def admit(mapping: AeTitleMapping | None, calling_ae_title: str, peer_host: str) -> Rejection | None:
    """None when the caller may open an association to the mapping's AE title, else why not."""
    if mapping is None or not mapping.applications:
        return REJECT.CALLED_AE_NOT_RECOGNISED
    if not mapping.allowed_callers:
        return None
    for caller in mapping.allowed_callers:
        if caller.ae_title == calling_ae_title and caller.host in (None, peer_host):
            return None
    return REJECT.CALLING_AE_NOT_RECOGNISED


@dataclass
class _Entry:
    mapping: AeTitleMapping | None
    expires_at: float


class CachedDirectory:
    """An `AeTitleDirectory` that remembers answers (mapped or not) for ``ttl_s`` seconds."""

    def __init__(
        self,
        directory: AeTitleDirectory,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    async def mapping(self, ae_title: str) -> AeTitleMapping | None:
        """The cached mapping; a stale one is served when the directory raises `TransientError`."""
        now = self._clock()
        entry = self._entries.get(ae_title)
        if entry is not None and entry.expires_at > now:
            return entry.mapping
        try:
            mapping = await self._directory.mapping(ae_title)
        except TransientError:
            if entry is None:
                raise
            return entry.mapping
        self._entries[ae_title] = _Entry(mapping, now + self._ttl_s)
        return mapping
