"""Run every benchmark in ``bench/`` and write ``bench/RESULTS.md``.

Each ``bench/*.py`` script except this one runs as a subprocess (the repository on ``PYTHONPATH``, its
own timeout). Every stdout line that starts with ``| `` is a result row; a script that fails or times out
contributes a row saying so. The table is written to ``bench/RESULTS.md`` with the date and the machine,
and printed.

    python bench/run_all.py [--timeout 900] [--only bus_hop ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _machine import cpu_times

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
HEADER = "| benchmark | MWM | baseline | ratio | target |"
RULE = "|---|---|---|---|---|"
STDERR_TAIL_LINES = 5


@dataclass(frozen=True)
class Outcome:
    """What one benchmark script produced."""

    script: str
    rows: list[str]
    returncode: int | None  # None: timed out
    seconds: float
    stderr_tail: list[str]

    @property
    def failed(self) -> bool:
        return self.returncode != 0


def benchmark_scripts(only: list[str]) -> list[Path]:
    """``bench/*.py`` except this runner and modules starting with ``_``; restricted to ``only`` if given."""
    me = Path(__file__).name
    scripts = sorted(path for path in BENCH.glob("*.py") if path.name != me and not path.name.startswith("_"))
    if only:
        scripts = [path for path in scripts if path.stem in only]
    return scripts


def wait_until_quiet(idle_fraction: float = 0.8, timeout_s: float = 60.0) -> None:
    """Wait until the CPUs were mostly idle for a whole second (services finishing the previous run's work:
    dropped queues, a database writing behind), so a benchmark does not inherit its predecessor's load."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        idle_before, total_before = cpu_times()
        time.sleep(1.0)
        idle_after, total_after = cpu_times()
        if (idle_after - idle_before) >= idle_fraction * max(1, total_after - total_before):
            return


def run_script(script: Path, timeout_s: float) -> Outcome:
    """Run one benchmark; its result rows are the stdout lines starting with ``| ``."""
    wait_until_quiet()
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    started = time.monotonic()
    print(f"running {script.name} (timeout {timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
    try:
        completed = subprocess.run(
            [sys.executable, str(script)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        return Outcome(
            script.name,
            _rows(_text(exc.stdout)),
            None,
            time.monotonic() - started,
            _text(exc.stderr).splitlines()[-STDERR_TAIL_LINES:],
        )
    return Outcome(
        script.name,
        _rows(completed.stdout),
        completed.returncode,
        time.monotonic() - started,
        completed.stderr.splitlines()[-STDERR_TAIL_LINES:],
    )


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _rows(stdout: str) -> list[str]:
    """Table lines, without a script's own header rows (a row followed by a ``| --- |`` separator)."""
    lines = [line.rstrip() for line in stdout.splitlines() if line.startswith("| ")]
    return [
        line
        for index, line in enumerate(lines)
        if not _is_separator(line) and not (index + 1 < len(lines) and _is_separator(lines[index + 1]))
    ]


def _is_separator(line: str) -> bool:
    return set(line) <= set("|-: ")


def table_rows(outcome: Outcome) -> list[str]:
    """The rows a benchmark contributes; a failure adds a row saying how it failed."""
    if not outcome.failed:
        return outcome.rows or [f"| {outcome.script} | no result row printed | | | |"]
    how = "timed out" if outcome.returncode is None else f"failed (exit code {outcome.returncode})"
    return [*outcome.rows, f"| {outcome.script} | {how} | | | |"]


def machine_facts() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def report(outcomes: list[Outcome]) -> str:
    """The markdown of ``bench/RESULTS.md``."""
    lines = [
        "# Benchmark results",
        "",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine_facts()}  ",
        f"Command: `python bench/run_all.py` (load average at the end: {_load()})",
        "",
        "Each ratio compares MWM with its baseline measured side by side in the same run, on the same",
        "machine and services; absolute numbers depend on the machine and its load, the ratios much less.",
        "",
        HEADER,
        RULE,
        *(row for outcome in outcomes for row in table_rows(outcome)),
        "",
        "| script | exit code | seconds |",
        "|---|---|---|",
        *(
            f"| {outcome.script} | {'timeout' if outcome.returncode is None else outcome.returncode} "
            f"| {outcome.seconds:.0f} |"
            for outcome in outcomes
        ),
    ]
    failures = [outcome for outcome in outcomes if outcome.failed and outcome.stderr_tail]
    for outcome in failures:
        lines += ["", f"`{outcome.script}` stderr (last lines):", "", "```", *outcome.stderr_tail, "```"]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per script (default 900)")
    parser.add_argument("--only", nargs="*", default=[], help="script names without .py (default: all)")
    arguments = parser.parse_args()
    outcomes = [run_script(script, arguments.timeout) for script in benchmark_scripts(arguments.only)]
    text = report(outcomes)
    RESULTS.write_text(text)
    print(text)
    print(f"written to {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 1 if any(outcome.failed for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
