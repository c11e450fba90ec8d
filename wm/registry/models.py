"""Records the registry returns: an application revision, and one page of a listing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from schemas.applications import ApplicationDefinition

T = TypeVar("T")

FieldError = dict[str, str]
"""One validation problem: ``{"field": "sinks[0]", "message": "unknown sink 'pacs'"}``."""

MAX_PAGE_SIZE = 200


class ApplicationRevision(BaseModel):
    """One stored revision of an application; ``deleted_at`` is set on every revision once it is deleted."""

    name: str
    revision: int
    definition: ApplicationDefinition
    created_at: datetime
    deleted_at: datetime | None = None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> ApplicationRevision:
        """Build from a document of the ``applications`` collection."""
        return cls.model_validate({key: value for key, value in document.items() if key != "_id"})


class Page(BaseModel, Generic[T]):
    """One page of a listing."""

    items: list[T]
    page: int = Field(ge=1)
    page_size: int = Field(ge=1, le=MAX_PAGE_SIZE)
    total: int = Field(ge=0, description="items over all pages")


@dataclass(frozen=True)
class PageRequest:
    """Which page of a listing to return (1-based)."""

    page: int = 1
    page_size: int = 50

    @property
    def skip(self) -> int:
        """How many items come before this page."""
        return (self.page - 1) * self.page_size

    def of(self, items: list[T], total: int) -> Page[T]:
        """This page holding ``items``."""
        return Page[T](items=items, page=self.page, page_size=self.page_size, total=total)
