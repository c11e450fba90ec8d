"""AE title mappings: which applications an AE title triggers, and who may send to it.

Two collections. ``ae_titles`` holds one document per AE title (``_id`` = the AE title) with its
allow-list of calling peers. ``ae_title_applications`` holds one document per (AE title, application)
link, ``_id = "<application>@<ae_title>"``: links are only ever inserted or deleted, never updated in
place, because FerretDB v1 loses concurrent array updates (``$addToSet`` on one document from two writers
keeps only one of them). An AE title can trigger several applications and an application can listen on
several AE titles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, IndexModel

from schemas.applications import AeTitleMapping, CallingPeer
from wm.adapters.mongo import Database, IndexSpec, insert_new, translated_errors
from wm.errors import NotFound
from wm.registry.models import Page, PageRequest

AE_TITLES = "ae_titles"
AE_TITLE_LINKS = "ae_title_applications"

AE_TITLE_LINKS_INDEXES = IndexSpec(
    AE_TITLE_LINKS,
    (
        IndexModel([("ae_title", ASCENDING)], name="ae_title"),
        IndexModel([("application", ASCENDING)], name="application"),
    ),
)


class AeTitles:
    """The store of AE title mappings (no existence checks on applications: see `wm.registry.Registry`)."""

    def __init__(self, database: Database) -> None:
        self._titles = database.collection(AE_TITLES)
        self._links = database.collection(AE_TITLE_LINKS)

    async def map(self, ae_title: str, application: str, allowed_callers: Sequence[CallingPeer] = ()) -> None:
        """Link the AE title to the application and add ``allowed_callers`` to its allow-list (idempotent)."""
        await self._ensure_title(ae_title)
        if allowed_callers:
            callers = [caller.model_dump() for caller in allowed_callers]
            async with translated_errors("update allowed callers"):
                await self._titles.update_one(
                    {"_id": ae_title}, {"$addToSet": {"allowed_callers": {"$each": callers}}}
                )
        await self._link(ae_title, [application])

    async def unmap(self, ae_title: str, application: str) -> None:
        """Remove the link; ``NotFound`` when the AE title does not trigger that application."""
        async with translated_errors("unmap AE title"):
            result = await self._links.delete_one({"_id": _link_id(ae_title, application)})
        if result.deleted_count == 0:
            raise NotFound(f"AE title {ae_title!r} is not mapped to application {application!r}")

    async def replace(self, mapping: AeTitleMapping) -> None:
        """Make the stored mapping equal ``mapping`` (applications and allow-list)."""
        await self._ensure_title(mapping.ae_title)
        callers = [caller.model_dump() for caller in mapping.allowed_callers]
        async with translated_errors("replace AE title mapping"):
            await self._titles.update_one({"_id": mapping.ae_title}, {"$set": {"allowed_callers": callers}})
            await self._links.delete_many(
                {"ae_title": mapping.ae_title, "application": {"$nin": list(mapping.applications)}}
            )
        await self._link(mapping.ae_title, mapping.applications)

    async def find(self, ae_title: str) -> AeTitleMapping | None:
        """The mapping of ``ae_title``, or None when it was never mapped."""
        mappings = await self._mappings([ae_title])
        return mappings[0] if mappings else None

    async def get(self, ae_title: str) -> AeTitleMapping:
        """The mapping of ``ae_title``; ``NotFound`` when it was never mapped."""
        mapping = await self.find(ae_title)
        if mapping is None:
            raise NotFound(f"AE title {ae_title!r} is not mapped")
        return mapping

    async def list_page(self, page: PageRequest) -> Page[AeTitleMapping]:
        """Mappings by AE title."""
        async with translated_errors("list AE titles"):
            total = await self._titles.count_documents({})
            cursor = self._titles.find({}, {"_id": 1}).sort("_id", 1).skip(page.skip).limit(page.page_size)
            titles = [document["_id"] for document in await cursor.to_list()]
        return page.of(await self._mappings(titles), total)

    async def applications(self, ae_title: str) -> list[str]:
        """Names of the applications the AE title triggers (one query)."""
        async with translated_errors("read AE title links"):
            documents = await self._links.find({"ae_title": ae_title}, {"application": 1}).to_list()
        return sorted(document["application"] for document in documents)

    async def forget_application(self, application: str) -> None:
        """Remove every link to ``application`` (it was deleted)."""
        async with translated_errors("unmap application"):
            await self._links.delete_many({"application": application})

    async def _ensure_title(self, ae_title: str) -> None:
        document = {"_id": ae_title, "allowed_callers": [], "created_at": _now()}
        await insert_new(self._titles, document, "create AE title")  # an existing one stays as it is

    async def _link(self, ae_title: str, applications: Iterable[str]) -> None:
        for application in applications:
            document = {
                "_id": _link_id(ae_title, application),
                "ae_title": ae_title,
                "application": application,
            }
            await insert_new(self._links, {**document, "created_at": _now()}, "map AE title")

    async def _mappings(self, titles: Sequence[str]) -> list[AeTitleMapping]:
        if not titles:
            return []
        async with translated_errors("read AE titles"):
            documents = await self._titles.find({"_id": {"$in": list(titles)}}).sort("_id", 1).to_list()
            links = await self._links.find({"ae_title": {"$in": list(titles)}}).to_list()
        linked: dict[str, list[str]] = {}
        for link in links:
            linked.setdefault(link["ae_title"], []).append(link["application"])
        return [_mapping(document, sorted(linked.get(document["_id"], []))) for document in documents]


def _mapping(document: dict[str, Any], applications: list[str]) -> AeTitleMapping:
    return AeTitleMapping(
        ae_title=document["_id"],
        applications=applications,
        allowed_callers=document.get("allowed_callers", []),
    )


def _link_id(ae_title: str, application: str) -> str:
    return f"{application}@{ae_title}"


def _now() -> datetime:
    return datetime.now(UTC)
