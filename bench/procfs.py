"""What /proc says of processes: CPU time, memory, the machine's busy time.

Shared by bench/plan_day.py and bench/peers/ (the Celery worker imports the peers'
module, so this one imports nothing but the standard library)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

K = TypeVar("K")


def cpu_seconds(pids: Mapping[K, int]) -> dict[K, float]:
    """User + system CPU seconds of each live process, by the key it is given under."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[K, float] = {}
    for key, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[key] = (int(fields[11]) + int(fields[12])) / tick
    return found


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None
