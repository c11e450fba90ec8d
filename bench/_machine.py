"""The whole machine's CPU time (every process: servers and peers too), for benchmarks that account for it."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def busy_s() -> float:
    """CPU seconds all CPUs spent busy (not idle, not waiting for I/O) since boot."""
    idle, total = cpu_times()
    return (total - idle) / os.sysconf("SC_CLK_TCK")
