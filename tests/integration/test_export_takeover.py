"""Leases that follow the work (issue #18): an exporter killed -9 mid-send gives its task up within a lease.

The export lease is short (``export.lease_s``, 20 s) and renewed while the exporter works, so the task of
an exporter that dies is re-requested by another exporter's sweep once the lease ran out (lease + sweep
interval, about 30 s), not after the 300 s lease it used to hold.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from consumers import exporter
from devkit.peers import StoreSCP
from devkit.services import consumer_processes
from tests.integration.test_exporter import add_sink, completions, job_outputs, publish, request
from wm.adapters.rabbitmq import Bus
from wm.config import Settings

TAKEN_OVER_WITHIN_S = 60


async def test_an_exporter_killed_mid_send_has_its_task_finished_by_another_within_a_minute(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    files = await job_outputs(settings, tmp_path / "outputs", slices=12)
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, exporter.NAME, exporter.ROUTING_KEYS)
    with StoreSCP(tmp_path / "pacs") as pacs:
        await add_sink(settings, "pacs", pacs.port, pacs.aet)
        async with completions(settings) as done:
            with consumer_processes(settings, exporter.NAME) as [first]:
                await publish(settings, request("pacs", files))
                await pacs.await_files(1, timeout=60)
                pacs.pause()  # the exporter now waits for a C-STORE response: it is in the middle of a send
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
                killed_at = time.monotonic()
                pacs.resume()
                with consumer_processes(settings, exporter.NAME):
                    [completed] = await done.wait(1)
                    finished_after = time.monotonic() - killed_at
        received = {path.name for path in pacs.received_files()}
    assert completed.status == "succeeded", completed.message  # the report.txt is skipped (not DICOM)
    sent = [result for result in completed.file_results if result.status == "succeeded"]
    assert len(sent) == 12 and len(received) >= 12
    assert finished_after < TAKEN_OVER_WITHIN_S, f"finished {finished_after:.1f} s after the kill"
    print(f"task finished by the second exporter {finished_after:.1f} s after the first was killed")
