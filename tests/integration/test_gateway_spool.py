"""The gateway's store and forward on the real services: spool, uploader, integrity, aborted associations.

dcmtk's storescu is the modality, except where a sender must do what storescu refuses to (send a truncated
data set, abort an association after some files): pynetdicom's SCU then. The tests with RabbitMQ or the S3
server down are in the fault suite (tests/faults/test_gateway_outages.py), on a stack of their own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.acse import ACSE
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from devkit.dicom import GeneratedStudy, write_ct_study
from devkit.peers import LOCALHOST, free_port
from devkit.pipeline import bound_queue
from producers.gateway import serving
from producers.gateway_slots import SlotRecord, Slots
from producers.gateway_spool import INCOMING, SLOTS
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
from wm.pynetdicom_patches import dul_socket

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(live_settings: Settings) -> Settings:
    """The test's settings with the gateway on a free port and a short grace period for aborted sends."""
    return with_gateway(live_settings, host=LOCALHOST, port=free_port(), abort_grace_s=3.0)


@pytest.fixture
def study(tmp_path: Path) -> GeneratedStudy:
    return write_ct_study(tmp_path / "study", series=2, slices_per_series=5, rows=64, columns=64, seed=43)


def sop_uids(paths: Sequence[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths)


def spooled(directory: Path) -> list[SlotRecord]:
    """The accepted files a spool directory holds on disk, as a restarted gateway would find them."""
    return [record for _, record in Slots(directory / SLOTS, directory / INCOMING).scan()]


def announced(messages: Sequence[object]) -> list[PayloadArrived]:
    return [PayloadArrived.model_validate_json(message.body) for message in messages]  # type: ignore[attr-defined]


def send_raw(
    address: tuple[str, int],
    files: Sequence[Path],
    abort_after: int | None = None,
    called: str = AET,
    pause_s: float = 0.0,
    hang_up_on_release: bool = False,
) -> list[tuple[int, str]]:
    """C-STORE ``files`` as their bytes are, pynetdicom streaming each from disk; (status, Error Comment)s.

    With ``abort_after``, the association is aborted after that many files instead of released; with
    ``pause_s``, it waits that long before each file (a slow sender); with ``hang_up_on_release``, it
    sends its A-RELEASE-RQ and closes the connection without waiting for the answer.
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
    if hang_up_on_release:
        connection = dul_socket(assoc)
        assert connection is not None
        connection.sendall(A_RELEASE_RQ().encode())
        connection.shutdown(socket.SHUT_RDWR)
        assoc.kill()
        return statuses
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


async def test_a_sender_that_hangs_up_right_after_its_release_request_sent_a_whole_study(
    settings: Settings, study: GeneratedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its connection closes as the gateway answers the release: the gateway must not see an abort. The
    # gateway's association thread is held after its answer, so its DUL thread sees the close first.
    send_release = ACSE.send_release

    def answer_slowly(self: ACSE, is_response: bool = False) -> None:
        send_release(self, is_response)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_release", answer_slowly)
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        statuses = await asyncio.to_thread(send_raw, gateway.address, study.files, hang_up_on_release=True)
        assert statuses == [(0, "")] * len(study.files)
        events = announced(await collect(queue, len(study.files), within_s=settings.gateway.abort_grace_s))
    assert sorted(event.dicom.sop_instance_uid for event in events) == sop_uids(study.files)
    assert not any(event.interrupted for event in events), "announced as a study that ended well"


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
