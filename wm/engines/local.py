"""The ``local`` engine: runs a MAP on this machine (the default for a single-machine site).

A job runs in a detached runner process (``python -m wm.engines.local_runner JOB_DIR``) that stages the
job's inputs from the object store into ``JOB_DIR/input``, runs the MAP, uploads ``JOB_DIR/output`` to the
job's output prefix and records its phase in ``JOB_DIR/status.json``. The MAP runs with docker or podman
when one is installed and the application names an image; otherwise the application's command runs as a
subprocess. Either way it gets the MAP conventions: ``MONAI_INPUTPATH`` / ``MONAI_OUTPUTPATH`` and
``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH``. In a command, ``python`` means MWM's own interpreter;
the command inherits the runner's environment without MWM's own ``MWM_*`` settings.

The status lives on disk, not in the process that launched the job, so any consumer replica on this
machine can follow the job, and a restarted monitor loses nothing. The engine job id is the job id.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from schemas.applications import ApplicationDefinition
from wm.config import ObjectStoreSettings
from wm.engines import EngineStatus, JobSpec
from wm.errors import PermanentError
from wm.plugins import PluginSettings

STATUS_FILE = "status.json"
SPEC_FILE = "job.json"
PID_FILE = "runner.pid"


def container_runtime() -> str | None:
    """docker or podman, whichever is installed."""
    return shutil.which("docker") or shutil.which("podman")


class LocalEngineSettings(PluginSettings):
    """What the local engine reads: its work directory, and the object store its runners stage files with
    (credentials included: the runner downloads the inputs and uploads the outputs itself)."""

    work_dir: str
    object_store: ObjectStoreSettings


class LocalEngine:
    """Runs jobs as detached processes under ``settings.work_dir/jobs``; the ``mwm.engines`` entry point."""

    name = "local"
    settings_type = LocalEngineSettings

    def __init__(self, settings: LocalEngineSettings) -> None:
        if not settings.work_dir:
            raise PermanentError("the local engine needs MWM_WORK_DIR")
        self._settings = settings
        self._root = Path(settings.work_dir) / "jobs"

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files, logs and status live."""
        return self._root / job_id

    async def validate(self, application: ApplicationDefinition) -> list[str]:
        """The MAP must be runnable here: an image with a container runtime, or a resolvable command."""
        spec = application.map
        if spec.image and container_runtime():
            return []
        if not spec.command:
            missing = "no container runtime (docker/podman) is installed" if spec.image else "no image"
            return [f"map: {missing} and no command to run locally"]
        executable = spec.command[0]
        if executable != "python" and shutil.which(executable) is None:
            return [f"map.command: {executable!r} is not an executable on this machine"]
        return []

    async def launch(self, job: JobSpec) -> str:
        """Start the runner once per job id (a second launch finds the job started and returns)."""
        job_dir = self.job_dir(job.job_id)
        await asyncio.to_thread(self._start_runner, job, job_dir)
        return job.job_id

    def _start_runner(self, job: JobSpec, job_dir: Path) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            marker = os.open(job_dir / PID_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # launched before (a duplicate bucket.ready or a retried launch)
        spec = {
            "job_id": job.job_id,
            "correlation_id": job.correlation_id,
            "application": job.application.model_dump(mode="json"),
            "input_prefix": job.input_prefix,
            "output_prefix": job.output_prefix,
            "deadline": job.deadline.isoformat(),
        }
        (job_dir / SPEC_FILE).write_text(json.dumps(spec))
        write_status(job_dir, "pending", "")
        with open(job_dir / "runner.log", "ab") as log:
            runner = subprocess.Popen(
                [sys.executable, "-m", "wm.engines.local_runner", str(job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, **_settings_env(self._settings)},
            )
        os.write(marker, str(runner.pid).encode())
        os.close(marker)

    async def status(self, engine_job_id: str) -> EngineStatus:
        """The phase the runner last recorded."""
        path = self.job_dir(engine_job_id) / STATUS_FILE
        try:
            recorded = json.loads(await asyncio.to_thread(path.read_text))
        except FileNotFoundError:
            return EngineStatus("error", f"job {engine_job_id} is unknown to the local engine")
        except json.JSONDecodeError:
            return EngineStatus("pending", "status being written")
        return EngineStatus(recorded["phase"], recorded.get("message", ""))

    async def cancel(self, engine_job_id: str) -> None:
        """Kill the runner and the MAP (its whole process group)."""
        try:
            pid = int((self.job_dir(engine_job_id) / PID_FILE).read_text() or "0")
        except (FileNotFoundError, ValueError):
            return
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        write_status(self.job_dir(engine_job_id), "failed", "cancelled")

    async def cleanup(self, engine_job_id: str) -> None:
        """Remove the job's work directory."""
        await asyncio.to_thread(shutil.rmtree, self.job_dir(engine_job_id), True)


def write_status(job_dir: Path, phase: str, message: str) -> None:
    """Record the job's phase atomically (readers never see half a file)."""
    temporary = job_dir / f".{STATUS_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps({"phase": phase, "message": message}))
    temporary.replace(job_dir / STATUS_FILE)


def _settings_env(settings: LocalEngineSettings) -> dict[str, str]:
    """The object-store settings the runner needs, as MWM_ variables."""
    store = settings.object_store
    return {f"MWM_OBJECT_STORE__{name.upper()}": str(value) for name, value in store}
