"""MWM behind the IG emulator on the real services: settings, the emulator on a vhost of its own, clean-up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from consumers import ig_completions, ig_exports, ig_requests, monitor, scheduler
from devkit.dicom import write_ct_study
from devkit.ig_emulator import Destination, IgEmulator, Version, vhost
from schemas.applications import SinkDefinition
from schemas.events import ExportRequested, FileRef, SinkRef
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.config import Settings
from wm.registry.sinks import Sinks
from wm.runtime import Consumer

IG_CONSUMERS: list[Consumer[Any]] = [ig_requests.CONSUMER, ig_exports.CONSUMER, ig_completions.CONSUMER]
LOOP_CONSUMERS: list[Consumer[Any]] = [*IG_CONSUMERS, scheduler.CONSUMER, monitor.CONSUMER]


def with_ig(settings: Settings, url: str, name: str, **changes: Any) -> Settings:
    """``settings`` with the IG side on: the vhost ``name`` at ``url``, a bucket of its own."""
    ig = settings.ig.model_copy(
        update={
            "enabled": True,
            "url": url,
            "vhost": name,
            "bucket": f"{settings.object_store.bucket}-ig",
            "sweep_interval_s": 0.5,
            **changes,
        }
    )
    return settings.model_copy(update={"ig": ig})


@asynccontextmanager
async def ig_stack(
    settings: Settings, version: Version, destinations: dict[str, Destination] | None = None, **changes: Any
) -> AsyncIterator[tuple[Settings, IgEmulator]]:
    """The IG emulator of ``version`` on a vhost of its own, and MWM's settings pointing at it."""
    name = f"ig-t-{uuid.uuid4().hex[:8]}"
    async with vhost(settings, name) as url:
        ig_settings = with_ig(settings, url, name, **changes)
        emulator = IgEmulator(version, url, ig_settings, bucket=ig_settings.ig.bucket)
        emulator.destinations.update(destinations or {})
        try:
            async with emulator:
                yield ig_settings, emulator
        finally:
            await asyncio.to_thread(_remove_bucket, emulator)


def _remove_bucket(emulator: IgEmulator) -> None:
    for item in emulator.s3.list_objects(emulator.bucket, recursive=True):
        emulator.s3.remove_object(emulator.bucket, str(item.object_name))
    emulator.s3.remove_bucket(emulator.bucket)


async def add_ig_sink(settings: Settings, name: str, destinations: list[str], **fields: Any) -> None:
    """Create a ``monai-ig`` sink."""
    definition = SinkDefinition.model_validate(
        {"name": name, "type": "monai-ig", "args": {"destinations": destinations}, **fields}
    )
    async with Database(settings.mongo) as database:
        await Sinks(database).create(definition)


async def request_export(
    settings: Settings, tmp_path: Path, extra: bytes | None = None, job_id: str = "job-1"
) -> str:
    """Job outputs in MWM's bucket (two CT slices, plus a broken ``.dcm`` when ``extra``), and their
    export to the sink ``ig-pacs`` requested as the monitor does; returns the export task id."""
    study = write_ct_study(tmp_path / "out", slices_per_series=2, seed=3)
    files: list[FileRef] = []
    async with ObjectStore(settings.object_store) as objects:
        for index, path in enumerate(study.files):
            files.append(await objects.put_file(f"jobs/{job_id}/output/{index}.dcm", path))
        if extra is not None:
            broken = tmp_path / "broken.dcm"
            broken.write_bytes(extra)
            files.append(await objects.put_file(f"jobs/{job_id}/output/broken.dcm", broken))
    event = ExportRequested(
        correlation_id=f"corr-{job_id}",
        export_task_id=f"{job_id}.ig-pacs",
        job_id=job_id,
        application_id="mip",
        sink=SinkRef(name="ig-pacs", type="monai-ig"),
        files=files,
    )
    async with Bus(settings.bus) as bus:
        await bus.publish(event, message_id=event.export_task_id)
    return event.export_task_id
