"""The main job end to end on one machine: a CT study in by DICOM, a result out by DICOM.

Run by ``scripts/demo`` after set-up and ``scripts/services up``. Steps, each printed with its timing:
generate a CT study; register the example application (a MIP, local engine), a DICOM sink and the AE title
``MWM-MIP``; start MWM (every consumer in one process) and the DICOM gateway; start a dcmtk ``storescp`` as
the PACS; send the study with dcmtk ``storescu``; wait for ``export.completed`` and check the MIP arrived.
Uses its own exchange, database and bucket, and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.dicom import write_ct_study  # noqa: E402
from devkit.peers import StoreSCP, free_port, storescu, wait_for_port  # noqa: E402
from devkit.pipeline import bound_queue  # noqa: E402
from devkit.services import settings_env, unique_settings  # noqa: E402
from schemas.applications import SinkDefinition  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.adapters.rabbitmq import Bus  # noqa: E402
from wm.cli.bus import resolve_consumer  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.fleet import consumer_names as available_consumers  # noqa: E402
from wm.registry import Registry, engine_validator  # noqa: E402

STARTED = time.perf_counter()


def step(message: str) -> None:
    """Progress, with the time since the demo started."""
    print(f"[{time.perf_counter() - STARTED:6.2f}s] {message}", flush=True)


async def configure(settings: Settings, pacs_port: int) -> None:
    """Sink, application and AE title, through the registry (what `mwm sinks/apps/aet` do over the API)."""
    async with Database(settings.mongo) as database:
        registry = Registry(database, engine_validator(settings))
        await registry.sinks.create(
            SinkDefinition.model_validate(
                {
                    "name": "pacs",
                    "type": "dicom",
                    "args": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                }
            )
        )
        await registry.register(
            {
                "name": "mip",
                "version": "1.0.0",
                "ae_titles": ["MWM-MIP"],
                "discovery": {"quiet_period_s": 1.0, "filters": {"modalities": ["CT"]}},
                "map": {"command": ["python", str(REPO / "examples" / "mip" / "app.py")], "timeout_s": 600},
                "engine": {"name": "local"},
                "sinks": ["pacs"],
            }
        )
    async with Bus(settings.bus) as bus:
        for name in available_consumers():
            consumer = resolve_consumer(name)
            await bus.declare_consumer_queue(bus.channel, consumer.name, consumer.routing_keys)


async def wait_for_export(settings: Settings, timeout: float) -> dict[str, object]:
    """The first export.completed on the exchange, with progress lines for the events before it."""
    async with bound_queue(settings, "mwm.#") as queue:
        seen_files = 0
        deadline = time.monotonic() + timeout
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                body = json.loads(message.body)
                kind = (message.type or "").removeprefix("mwm.").rsplit(".v", 1)[0]
                if kind == "payload.arrived":
                    seen_files += 1
                    if seen_files % 20 == 0:
                        step(f"  {seen_files} files stored and announced")
                    continue
                step(
                    f"  {kind}: "
                    + ", ".join(f"{k}={body[k]}" for k in ("bucket_id", "job_id", "status") if k in body)
                )
                if kind == "export.completed":
                    return dict(body)
                if time.monotonic() > deadline:
                    break
    raise TimeoutError("no export.completed in time")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child process whose output goes to ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)


async def main() -> int:
    """Run the demo; exit status 0 when the result reached the PACS."""
    work = Path(tempfile.mkdtemp(prefix="mwm-demo-"))
    slices = int(os.environ.get("MWM_DEMO_SLICES", "64"))
    settings = unique_settings(work / "work")
    gateway_port, pacs_port = free_port(), free_port()
    env = {
        **settings_env(settings),
        "MWM_GATEWAY__PORT": str(gateway_port),
        "MWM_OBSERVABILITY__HTTP_PORT": "0",
    }
    step(f"work directory {work}")
    study = write_ct_study(work / "study", series=2, slices_per_series=slices // 2, rows=256, columns=256)
    step(f"generated CT study {study.study_uid}: {len(study.files)} slices in 2 series")
    await configure(settings, pacs_port)
    step("registered application 'mip' (local engine), sink 'pacs' and AE title MWM-MIP")
    processes = [
        start([sys.executable, "-m", "wm", "run"], env, work / "mwm.log"),
        start([sys.executable, "-m", "wm", "gateway"], env, work / "gateway.log"),
    ]
    try:
        with StoreSCP(work / "pacs", aet="PACS", port=pacs_port, verbose=False):
            await asyncio.to_thread(wait_for_port, "127.0.0.1", gateway_port, timeout=60.0)
            step(f"MWM running (gateway on port {gateway_port}); PACS (storescp) on port {pacs_port}")
            waiting = asyncio.create_task(wait_for_export(settings, 300))
            await asyncio.sleep(0.2)
            sent = time.perf_counter()
            result = await asyncio.to_thread(
                storescu, "127.0.0.1", gateway_port, "MWM-MIP", work / "study", calling_aet="CT-SCANNER"
            )
            step(f"storescu sent the study in {time.perf_counter() - sent:.2f}s (exit {result.returncode})")
            if result.returncode != 0:
                print(result.stderr[-2000:], file=sys.stderr)
                waiting.cancel()
                return 1
            completed = await waiting
            received = sorted((work / "pacs").rglob("*"))
            received = [path for path in received if path.is_file()]
            step(
                f"export {completed['status']}: {len(received)} file(s) at the PACS; "
                f"study in to result out {time.perf_counter() - sent:.2f}s"
            )
            return 0 if completed["status"] == "succeeded" and received else 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=40)
        step(f"stopped MWM; logs in {work}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
