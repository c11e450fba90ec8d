"""The gateway and a complete study through outages: RabbitMQ or the S3 server stopped while a modality
sends, the spool full while S3 is down, a gateway killed with files in its spool while S3 is down, a service
restarted during a send that must still end in one job on the whole study and one result (moved from
tests/integration/test_gateway_spool.py and test_complete_studies.py: they stop and restart services, so
they run on the fault suite's own stack, ``scripts/faults``)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from devkit.dicom import GeneratedStudy
from devkit.peers import LOCALHOST, astorescu, wait_for_port
from devkit.pipeline import bound_queue
from devkit.services import REPO, services_command, settings_env, wait_for
from producers.gateway import serving, spool_directory
from schemas.events import BucketReady, JobFinished, PayloadArrived
from tests.integration import test_gateway_spool as spool
from tests.integration.test_complete_studies import SETTLE_S, ct, stack
from tests.integration.test_gateway import (
    AET,
    SENDER,
    collect,
    drain,
    map_ae_title,
    send,
    stored_keys,
    with_gateway,
)
from wm.config import Settings

# The spool tests' fixtures, shared: the gateway on a free port with a short grace period, a small study.
settings = spool.settings
study = spool.study
announced, sop_uids = spool.announced, spool.sop_uids


STAGES = {"s3": "upload", "rabbitmq": "publish"}
"""The uploader's stage that fails when the service is down."""


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one of the gateway's metrics (0 when it has no sample yet)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.parametrize("service", ["s3", "rabbitmq"])
async def test_with_a_service_down_every_store_succeeds_and_each_file_is_announced_once_it_is_back(
    settings: Settings, study: GeneratedStudy, service: str
) -> None:
    await map_ae_title(settings)
    async with serving(settings) as (gateway, _):
        services_command("stop", service)
        failures_before = metric("mwm_gateway_upload_failures_total", {"stage": STAGES[service]})
        try:
            result = await send(gateway, study.files, extra_args=["-v"])
            assert gateway.spool.files == len(study.files), "the files wait in the spool"

            async def failed() -> bool:  # the service stays down until an upload or publish failed
                return (
                    metric("mwm_gateway_upload_failures_total", {"stage": STAGES[service]}) > failures_before
                )

            await wait_for(failed, 30, f"a failed {STAGES[service]}")
            assert metric("mwm_gateway_spool_files") == len(study.files)
            on_disk = spool.spooled(spool_directory(settings))
            assert metric("mwm_gateway_spool_bytes") == sum(record.length for record in on_disk) > 0
            assert metric("mwm_gateway_spool_oldest_age_seconds") > 0
        finally:
            services_command("start", service)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Received Store Response (Success)") == len(study.files), result.stderr
        # Bound once the broker is back (a restart drops exclusive queues); until then the announcements,
        # published mandatory, find no queue and are retried.
        async with bound_queue(settings, PayloadArrived.event_type) as queue:
            events = announced(await collect(queue, len(study.files), within_s=90))

        async def spool_empty() -> bool:
            return gateway.spool.files == 0

        await wait_for(spool_empty, 10, "an empty spool")
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files)
    assert len({event.payload_id for event in events}) == 1
    assert sorted(await stored_keys(settings)) == sorted(event.file.key for event in events)


async def test_a_full_spool_refuses_with_out_of_resources_and_loses_nothing_accepted(
    settings: Settings, study: GeneratedStudy
) -> None:
    size = study.files[0].stat().st_size
    settings = with_gateway(
        settings, spool_max_bytes=3 * size
    )  # three files fit (the limit is checked first)
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        services_command("stop", "s3")
        try:
            result = await send(gateway, study.files[:5], extra_args=["-v", "--no-halt"])
            spooled = gateway.spool.files
        finally:
            services_command("start", "s3")
        assert spooled == 3
        assert result.stderr.count("Received Store Response (Success)") == 3, result.stderr
        assert result.stderr.count("Received Store Response (Refused: OutOfResources)") == 2, result.stderr
        events = announced(await collect(queue, 3, within_s=90))
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files[:3])


def start_gateway(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "wm", "gateway"],
            env=settings_env(settings),
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def test_a_gateway_killed_with_files_in_its_spool_uploads_and_announces_each_once_after_restart(
    settings: Settings, study: GeneratedStudy, tmp_path: Path
) -> None:
    await map_ae_title(settings)
    log = tmp_path / "gateway.log"
    async with bound_queue(settings, PayloadArrived.event_type) as queue:
        gateway = start_gateway(settings, log)
        await asyncio.to_thread(
            wait_for_port, LOCALHOST, settings.gateway.port, timeout=60.0, process=gateway
        )
        services_command("stop", "s3")
        try:
            result = await send_to(settings, study.files)
            assert result.returncode == 0, result.stderr + log.read_text()
            gateway.send_signal(signal.SIGKILL)
            await asyncio.to_thread(gateway.wait)
        finally:
            services_command("start", "s3")
        assert len(spool.spooled(spool_directory(settings))) == len(study.files), "every file is in the spool"
        restarted = start_gateway(settings, log)
        try:
            messages = await collect(queue, len(study.files), within_s=90)
            await asyncio.sleep(1.0)
            messages += await drain(queue)
        finally:
            restarted.terminate()
            await asyncio.to_thread(restarted.wait)
    events = announced(messages)
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files)
    assert len({message.message_id for message in messages}) == len(study.files)
    assert spool.spooled(spool_directory(settings)) == []


async def send_to(settings: Settings, files: Sequence[Path]) -> subprocess.CompletedProcess[str]:
    return await astorescu(LOCALHOST, settings.gateway.port, AET, files, calling_aet=SENDER, timeout=60)


@pytest.mark.parametrize("service", ["rabbitmq", "s3"])
async def test_a_service_restarted_during_a_send_gives_one_job_on_the_whole_study_and_one_result(
    live_settings: Settings, tmp_path: Path, service: str
) -> None:
    study = ct(tmp_path, 60, seed=61)
    async with stack(live_settings, tmp_path) as mwm:
        services_command("stop", service)
        try:
            await mwm.send(study.files)
        finally:
            services_command("start", service)
        [finished] = await mwm.jobs(1, timeout=180)
        await asyncio.sleep(SETTLE_S)
        assert len(mwm.of(JobFinished)) == 1
        [ready] = mwm.of(BucketReady)
        assert len(ready.files) == len(study.files)
        assert finished.status == "succeeded", finished.message
        assert len(mwm.pacs.received_files()) == 1, "one result (one MIP) at the PACS"
