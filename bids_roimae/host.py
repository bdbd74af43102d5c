"""What the host gives this process: the cores and the memory it may use.

Both respect the limits a scheduler or container sets (a SLURM CPU set, a Docker
``--memory`` limit), which the machine-wide figures do not show.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Used when the memory available cannot be read.
UNKNOWN_MEMORY_BYTES = 4 << 30
#: cgroup v1 reports "no limit" as a number near 2**63.
_NO_LIMIT = 1 << 60


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity set), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _read_number(path: Path):
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo: Path):
    """``MemAvailable`` in bytes: free memory plus what the page cache can give back."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(cgroup: Path):
    """Bytes left under this process's cgroup memory limit (v2, then v1); None if unset."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        limit = _read_number(cgroup / limit_file)  # v2 "max" (no limit) reads as None
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_number(cgroup / usage_file) or 0
        return max(0, limit - usage)
    return None


def available_memory(meminfo="/proc/meminfo", cgroup="/sys/fs/cgroup") -> int:
    """Bytes of memory this process can still use without swapping.

    Linux's ``MemAvailable`` (free memory plus reclaimable page cache: after reading a
    few BOLD runs most free memory is page cache), capped by the headroom under a cgroup
    memory limit; elsewhere the free physical pages, else :data:`UNKNOWN_MEMORY_BYTES`.

    Parameters
    ----------
    meminfo, cgroup : path
        Where the kernel reports them (parameters so that tests can point elsewhere).
    """
    available = _meminfo_available(Path(meminfo))
    if available is None:
        try:
            available = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            available = UNKNOWN_MEMORY_BYTES
    headroom = _cgroup_headroom(Path(cgroup))
    return available if headroom is None else min(available, headroom)
