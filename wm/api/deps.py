"""Request dependencies: the registry, object store and bus, the caller's API key and scope, pagination."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.config import Settings
from wm.registry import MAX_PAGE_SIZE, PageRequest, Registry
from wm.stores.auth import ApiKeys, Principal, Scope
from wm.stores.exports import ExportTasks

T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="an MWM API key: `mwm_<key id>_<secret>`")


def _from_app_state(name: str, kind: type[T]) -> Callable[[Request], T]:
    """A dependency returning ``request.app.state.<name>``, which the app's lifespan opened or set."""

    def dependency(request: Request) -> T:
        found: T = getattr(request.app.state, name)
        return found

    dependency.__name__ = name
    dependency.__doc__ = f"The {kind.__name__} the app's lifespan put in ``app.state.{name}``."
    return dependency


registry = _from_app_state("registry", Registry)
objects = _from_app_state("objects", ObjectStore)
bus = _from_app_state("bus", Bus)
settings = _from_app_state("settings", Settings)
export_tasks = _from_app_state("export_tasks", ExportTasks)
api_keys = _from_app_state("api_keys", ApiKeys)


def require(*scopes: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting keys with one of ``scopes`` (admin always): else 401 or 403."""
    accepted = frozenset(scopes)

    async def authorized(
        keys: Annotated[ApiKeys, Depends(api_keys)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if credentials is None:
            raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
        principal = await keys.authenticate(credentials.credentials)
        if principal is None:
            raise _unauthorized("the API key is unknown or revoked")
        if not principal.may(accepted):
            wanted = " or ".join(sorted({"admin", *accepted}))
            raise HTTPException(
                403, f"the API key {principal.name!r} has scope {principal.scope}; needs {wanted}"
            )
        return principal

    return authorized


def page_request(
    page: Annotated[int, Query(ge=1, description="1-based page number")] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")] = 50,
) -> PageRequest:
    """The ``page`` and ``page_size`` query parameters of a listing."""
    return PageRequest(page=page, page_size=page_size)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


RegistryDep = Annotated[Registry, Depends(registry)]
SettingsDep = Annotated[Settings, Depends(settings)]
ExportTasksDep = Annotated[ExportTasks, Depends(export_tasks)]
PageDep = Annotated[PageRequest, Depends(page_request)]
ObjectsDep = Annotated[ObjectStore, Depends(objects)]
BusDep = Annotated[Bus, Depends(bus)]
ADMIN = [Depends(require("admin"))]
READ = [Depends(require("read"))]
GATEWAY_READ = [Depends(require("read", "gateway"))]
GATEWAY = [Depends(require("gateway"))]
