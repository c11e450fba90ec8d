"""Benchmark: export a 324-slice CT study from the object store with the DICOM sink, against Orthanc.

Both send the same study to the same dcmtk ``storescp`` (``--fork``: one process per association), in the
same run, alternating, ``--rounds`` times each; the median of each is compared.

- mwm: ``DicomSink.export`` of the study's files as they sit in the object store (parallel downloads into
  memory or a scratch directory, file meta read, C-STORE over up to the sink's ``max_associations``
  associations as the files arrive).
- Orthanc: the study uploaded into Orthanc first (dcmtk storescu), then
  ``POST /modalities/{id}/store`` with ``Synchronous: true`` (Orthanc reads from its own storage).
- the download floor: the same files fetched from the object store with parallel GETs
  (``object_store.workers`` at a time), into memory or to disk as the sink fetches them
  (``export.in_memory_max_bytes``), and nothing else: no S3-backed exporter can be faster.

Needs the S3 server (``bash scripts/services up``), dcmtk and Orthanc. Prints markdown-table rows: export
vs Orthanc (target <= 2.5), export vs the download floor (target <= 1.3), and the export's CPU floor: the
CPU seconds every process of the machine spent during the export (the S3 server, the exporter, storescp),
over the core count, against the download floor: no exporter on this machine can do better than that.

Run: ``python -m bench.export_vs_orthanc [--slices 324] [--rounds 3] [--associations 1]``; the sender
is the sink's default (``wire``: the exporter's event loop writes the files' bytes) unless
``MWM_EXPORT__SENDER=pynetdicom`` (pynetdicom's SCU in a thread per association, or in a process per
association with ``MWM_EXPORT__SEND_PROCESSES=true``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _root in (REPO, REPO / "bench"):  # `python bench/export_vs_orthanc.py` from anywhere, or `-m bench...`
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from _machine import busy_s  # noqa: E402

from devkit.dicom import write_ct_study  # noqa: E402
from devkit.peers import LOCALHOST, Orthanc, StoreSCP, astorescu  # noqa: E402
from schemas.applications import SinkDefinition  # noqa: E402
from schemas.events import FileRef  # noqa: E402
from wm.adapters.objectstore import ObjectStore  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.sinks import FileSource  # noqa: E402
from wm.sinks.dicom import DicomSink, DicomSinkSettings  # noqa: E402

TARGET_RATIO = 2.5
TARGET_FLOOR_RATIO = 1.3
SCP_AET = "BENCHSCP"


async def upload(objects: ObjectStore, files: list[Path], prefix: str) -> list[FileRef]:
    """Put the study in the object store, as a job's outputs would be."""
    return list(await asyncio.gather(*(objects.put_file(f"{prefix}/{p.name}", p) for p in files)))


async def time_mwm(sink: DicomSink, refs: list[FileRef], cpu: list[float], machine: list[float]) -> float:
    """Seconds to export ``refs``; appends this process's CPU seconds (every thread; not the CPU of the
    sink's sending processes, with ``export.send_processes``) to ``cpu``, and the whole machine's (the S3
    server and storescp too) to ``machine``."""
    started, cpu_started, busy_started = time.perf_counter(), time.process_time(), busy_s()
    results = (await sink.export(refs)).results
    elapsed = time.perf_counter() - started
    cpu.append(time.process_time() - cpu_started)
    machine.append(busy_s() - busy_started)
    failed = [r for r in results if r.status != "succeeded"]
    if failed:
        raise RuntimeError(f"mwm export failed for {len(failed)} files, first: {failed[0]}")
    return elapsed


async def time_download(
    objects: FileSource, refs: list[FileRef], directory: Path, workers: int, memory_limit: int
) -> float:
    """Seconds to fetch ``refs`` with ``workers`` parallel GETs, as the sink fetches them: into memory up to
    ``memory_limit`` bytes a file, any larger one into ``directory``."""
    clear(directory)
    slots = asyncio.Semaphore(workers)

    async def one(index: int, ref: FileRef) -> None:
        async with slots:
            await objects.fetch(ref.key, directory / f"{index}.dcm", lambda size: size <= memory_limit)

    started = time.perf_counter()
    await asyncio.gather(*(one(index, ref) for index, ref in enumerate(refs)))
    return time.perf_counter() - started


def time_orthanc(orthanc: Orthanc, study_id: str, count: int) -> float:
    started = time.perf_counter()
    summary = orthanc.store_to_modality("dest", [study_id], synchronous=True)
    elapsed = time.perf_counter() - started
    if summary.get("FailedInstancesCount") or summary.get("InstancesCount") != count:
        raise RuntimeError(f"Orthanc export incomplete: {summary}")
    return elapsed


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def bench_settings(root: Path, associations: int) -> Settings:
    """Default settings with a bucket of its own and ``associations`` per task."""
    base = Settings()
    return base.model_copy(
        update={
            "object_store": base.object_store.model_copy(
                update={"bucket": f"mwm-bench-{uuid.uuid4().hex[:8]}"}
            ),
            "export": base.export.model_copy(update={"associations_per_task": max(associations, 2)}),
            "work_dir": str(root / "work"),
        }
    )


