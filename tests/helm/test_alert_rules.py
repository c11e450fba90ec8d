"""The shipped alert rules pass ``promtool check rules`` and fire as ``alert_rules_test.yaml`` says.

promtool is at ${MWM_CACHE_DIR:-$HOME/.cache/mwm}/bin/promtool (``helm/check.sh`` builds it from the Go module
proxy): the tests fail, not skip, without it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helm.test_chart import CHART

RULES = CHART / "files" / "prometheus-rules.yaml"
CASES = Path(__file__).with_name("alert_rules_test.yaml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(os.environ.get("MWM_CACHE_DIR") or Path.home() / ".cache" / "mwm") / "bin" / "promtool"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"promtool is not installed at {binary}: run helm/check.sh first")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout + result.stderr


def test_the_rules_fire_on_the_cases_they_are_for() -> None:
    result = promtool("test", "rules", str(CASES))
    assert result.returncode == 0, result.stdout + result.stderr
