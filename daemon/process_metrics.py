"""The standard ``process_*`` gauges (as Prometheus client libraries export them), read from
``/proc`` on Linux: memory, file descriptors against their limit, CPU time, start time.
Elsewhere they are left out rather than reported as zero."""

from __future__ import annotations

import functools
import os
import resource
from pathlib import Path

_PROC = Path("/proc/self")


def process_values() -> dict[str, tuple[str, str, float]]:
    """name -> (type, help, value); empty where /proc is missing."""
    if not _PROC.is_dir():
        return {}
    page = os.sysconf("SC_PAGE_SIZE")
    _size, resident = (int(v) for v in (_PROC / "statm").read_text().split()[:2])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft_fds, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes",
                                          float(resident * page)),
        "process_open_fds": ("gauge", "Open file descriptors",
                             float(len(os.listdir(_PROC / "fd")))),
        "process_max_fds": ("gauge", "The open file descriptor limit (soft)", float(soft_fds)),
        "process_cpu_seconds_total": ("counter", "User and system CPU time spent, in seconds",
                                      usage.ru_utime + usage.ru_stime),
        "process_start_time_seconds": ("gauge", "Start time of the process since the Unix "
                                       "epoch, in seconds", _start_time()),
    }


@functools.cache  # fixed for the process's life: read once, not on every scrape
def _start_time() -> float:
    """From /proc/self/stat's start time in clock ticks after boot, and the boot time."""
    stat = (_PROC / "stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22 of stat(5)
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")
