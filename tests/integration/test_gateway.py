"""The DICOM gateway on the real services, with dcmtk's storescu and echoscu as the peers (never skipped).

Each test runs the gateway in this process (pynetdicom threads, the test's event loop) on a free port, with
its own bucket, exchange and database, and an AE title mapping made through `wm.registry.Registry`.
Announcements are read from a queue of the test's own, bound to ``mwm.payload.arrived``.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from prometheus_client import REGISTRY
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from devkit.dicom import GeneratedStudy, write_ct_study
from devkit.peers import LOCALHOST, astorescu, dcmtk_tool, free_port, peer_env
from devkit.pipeline import bound_queue
from devkit.services import wait_for
from producers.gateway import Gateway, serving
from producers.gateway_spool import SpooledFile
from schemas.applications import CallingPeer
from schemas.events import PayloadArrived
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.registry import Registry

pytestmark = pytest.mark.integration

AET = "MWM-CT"
SENDER = "CT-SCANNER"


def with_gateway(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with these gateway settings changed."""
    return settings.model_copy(update={"gateway": settings.gateway.model_copy(update=changes)})


@pytest.fixture
def settings(live_settings: Settings) -> Settings:
    """The test's settings with the gateway on a free port."""
    return with_gateway(live_settings, host=LOCALHOST, port=free_port())


@pytest.fixture
def study(tmp_path: Path) -> GeneratedStudy:
    return write_ct_study(tmp_path / "study", series=2, slices_per_series=3, rows=64, columns=64, seed=41)


async def map_ae_title(
    settings: Settings, callers: Sequence[CallingPeer] = (CallingPeer(ae_title=SENDER),)
) -> None:
    """Map ``AET`` to an application, allowing ``callers`` (empty: anyone)."""
    async with Database(settings.mongo) as database:
        await Registry(database).ae_titles.map(AET, "ct-liver", callers)


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Every message now in ``queue`` (acknowledged)."""
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


async def collect(queue: AbstractQueue, count: int, within_s: float = 20) -> list[AbstractIncomingMessage]:
    """Wait until ``count`` messages arrived, then return them (and any extra ones)."""
    messages: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        messages.extend(await drain(queue))
        return len(messages) >= count

    await wait_for(enough, within_s, f"{count} payload.arrived events")
    await asyncio.sleep(0.2)  # a margin for duplicates that must not come
    return messages + await drain(queue)


async def stored_keys(settings: Settings) -> list[str]:
    async with ObjectStore(settings.object_store) as objects:
        return [ref.key for ref in await objects.list("payloads/")]


async def send(
    gateway: Gateway,
    files: Path | Sequence[Path],
    *,
    called: str = AET,
    calling: str = SENDER,
    extra_args: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    host, port = gateway.address
    return await astorescu(
        host, port, called, files, calling_aet=calling, timeout=timeout, extra_args=extra_args
    )


async def test_a_study_is_stored_byte_for_byte_and_announced_once_per_file(
    settings: Settings, study: GeneratedStudy, tmp_path: Path
) -> None:
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        result = await send(gateway, study.files[0].parent.parent)
        assert result.returncode == 0, result.stderr
        messages = await collect(queue, len(study.files))
    events = [PayloadArrived.model_validate_json(message.body) for message in messages]
    assert len(events) == len(study.files) == 6
    payload_ids = {event.payload_id for event in events}
    assert len(payload_ids) == 1, "one payload per association"
    for message, event in zip(messages, events, strict=True):
        assert message.type == "mwm.payload.arrived.v1" and message.message_id
        assert message.correlation_id == event.correlation_id == event.payload_id
        assert (event.source, event.calling_ae_title, event.called_ae_title) == ("dimse", SENDER, AET)
        assert event.dicom.study_instance_uid == study.study_uid
        assert event.dicom.series_instance_uid in study.series_uids
        assert event.file.key == (
            f"payloads/{event.payload_id}/{study.study_uid}/{event.dicom.series_instance_uid}/"
            f"{event.dicom.sop_instance_uid}.dcm"
        )
    assert sorted(await stored_keys(settings)) == sorted(event.file.key for event in events)
    await assert_identical_to_sources(settings, events, study, tmp_path / "downloaded")


async def assert_identical_to_sources(
    settings: Settings, events: list[PayloadArrived], study: GeneratedStudy, directory: Path
) -> None:
    """Each stored file is valid Part-10 with the source's pixel data, byte for byte."""
    sources = {str(pydicom.dcmread(path).SOPInstanceUID): pydicom.dcmread(path) for path in study.files}
    async with ObjectStore(settings.object_store) as objects:
        for event in events:
            path = directory / f"{event.dicom.sop_instance_uid}.dcm"
            await objects.download_file(event.file.key, path)
            assert path.stat().st_size == event.file.size
            stored = pydicom.dcmread(path)
            source = sources[event.dicom.sop_instance_uid]
            assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
            assert stored.PixelData == source.PixelData
            assert stored.SOPInstanceUID == event.dicom.sop_instance_uid


