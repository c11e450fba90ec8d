"""The seed's three flows, end to end on the real services: deploy and setup, trigger, data export."""

from __future__ import annotations

import pydicom
import yaml
from pydicom.uid import SecondaryCaptureImageStorage
from pytest_bdd import given, parsers, scenarios, then, when

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, storescu
from devkit.pipeline import MIP_APP
from tests.features.conftest import Stack, eventually, start_mwm
from wm.adapters.mongo import Database
from wm.stores.buckets import BUCKETS
from wm.stores.jobs import JobStore

scenarios("deploy_and_setup.feature", "trigger.feature", "data_export.feature")


# Given


@given("MWM's API is running")
def api_running(stack: Stack) -> None:
    """The ``stack`` fixture started it and waited for /health."""


@given(parsers.parse('a DICOM receiver "{ae_title}" is listening'))
def receiver_listening(stack: Stack, ae_title: str) -> None:
    stack.receiver(ae_title)


@given(parsers.parse('MWM is running with the example application "{app}" on the AE title "{ae_title}"'))
def mwm_with_application(stack: Stack, app: str, ae_title: str) -> None:
    register_application(stack, app, ae_title, sinks=[])
    start_mwm(stack)


@given(
    parsers.parse(
        'MWM is running with the example application "{app}" on the AE title "{ae_title}" '
        'exporting to "{receiver}"'
    )
)
def mwm_exporting(stack: Stack, app: str, ae_title: str, receiver: str) -> None:
    sink = receiver.lower()
    create_sink(stack, sink, receiver, stack.receiver(receiver))
    register_application(stack, app, ae_title, sinks=[sink])
    start_mwm(stack)


@given(
    parsers.parse(
        'MWM is running with the example application "{app}" on the AE title "{ae_title}" '
        'for the pull sink "{sink}"'
    )
)
def mwm_for_pull_sink(stack: Stack, app: str, ae_title: str, sink: str) -> None:
    definition = stack.work / f"{sink}.yaml"
    definition.write_text(yaml.safe_dump({"name": sink, "type": "external"}))
    stack.cli("sinks", "create", sink, "--file", str(definition))
    register_application(stack, app, ae_title, sinks=[sink])
    start_mwm(stack)


@given(parsers.parse('the export client of "{sink}" is sending to "{receiver}"'))
def export_client_running(stack: Stack, sink: str, receiver: str) -> None:
    port = stack.receiver(receiver)
    stack.start(
        "export-client",
        "export-client",
        "--sink",
        sink,
        "--ae-title",
        receiver,
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--poll-interval",
        "0.5",
    )


# When


@when(
    parsers.parse(
        'I create the DICOM sink "{sink}" for the AE title "{ae_title}" on port {port:d} with the CLI'
    )
)
def create_sink(stack: Stack, sink: str, ae_title: str, port: int) -> None:
    stack.cli("sinks", "create", sink, "--ae-title", ae_title, "--host", LOCALHOST, "--port", str(port))


@when(parsers.parse('I register the example application "{app}" exporting to "{sink}" with the CLI'))
def register_exporting(stack: Stack, app: str, sink: str) -> None:
    register_application(stack, app, None, sinks=[sink])


@when(parsers.parse('I map the AE title "{ae_title}" to "{app}" allowing the caller "{caller}" with the CLI'))
def map_ae_title(stack: Stack, ae_title: str, app: str, caller: str) -> None:
    stack.cli("aet", "map", ae_title, app, "--allow", caller)


@when(
    parsers.parse(
        'the modality "{caller}" sends {count:d} CT studies of {series:d} series each to "{ae_title}"'
    )
)
def send_studies(stack: Stack, caller: str, count: int, series: int, ae_title: str) -> None:
    studies = [
        write_ct_study(
            stack.work / "studies" / str(i),
            series=series,
            slices_per_series=3,
            seed=100 + i,
            patient_id=f"PATIENT-{i}",
        )
        for i in range(count)
    ]
    for study in studies:
        result = storescu(
            LOCALHOST, stack.gateway_port, ae_title, study.files[0].parent.parent, calling_aet=caller
        )
        assert result.returncode == 0, result.stderr
    stack.context["studies"] = {study.study_uid: study for study in studies}
    stack.context["series"] = series


