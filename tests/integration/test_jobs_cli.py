"""``mwm jobs``: the real command (a subprocess) against the API, on jobs the real pipeline made."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from devkit.peers import free_port
from devkit.services import settings_env
from tests.support.api import api_settings
from tests.support.cli import Cli, finished
from tests.support.jobs import SLEEPER, job_finished, launch_job, pipeline_and_api
from wm.config import Settings

LINE_TIMEOUT_S = 30.0


async def line_with(stream: asyncio.StreamReader | None, text: str) -> str:
    """The first line of ``stream`` holding ``text``."""
    assert stream is not None
    while text not in (line := (await asyncio.wait_for(stream.readline(), LINE_TIMEOUT_S)).decode()):
        assert line, f"the command ended without printing {text!r}"
    return line


async def test_jobs_are_listed_shown_cancelled_and_watched_to_their_end(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = api_settings(live_settings, free_port())
    cli = Cli(settings_env(settings))
    async with pipeline_and_api(settings) as events:
        done = await launch_job(settings, events, tmp_path, "mip")
        await job_finished(events, done.job_id)
        slow = await launch_job(settings, events, tmp_path, "slow", command=SLEEPER)
        active = await cli.spawn("jobs", "watch", "--interval", "0.2")
        await line_with(active.stdout, slow.job_id)
        active.send_signal(signal.SIGINT)
        watcher = await cli.spawn("jobs", "watch", slow.job_id, "--interval", "0.2")
        first = await line_with(watcher.stdout, slow.job_id)
        cancel = await cli("jobs", "cancel", slow.job_id)
        watched = await finished(watcher)
        stopped = await finished(active)
        listed = json.loads((await cli("jobs", "list", "--output", "json")).out)
        succeeded = json.loads((await cli("jobs", "list", "--state", "succeeded", "-o", "json")).out)
        shown = await cli("jobs", "show", done.job_id, "--output", "json")
        refused = await cli("jobs", "cancel", done.job_id)
        replay = await cli("jobs", "watch", done.job_id)
    assert stopped.code == 0, stopped.err
    assert first.split()[-1] in ("launched", "running"), first
    assert cancel.code == 0 and f"cancellation of job {slow.job_id} requested" in cancel.out
    assert watched.code == 1 and watched.out.splitlines()[-1].split()[1:3] == [slow.job_id, "cancelled"]
    assert [job["id"] for job in listed] == [slow.job_id, done.job_id], "newest first"
    assert [job["id"] for job in succeeded] == [done.job_id]
    assert shown.code == 0 and json.loads(shown.out)["state"] == "succeeded"
    assert len(json.loads(shown.out)["outputs"]) == 1
    assert refused.code == 1 and "(409)" in refused.err and "already ended" in refused.err
    assert replay.code == 0 and replay.out.split()[1:] == [done.job_id, "succeeded"]
