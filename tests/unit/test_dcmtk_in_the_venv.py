"""With the venv activated, the dcmtk commands of the docs reach dcmtk, not pynetdicom's look-alikes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from devkit.services import REPO

VENV_BIN = Path(sys.executable).parent


def test_the_documented_dcmtk_tools_are_dcmtks_with_the_venv_first_on_path() -> None:
    readme = (REPO / "README.md").read_text()
    tools = sorted(set(re.findall(r"^/usr/bin/(\w+) ", readme, re.M)))
    assert {"echoscu", "storescu"} <= set(tools), tools
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    for tool in tools:
        found = shutil.which(tool, path=path)
        assert found == f"/usr/bin/{tool}", f"{tool} resolves to {found} with the venv activated"
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
        assert "dcmtk" in version.stdout.lower(), version.stdout