@pytest.mark.parametrize(
    ("called", "callers", "diagnostic"),
    [
        ("UNKNOWN-AE", [CallingPeer(ae_title=SENDER)], "Called AE Title Not Recognized"),
        (AET, [CallingPeer(ae_title="SOMEONE-ELSE")], "Calling AE Title Not Recognized"),
        (AET, [CallingPeer(ae_title=SENDER, host="10.11.12.13")], "Calling AE Title Not Recognized"),
    ],
    ids=["unknown-called-ae", "calling-ae-not-allowed", "calling-ae-from-another-host"],
)
async def test_an_association_that_is_not_allowed_is_rejected_and_nothing_is_stored(
    settings: Settings, study: GeneratedStudy, called: str, callers: list[CallingPeer], diagnostic: str
) -> None:
    await map_ae_title(settings, callers)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        result = await send(gateway, study.files[:2], called=called, extra_args=["-v"])
        await asyncio.sleep(0.2)
        assert await drain(queue) == []
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and diagnostic in result.stderr, result.stderr
    assert await stored_keys(settings) == []


async def test_an_empty_allow_list_accepts_any_caller(settings: Settings, study: GeneratedStudy) -> None:
    await map_ae_title(settings, callers=())
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        result = await send(gateway, study.files[:1], calling="ANY-SENDER")
        assert result.returncode == 0, result.stderr
        assert len(await collect(queue, 1)) == 1


async def test_a_file_the_gateway_cannot_understand_fails_and_nothing_is_stored_or_published(
    settings: Settings, study: GeneratedStudy, tmp_path: Path
) -> None:
    unusable = tmp_path / "no-study-uid.dcm"
    dataset = pydicom.dcmread(study.files[0])
    del dataset.StudyInstanceUID
    dataset.save_as(unusable, enforce_file_format=True)
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        result = await send(gateway, [unusable], extra_args=["-v"])
        await asyncio.sleep(0.2)
        assert await drain(queue) == []
    assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr
    assert await stored_keys(settings) == []


async def test_c_echo_is_answered_for_a_mapped_ae_title(settings: Settings) -> None:
    await map_ae_title(settings)
    async with serving(settings) as (gateway, _):
        host, port = gateway.address
        echo = [dcmtk_tool("echoscu"), "-aet", SENDER, "-aec", AET, host, str(port)]
        result = await asyncio.to_thread(
            subprocess.run, echo, capture_output=True, text=True, timeout=30, env=peer_env()
        )
    assert result.returncode == 0, result.stderr


async def test_accepted_sockets_have_tcp_nodelay(settings: Settings) -> None:
    await map_ae_title(settings)
    async with serving(settings) as (gateway, _):
        host, port = gateway.address
        scu = AE(ae_title=SENDER)
        scu.add_requested_context(Verification)
        assoc = await asyncio.to_thread(scu.associate, host, port, ae_title=AET)
        try:
            assert assoc.is_established
            accepted = [a for a in gateway.ae.active_associations if a.is_acceptor]
            assert len(accepted) == 1
            connection = accepted[0].dul.socket
            assert connection is not None and connection.socket is not None
            server_socket = connection.socket
            assert server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            await asyncio.to_thread(assoc.release)


