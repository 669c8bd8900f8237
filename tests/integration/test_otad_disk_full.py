"""The disk fills mid-run, for real: the state directory is a small tmpfs, and after the
transfers started a file takes every free byte of it, so the outbox, the final states and the
progress batch all meet ENOSPC (``SQLITE_FULL``). The whole daemon (``Daemon.run``) runs in this
process, distributing to virtual CHs over a real Mosquitto.

While it is full nothing is reported ahead of the database: ``otactl transfers`` and the status
show every transfer active and the status says why otad is degraded. A stop exits 3, not 0; once
the file is gone (space is back) the restart asks the CHs, which hold the image, and records
every final state. (SQLite's own limit, ``PRAGMA max_page_count``, is what the in-memory tests
use; it refuses only changes that need a new page, so a few small final states may still fit, and
this test needs every write refused.)"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from otad_harness import Monitor, otactl, otactl_json

from loadtest.broker import MosquittoBroker
from loadtest.hub import HubGroup, HubOptions
from loadtest.release import make_release
from loadtest.runner import load_trust
from otad.config import cli_overrides, load_config
from otad.daemon import EXIT_STORE_FAILED, Daemon
from otad.events import HubOnline

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUBS = 12
DISK_BYTES = 32 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_BYTES (root may mount one; a machine that refuses says why)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


async def ctl(broker: MosquittoBroker, *args: str) -> Any:
    """``otactl --json`` in a thread: otad answers on this very event loop."""
    return await asyncio.to_thread(otactl_json, broker, *args)


@pytest.mark.timeout(150)
async def test_a_full_disk_is_never_reported_ahead_exits_3_and_a_restart_records_all(
    broker: MosquittoBroker, tmp_path: Path, small_disk: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=48 * 1024)
    overrides = cli_overrides(
        broker=broker.address, state_dir=str(small_disk / "state"), trust=str(release.trust_dir)
    )
    overrides["transfer.segment_rate"] = 40.0  # blocks/s per segment: a few seconds each
    config = load_config(None, overrides)
    monitor = await Monitor().start(broker, wiretap=False)
    hubs = HubGroup(
        options=HubOptions(host=broker.host, port=broker.port),
        trust=load_trust(release.trust_dir),
        state_dir=tmp_path / "hubs",
        indices=range(HUBS),
    )
    first = Daemon(config)
    running = asyncio.create_task(first.run())
    try:
        await monitor.wait_for(
            lambda: any(s.get("pid") == os.getpid() and s.get("state") == "online"
                        for s in monitor.statuses)
        )  # fmt: skip
        await hubs.start()
        await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == HUBS)
        imported = await asyncio.to_thread(otactl, broker, "image", "import", str(release.path))
        assert imported.returncode == 0, imported.stderr
        await ctl(broker, "distribute", release.sha256, "--all-matching")
        filler = await asyncio.to_thread(fill, small_disk)

        async def every_hub_holds_it() -> bool:
            stats = {g: h.stats for g, h in hubs.hubs.items()}
            return all(s.held.get(release.sha256) == release.sha256 for s in stats.values())

        for _ in range(600):
            if await every_hub_holds_it() and first.distribution.degraded:
                break
            await asyncio.sleep(0.1)
        assert await every_hub_holds_it()
        rows = await ctl(broker, "transfers")
        assert [r["state"] for r in rows] == ["active"] * HUBS  # what the database says
        status = await ctl(broker, "status")
        assert status["transfers"]["held"] == 0
        assert any("database or disk is full" in line for line in status["degraded"])
        assert any("not yet recorded" in line for line in status["degraded"])
        first.request_stop()
        assert await running == EXIT_STORE_FAILED
        filler.unlink()  # the operator frees space; systemd restarts otad

        again = Daemon(config)
        running = asyncio.create_task(again.run())
        for _ in range(300):
            await asyncio.sleep(0.1)
            if (
                hasattr(again, "distribution")
                and again.distribution.counts(recorded=True)["held"] == HUBS
            ):
                break
        rows = await ctl(broker, "transfers")
        assert [r["state"] for r in rows] == ["held"] * HUBS
        assert (await ctl(broker, "status"))["degraded"] == []
        again.request_stop()
        assert await running == 0
    finally:
        if not running.done():
            running.cancel()
        await hubs.close()
        await monitor.close()
