"""MongoDB through PyMongo's native async client (``AsyncMongoClient``; Motor is deprecated).

Works on MongoDB and on FerretDB v1's subset: no transactions, no change streams, no TTL/partial/sparse
indexes. Mutual exclusion across replicas is built on inserts under unique indexes, never on
check-then-write. Indexes are declared in code (``IndexSpec``) and created at start-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import structlog
from pymongo import ASCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from wm import metrics
from wm.adapters.closing import ClosedOnExit
from wm.config import MongoSettings
from wm.errors import Duplicate, NotFound, TransientError

Document = dict[str, Any]
log = structlog.get_logger(__name__)

# Error codes that mean "the server is there but not ready/available", worth a retry.
DUPLICATE_KEY = 11000
_RETRYABLE_CODES = frozenset({6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})
LINGER_STEPS = 10  # a pause of linger_s / LINGER_STEPS without a new idempotency key ends the wait


@dataclass(frozen=True)
class IndexSpec:
    """Indexes one collection needs."""

    collection: str
    indexes: tuple[IndexModel, ...] = field(default_factory=tuple)


@asynccontextmanager
async def translated_errors(what: str) -> AsyncIterator[None]:
    """Translate PyMongo errors: a duplicate key to ``Duplicate``, outages to ``TransientError``."""
    try:
        yield
    except DuplicateKeyError as exc:
        raise Duplicate(f"{what}: duplicate key") from exc
    except BulkWriteError:
        raise  # the caller inspects which writes failed
    except ConnectionFailure as exc:
        raise TransientError(f"{what}: database unavailable: {exc}") from exc
    except OperationFailure as exc:
        if exc.code in _RETRYABLE_CODES:
            raise TransientError(f"{what}: {exc}") from exc
        raise
    except PyMongoError as exc:
        if getattr(exc, "timeout", False):
            raise TransientError(f"{what}: database timeout: {exc}") from exc
        raise


async def delete_matching(
    collection: AsyncCollection[Document], criteria: Document, what: str, dry_run: bool = False
) -> int:
    """Delete the documents matching ``criteria`` (with ``dry_run``, only count them); how many."""
    async with translated_errors(what):
        if dry_run:
            return await collection.count_documents(criteria)
        result = await collection.delete_many(criteria)
    return result.deleted_count


async def upsert(
    collection: AsyncCollection[Document], criteria: Document, update: Document, what: str
) -> None:
    """``update_one(criteria, update, upsert=True)``, tried again once when two upserts raced to insert.

    The MongoDB-wire server reports the loser of such a race as a duplicate key; the document exists by
    then, so the second try updates it.
    """
    for attempt in range(2):
        try:
            async with translated_errors(what):
                await collection.update_one(criteria, update, upsert=True)
            return
        except Duplicate:
            if attempt:
                raise


async def insert_new(collection: AsyncCollection[Document], document: Document, what: str) -> bool:
    """Insert ``document``; False, writing nothing, when a document with its unique key exists already.

    The unique insert is how MWM decides anything once across replicas: the caller that gets True won.
    """
    try:
        async with translated_errors(what):
            await collection.insert_one(document)
    except Duplicate:
        return False
    return True


async def find_by_id(collection: AsyncCollection[Document], key: str, what: str, missing: str) -> Document:
    """The document whose ``_id`` is ``key``; ``NotFound(missing)`` when there is none."""
    async with translated_errors(what):
        document = await collection.find_one({"_id": key})
    if document is None:
        raise NotFound(missing)
    return document


async def reclaim_stale(
    collection: AsyncCollection[Document], key: str, older_than: timedelta, what: str
) -> bool:
    """Take over the unpublished claim ``key`` once it is older than ``older_than``: True for one caller.

    A claim is ``{_id, claimed_at, published_at}``; the winner is the caller whose conditional re-stamp
    of the ``claimed_at`` it read lands (a read, then a compare-and-set: the MongoDB-wire server has no
    atomic find-and-modify on a condition like this).
    """
    async with translated_errors(what):
        document = await collection.find_one({"_id": key})
        if document is None or document["published_at"] is not None:
            return False
        if document["claimed_at"] > datetime.now(UTC) - older_than:
            return False
        result = await collection.update_one(
            {"_id": key, "claimed_at": document["claimed_at"]}, {"$set": {"claimed_at": datetime.now(UTC)}}
        )
    return result.modified_count == 1


class Database(ClosedOnExit):
    """One ``AsyncMongoClient`` and database per process; use as an async context manager."""

    def __init__(self, settings: MongoSettings, index_specs: Iterable[IndexSpec] = ()) -> None:
        self.settings = settings
        self.index_specs = tuple(index_specs)
        self._client: AsyncMongoClient[Document] | None = None

    async def __aenter__(self) -> Self:
        timeout = self.settings.timeout_ms
        self._client = AsyncMongoClient(
            self.settings.url,
            tz_aware=True,
            serverSelectionTimeoutMS=timeout,
            connectTimeoutMS=timeout,
            socketTimeoutMS=timeout * 3,
            retryWrites=False,  # FerretDB has no retryable writes; our writes are idempotent anyway
        )
        try:
            await self.ensure_indexes()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close the client (idempotent)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def db(self) -> AsyncDatabase[Document]:
        assert self._client is not None, "Database used outside its context"
        return self._client[self.settings.database]

    def collection(self, name: str) -> AsyncCollection[Document]:
        """A collection of the configured database."""
        return self.db[name]

    async def ensure_indexes(self, specs: Sequence[IndexSpec] | None = None) -> None:
        """Create the declared indexes (or those of ``specs``) that do not exist yet.

        Only missing ones are sent: FerretDB v1 drops the connection when a ``createIndexes`` batch repeats
        indexes that exist, and skipping them costs one ``listIndexes`` per collection on MongoDB too.
        """
        async with translated_errors("create indexes"):
            for spec in self.index_specs if specs is None else specs:
                collection = self.db[spec.collection]
                existing = {index["name"] async for index in await collection.list_indexes()}
                missing = [index for index in spec.indexes if index.document["name"] not in existing]
                if missing:
                    await collection.create_indexes(missing)
                    existing.update(index.document["name"] for index in missing)

    async def ping(self) -> bool:
        """True when the server answers."""
        try:
            async with translated_errors("ping"):
                await self.db.command("ping")
        except TransientError:
            return False
        return True


PROCESSED_MESSAGES = "processed_messages"

PROCESSED_MESSAGES_INDEXES = IndexSpec(PROCESSED_MESSAGES, (IndexModel([("processed_at", ASCENDING)]),))


class ProcessedMessages:
    """Keys of messages a consumer has fully handled, under the unique ``_id`` index.

    A key is a shortcut, not the guarantee: every handler's effects are idempotent (natural keys), and the
    key lets a redelivery of an already handled message be acknowledged without running the handler again.
    So keys are written behind the acknowledgement: ``record`` queues the key and returns, and the keys
    queued within ``linger_s`` share one ``insert_many``. A key that is never written (its process died,
    the write failed) costs at most one re-run of an idempotent handler, and only for a delivery whose ack
    was lost as well.

    When ``max_pending`` keys are already waiting, ``record`` waits for its own write (back-pressure on the
    consumer); ``flush`` writes everything queued and is called before the process closes the database.
    """

    def __init__(
        self, database: Database, batch_size: int = 256, max_pending: int = 1024, linger_s: float = 0.05
    ) -> None:
        self._collection = database.collection(PROCESSED_MESSAGES)
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._linger_s = linger_s
        self._pending: list[tuple[Document, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @staticmethod
    def _key(consumer: str, message_id: str) -> str:
        return f"{consumer}:{message_id}"

    async def seen(self, consumer: str, message_id: str) -> bool:
        """Whether this consumer already handled this message."""
        async with translated_errors("read processed message"):
            found = await self._collection.find_one({"_id": self._key(consumer, message_id)}, {"_id": 1})
        return found is not None

    async def record(self, consumer: str, message_id: str) -> None:
        """Queue the key for writing (recording it twice is harmless); waits only under back-pressure."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = {"_id": self._key(consumer, message_id), "processed_at": datetime.now(UTC)}
        self._pending.append((key, written))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        if len(self._pending) > self._max_pending:
            await written

    async def flush(self) -> None:
        """Write every queued key (returns when the writes are done, whether or not they succeeded)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._pending:
            await self._linger()
            batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
            try:
                await self._insert([document for document, _ in batch])
            except Exception as exc:  # a failed write must not leave back-pressured deliveries waiting
                metrics.PROCESSED_KEYS_UNWRITTEN.inc(len(batch))
                log.warning("processed_keys_unwritten", keys=len(batch), error=repr(exc))
            for _, written in batch:
                if not written.done():
                    written.set_result(None)

    async def _linger(self) -> None:
        """Wait, up to ``linger_s``, while keys keep arriving and a batch is not full.

        An insert costs far more per key in small batches (FerretDB: 160 us a key in tens, 60 us in
        hundreds), so a busy consumer's keys should share one. Nothing waits on them (they are behind the
        ack) unless the consumer is held back, which writes at once; and once deliveries stop, a step
        without a new key ends the wait, so the last keys of a burst land within a step, not ``linger_s``.
        """
        step = self._linger_s / LINGER_STEPS
        deadline = time.monotonic() + self._linger_s
        arrived = len(self._pending)
        while arrived < self._batch_size and arrived <= self._max_pending and time.monotonic() < deadline:
            await asyncio.sleep(step)
            if len(self._pending) == arrived:
                return
            arrived = len(self._pending)

    async def _insert(self, documents: list[Document]) -> None:
        try:
            async with translated_errors("record processed messages"):
                await self._collection.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise TransientError(f"record processed messages: {exc}") from exc

    async def forget_before(self, cutoff: datetime, dry_run: bool = False) -> int:
        """Remove keys older than ``cutoff`` (no TTL indexes on FerretDB); how many (``dry_run``: counts)."""
        criteria = {"processed_at": {"$lt": cutoff}}
        return await delete_matching(self._collection, criteria, "purge processed messages", dry_run)