def closed_by_peer(connection: socket.socket, within_s: float) -> bool:
    """Whether the gateway closes ``connection`` within ``within_s`` seconds (we never write to it)."""
    connection.settimeout(within_s)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_connection_that_sends_nothing_is_closed_after_the_acse_timeout(
    settings: Settings, tls: bool, request: pytest.FixtureRequest
) -> None:
    """With TLS, a connection that never starts its handshake; without, one that sends no A-ASSOCIATE-RQ."""
    settings = with_gateway(settings, acse_timeout_s=1.0)
    if tls:
        settings = with_tls(settings, request.getfixturevalue("tls_files"))
    async with serving(settings) as (gateway, _):
        with socket.create_connection(gateway.address, timeout=5) as silent:
            started = time.monotonic()
            closed = await asyncio.to_thread(closed_by_peer, silent, 10)
            waited_s = time.monotonic() - started
    assert closed, "the gateway kept a silent connection open"
    assert 0.5 < waited_s < 5, waited_s


DRAIN_TIMEOUT_S = 20.0


async def test_stop_closes_connections_without_an_association_request_at_once_and_drains_a_study(
    settings: Settings, study: GeneratedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway's own timeout would close the silent connection only long after the drain timeout.
    settings = with_gateway(settings, acse_timeout_s=3 * DRAIN_TIMEOUT_S)
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue:
        async with serving(settings) as (gateway, _):
            holding, release = threading.Event(), threading.Event()
            accept = gateway.spool.accept

            def held_accept(*args: Any) -> SpooledFile:
                holding.set()
                release.wait(30)
                return accept(*args)

            # Holds the study's first file until stop has begun, so stop meets an established association.
            monkeypatch.setattr(gateway.spool, "accept", held_accept)
            socket.create_connection(gateway.address, timeout=5).close()  # a TCP probe: connects, leaves
            with socket.create_connection(gateway.address, timeout=5) as silent:  # connects, never speaks
                sending = asyncio.create_task(send(gateway, study.files))
                assert await asyncio.to_thread(holding.wait, 20)
                started = time.monotonic()
                stopping = asyncio.create_task(gateway.stop(DRAIN_TIMEOUT_S))
                closed = await asyncio.to_thread(closed_by_peer, silent, DRAIN_TIMEOUT_S + 5)
                release.set()
                await stopping
                stopped_s = time.monotonic() - started
            assert stopped_s < 5, (
                f"stop took {stopped_s:.1f}s: it waited for connections that asked for nothing"
            )
            assert closed, "stop left the silent connection open"
            result = await sending
            assert result.returncode == 0, result.stderr
        # What the stopped gateway had not announced yet is in its spool: the next one announces it.
        async with serving(with_gateway(settings, port=free_port())):
            messages = await collect(queue, len(study.files))
    events = [PayloadArrived.model_validate_json(message.body) for message in messages]
    assert sorted(event.dicom.sop_instance_uid for event in events) == sorted(
        str(pydicom.dcmread(path).SOPInstanceUID) for path in study.files
    )


# -- TLS ------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its unencrypted key, made with the openssl CLI."""
    cert, key = tmp_path / "gateway-cert.pem", tmp_path / "gateway-key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", f"/CN={LOCALHOST}", "-addext", f"subjectAltName=IP:{LOCALHOST}"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60
    )
    return cert, key


def with_tls(settings: Settings, tls_files: tuple[Path, Path], **changes: Any) -> Settings:
    cert, key = tls_files
    return with_gateway(settings, tls_cert=str(cert), tls_key=str(key), **changes)


def tls_args(tls_files: tuple[Path, Path]) -> list[str]:
    """storescu over TLS without a client certificate, trusting only the gateway's certificate."""
    return ["+tla", "+cf", str(tls_files[0])]


