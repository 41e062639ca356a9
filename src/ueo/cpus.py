"""The CPUs a process may really use (torch-free: the command line asks before importing torch)."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_quota(root: Path = CGROUP) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` (or v1 cfs quota), rounded up; None if unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            if quota == "max":
                return None
            return max(1, -(-int(quota) // int(period)))
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else max(1, -(-quota // period))
    except (OSError, ValueError):
        return None
    return None
