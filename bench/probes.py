"""What a process costs, read from /proc: CPU seconds, memory, and finding workerd itself.

CPU is `utime + stime` in clock ticks (10 ms each on Linux), so per-request figures need many
requests per reading; memory is the kernel's `VmRSS` / `VmHWM` in KiB.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def find_workerd(runner_pid: int, timeout: float = 10.0) -> int | None:
    """workerd is a child (or grandchild) of the harness's node runner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frontier = [runner_pid]
        for _ in range(3):
            nxt = []
            for p in frontier:
                for c in children(p):
                    try:
                        comm = Path(f"/proc/{c}/comm").read_text().strip()
                    except OSError:
                        continue
                    if "workerd" in comm:
                        return c
                    nxt.append(c)
            frontier = nxt
        time.sleep(0.1)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time the process has used so far."""
    fields = None if pid is None else _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_kib(pid: int | None, key: str = "VmRSS") -> int | None:
    """One `/proc/PID/status` memory line (VmRSS, VmHWM, ...) in KiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
