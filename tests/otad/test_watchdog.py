"""The watchdog's decision (otad.watchdog.unhealthy_reasons) and its writer probe against a real
store whose writer is really stuck in a job; sd_notify's environment parsing and datagrams."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from otad.looplag import LoopLag
from otad.sdnotify import Notifier, watchdog_interval
from otad.store import Store, Tx
from otad.watchdog import HealthLimits, HealthSample, Watchdog, unhealthy_reasons

LIMITS = HealthLimits.for_timeout(30.0)  # max_lag 7.5 s, writer_stall 15 s


def sample(**changes: object) -> HealthSample:
    base: dict[str, object] = {
        "now": 100.0,
        "wake_late": 0.01,
        "lag_sampled_at": 99.95,
        "lag_interval": 0.1,
        "store_healthy": True,
        "probe_pending_since": None,
    }
    base.update(changes)
    return HealthSample(**base)  # type: ignore[arg-type]


def test_healthy_pings() -> None:
    assert unhealthy_reasons(sample(), LIMITS) == []
    assert unhealthy_reasons(sample(probe_pending_since=90.0), LIMITS) == []  # 10 s < 15 s


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"wake_late": 7.6}, "event loop blocked for 7.6 s"),
        ({"lag_sampled_at": None}, "event-loop lag monitor not sampling"),
        ({"lag_sampled_at": 92.0}, "event-loop lag monitor not sampling"),
        ({"store_healthy": False}, "store writer stopped or its batch flush failing"),
        ({"probe_pending_since": 84.0}, "store writer has not answered for 16.0 s"),
    ],
)
def test_each_sickness_withholds_the_ping(changes: dict[str, object], reason: str) -> None:
    assert unhealthy_reasons(sample(**changes), LIMITS) == [reason]


def test_limits_follow_the_timeout() -> None:
    assert HealthLimits.for_timeout(2.0) == HealthLimits(max_lag=0.5, writer_stall=1.0)


async def test_a_writer_stuck_in_a_job_is_seen_and_recovery_too(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    release = asyncio.Event()

    async def stuck(tx: Tx) -> None:  # holds the writer, as a hung fsync would
        await release.wait()

    lag = LoopLag()
    lag.record(0.0, asyncio.get_running_loop().time())
    dog = Watchdog(Notifier({}), timeout=2.0, loop_lag=lag, store=store, status_line=lambda: "test")
    try:
        job = asyncio.ensure_future(store.write(stuck))
        await asyncio.sleep(0.05)
        now = asyncio.get_running_loop().time()
        lag.record(0.0, now)
        assert dog.check(now, 0.0) == []  # the probe is queued now
        await asyncio.sleep(0.05)
        lag.record(0.0, now + 0.9)  # the lag monitor samples on (checks are at these times)
        assert dog.check(now + 0.9, 0.0) == []  # 0.9 s < writer_stall 1 s
        lag.record(0.0, now + 1.5)
        reasons = dog.check(now + 1.5, 0.0)
        assert reasons == ["store writer has not answered for 1.5 s"]
        release.set()
        await job
        await asyncio.sleep(0.05)  # the probe is answered
        later = asyncio.get_running_loop().time()
        lag.record(0.0, later)
        assert dog.check(later, 0.0) == []
    finally:
        release.set()
        await store.close()
    assert not store.healthy
    assert "store writer stopped or its batch flush failing" in dog.check(later + 0.1, 0.0)


def test_watchdog_interval_from_the_environment() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_notifier_sends_datagrams_and_never_raises(tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"otad-unit-{os.getpid()}"
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(2)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert notifier.enabled
    notifier.ready("3 of 4 hubs\nonline")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=3 of 4 hubs online"
    notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    receiver.close()
    assert notifier.notify(STATUS="nobody listens") is False  # logged once, never raised
    assert Notifier({}).notify(READY=1) is False
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
