"""``async with`` for the adapters' clients: each opens in its ``__aenter__``; leaving the block closes it."""

from __future__ import annotations

from types import TracebackType


class ClosedOnExit:
    """Base of a client whose ``close`` is idempotent: ``__aexit__`` closes it, whatever ended the block."""

    async def close(self) -> None:
        """Release the client's connections (idempotent)."""
        raise NotImplementedError

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
