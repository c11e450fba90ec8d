"""The README's configuration table is generated from the settings; this keeps it from drifting."""

from __future__ import annotations

from devkit.services import REPO
from wm.config import settings_table


def test_the_readme_configuration_table_matches_the_settings() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- config-table:start")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- config-table:end -->")].rstrip()
    assert table == settings_table(), "regenerate it: python -m wm.config"
