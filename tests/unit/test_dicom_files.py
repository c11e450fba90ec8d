"""The DICOM sink's downloads: which files are held in memory, and that the budget always comes back."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from devkit.dicom import write_ct_study
from schemas.events import FileRef
from wm.config import ExportSettings
from wm.errors import TransientError
from wm.sinks.dicom_files import HELD, MemoryBudget, fetch
from wm.sinks.dicom_lanes import LocalFile


class Source:
    """A file source over local files that holds what ``hold`` allows, and can fail after asking it."""

    def __init__(self, files: dict[str, bytes], fail_after_hold: bool = False) -> None:
        self.files = files
        self.fail_after_hold = fail_after_hold

    async def download_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(path.write_bytes, self.files[key])

    async def fetch(self, key: str, path: Path, hold: Callable[[int], bool]) -> bytes | None:
        data = self.files[key]
        if hold(len(data)):
            if self.fail_after_hold:
                raise TransientError("connection reset while reading the body")
            return data
        await asyncio.to_thread(path.write_bytes, data)
        return None


@pytest.fixture
def slices(tmp_path: Path) -> dict[str, bytes]:
    study = write_ct_study(tmp_path / "study", slices_per_series=3, rows=32, columns=32, seed=3)
    return {path.name: path.read_bytes() for path in study.files}


def ref(key: str) -> FileRef:
    return FileRef(bucket="mwm-test", key=key, size=1)


def test_the_budget_holds_a_file_only_within_both_limits() -> None:
    budget = MemoryBudget()
    assert budget.take(100, file_limit=100, total_limit=150)
    assert not budget.take(101, file_limit=100, total_limit=1000)  # too large a file
    assert not budget.take(60, file_limit=100, total_limit=150)  # the total would pass its limit
    budget.give_back(100)
    assert budget.take(60, file_limit=100, total_limit=150)
    assert budget.used == 60


async def test_a_held_file_counts_until_it_is_gone(slices: dict[str, bytes], tmp_path: Path) -> None:
    key, data = next(iter(slices.items()))
    before = HELD.used
    local = await fetch(Source(slices), ref(key), tmp_path / "a.dcm", ExportSettings(sender="wire"))
    assert isinstance(local, LocalFile)
    assert local.data == data and not (tmp_path / "a.dcm").exists()
    assert local.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    (tmp_path / "reference.dcm").write_bytes(data)
    assert local.dataset_offset == split_dataset(tmp_path / "reference.dcm")[1]  # as pynetdicom reads it
    assert HELD.used == before + len(data)
    del local
    gc.collect()
    assert HELD.used == before


async def test_past_the_total_budget_files_go_to_disk(slices: dict[str, bytes], tmp_path: Path) -> None:
    (first, one), (second, _) = list(slices.items())[:2]
    settings = ExportSettings(sender="wire", in_memory_total_bytes=HELD.used + len(one))
    held = await fetch(Source(slices), ref(first), tmp_path / "1.dcm", settings)
    written = await fetch(Source(slices), ref(second), tmp_path / "2.dcm", settings)
    assert isinstance(held, LocalFile) and held.data is not None
    assert isinstance(written, LocalFile) and written.data is None
    assert written.path.read_bytes() == slices[second]


async def test_pynetdicoms_lanes_get_files_on_disk(slices: dict[str, bytes], tmp_path: Path) -> None:
    key = next(iter(slices))
    local = await fetch(Source(slices), ref(key), tmp_path / "a.dcm", ExportSettings(sender="pynetdicom"))
    assert isinstance(local, LocalFile) and local.data is None
    assert local.path.read_bytes() == slices[key]


async def test_a_held_file_that_is_not_dicom_fails_and_gives_its_bytes_back(tmp_path: Path) -> None:
    before = HELD.used
    result = await fetch(Source({"x": b"not dicom" * 40}), ref("x"), tmp_path / "x", ExportSettings())
    assert not isinstance(result, LocalFile)
    assert result.status == "failed" and "not a DICOM file" in (result.error or "")
    assert HELD.used == before


async def test_a_download_failing_after_the_hold_gives_its_bytes_back(
    slices: dict[str, bytes], tmp_path: Path
) -> None:
    before = HELD.used
    key = next(iter(slices))
    with pytest.raises(TransientError):
        await fetch(Source(slices, fail_after_hold=True), ref(key), tmp_path / "a.dcm", ExportSettings())
    assert HELD.used == before
