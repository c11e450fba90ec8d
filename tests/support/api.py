"""The REST API in tests: settings for serving it on a port, and checks of its problem answers."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from devkit.peers import LOCALHOST
from wm.config import Settings


def api_settings(settings: Settings, port: int) -> Settings:
    """``settings`` with the API on ``port``, a bootstrap admin key, and the CLI using both."""
    admin = f"bootstrap-{uuid.uuid4().hex}"
    api = {"port": port, "url": f"http://{LOCALHOST}:{port}", "token": admin, "bootstrap_admin_key": admin}
    return settings.model_copy(update={"api": settings.api.model_copy(update=api)})


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is an RFC 7807 problem with ``status``; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("urn:mwm:problem:")
    assert body["title"] and body["detail"]
    return body
