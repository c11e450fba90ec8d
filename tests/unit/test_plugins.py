"""Plugins are found through their entry-point groups; a missing optional dependency is a clear error."""

from __future__ import annotations

import sys

import pytest

from wm.config import Settings
from wm.engines import available_engines, load_engine
from wm.errors import PermanentError
from wm.sinks import ENTRY_POINT_GROUP, sink_class
from wm.sinks.dicom import DicomSink


def test_the_built_in_plugins_are_declared_entry_points() -> None:
    assert sink_class("dicom") is DicomSink
    assert ENTRY_POINT_GROUP == "mwm.sinks"
    assert {"local", "argo"} <= set(available_engines())


def test_the_argo_engine_without_its_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.delitem(sys.modules, "wm.engines.argo", raising=False)
    monkeypatch.setitem(sys.modules, "argo_workflows", None)  # as if argo-workflows were not installed

    with pytest.raises(PermanentError, match=r"engine 'argo' cannot be loaded.*pip install 'mwm\[argo\]'"):
        load_engine("argo", settings)
