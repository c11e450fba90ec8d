"""Benchmark: the DICOM gateway against Orthanc, receiving the same 324-slice CT study, in one run.

    python bench/gateway_vs_orthanc.py [--slices 324] [--rows 512] [--columns 512] [--rounds 3]

Needs the real local services (``bash scripts/services up``), dcmtk and Orthanc. Generates a CT study
(1 series x 324 slices of 512 x 512, 16-bit: about 164 MB) and sends it with dcmtk ``storescu``
(``TCP_NODELAY=1``):

* to the gateway, run as its own process (``python -m wm gateway``) with a fresh bucket, exchange,
  database and spool directory (written ahead at start with a reusable file per slice, as a persistent
  spool volume holds them once it received such a study) and an AE title mapping made first. Two times,
  from the start of storescu: until storescu finished (every C-STORE answered, so every file fsynced in
  the spool: what the modality waits for), and until every file was uploaded and announced on
  ``mwm.payload.arrived`` (the object count is checked afterwards);
* to Orthanc 1.10 (``TCP_NODELAY=1``): timed until storescu finished and Orthanc indexed every instance;
* the gateway's DICOM side alone: the gateway's pynetdicom AE in its own process, answering success once
  it holds each file's bytes in memory (``encoded_dataset``), storing nothing: what the spool adds
  (streaming to disk, the checks, the fsyncs) is the difference.

All three run ``--rounds`` times, the gateway first in odd rounds and last in even ones (the machines are
shared and noisy); the medians are reported, each round and the load average go to stderr. Prints as
Markdown table rows the gateway's and Orthanc's times and their ratio (target <= 1.25), the time until
every file is announced, the DICOM side alone and the gateway's peak resident memory (VmHWM, highest of
the rounds, target under 300 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
from pynetdicom import evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.dicom import write_ct_study  # noqa: E402
from devkit.peers import LOCALHOST, Orthanc, free_port, storescu, wait_for_port  # noqa: E402
from devkit.pipeline import bound_queue  # noqa: E402
from devkit.process import peak_rss_mb  # noqa: E402
from devkit.services import cleanup, settings_env  # noqa: E402
from producers.gateway import STATUS  # noqa: E402
from producers.gateway_ae import application_entity, disable_nagle  # noqa: E402
from schemas.applications import CallingPeer  # noqa: E402
from schemas.events import PayloadArrived  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.adapters.objectstore import ObjectStore  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.pynetdicom_patches import copy_contexts_cheaply  # noqa: E402
from wm.registry import Registry  # noqa: E402

AET = "MWM-BENCH"
CALLING = "STORESCU"
TIMEOUT_S = 300.0


def bench_settings(files: int) -> Settings:
    """Settings with this run's own exchange, queues, database and bucket, and a free gateway port.

    The spool is new, and written ahead with a reusable file for each of the study's ``files`` (as one is
    on a persistent spool volume once it held such a study: `producers.gateway_slots`).
    """
    run = uuid.uuid4().hex[:8]
    base = Settings()
    return base.model_copy(
        update={
            "bus": base.bus.model_copy(
                update={"exchange": f"mwm-bench-{run}", "dead_letter_exchange": f"mwm-bench-{run}.dlx"}
            ),
            "mongo": base.mongo.model_copy(update={"database": f"mwm_bench_{run}"}),
            "object_store": base.object_store.model_copy(update={"bucket": f"mwm-bench-{run}"}),
            "gateway": base.gateway.model_copy(
                update={"host": LOCALHOST, "port": free_port(), "spool_preallocated_files": files}
            ),
            "work_dir": tempfile.mkdtemp(prefix="mwm-bench-work-"),  # the gateway's spool is under it
            "observability": base.observability.model_copy(update={"http_port": 0, "log_level": "WARNING"}),
        }
    )


async def time_gateway(settings: Settings, study_dir: Path, count: int) -> tuple[float, float, float]:
    """Seconds until storescu finished, until ``count`` files were announced; the gateway's peak RSS (MB)."""
    async with Database(settings.mongo) as database:
        await Registry(database).ae_titles.map(AET, "bench", [CallingPeer(ae_title=CALLING)])
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wm", "gateway", env=settings_env(settings), cwd=REPO, stdin=subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(wait_for_port, LOCALHOST, settings.gateway.port, timeout=60)
        sent_s, announced_s = await _send_and_count(settings, study_dir, count)
        peak = peak_rss_mb(gateway.pid)
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.wait(), 60)
    async with ObjectStore(settings.object_store) as objects:
        stored = len(await objects.list("payloads/"))
    if stored != count:
        raise RuntimeError(f"{stored} files in the object store, expected {count}")
    shutil.rmtree(settings.work_dir, ignore_errors=True)
    return sent_s, announced_s, peak


async def _send_and_count(settings: Settings, study_dir: Path, count: int) -> tuple[float, float]:
    async with bound_queue(settings, PayloadArrived.event_type) as queue:
        announced = 0
        all_announced = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal announced
            announced += 1
            if announced >= count:
                all_announced.set()

        await queue.consume(on_message, no_ack=True)
        started = time.perf_counter()
        sent = await asyncio.to_thread(_storescu, settings.gateway.port, AET, study_dir)
        sent_s = time.perf_counter() - started
        await asyncio.wait_for(all_announced.wait(), TIMEOUT_S)
        announced_s = time.perf_counter() - started
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to the gateway failed:\n{sent.stderr[-2000:]}")
    return sent_s, announced_s


