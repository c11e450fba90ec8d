"""The Payloads API over HTTP (uvicorn on a free port) on the real broker, object store and database."""

from __future__ import annotations

import io
import struct
import tarfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from devkit.dicom import write_corrupt_file, write_ct_study
from devkit.peers import LOCALHOST, free_port
from devkit.pipeline import EventTap, mip_application, register, tap
from devkit.process import api_process, peak_rss_mb
from devkit.services import queue_settled
from schemas.events import PayloadArrived
from tests.support.api import api_settings, assert_problem
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings
from wm.stores.auth import ApiKeys, Scope

BOUNDARY = "mwm-test-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MB = 1024 * 1024
LARGE_PIXEL_DATA_MB = 160
PEAK_RSS_GROWTH_LIMIT_MB = LARGE_PIXEL_DATA_MB / 2
"""A server holding the file would grow by at least its size. Measured: 40-60 MB for 52, 160 and 320 MB
files, nearly all of it the object store's multipart upload (the minio SDK reads up to 4 parts of 8 MiB at
once: 3 in flight, 1 being read); the route itself adds a request chunk and at most 1 MiB of spooled part."""


def related_body(parts: Sequence[bytes]) -> bytes:
    """A DICOMweb STOW-shaped ``multipart/related`` body with one ``application/dicom`` part per file."""
    chunks = [
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    ]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def client(settings: Settings, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=settings.api.url, headers=headers, timeout=60)


async def post_dicom(
    http: httpx.AsyncClient, content: bytes | AsyncIterator[bytes], **params: str | list[str]
) -> httpx.Response:
    """``POST /payloads`` of one ``application/dicom`` body."""
    headers = {"Content-Type": "application/dicom"}
    return await http.post("/payloads", params=params, content=content, headers=headers)


async def streamed(path: Path) -> AsyncIterator[bytes]:
    """The file in 1 MB chunks (the client never holds it whole either)."""
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            yield chunk


def large_ct_file(directory: Path, pixel_megabytes: int) -> Path:
    """A CT file whose Pixel Data is ``pixel_megabytes`` MB of zeros, written without holding them in memory.

    Only its header matters to MWM (the identifiers are read with ``stop_before_pixels``).
    """
    path = write_ct_study(directory, slices_per_series=1, rows=16, columns=16).files[0]
    pixel_data_header = b"\xe0\x7f\x10\x00OW\x00\x00"  # (7FE0,0010) OW, explicit VR little endian
    header = path.read_bytes()[
        : -(16 * 16 * 2 + 4)
    ]  # Pixel Data is the last element: cut its length and value
    assert header.endswith(pixel_data_header)
    with path.open("wb") as file:
        file.write(header + struct.pack("<I", pixel_megabytes * MB))
        for _ in range(pixel_megabytes):
            file.write(bytes(MB))
    return path


async def api_key(settings: Settings, scope: Scope) -> str:
    async with Database(settings.mongo) as database:
        _, token = await ApiKeys(database).create(f"{scope}-{uuid.uuid4().hex[:6]}", scope)
    return token


@pytest.fixture
async def api(live_settings: Settings) -> AsyncIterator[Settings]:
    """The API serving on a free port, with the example application mapped to ``MWM-MIP``."""
    settings = api_settings(live_settings, free_port())
    await register(settings, mip_application())
    async with running(create_app(settings), LOCALHOST, settings.api.port):
        yield settings


@asynccontextmanager
async def arrivals(settings: Settings) -> AsyncIterator[EventTap]:
    """A tap on ``payload.arrived`` (it also makes the event routable, as discovery's queue would)."""
    async with tap(settings, PayloadArrived.event_type) as events:
        yield events


