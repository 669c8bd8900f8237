"""loadtest.procstat against this very process and one that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.procstat import cpu_or_none, cpu_seconds, peak_rss_bytes, rss_bytes, rss_or_none


def test_this_process_cpu_grows_and_its_memory_is_plausible() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn a little CPU
        pass
    assert cpu_seconds(os.getpid()) >= before + 0.03
    rss, peak = rss_bytes(os.getpid()), peak_rss_bytes(os.getpid())
    assert 10 * 2**20 < rss <= peak < 4 * 2**30


def test_a_process_gone_reads_as_none_or_raises() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(child.stdout)
    assert cpu_or_none(gone) is None
    assert rss_or_none(gone) is None
    assert peak_rss_bytes(gone) == 0
    assert peak_rss_bytes(None) == 0
    with pytest.raises(OSError):
        cpu_seconds(gone)
