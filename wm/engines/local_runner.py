"""``python -m wm.engines.local_runner JOB_DIR``: one local job, from staging to uploaded outputs.

Reads ``JOB_DIR/job.json`` (written by ``LocalEngine.launch``), downloads the job's inputs, runs the MAP
with the MAP environment variables and the application's timeout, uploads every output file and records
the phase in ``JOB_DIR/status.json`` at each step. The MAP's output goes to ``JOB_DIR/app.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from schemas.applications import ApplicationDefinition
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.engines.local import SPEC_FILE, container_runtime, write_status
from wm.retry import retrying

CONTAINER_INPUT = "/var/monai/input"
CONTAINER_OUTPUT = "/var/monai/output"


def map_environment(input_dir: str, output_dir: str) -> dict[str, str]:
    """The MAP conventions for where inputs are and outputs go."""
    return {
        "MONAI_INPUTPATH": input_dir,
        "MONAI_OUTPUTPATH": output_dir,
        "HOLOSCAN_INPUT_PATH": input_dir,
        "HOLOSCAN_OUTPUT_PATH": output_dir,
    }


def map_command(application: ApplicationDefinition, job_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line that runs the MAP, and its environment."""
    spec = application.map
    runtime = container_runtime()
    if spec.image and runtime:
        command = [
            runtime,
            "run",
            "--rm",
            "-v",
            f"{job_dir / 'input'}:{CONTAINER_INPUT}:ro",
            "-v",
            f"{job_dir / 'output'}:{CONTAINER_OUTPUT}",
        ]
        for key, value in {**spec.environment, **map_environment(CONTAINER_INPUT, CONTAINER_OUTPUT)}.items():
            command += ["-e", f"{key}={value}"]
        if spec.cpu:
            command += ["--cpus", str(spec.cpu)]
        if spec.memory:
            command += ["--memory", spec.memory.replace("i", "").lower()]
        if spec.gpu:
            command += ["--gpus", str(spec.gpu)]
        return [*command, spec.image, *spec.command], dict(os.environ)
    executable = sys.executable if spec.command[0] == "python" else spec.command[0]
    # The runner's environment without MWM's settings: the application is not MWM, and those hold the
    # database's and the broker's URLs, the S3 keys and the API keys.
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("MWM_")},
        **spec.environment,
        **map_environment(str(job_dir / "input"), str(job_dir / "output")),
    }
    return [executable, *spec.command[1:]], environment


async def run(job_dir: Path) -> tuple[str, str]:
    """Stage, run and collect one job; returns the final phase and message."""
    spec = json.loads((job_dir / SPEC_FILE).read_text())
    application = ApplicationDefinition.model_validate(spec["application"])
    timeout = (datetime.fromisoformat(spec["deadline"]) - datetime.now().astimezone()).total_seconds()
    settings = Settings()
    retry = settings.retry  # an object-store outage (a restart) must not fail the job
    async with contextlib.AsyncExitStack() as stack:
        objects = await retrying(
            lambda: stack.enter_async_context(ObjectStore(settings.object_store)),
            retry,
            "open the object store",
        )
        write_status(job_dir, "running", "staging inputs")
        prefix = spec["input_prefix"]
        for ref in await retrying(functools.partial(objects.list, prefix), retry, f"list {prefix}"):
            target = job_dir / "input" / ref.key.removeprefix(prefix)
            await retrying(functools.partial(objects.download_file, ref.key, target), retry, f"get {ref.key}")
        (job_dir / "output").mkdir(exist_ok=True)
        write_status(job_dir, "running", "application running")
        code = await _run_map(application, job_dir, max(timeout, 1.0))
        if code != 0:
            return "failed", f"application exited with {code}: {_tail(job_dir / 'app.log')}"
        for path in sorted(p for p in (job_dir / "output").rglob("*") if p.is_file()):
            key = spec["output_prefix"] + path.relative_to(job_dir / "output").as_posix()
            content_type = "application/dicom" if path.suffix == ".dcm" else "application/octet-stream"
            await retrying(functools.partial(objects.put_file, key, path, content_type), retry, f"put {key}")
    return "succeeded", ""


async def _run_map(application: ApplicationDefinition, job_dir: Path, limit_s: float) -> int:
    command, environment = map_command(application, job_dir)
    with (job_dir / "app.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=environment, cwd=job_dir, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
        try:
            return await asyncio.wait_for(process.wait(), limit_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            return -9


def _tail(path: Path, limit: int = 500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except FileNotFoundError:
        return ""


def main() -> int:
    """Run the job in ``sys.argv[1]`` and record how it ended."""
    job_dir = Path(sys.argv[1])
    try:
        phase, message = asyncio.run(run(job_dir))
    except Exception as exc:  # the status file must say why, whatever failed
        phase, message = "error", f"{type(exc).__name__}: {exc}"
    write_status(job_dir, phase, message)
    return 0 if phase == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
