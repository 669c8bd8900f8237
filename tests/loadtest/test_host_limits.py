"""The open-files check before a load test: a fleet the host cannot hold is refused, naming the
limit, instead of hanging with CHs retrying for ever (loadtest.runner.check_host_limits)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from loadtest.runner import HostLimitError, check_host_limits


def test_limits_are_raised_and_a_fleet_over_them_is_refused_naming_the_part() -> None:
    check_host_limits(100, 1, local_broker=True, proxy=True)  # small: fits anywhere
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    over = soft  # as many CHs as files: one process, one broker or one proxy cannot hold them
    with pytest.raises(HostLimitError, match="RLIMIT_NOFILE"):
        check_host_limits(over, 1, local_broker=False)
    with pytest.raises(HostLimitError, match="one Mosquitto"):
        check_host_limits(over, 1000, local_broker=True)
    with pytest.raises(HostLimitError, match="fault proxy"):
        check_host_limits(soft // 2, 1000, local_broker=False, proxy=True)


def test_a_process_with_a_low_hard_limit_raises_it_when_it_may() -> None:
    # what a 10,000-CH run needs of its proxy: the hard limit, not just the soft one, raised
    # where the process is allowed to (CAP_SYS_RESOURCE), up to the kernel's fs.nr_open
    probe = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096));"
        "n = int(open('/proc/sys/fs/nr_open').read())\n"
        "try: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); print(n)\n"
        "except (ValueError, OSError): print(4096)"
    )
    code = (
        "import resource; from loadtest.broker import raise_nofile_limit;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096));"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[1])"
    )

    def run(source: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                              check=True)  # fmt: skip
        return [int(x) for x in done.stdout.split()]

    (allowed,) = run(probe)
    assert run(code) == [allowed, allowed]
