"""What MWM hands its plugins: only the settings each one declares it reads.

Engines (entry-point group ``mwm.engines``) and sinks (``mwm.sinks``) are found by name. What an entry
point names (an engine class or factory, a sink class) declares ``settings_type``: a `PluginSettings`
model whose fields mirror, by the same names, the part of `wm.config.Settings` the plugin reads. A field
is a whole section (``argo: ArgoSettings``), a top-level setting (``work_dir: str``), or a smaller
`PluginSettings` holding only the fields the plugin reads of a section (``object_store: Download`` with
just ``workers``). MWM fills that model from its settings (`plugin_settings`) and passes it to the
plugin, which never sees the rest: the broker's and the database's URLs and credentials, the API keys,
the object store's keys (unless it declares them), the other plugins' secrets::

    class MyEngineSettings(PluginSettings):
        work_dir: str
        argo: ArgoSettings

    class MyEngine:
        settings_type = MyEngineSettings

        def __init__(self, settings: MyEngineSettings) -> None: ...
"""

from __future__ import annotations

from typing import Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from wm.config import Settings
from wm.errors import PermanentError

__all__ = ["Configurable", "PluginSettings", "plugin_settings"]


class PluginSettings(BaseModel):
    """The part of MWM's settings a plugin reads: fields named as in `wm.config.Settings`."""

    # from_attributes: filled from the sections themselves (a whole section passes as it is).
    model_config = ConfigDict(frozen=True, from_attributes=True)

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """This model's part of ``settings``; ``PermanentError`` when it names what ``Settings`` lacks."""
        unknown = sorted(set(cls.model_fields) - set(Settings.model_fields))
        if unknown:
            raise PermanentError(f"{cls.__qualname__} reads no setting of MWM's named {', '.join(unknown)}")
        try:
            return cls.model_validate(settings, from_attributes=True)
        except ValidationError as exc:
            raise PermanentError(f"{cls.__qualname__} does not match MWM's settings: {exc}") from exc


S_co = TypeVar("S_co", bound=PluginSettings, covariant=True)
S = TypeVar("S", bound=PluginSettings)


class Configurable(Protocol[S_co]):
    """A plugin (a class or a factory) that declares the settings it is built with."""

    @property
    def settings_type(self) -> type[S_co]:
        """The `PluginSettings` model the plugin's constructor takes."""
        ...


def plugin_settings(plugin: Configurable[S], settings: Settings) -> S:
    """What ``plugin`` declares it reads of ``settings``, and nothing else.

    ``PermanentError`` when ``plugin`` declares no ``settings_type`` (a plugin written for the whole
    ``Settings``) or one that does not fit MWM's settings.
    """
    declared = getattr(plugin, "settings_type", None)
    if not (isinstance(declared, type) and issubclass(declared, PluginSettings)):
        name = getattr(plugin, "__qualname__", repr(plugin))
        raise PermanentError(
            f"plugin {name} declares no settings_type (a wm.plugins.PluginSettings model of what it reads)"
        )
    return plugin.settings_type.of(settings)
