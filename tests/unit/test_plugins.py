"""Plugins are found through their entry-point groups and given only the settings they declare; a missing
optional dependency is a clear error."""

from __future__ import annotations

import os
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from schemas.applications import ApplicationDefinition, SinkDefinition
from tests.unit.fakes import NoFiles
from wm.config import ArgoSettings, Settings
from wm.engines import ENGINE_GROUP, available_engines, load_engine
from wm.engines.local_runner import map_command
from wm.errors import PermanentError
from wm.plugins import PluginSettings, plugin_settings
from wm.sinks import ENTRY_POINT_GROUP, load_sink, sink_class
from wm.sinks.dicom import DicomSink

SECRETS = {
    "broker": "bus-password-1",
    "database": "mongo-password-2",
    "api token": "api-token-3",
    "admin key": "admin-key-4",
    "object store access key": "s3-access-5",
    "object store secret key": "s3-secret-6",
    "argo token": "argo-token-7",
    "IG broker": "ig-password-8",
    "gateway TLS key": "tls-key-9",
}
"""A secret of every kind MWM's settings hold, each recognisable in what a plugin is given."""

NEEDED = {
    ("mwm.engines", "local"): {"object store access key", "object store secret key"},  # its runner's uploads
    ("mwm.engines", "argo"): {"argo token"},
    ("mwm.sinks", "dicom"): set(),
    ("mwm.sinks", "monai-ig"): set(),
}
"""The secrets each built-in plugin needs (the rest it must not see)."""


@pytest.fixture
def secret_settings(tmp_path: Path) -> Settings:
    """Settings holding every kind of secret."""
    base = Settings(work_dir=str(tmp_path))
    sections = {
        "bus": base.bus.model_copy(update={"url": f"amqp://mwm:{SECRETS['broker']}@rabbit:5672/"}),
        "mongo": base.mongo.model_copy(update={"url": f"mongodb://mwm:{SECRETS['database']}@db:27017/"}),
        "api": base.api.model_copy(
            update={"token": SECRETS["api token"], "bootstrap_admin_key": SECRETS["admin key"]}
        ),
        "object_store": base.object_store.model_copy(
            update={
                "access_key": SECRETS["object store access key"],
                "secret_key": SECRETS["object store secret key"],
            }
        ),
        "argo": base.argo.model_copy(update={"token": SECRETS["argo token"]}),
        "ig": base.ig.model_copy(update={"url": f"amqp://ig:{SECRETS['IG broker']}@ig-rabbit:5672/"}),
        "gateway": base.gateway.model_copy(update={"tls_key": SECRETS["gateway TLS key"]}),
    }
    return base.model_copy(update=sections)


def test_the_built_in_plugins_are_declared_entry_points() -> None:
    assert sink_class("dicom") is DicomSink
    assert ENTRY_POINT_GROUP == "mwm.sinks"
    assert {"local", "argo"} <= set(available_engines())
    declared = {
        (group, entry.name) for group in ("mwm.engines", "mwm.sinks") for entry in entry_points(group=group)
    }
    assert set(NEEDED) <= declared


@pytest.mark.parametrize(("group", "name"), sorted(NEEDED))
def test_each_built_in_plugin_is_given_only_the_secrets_it_needs(
    secret_settings: Settings, group: str, name: str
) -> None:
    [entry] = entry_points(group=group, name=name)
    given = plugin_settings(entry.load(), secret_settings).model_dump_json()
    seen = {kind for kind, secret in SECRETS.items() if secret in given}
    assert seen == NEEDED[(group, name)]


class SpySettings(PluginSettings):
    argo: ArgoSettings
    work_dir: str


class SpyEngine:
    """An engine plugin that keeps what it was given."""

    settings_type = SpySettings

    def __init__(self, settings: SpySettings) -> None:
        self.given = settings


class LegacyEngine:
    """An engine written for the whole ``Settings``: it declares nothing."""

    def __init__(self, settings: Settings) -> None:
        raise AssertionError("never built")


class GreedySettings(PluginSettings):
    plugin_secrets: str


class GreedyEngine:
    """An engine that declares a setting MWM does not have."""

    settings_type = GreedySettings

    def __init__(self, settings: GreedySettings) -> None:
        raise AssertionError("never built")


def installed(monkeypatch: pytest.MonkeyPatch, module: str, group: str, **plugins: str) -> None:
    """Only ``plugins`` (name: ``module:attribute`` of this file) installed in ``group``, for ``module``."""
    fake = [EntryPoint(name, f"{__name__}:{target}", group) for name, target in plugins.items()]
    monkeypatch.setattr(f"{module}.entry_points", lambda group: fake)


def test_an_engine_is_built_with_exactly_the_settings_it_declares(
    monkeypatch: pytest.MonkeyPatch, secret_settings: Settings
) -> None:
    installed(monkeypatch, "wm.engines", ENGINE_GROUP, spy="SpyEngine")
    engine = load_engine("spy", secret_settings)
    assert isinstance(engine, SpyEngine)
    assert engine.given == SpySettings(argo=secret_settings.argo, work_dir=secret_settings.work_dir)
    assert set(type(engine.given).model_fields) == {"argo", "work_dir"}


def test_a_sink_is_built_with_its_own_settings_not_mwms(secret_settings: Settings) -> None:
    definition = SinkDefinition.model_validate(
        {"name": "pacs", "type": "dicom", "args": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    )
    sink = load_sink(definition, secret_settings, NoFiles())
    assert not isinstance(sink.settings, Settings)
    assert sink.settings.model_dump() == {
        "export": secret_settings.export.model_dump(),
        "work_dir": secret_settings.work_dir,
        "object_store": {"workers": secret_settings.object_store.workers},
    }


@pytest.mark.parametrize(
    ("plugin", "error"),
    [
        ("LegacyEngine", r"plugin LegacyEngine declares no settings_type"),
        ("GreedyEngine", r"GreedySettings reads no setting of MWM's named plugin_secrets"),
    ],
)
def test_a_plugin_that_does_not_declare_settings_mwm_has_is_refused(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, plugin: str, error: str
) -> None:
    installed(monkeypatch, "wm.engines", ENGINE_GROUP, other=plugin)
    with pytest.raises(PermanentError, match=error):
        load_engine("other", settings)


def test_the_argo_engine_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.delitem(sys.modules, "wm.engines.argo", raising=False)
    monkeypatch.setitem(sys.modules, "argo_workflows", None)  # as if argo-workflows were not installed

    with pytest.raises(PermanentError, match=r"engine 'argo' cannot be loaded.*pip install 'mwm\[argo\]'"):
        load_engine("argo", settings)


def test_an_application_the_local_engine_runs_as_a_command_sees_none_of_mwms_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MWM_MONGO__URL", f"mongodb://mwm:{SECRETS['database']}@db:27017/")
    monkeypatch.setenv("MWM_OBJECT_STORE__SECRET_KEY", SECRETS["object store secret key"])
    application = ApplicationDefinition.model_validate(
        {
            "name": "mip",
            "version": "1",
            "map": {"command": ["python", "-m", "app"], "environment": {"A": "1"}},
        },
    )
    _, environment = map_command(application, tmp_path)
    assert not [name for name in environment if name.startswith("MWM_")]
    assert environment["A"] == "1" and environment["MONAI_INPUTPATH"] == str(tmp_path / "input")
    assert environment["PATH"] == os.environ["PATH"], "the rest of the runner's environment is kept"
