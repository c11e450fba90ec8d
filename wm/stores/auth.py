"""API keys: bearer tokens with one scope each, stored hashed in collection ``api_keys``.

A token is ``mwm_<key_id>_<secret>``: ``key_id`` (16 hex digits) finds the record, ``secret`` (32 random
bytes, URL-safe base64) is checked against its SHA-256 with ``hmac.compare_digest``. A high-entropy
secret needs no slow hash; the clear token is shown once, at creation, and never stored.

Scopes: ``admin`` may do everything, ``read`` may read the registry, ``gateway`` may read AE title
mappings (what a DICOM gateway needs). The bootstrap admin key (``MWM_API__BOOTSTRAP_ADMIN_KEY``, any
string of at least 16 characters, or a ``mwm_`` token) is ensured at API start-up under the name
``bootstrap``; changing the setting replaces it, and it is re-enabled at each start while it is set.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel
from pymongo import ASCENDING, IndexModel

from wm.adapters.mongo import Database, IndexSpec, insert_new, translated_errors
from wm.errors import Conflict, NotFound, PermanentError

API_KEYS = "api_keys"
API_KEYS_INDEXES = IndexSpec(API_KEYS, (IndexModel([("name", ASCENDING)], unique=True, name="name"),))

Scope = Literal["admin", "gateway", "read"]
SCOPES: tuple[Scope, ...] = ("admin", "gateway", "read")

BOOTSTRAP = "bootstrap"
MIN_BOOTSTRAP_LENGTH = 16
_TOKEN = re.compile(r"^mwm_([0-9a-f]{16})_([A-Za-z0-9_-]{20,})$")


class ApiKey(BaseModel):
    """An API key as listed (never with its secret)."""

    key_id: str
    name: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's id, name and scope."""

    key_id: str
    name: str
    scope: Scope

    def may(self, accepted: frozenset[Scope]) -> bool:
        """Whether this key's scope is one of ``accepted`` (admin may do everything)."""
        return self.scope == "admin" or self.scope in accepted


def new_token() -> tuple[str, str]:
    """A fresh ``(key_id, token)``."""
    key_id = secrets.token_hex(8)
    return key_id, f"mwm_{key_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a token; any other string is a candidate for the bootstrap key."""
    match = _TOKEN.match(token)
    return (match.group(1), match.group(2)) if match else (BOOTSTRAP, token)


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    """The store of API keys."""

    def __init__(self, database: Database) -> None:
        self._collection = database.collection(API_KEYS)

    async def create(self, name: str, scope: Scope) -> tuple[ApiKey, str]:
        """A new key and its token (shown once); ``Conflict`` when the name is taken."""
        key_id, token = new_token()
        key = ApiKey(key_id=key_id, name=name, scope=scope, created_at=datetime.now(UTC))
        await self._insert(key, parse_token(token)[1])
        return key, token

    async def authenticate(self, token: str) -> Principal | None:
        """The key's principal, or None when the token is unknown, wrong or revoked."""
        key_id, secret = parse_token(token)
        async with translated_errors("read API key"):
            document = await self._collection.find_one({"_id": key_id})
        if document is None or document.get("revoked_at") is not None:
            return None
        if not hmac.compare_digest(document["secret_sha256"], digest(secret)):
            return None
        return Principal(key_id=key_id, name=document["name"], scope=document["scope"])

    async def all(self) -> list[ApiKey]:
        """Every key, revoked ones included, by name."""
        async with translated_errors("list API keys"):
            documents = await self._collection.find({}).sort("name", ASCENDING).to_list()
        return [_key(document) for document in documents]

    async def revoke(self, name: str) -> ApiKey:
        """Revoke the key called ``name``; ``NotFound`` when there is none."""
        async with translated_errors("revoke API key"):
            await self._collection.update_one({"name": name}, {"$set": {"revoked_at": datetime.now(UTC)}})
            document = await self._collection.find_one({"name": name})
        if document is None:
            raise NotFound(f"API key {name!r} not found")
        return _key(document)

    async def ensure_bootstrap(self, token: str) -> None:
        """Make ``token`` a valid admin key named ``bootstrap`` (replacing an older bootstrap key)."""
        if len(token) < MIN_BOOTSTRAP_LENGTH:
            raise PermanentError(
                f"the bootstrap admin key must be at least {MIN_BOOTSTRAP_LENGTH} characters"
            )
        key_id, secret = parse_token(token)
        async with translated_errors("ensure bootstrap key"):
            await self._collection.delete_many({"name": BOOTSTRAP, "_id": {"$ne": key_id}})
            await self._collection.delete_one({"_id": key_id})
        key = ApiKey(key_id=key_id, name=BOOTSTRAP, scope="admin", created_at=datetime.now(UTC))
        try:
            await self._insert(key, secret)
        except Conflict:
            return  # another replica starting at the same moment inserted the same key

    async def _insert(self, key: ApiKey, secret: str) -> None:
        document = {"_id": key.key_id, **key.model_dump(exclude={"key_id"}), "secret_sha256": digest(secret)}
        if not await insert_new(self._collection, document, "create API key"):
            raise Conflict(f"an API key named {key.name!r} already exists")


def _key(document: dict[str, object]) -> ApiKey:
    return ApiKey.model_validate({**document, "key_id": document["_id"]})
