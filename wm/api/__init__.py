"""The MWM REST API (FastAPI): applications, sinks, AE title mappings and health.

`create_app` builds the application; `wm.api.server` runs it. Errors are RFC 7807 problems
(`wm.api.problems`); authentication is by API key with scopes (`wm.api.deps`, `wm.stores.auth`).
"""

from wm.api.app import create_app

__all__ = ["create_app"]
