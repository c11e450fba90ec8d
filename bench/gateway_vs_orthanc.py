"""Benchmark: the DICOM gateway against Orthanc, receiving the same 324-slice CT study, in one run.

    python bench/gateway_vs_orthanc.py [--slices 324] [--rows 512] [--columns 512] [--rounds 3]

Needs the real local services (``bash scripts/services up``), dcmtk and Orthanc. Generates a CT study
(1 series x 324 slices of 512 x 512, 16-bit: about 164 MB) and sends it with dcmtk ``storescu``
(``TCP_NODELAY=1``):

* to the gateway, run as its own process (``python -m wm gateway``) with a fresh bucket, exchange and
  database and an AE title mapping made first: timed from the start of storescu until storescu finished
  and every file was announced on ``mwm.payload.arrived`` (the gateway announces a file only after the
  object store confirmed it; the object count is checked afterwards);
* to Orthanc 1.10 (``TCP_NODELAY=1``): timed until storescu finished and Orthanc indexed every instance;
* the gateway's floor: the same files read from disk and, one after the other, uploaded and announced
  exactly as the gateway does after receiving each (identifiers read, ``put_stream``, confirmed publish),
  with no DICOM at all. storescu waits for each C-STORE response and the gateway answers only after the
  file is stored and announced, so the gateway can never be faster than this serial work;
* the gateway's DICOM side alone: the gateway's pynetdicom AE in its own process, answering success once
  it holds each file's Part-10 bytes (``encoded_dataset``), storing nothing. The gateway takes about this
  plus the floor: the difference is the hand-offs between pynetdicom's threads and the event loop.

All four run ``--rounds`` times, one after the other (the machines are shared and noisy); the medians
are reported, each round and the load average go to stderr. Prints the gateway's and Orthanc's times, their
ratio (target <= 1.0), the floor, the DICOM side alone and the gateway's peak resident memory (VmHWM,
highest of the rounds, target under 300 MB), as Markdown table rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

from producers.gateway import STATUS, application_entity, disable_nagle  # noqa: E402
from producers.publisher import PayloadPublisher  # noqa: E402
from schemas.applications import CallingPeer  # noqa: E402
from schemas.events import PayloadArrived  # noqa: E402
from tests.support.pipeline import bound_queue  # noqa: E402
from tests.support.process import peak_rss_mb  # noqa: E402
from tests.support.services import cleanup, settings_env  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.adapters.objectstore import ObjectStore  # noqa: E402
from wm.adapters.rabbitmq import Bus  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.dicom import object_key, read_identifiers  # noqa: E402
from wm.registry import Registry  # noqa: E402
from wm.testing.dicom import write_ct_study  # noqa: E402
from wm.testing.peers import LOCALHOST, Orthanc, free_port, storescu, wait_for_port  # noqa: E402

AET = "MWM-BENCH"
CALLING = "STORESCU"
TIMEOUT_S = 300.0


def bench_settings() -> Settings:
    """Settings with this run's own exchange, queues, database and bucket, and a free gateway port."""
    run = uuid.uuid4().hex[:8]
    base = Settings()
    return base.model_copy(
        update={
            "bus": base.bus.model_copy(
                update={"exchange": f"mwm-bench-{run}", "dead_letter_exchange": f"mwm-bench-{run}.dlx"}
            ),
            "mongo": base.mongo.model_copy(update={"database": f"mwm_bench_{run}"}),
            "object_store": base.object_store.model_copy(update={"bucket": f"mwm-bench-{run}"}),
            "gateway": base.gateway.model_copy(update={"host": LOCALHOST, "port": free_port()}),
            "observability": base.observability.model_copy(update={"http_port": 0, "log_level": "WARNING"}),
        }
    )


async def time_gateway(settings: Settings, study_dir: Path, count: int) -> tuple[float, float]:
    """Seconds until storescu finished and ``count`` files were announced; the gateway's peak RSS in MB."""
    async with Database(settings.mongo) as database:
        await Registry(database).ae_titles.map(AET, "bench", [CallingPeer(ae_title=CALLING)])
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wm", "gateway", env=settings_env(settings), cwd=REPO, stdin=subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(wait_for_port, LOCALHOST, settings.gateway.port, timeout=60)
        elapsed = await _send_and_count(settings, study_dir, count)
        peak = peak_rss_mb(gateway.pid)
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.wait(), 60)
    async with ObjectStore(settings.object_store) as objects:
        stored = len(await objects.list("payloads/"))
    if stored != count:
        raise RuntimeError(f"{stored} files in the object store, expected {count}")
    return elapsed, peak


