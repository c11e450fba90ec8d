"""The gateway's store and forward on the real services: spool, uploader, integrity, aborted associations.

dcmtk's storescu is the modality, except where a sender must do what storescu refuses to (send a truncated
data set, abort an association after some files): pynetdicom's SCU then. RabbitMQ and the S3 server are
stopped and started on this test run's own stack (``scripts/services``, ``MWM_SERVICES_PORT_OFFSET``).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from devkit.dicom import GeneratedStudy, write_ct_study
from devkit.peers import LOCALHOST, astorescu, free_port, wait_for_port
from devkit.pipeline import bound_queue
from devkit.services import REPO, services_command, settings_env, wait_for
from producers.gateway import serving, spool_directory
from schemas.events import PayloadArrived
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

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(live_settings: Settings) -> Settings:
    """The test's settings with the gateway on a free port and a short grace period for aborted sends."""
    return with_gateway(live_settings, host=LOCALHOST, port=free_port(), abort_grace_s=3.0)


@pytest.fixture
def study(tmp_path: Path) -> GeneratedStudy:
    return write_ct_study(tmp_path / "study", series=2, slices_per_series=5, rows=64, columns=64, seed=43)


STAGES = {"s3": "upload", "rabbitmq": "publish"}
"""The uploader's stage that fails when the service is down."""


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one of the gateway's metrics (0 when it has no sample yet)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def sop_uids(paths: Sequence[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths)


def announced(messages: Sequence[object]) -> list[PayloadArrived]:
    return [PayloadArrived.model_validate_json(message.body) for message in messages]  # type: ignore[attr-defined]


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
            spooled = spool_directory(settings).glob("*/*.dcm")
            assert metric("mwm_gateway_spool_bytes") == sum(path.stat().st_size for path in spooled) > 0
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


def send_raw(
    address: tuple[str, int],
    files: Sequence[Path],
    abort_after: int | None = None,
    called: str = AET,
    pause_s: float = 0.0,
) -> list[tuple[int, str]]:
    """C-STORE ``files`` as their bytes are, pynetdicom streaming each from disk; (status, Error Comment)s.

    With ``abort_after``, the association is aborted after that many files instead of released; with
    ``pause_s``, it waits that long before each file (a slow sender).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, never decoded
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established
    statuses: list[tuple[int, str]] = []
    for index, path in enumerate(files):
        if index == abort_after:
            assoc.abort()
            return statuses
        time.sleep(pause_s)
        response = assoc.send_c_store(path)
        statuses.append((int(response.Status), str(response.get("ErrorComment", ""))))
    assoc.release()
    return statuses


async def test_a_truncated_data_set_is_refused_with_an_error_comment_and_nothing_is_stored(
    settings: Settings, study: GeneratedStudy, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(study.files[0].read_bytes()[:-1000])
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        [(status, comment)] = await asyncio.to_thread(send_raw, gateway.address, [truncated])
        await asyncio.sleep(0.5)
        assert await drain(queue) == []
        assert gateway.spool.files == 0
    assert status == 0xC210
    assert comment.startswith("incomplete data set: element (7FE0,0010)"), comment
    assert await stored_keys(settings) == []


async def test_an_aborted_association_resent_whole_is_announced_once_as_the_resent_study(
    settings: Settings, study: GeneratedStudy
) -> None:
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        statuses = await asyncio.to_thread(send_raw, gateway.address, study.files, 4)
        assert statuses == [(0, "")] * 4
        await asyncio.sleep(1.0)
        assert await drain(queue) == [], "the files of an aborted association wait for the retry"
        result = await send(gateway, study.files)
        assert result.returncode == 0, result.stderr
        events = announced(await collect(queue, len(study.files)))
        await asyncio.sleep(settings.gateway.abort_grace_s + 1.5)  # the grace period ends: nothing more
        assert await drain(queue) == []
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files)
    assert len({event.payload_id for event in events}) == 1 and not any(event.interrupted for event in events)


async def test_an_aborted_association_not_resent_is_announced_after_the_grace_period_as_interrupted(
    settings: Settings, study: GeneratedStudy
) -> None:
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        statuses = await asyncio.to_thread(send_raw, gateway.address, study.files, 4)
        assert statuses == [(0, "")] * 4
        await asyncio.sleep(settings.gateway.abort_grace_s / 2)
        assert await drain(queue) == []
        events = announced(await collect(queue, 4, within_s=settings.gateway.abort_grace_s + 10))
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files[:4])
    assert all(event.interrupted for event in events)


async def test_a_retry_still_receiving_as_the_grace_period_ends_is_waited_for(
    settings: Settings, study: GeneratedStudy
) -> None:
    grace = settings.gateway.abort_grace_s
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        statuses = await asyncio.to_thread(send_raw, gateway.address, study.files, 4)
        assert statuses == [(0, "")] * 4
        await asyncio.sleep(grace - 1.0)
        # The resend starts before the grace period ends and resends the 4 held files last, after it ended.
        resent = study.files[::-1]
        statuses = await asyncio.to_thread(send_raw, gateway.address, resent, pause_s=0.25)
        assert statuses == [(0, "")] * len(resent)
        events = announced(await collect(queue, len(resent)))
        await asyncio.sleep(grace)
        assert await drain(queue) == []
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files)
    assert len({event.payload_id for event in events}) == 1 and not any(event.interrupted for event in events)


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
        spooled = list(spool_directory(settings).glob("*/*.dcm"))
        assert len(spooled) == len(study.files), "every accepted file is in the spool"
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
    assert list(spool_directory(settings).glob("*/*.dcm")) == []


async def send_to(settings: Settings, files: Sequence[Path]) -> subprocess.CompletedProcess[str]:
    return await astorescu(LOCALHOST, settings.gateway.port, AET, files, calling_aet=SENDER, timeout=60)
