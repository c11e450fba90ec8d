"""Why a dead letter is not worth replaying: its effect is decided already (for ``mwm dlq replay``).

A ``bucket.ready`` is turned into its job once (the job id is derived from the bucket); when that job has
ended, the scheduler finds it and does nothing, so a replay would "succeed" without running anything.
Such a letter stays in the dead-letter queue and the replay's output says what to do instead
(``mwm jobs retry``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aio_pika
from pydantic import ValidationError

from schemas.events import BucketReady
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.domain.jobs import job_id_for
from wm.errors import NotFound
from wm.stores.jobs import JobStore


class ReplayNotes:
    """Looks up what a dead letter would do; opens the database only when a letter needs it."""

    def __init__(self, settings: Settings, enabled: bool = True) -> None:
        self._settings = settings
        self._enabled = enabled
        self._database: Database | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._database is not None:
            await self._database.close()

    async def why_not(self, message: aio_pika.abc.AbstractIncomingMessage) -> str | None:
        """Why replaying ``message`` would change nothing; None when it should be replayed."""
        if not self._enabled or message.type != BucketReady.type_name():
            return None
        try:
            event = BucketReady.model_validate_json(message.body)
        except ValidationError:
            return None  # the consumer says what is wrong with it
        job_id = job_id_for(event.bucket_id)
        try:
            job = await JobStore(await self._open()).get(job_id)
        except NotFound:
            return None
        if not job.terminal:
            return None
        return (
            f"not replayed: job {job_id} already ended ({job.state.value}); "
            f"run it again with `mwm jobs retry {job_id}`"
        )

    async def _open(self) -> Database:
        if self._database is None:
            self._database = await Database(self._settings.mongo).__aenter__()
        return self._database
