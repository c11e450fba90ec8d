"""Configuration from the environment."""

from __future__ import annotations

import pytest

from wm.config import Settings, settings_table


def test_nested_settings_come_from_mwm_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MWM_BUS__URL", "amqp://user:pw@rabbit:5672/")
    monkeypatch.setenv("MWM_RETRY__ATTEMPTS", "9")
    settings = Settings()
    assert settings.bus.url == "amqp://user:pw@rabbit:5672/"
    assert settings.retry.attempts == 9


def test_an_invalid_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MWM_BUS__PREFETCH", "0")
    with pytest.raises(ValueError, match="prefetch"):
        Settings()


def test_the_documented_table_lists_every_setting() -> None:
    table = settings_table()
    for section, field in Settings.model_fields.items():
        assert f"MWM_{section.upper()}" in table, field
    assert "`MWM_OBSERVABILITY__DRAIN_TIMEOUT_S`" in table
