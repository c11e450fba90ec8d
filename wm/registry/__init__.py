"""The registry of applications (with revisions), export sinks and AE title mappings, over MongoDB.

`Registry` is the entry point; the stores (`Applications`, `Sinks`, `AeTitles`) are its parts;
`migrate` brings the database's collections and indexes up to date at start-up.
"""

from wm.registry.aetitles import AE_TITLE_LINKS, AE_TITLE_LINKS_INDEXES, AE_TITLES, AeTitles
from wm.registry.applications import APPLICATIONS, APPLICATIONS_INDEXES, Applications
from wm.registry.migrations import MIGRATIONS, SCHEMA_MIGRATIONS, migrate
from wm.registry.models import MAX_PAGE_SIZE, ApplicationRevision, FieldError, Page, PageRequest
from wm.registry.service import Registry
from wm.registry.sinks import SINKS, Sinks
from wm.registry.validation import (
    EngineValidator,
    UnknownEngine,
    engine_validator,
    validate_application,
    validate_definition,
)

INDEXES = (APPLICATIONS_INDEXES, AE_TITLE_LINKS_INDEXES)
"""Indexes of the registry's collections, for processes that open the database without migrating."""

__all__ = [
    "AE_TITLES",
    "AE_TITLE_LINKS",
    "APPLICATIONS",
    "INDEXES",
    "MAX_PAGE_SIZE",
    "MIGRATIONS",
    "SCHEMA_MIGRATIONS",
    "SINKS",
    "AeTitles",
    "ApplicationRevision",
    "Applications",
    "EngineValidator",
    "FieldError",
    "Page",
    "PageRequest",
    "Registry",
    "Sinks",
    "UnknownEngine",
    "engine_validator",
    "migrate",
    "validate_application",
    "validate_definition",
]