async def test_a_study_uploaded_as_multipart_related_is_stored_announced_and_downloadable(
    api: Settings, tmp_path: Path
) -> None:
    study = write_ct_study(tmp_path, series=2, slices_per_series=3, rows=32, columns=32)
    contents = {path.name + str(path.parent.name): path.read_bytes() for path in study.files}
    async with arrivals(api) as events, client(api, api.api.token) as http:
        response = await http.post(
            "/payloads",
            params={"called_ae_title": "MWM-MIP"},
            content=related_body(list(contents.values())),
            headers={"Content-Type": RELATED},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        announced: list[PayloadArrived] = await events.wait_for(PayloadArrived, len(study.files), 10)
        payload_id = body["payload_id"]
        listing = (await http.get(f"/payloads/{payload_id}", params={"page_size": 200})).json()
        first = body["files"][0]
        download = await http.get(f"/payloads/{payload_id}/files/{first['sop_instance_uid']}")
        archive = await http.get(f"/payloads/{payload_id}/archive")
    assert body["failed"] == [] and [f["part"] for f in body["files"]] == list(range(len(study.files)))
    assert {f["study_instance_uid"] for f in body["files"]} == {study.study_uid}
    async with ObjectStore(api.object_store) as objects:
        stored = {ref.key: ref.size for ref in await objects.list(f"payloads/{payload_id}/")}
    assert stored == {f["key"]: f["size"] for f in body["files"]}
    assert sorted(e.file.key for e in announced) == sorted(stored)
    assert {(e.payload_id, e.correlation_id, e.source, e.called_ae_title) for e in announced} == {
        (payload_id, payload_id, "upload", "MWM-MIP")
    }
    assert listing["total"] == len(study.files) and [i["key"] for i in listing["items"]] == sorted(stored)
    assert download.status_code == 200 and download.headers["content-type"] == "application/dicom"
    assert download.content == next(iter(contents.values()))
    assert archive.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == sorted(key.removeprefix("payloads/") for key in stored)
    assert sorted(members.values()) == sorted(contents.values())


async def test_a_part_that_is_not_dicom_is_reported_and_the_others_stored(
    api: Settings, tmp_path: Path
) -> None:
    study = write_ct_study(tmp_path, slices_per_series=2, rows=16, columns=16)
    corrupt = write_corrupt_file(tmp_path / "corrupt.dcm")
    files = [study.files[0], None, corrupt, study.files[1]]
    form = [
        ("file", (f"{i}.dcm", path.read_bytes() if path else b"hello, not DICOM", "application/dicom"))
        for i, path in enumerate(files)
    ]
    async with arrivals(api) as events, client(api, api.api.token) as http:
        response = await http.post("/payloads", params={"application": "mip"}, files=form)
        announced: list[PayloadArrived] = await events.wait_for(PayloadArrived, 2, 10)
        await queue_settled(events.queue)  # the response came after every publish was confirmed
    assert response.status_code == 201, response.text
    body = response.json()
    assert [f["part"] for f in body["files"]] == [0, 3]
    assert [f["part"] for f in body["failed"]] == [1, 2]
    assert all("DICOM" in f["error"] for f in body["failed"]), body["failed"]
    assert len(events.of(PayloadArrived)) == 2
    assert [e.application_ids for e in announced] == [["mip"], ["mip"]]
    assert {e.called_ae_title for e in announced} == {None}


async def test_one_file_as_application_dicom_and_uploads_with_nothing_stored(
    api: Settings, tmp_path: Path
) -> None:
    study = write_ct_study(tmp_path, slices_per_series=1, rows=16, columns=16)
    async with arrivals(api) as events, client(api, api.api.token) as http:
        single = await post_dicom(http, study.files[0].read_bytes(), called_ae_title="MWM-MIP")
        garbage = await post_dicom(http, b"x" * 1000)
        empty = await http.post(
            "/payloads", content=f"--{BOUNDARY}--\r\n".encode(), headers={"Content-Type": RELATED}
        )
        truncated = await http.post(
            "/payloads", content=related_body([b"x"])[:-20], headers={"Content-Type": RELATED}
        )
        await events.wait_for(PayloadArrived, 1, 10)
    assert single.status_code == 201 and [f["part"] for f in single.json()["files"]] == [0]
    assert assert_problem(garbage, 422)["errors"][0]["field"] == "parts[0]"
    assert assert_problem(empty, 422)["errors"] == [{"field": "body", "message": "the request holds no file"}]
    assert [e["field"] for e in assert_problem(truncated, 422)["errors"]] == ["parts[0]"]


async def test_scopes_content_types_and_unknown_targets(api: Settings, tmp_path: Path) -> None:
    study = write_ct_study(tmp_path, slices_per_series=1, rows=16, columns=16)
    dicom = study.files[0].read_bytes()
    reader, gateway = await api_key(api, "read"), await api_key(api, "gateway")
    async with (
        arrivals(api),
        client(api) as anonymous,
        client(api, reader) as read,
        client(api, gateway) as gw,
    ):
        assert_problem(await post_dicom(anonymous, dicom), 401)
        assert_problem(await post_dicom(read, dicom), 403)
        stored = await post_dicom(gw, dicom)
        assert stored.status_code == 201, stored.text
        payload_id = stored.json()["payload_id"]
        assert (await read.get(f"/payloads/{payload_id}")).status_code == 200
        assert (await gw.get(f"/payloads/{payload_id}/archive")).status_code == 200
        assert_problem(await anonymous.get(f"/payloads/{payload_id}"), 401)
        text = await gw.post("/payloads", content=b"hello", headers={"Content-Type": "text/plain"})
        json_stow = 'multipart/related; type="application/dicom+json"; boundary=x'
        metadata = await gw.post("/payloads", content=b"--x--", headers={"Content-Type": json_stow})
        unknown = await post_dicom(gw, dicom, application=["mip", "nosuch"], called_ae_title="NOBODY")
        assert_problem(await read.get("/payloads/0123456789abcdef"), 404)
        assert_problem(await read.get(f"/payloads/{payload_id}/files/1.2.3"), 404)
    assert "application/dicom" in assert_problem(text, 415)["detail"]
    assert_problem(metadata, 415)
    assert assert_problem(unknown, 422)["errors"] == [
        {"field": "query.called_ae_title", "message": "AE title 'NOBODY' is not mapped to any application"},
        {"field": "query.application", "message": "unknown application 'nosuch'"},
    ]


async def test_an_unannounceable_upload_is_503_with_retry_after(api: Settings, tmp_path: Path) -> None:
    """No queue is bound to payload.arrived (no discovery, no tap): the broker does not route the event."""
    study = write_ct_study(tmp_path, slices_per_series=1, rows=16, columns=16)
    async with client(api, api.api.token) as http:
        response = await post_dicom(http, study.files[0].read_bytes())
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == "5"
    assert "not routed" in body["detail"] and "0 file(s) had been stored and announced" in body["detail"]


async def test_a_large_upload_is_streamed_not_held_in_memory(live_settings: Settings, tmp_path: Path) -> None:
    """``mwm api`` in its own process: a 160 MB file raises its peak RSS by a bounded amount, not its size."""
    settings = api_settings(live_settings, free_port())
    await register(settings, mip_application())
    small = write_ct_study(tmp_path / "small", slices_per_series=1, rows=16, columns=16).files[0]
    large = large_ct_file(tmp_path / "large", LARGE_PIXEL_DATA_MB)
    async with arrivals(settings), api_process(settings) as pid, client(settings, settings.api.token) as http:
        warm_up = await post_dicom(http, streamed(small), called_ae_title="MWM-MIP")  # imports, connections
        assert warm_up.status_code == 201, warm_up.text
        before = peak_rss_mb(pid)
        response = await post_dicom(http, streamed(large), called_ae_title="MWM-MIP")
        growth = peak_rss_mb(pid) - before
    assert response.status_code == 201, response.text
    assert response.json()["files"][0]["size"] == large.stat().st_size
    assert growth < PEAK_RSS_GROWTH_LIMIT_MB, (
        f"peak RSS grew by {growth:.0f} MB for a {LARGE_PIXEL_DATA_MB} MB upload"
    )