# Then


@then(parsers.parse('the CLI lists the application "{app}" at revision {revision:d} with the sink "{sink}"'))
def application_listed(stack: Stack, app: str, revision: int, sink: str) -> None:
    [listed] = [a for a in stack.cli_json("apps", "list") if a["name"] == app]
    assert listed["revision"] == revision
    assert listed["definition"]["sinks"] == [sink]


@then(parsers.parse('the CLI lists the sink "{sink}" for the AE title "{ae_title}"'))
def sink_listed(stack: Stack, sink: str, ae_title: str) -> None:
    [listed] = [s for s in stack.cli_json("sinks", "list") if s["name"] == sink]
    assert listed["args"]["ae_title"] == ae_title


@then(parsers.parse('the CLI lists the AE title "{ae_title}" triggering "{app}"'))
def ae_title_listed(stack: Stack, ae_title: str, app: str) -> None:
    [listed] = [m for m in stack.cli_json("aet", "list") if m["ae_title"] == ae_title]
    assert app in listed["applications"]


@then(parsers.parse('{count:d} jobs of "{app}" succeed, one per StudyInstanceUID'))
def jobs_succeed(stack: Stack, count: int, app: str) -> None:
    eventually(lambda: len(succeeded_jobs(stack, app)) >= count, 120, f"{count} succeeded jobs")
    jobs = succeeded_jobs(stack, app)
    assert len(jobs) == count
    assert set(grouping_values(stack, [job["bucket_id"] for job in jobs])) == set(stack.context["studies"])
    stack.context["jobs"] = jobs


@then("each job's outputs hold one MIP per series")
def one_mip_per_series(stack: Stack) -> None:
    for job in stack.context["jobs"]:
        assert len(job["outputs"]) == stack.context["series"], job


@then(parsers.parse('the receiver "{receiver}" gets {count:d} secondary captures of that study'))
def receiver_gets_results(stack: Stack, receiver: str, count: int) -> None:
    scp, _ = stack.receivers[receiver]
    eventually(lambda: len(scp.received_files()) >= count, 120, f"{count} files at {receiver}")
    received = [pydicom.dcmread(path) for path in scp.received_files()]
    assert len(received) == count
    assert {ds.SOPClassUID for ds in received} == {SecondaryCaptureImageStorage}
    assert {ds.StudyInstanceUID for ds in received} == set(stack.context["studies"])


# Helpers


def register_application(stack: Stack, app: str, ae_title: str | None, sinks: list[str]) -> None:
    """Register the example MIP application from a YAML file through the CLI."""
    definition = {
        "name": app,
        "version": "1.0.0",
        "ae_titles": [ae_title] if ae_title else [],
        "discovery": {"quiet_period_s": 1.0, "filters": {"modalities": ["CT"]}},
        "map": {"command": ["python", str(MIP_APP)], "timeout_s": 300},
        "engine": {"name": "local"},
        "sinks": sinks,
    }
    path = stack.work / f"{app}.yaml"
    path.write_text(yaml.safe_dump(definition))
    stack.cli("apps", "register", str(path))


def succeeded_jobs(stack: Stack, app: str) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        async with Database(stack.settings.mongo) as database:
            jobs, _ = await JobStore(database).page("succeeded", app, 0, 100)
        return [job.model_dump(mode="json") for job in jobs]

    result: list[dict[str, object]] = stack.run_async(read())
    return result


def grouping_values(stack: Stack, bucket_ids: list[object]) -> list[str]:
    async def read() -> list[str]:
        async with Database(stack.settings.mongo) as database:
            cursor = database.collection(BUCKETS).find({"_id": {"$in": bucket_ids}})
            return [str(doc["grouping_value"]) for doc in await cursor.to_list(None)]

    result: list[str] = stack.run_async(read())
    return result
