"""What Linux says of a process: CPU time, resident and peak memory (``/proc/<pid>``).

The one home of these readings for the bench, the scale run, the raw baseline and the load
test. :func:`cpu_seconds` and :func:`rss_bytes` raise :class:`OSError` (a process gone, no
``/proc``); the ``*_or_none`` forms are for samplers that must outlive the process they watch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_or_none", "cpu_seconds", "peak_rss_bytes", "rss_bytes", "rss_or_none"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def peak_rss_bytes(pid: int | None) -> int:
    """VmHWM (peak resident set) of a process, bytes; 0 if unknown."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_or_none(pid: int | None) -> float | None:
    """:func:`cpu_seconds`, or ``None`` for no process or one that is gone."""
    if pid is None:
        return None
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def rss_or_none(pid: int | None) -> int | None:
    """:func:`rss_bytes`, or ``None`` for no process or one that is gone."""
    if pid is None:
        return None
    try:
        return rss_bytes(pid)
    except (OSError, ValueError, IndexError):
        return None