async def _send_and_count(settings: Settings, study_dir: Path, count: int) -> float:
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
        await asyncio.wait_for(all_announced.wait(), TIMEOUT_S)
        elapsed = time.perf_counter() - started
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to the gateway failed:\n{sent.stderr[-2000:]}")
    return elapsed


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


async def time_floor(settings: Settings, files: list[Path]) -> float:
    """Seconds to read, upload and announce ``files`` one after the other, as the gateway does per file."""
    async with ObjectStore(settings.object_store) as objects, Bus(settings.bus) as bus:
        # payload.arrived is published mandatory: bind a queue of our own so that it routes.
        queue = await bus.channel.declare_queue(f"mwm-bench-{uuid.uuid4().hex[:8]}", exclusive=True)
        await queue.bind(settings.bus.exchange, routing_key=PayloadArrived.event_type)
        publisher = PayloadPublisher.over(bus)
        started = time.perf_counter()
        for path in files:
            with path.open("rb") as stream:
                ids = read_identifiers(stream)
                size = stream.seek(0, os.SEEK_END)
                stream.seek(0)
                ref = await objects.put_stream(object_key("floor", ids), stream, size)
            await publisher.file_stored(payload_id="floor", file=ref, dicom=ids, source="dimse")
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
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


async def one_round(study_dir: Path, files: list[Path]) -> tuple[float, float, float, float, float]:
    """One round of each measurement, each with its own exchange, database and bucket.

    Returns (gateway seconds, gateway peak RSS in MB, Orthanc seconds, floor seconds, DICOM-only seconds).
    """
    settings = bench_settings()
    try:
        gateway_s, peak_mb = await time_gateway(settings, study_dir, len(files))
    finally:
        await cleanup(settings)
    orthanc_s = await asyncio.to_thread(time_orthanc, study_dir, len(files))
    settings = bench_settings()
    try:
        floor_s = await time_floor(settings, files)
    finally:
        await cleanup(settings)
    dicom_only_s = await time_dicom_only(study_dir)
    return gateway_s, peak_mb, orthanc_s, floor_s, dicom_only_s


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
            rounds.append(await one_round(Path(tmp), list(study.files)))
            gateway_s, peak_mb, orthanc_s, floor_s, dicom_only_s = rounds[-1]
            print(
                f"round {number}: gateway {gateway_s:.2f} s, Orthanc {orthanc_s:.2f} s, "
                f"floor {floor_s:.2f} s, DICOM only {dicom_only_s:.2f} s, peak RSS {peak_mb:.0f} MB, "
                f"load average {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    medians = [statistics.median(r[i] for r in rounds) for i in (0, 2, 3, 4)]
    gateway_s, orthanc_s, floor_s, dicom_only_s = medians
    peak_mb = max(r[1] for r in rounds)
    what = f"{len(study.files)}-slice CT, {size_mb:.0f} MB, median of {len(rounds)}"
    print("| measure | gateway | Orthanc | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| gateway vs Orthanc ({what}) | gateway {gateway_s:.2f} s | Orthanc {orthanc_s:.2f} s "
        f"| ratio {gateway_s / orthanc_s:.2f} | target <= 1.0 |"
    )
    print(
        f"| gateway floor: serial upload + confirmed publish, no DICOM ({what}) | floor {floor_s:.2f} s "
        f"| Orthanc {orthanc_s:.2f} s | ratio {floor_s / orthanc_s:.2f} | gateway >= floor |"
    )
    print(
        f"| gateway DICOM side alone: its AE answering once it holds each file, no store ({what}) "
        f"| DICOM only {dicom_only_s:.2f} s | Orthanc {orthanc_s:.2f} s "
        f"| ratio {dicom_only_s / orthanc_s:.2f} | gateway ~ floor + DICOM only |"
    )
    print(f"| gateway peak RSS (VmHWM) | {peak_mb:.0f} MB | | | target < 300 MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
