"""After ``mwm apps delete``, its AE title behaves the same for DICOM and for the Payloads API.

The AE title stays listed (``mwm aet list``) with no application, its allow-list kept for a later
``mwm aet map``; an association to it is rejected (called AE title not recognised) and an upload naming
it is refused with the same 422 as an AE title never mapped. Nothing is stored either way.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, astorescu, free_port
from devkit.pipeline import mip_application, register
from producers.gateway import serving
from tests.support.api import api_settings, assert_problem
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings
from wm.registry import Registry
from wm.stores.auth import ApiKeys

AET = "MWM-MIP"


async def test_a_deleted_applications_ae_title_is_refused_by_dicom_and_by_the_payloads_api(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = api_settings(live_settings, free_port())
    settings = settings.model_copy(
        update={"gateway": settings.gateway.model_copy(update={"host": LOCALHOST, "port": free_port()})}
    )
    await register(settings, mip_application(ae_title=AET))
    async with Database(settings.mongo) as database:
        registry = Registry(database)
        await registry.delete_application("mip")
        mapping = await registry.mapping(AET)
        _, token = await ApiKeys(database).create(f"gw-{uuid.uuid4().hex[:6]}", "gateway")
    assert mapping is not None and mapping.applications == []  # still listed, with no application
    study = write_ct_study(tmp_path / "study", series=1, slices_per_series=2, rows=32, columns=32, seed=7)

    async with (
        running(create_app(settings), LOCALHOST, settings.api.port),
        serving(settings) as (gateway, _),
        httpx.AsyncClient(base_url=settings.api.url, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        host, port = gateway.address
        dicom = await astorescu(host, port, AET, study.files, calling_aet="CT", extra_args=["-v"])
        upload = await http.post(
            "/payloads",
            params={"called_ae_title": AET},
            content=study.files[0].read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )

    assert dicom.returncode != 0
    assert "Association Rejected" in dicom.stderr and "Called AE Title Not Recognized" in dicom.stderr
    assert assert_problem(upload, 422)["errors"] == [
        {"field": "query.called_ae_title", "message": f"AE title {AET!r} is not mapped to any application"}
    ]
    async with ObjectStore(settings.object_store) as objects:
        assert await objects.list("payloads/") == []