def dicom_sink(settings: Settings, objects: ObjectStore, port: int, associations: int) -> DicomSink:
    args = {"ae_title": SCP_AET, "host": LOCALHOST, "port": port, "max_associations": associations}
    definition = SinkDefinition.model_validate({"name": "bench", "type": "dicom", "args": args})
    return DicomSink(definition, DicomSinkSettings.of(settings), objects)


async def alternate(
    sink: DicomSink, refs: list[FileRef], orthanc: Orthanc, received: Path, rounds: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``rounds`` of each (export, Orthanc, download floor), alternating, into emptied directories; and the
    machine's CPU seconds during each export."""
    [study_id] = orthanc.studies()
    mwm_times: list[float] = []
    orthanc_times: list[float] = []
    floor_times: list[float] = []
    mwm_cpu: list[float] = []
    machine_cpu: list[float] = []
    workers = sink.settings.object_store.workers
    export = sink.settings.export
    memory_limit = export.in_memory_max_bytes if export.sender == "wire" else -1
    for _ in range(rounds):
        clear(received)
        mwm_times.append(await time_mwm(sink, refs, mwm_cpu, machine_cpu))
        clear(received)
        orthanc_times.append(await asyncio.to_thread(time_orthanc, orthanc, study_id, len(refs)))
        floor = received.parent / "floor"
        floor_times.append(await time_download(sink.objects, refs, floor, workers, memory_limit))
    print(f"mwm process CPU (s): {[round(t, 2) for t in mwm_cpu]}", file=sys.stderr)
    print(f"machine CPU during the export (s): {[round(t, 2) for t in machine_cpu]}", file=sys.stderr)
    return mwm_times, orthanc_times, floor_times, machine_cpu


async def run(slices: int, rounds: int, associations: int, max_pdu: int) -> tuple[float, float, float, float]:
    """Median seconds of (mwm, Orthanc, download floor, the machine's CPU during the export)."""
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as scratch:
        root = Path(scratch)
        settings = bench_settings(root, associations)
        study = write_ct_study(root / "study", slices_per_series=slices, rows=512, columns=512, seed=7)
        async with ObjectStore(settings.object_store) as objects:
            try:
                refs = await upload(objects, study.files, "jobs/bench/outputs")
                with (
                    StoreSCP(
                        root / "received",
                        aet=SCP_AET,
                        extra_args=["--fork", "--max-pdu", str(max_pdu)],
                        verbose=False,
                    ) as scp,
                    Orthanc(aet="BENCHORTHANC") as orthanc,
                ):
                    await astorescu(LOCALHOST, orthanc.dicom_port, orthanc.aet, root / "study", check=True)
                    orthanc.set_modality("dest", SCP_AET, LOCALHOST, scp.port)
                    sink = dicom_sink(settings, objects, scp.port, associations)
                    mwm_times, orthanc_times, floor_times, machine_cpu = await alternate(
                        sink, refs, orthanc, root / "received", rounds
                    )
            finally:
                await objects.remove_prefix("")
                await asyncio.to_thread(objects._client.remove_bucket, objects.bucket)
    rounded = [[round(t, 2) for t in times] for times in (mwm_times, orthanc_times, floor_times)]
    print(f"rounds (s): mwm {rounded[0]}, Orthanc {rounded[1]}, download {rounded[2]}", file=sys.stderr)
    median = statistics.median
    return median(mwm_times), median(orthanc_times), median(floor_times), median(machine_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=324)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--associations", type=int, default=1, help="the sink's max_associations")
    parser.add_argument(
        "--scp-max-pdu", type=int, default=16384, help="storescp's maximum PDU (dcmtk: 4096..131072)"
    )
    options = parser.parse_args()
    mwm, orthanc, floor, machine_cpu = asyncio.run(
        run(options.slices, options.rounds, options.associations, options.scp_max_pdu)
    )
    export = Settings().export
    senders = "processes" if export.send_processes else "threads"
    sender = "wire" if export.sender == "wire" else f"pynetdicom in {senders}"
    what = (
        f"{options.slices}-slice CT, {options.associations} association(s), {sender}, "
        f"PDU {options.scp_max_pdu}"
    )
    print(
        f"| export vs Orthanc ({what}) | mwm {mwm:.2f} s | Orthanc {orthanc:.2f} s "
        f"| ratio {mwm / orthanc:.2f} | target <= {TARGET_RATIO} |"
    )
    print(
        f"| export vs parallel download alone ({what}) | mwm {mwm:.2f} s | download {floor:.2f} s "
        f"| ratio {mwm / floor:.2f} | target <= {TARGET_FLOOR_RATIO} |"
    )
    # The export's processes (S3 server, exporter, storescp) share the machine's cores: its CPU seconds
    # over the core count is the shortest it could take here, whatever the exporter's design.
    cores = os.cpu_count() or 1
    print(
        f"| export's CPU floor: machine CPU during the export / {cores} cores ({what}) "
        f"| {machine_cpu / cores:.2f} s | download {floor:.2f} s | ratio {machine_cpu / cores / floor:.2f} "
        f"| none (the best the ratio above can be on this machine) |"
    )


if __name__ == "__main__":
    main()