async def test_a_study_sent_over_tls_is_stored_and_announced(
    settings: Settings, study: GeneratedStudy, tls_files: tuple[Path, Path]
) -> None:
    settings = with_tls(settings, tls_files)
    await map_ae_title(settings)
    async with bound_queue(settings, PayloadArrived.event_type) as queue, serving(settings) as (gateway, _):
        result = await send(gateway, study.files, extra_args=tls_args(tls_files))
        assert result.returncode == 0, result.stderr
        events = [PayloadArrived.model_validate_json(m.body) for m in await collect(queue, len(study.files))]
        plain = await send(gateway, study.files[:1])
        assert plain.returncode != 0, "a sender without TLS got through the TLS port"
        await asyncio.sleep(0.2)
        assert await drain(queue) == []
    assert len(events) == len(study.files)
    assert len({event.payload_id for event in events}) == 1
    assert sorted(await stored_keys(settings)) == sorted(event.file.key for event in events)


async def test_a_silent_connection_to_the_tls_port_blocks_neither_other_senders_nor_stop(
    settings: Settings, study: GeneratedStudy, tls_files: tuple[Path, Path]
) -> None:
    # A long ACSE timeout: the other sender must get through while the silent peer is still there. Time limits
    # of our own, so a gateway that is held up fails the test rather than hanging it; leaving the `with`
    # closes the silent connection, which frees such a gateway for the fixture's stop.
    settings = with_tls(settings, tls_files, acse_timeout_s=120.0)
    await map_ae_title(settings)
    async with (
        bound_queue(settings, PayloadArrived.event_type) as queue,
        serving(settings) as (gateway, _),
    ):
        with socket.create_connection(gateway.address, timeout=5) as silent:  # connects, never speaks
            await asyncio.sleep(0.5)  # the gateway has accepted it
            started = time.monotonic()
            try:
                result = await send(gateway, study.files[:2], extra_args=tls_args(tls_files), timeout=20)
            except TimeoutError:
                pytest.fail("a TLS sender was held up by a silent connection to the gateway")
            sent_s = time.monotonic() - started
            assert result.returncode == 0, result.stderr
            assert sent_s < 10, f"sending 2 files over TLS took {sent_s:.1f}s next to a silent connection"
            assert len(await collect(queue, 2)) == 2

            started = time.monotonic()
            try:
                async with asyncio.timeout(15):
                    await gateway.stop(DRAIN_TIMEOUT_S)
            except TimeoutError:
                pytest.fail("stop was held up by a silent connection to the TLS port")
            stopped_s = time.monotonic() - started
            closed = await asyncio.to_thread(closed_by_peer, silent, 5)
    assert stopped_s < 5, f"stop took {stopped_s:.1f}s next to a silent connection"
    assert closed, "stop left the silent connection open"


def tls_handshakes(outcome: str) -> float:
    return REGISTRY.get_sample_value("mwm_gateway_tls_handshakes_total", {"outcome": outcome}) or 0.0


async def test_connections_past_max_associations_in_their_tls_handshake_are_closed_at_once(
    settings: Settings, study: GeneratedStudy, tls_files: tuple[Path, Path]
) -> None:
    # Two silent peers fill the handshakes; a third connection is closed on accept, not kept in a thread for
    # the ACSE timeout. Once one of the two leaves, a real sender gets through.
    settings = with_tls(settings, tls_files, acse_timeout_s=120.0, max_associations=2)
    await map_ae_title(settings)
    refused, failed = tls_handshakes("refused"), tls_handshakes("failed")
    async with (
        bound_queue(settings, PayloadArrived.event_type) as queue,
        serving(settings) as (gateway, _),
    ):
        with (
            socket.create_connection(gateway.address, timeout=5) as first,
            socket.create_connection(gateway.address, timeout=5),
        ):
            await asyncio.sleep(0.5)  # both accepted, both in their handshake
            with socket.create_connection(gateway.address, timeout=5) as third:
                assert await asyncio.to_thread(closed_by_peer, third, 5), "a third handshake was let in"
            assert tls_handshakes("refused") == refused + 1

            first.close()

            async def first_handshake_ended() -> bool:
                return tls_handshakes("failed") == failed + 1

            await wait_for(first_handshake_ended, 10, "the end of the first peer's handshake")
            result = await send(gateway, study.files[:1], extra_args=tls_args(tls_files), timeout=20)
            assert result.returncode == 0, result.stderr
            assert len(await collect(queue, 1)) == 1
