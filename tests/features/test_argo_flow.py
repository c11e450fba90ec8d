"""The full pipeline on the Argo engine: a study in, an Argo workflow, the result at a ``storescp``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pydicom
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from devkit.argo_stack import ArgoStack, Executor, argo_application, argo_stack, forget_workflows
from devkit.pipeline import register
from tests.features.conftest import Stack, eventually, start_mwm
from tests.features.test_flows import create_sink, jobs_succeed, receiver_listening, send_studies

scenarios("argo_engine.feature")

# The steps shared with test_flows, registered for this module's scenarios too.
given(parsers.parse('a DICOM receiver "{ae_title}" is listening'))(receiver_listening)
when(
    parsers.parse(
        'the modality "{caller}" sends {count:d} CT studies of {series:d} series each to "{ae_title}"'
    )
)(send_studies)
then(parsers.parse('{count:d} jobs of "{app}" succeed, one per StudyInstanceUID'))(jobs_succeed)

StartExecutor = Callable[[ArgoStack, str], None]


@pytest.fixture
def executor(stack: Stack) -> Iterator[StartExecutor]:
    """Starts ``Executor`` (what Argo's executor does) in a thread of its own for the scenario."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    async def report(argo: ArgoStack, selector: str) -> None:
        async with Executor(argo, stack.settings, selector=selector).running():
            await asyncio.to_thread(stop.wait)

    def start(argo: ArgoStack, selector: str) -> None:
        thread = threading.Thread(target=lambda: asyncio.run(report(argo, selector)), daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=10)


@given(
    parsers.parse(
        'MWM is running with the Argo application "{app}" on the AE title "{ae_title}" '
        'exporting to "{receiver}"'
    )
)
def mwm_on_argo(stack: Stack, executor: StartExecutor, app: str, ae_title: str, receiver: str) -> None:
    argo = argo_stack()
    stack.run_async(forget_workflows(argo, app))
    stack.env.update(
        {
            "MWM_ARGO__SERVER_URL": argo.argo_url,
            "MWM_ARGO__TOKEN": argo.admin_token,
            "MWM_ARGO__NAMESPACE": argo.namespace,
            "MWM_ARGO__CA_CERT": argo.argo_ca,
            "MWM_MONITOR__POLL_INTERVAL_S": "0.5",
        }
    )
    sink = receiver.lower()
    create_sink(stack, sink, receiver, stack.receiver(receiver))
    definition = argo_application(app, ae_title, sinks=[sink])
    # Through the registry with the engine on the stack (the API process the fixture started has the
    # default Argo settings).
    stack.run_async(register(argo.settings(stack.settings), definition))
    executor(argo, f"mwm.application={app}")
    start_mwm(stack)


@then(parsers.parse('the receiver "{receiver}" gets the {count:d} images of that study back'))
def receiver_gets_the_study(stack: Stack, receiver: str, count: int) -> None:
    scp, _ = stack.receivers[receiver]
    eventually(lambda: len(scp.received_files()) >= count, 120, f"{count} files at {receiver}")
    received = [pydicom.dcmread(path) for path in scp.received_files()]
    [study] = stack.context["studies"].values()
    assert len(received) == count
    assert {ds.SOPInstanceUID for ds in received} == {pydicom.dcmread(p).SOPInstanceUID for p in study.files}