def _storescu(port: int, called: str, study_dir: Path) -> subprocess.CompletedProcess[str]:
    return storescu(LOCALHOST, port, called, study_dir, calling_aet=CALLING, timeout=TIMEOUT_S)


def time_orthanc(study_dir: Path, count: int) -> float:
    """Seconds until storescu finished and Orthanc indexed ``count`` instances."""
    with Orthanc(aet="ORTHANC") as orthanc:
        started = time.perf_counter()
        sent = _storescu(orthanc.dicom_port, orthanc.aet, study_dir)
        while orthanc.instance_count() < count:
            if time.perf_counter() - started > TIMEOUT_S:
                raise TimeoutError("Orthanc did not index every instance")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to Orthanc failed:\n{sent.stderr[-2000:]}")
    return elapsed


def serve_dicom_only(port: int) -> None:
    """Until SIGTERM: the gateway's AE on ``port``, answering each C-STORE once it holds the file's bytes."""

    def on_store(event: evt.Event) -> int:
        event.encoded_dataset()
        return int(STATUS.SUCCESS)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait, in every thread
    settings = Settings().gateway.model_copy(update={"host": LOCALHOST, "port": port})
    server = application_entity(settings).start_server(
        (LOCALHOST, port),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, disable_nagle), (evt.EVT_C_STORE, on_store)],
    )
    assert server is not None, "start_server(block=False) returns the server"
    copy_contexts_cheaply(server)  # as the gateway does
    signal.sigwait({signal.SIGTERM})
    server.shutdown()


async def time_dicom_only(study_dir: Path) -> float:
    """Seconds until storescu finished sending to `serve_dicom_only` in its own process."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-dicom-only", str(port), cwd=REPO, stdin=subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(wait_for_port, LOCALHOST, port, timeout=60)
        started = time.perf_counter()
        sent = await asyncio.to_thread(_storescu, port, AET, study_dir)
        elapsed = time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 60)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to the DICOM-only SCP failed:\n{sent.stderr[-2000:]}")
    return elapsed


async def one_round(
    study_dir: Path, files: list[Path], gateway_first: bool
) -> tuple[float, float, float, float, float]:
    """One round of each measurement, the gateway with its own exchange, database, bucket and spool.

    Rounds alternate the order (``gateway_first``): a side measured second may find the machine still busy
    with the first side's work (the uploads, Orthanc's indexing).
    Returns (gateway seconds, announced seconds, gateway peak RSS in MB, Orthanc seconds, DICOM-only seconds).
    """
    settings = bench_settings(len(files))
    if not gateway_first:
        orthanc_s = await asyncio.to_thread(time_orthanc, study_dir, len(files))
        dicom_only_s = await time_dicom_only(study_dir)
    try:
        gateway_s, announced_s, peak_mb = await time_gateway(settings, study_dir, len(files))
    finally:
        await cleanup(settings)
    if gateway_first:
        orthanc_s = await asyncio.to_thread(time_orthanc, study_dir, len(files))
        dicom_only_s = await time_dicom_only(study_dir)
    return gateway_s, announced_s, peak_mb, orthanc_s, dicom_only_s


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=324)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (medians)")
    parser.add_argument("--serve-dicom-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dicom_only:
        serve_dicom_only(args.serve_dicom_only)
        return 0
    rounds: list[tuple[float, float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as tmp:
        study = write_ct_study(
            Path(tmp), series=1, slices_per_series=args.slices, rows=args.rows, columns=args.columns
        )
        size_mb = sum(path.stat().st_size for path in study.files) / 1e6
        for number in range(1, args.rounds + 1):
            rounds.append(await one_round(Path(tmp), list(study.files), gateway_first=number % 2 == 1))
            gateway_s, announced_s, peak_mb, orthanc_s, dicom_only_s = rounds[-1]
            print(
                f"round {number}: gateway {gateway_s:.2f} s (announced {announced_s:.2f} s), Orthanc "
                f"{orthanc_s:.2f} s, ratio {gateway_s / orthanc_s:.2f}, DICOM only {dicom_only_s:.2f} s, "
                f"peak RSS {peak_mb:.0f} MB, load average {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    gateway_s, announced_s, orthanc_s, dicom_only_s = (
        statistics.median(r[i] for r in rounds) for i in (0, 1, 3, 4)
    )
    ratio = statistics.median(r[0] / r[3] for r in rounds)
    peak_mb = max(r[2] for r in rounds)
    what = f"{len(study.files)}-slice CT, {size_mb:.0f} MB, median of {len(rounds)}"
    print("| measure | gateway | Orthanc | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| gateway vs Orthanc, every file fsynced before its response ({what}) | gateway {gateway_s:.2f} s "
        f"| Orthanc {orthanc_s:.2f} s | ratio {ratio:.2f} | target <= 1.25 |"
    )
    print(
        f"| gateway: until every file is uploaded and announced ({what}) | announced {announced_s:.2f} s "
        f"| Orthanc {orthanc_s:.2f} s | ratio {announced_s / orthanc_s:.2f} | (reported) |"
    )
    print(
        f"| gateway DICOM side alone: its AE answering once it holds each file in memory ({what}) "
        f"| DICOM only {dicom_only_s:.2f} s | Orthanc {orthanc_s:.2f} s "
        f"| ratio {dicom_only_s / orthanc_s:.2f} | (reported) |"
    )
    print(f"| gateway peak RSS (VmHWM) | {peak_mb:.0f} MB | | | target < 300 MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
