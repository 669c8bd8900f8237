"""otad end to end: a real ``otad`` subprocess, a real Mosquitto, virtual CHs from loadtest/.

Every check here is made from outside the daemon: ``otactl`` (the real command line), the
monitoring events, a wiretap subscriber on the CHs' ``down`` topics, and the CHs' own records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from otad_harness import assert_clean_log, otactl, otactl_json, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from otad.events import TransferFailed, TransferHeld
from protocol.wire.messages import Limits

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.timeout(150)
async def test_200_hubs_each_receive_verify_and_hold_a_256_kib_image(
    broker: MosquittoBroker, tmp_path: Path, mqtt_library: str
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=256 * 1024)
    async with otad_with_fleet(broker, tmp_path, release, hubs=200, library=mqtt_library) as setup:
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        imported = otactl(broker, "image", "import", str(release.path))
        assert imported.returncode == 0, imported.stderr
        assert release.sha256 in imported.stdout
        began = time.monotonic()
        dist = otactl(broker, "distribute", release.sha256[:12], "--all-matching")
        assert dist.returncode == 0, dist.stderr
        assert "200 started" in dist.stdout
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= 200, 100)
        elapsed = time.monotonic() - began

        rows = otactl_json(broker, "transfers")
        hub_stats = await fleet.stats()
        await fleet.close()

        assert len(rows) == 200
        assert {r["guid"] for r in rows} == set(fleet.guids)
        for row in rows:
            assert row["state"] == "held", row
            assert row["blocks_acked"] == row["blocks_total"] == release.blocks
            assert row["held_sha256"] == release.sha256
            assert row["matches"] is True
            assert row["bytes_sent"] >= release.size
        held = monitor.of_kind(TransferHeld)
        assert {e.guid for e in held} == set(fleet.guids)
        assert all(e.sha256 == release.sha256 and e.matches is True for e in held)
        # what each CH itself computed over the image it stored
        assert all(s.held.get(release.sha256) == release.sha256 for s in hub_stats.values())
        sent = sum(monitor.block_bytes.values())
        ratio = sent / (200 * release.size)
        assert 1.0 <= ratio <= 1.05
        print(
            f"\n200 CHs x {release.size} B with {mqtt_library}: {elapsed:.1f} s,"
            f" {200 * release.blocks / elapsed:.0f} blocks/s, wire/image bytes {ratio:.4f}"
        )
        assert_clean_log(otad)
        assert otad.terminate() == 0


@pytest.mark.timeout(90)
async def test_a_hub_declaring_a_two_block_window_never_has_more_than_two_outstanding(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=64 * 1024, block_size=512)
    narrow = {0: Limits(max_block=4096, window=2, buffer=64 * 1024)}
    small_blocks = {1: Limits(max_block=256, window=8, buffer=64 * 1024)}
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=6, procs=0, limits_for={**narrow, **small_blocks}
    ) as setup:
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        result = otactl(broker, "distribute", release.sha256, "--all-matching", "--json")
        # the CH that takes 256-byte blocks at most gets a transfer that fails at once with
        # the reason (SPEC §7.4): it is in the fleet, only this image cannot reach it
        assert result.returncode == 0, result.stderr
        dist = json.loads(result.stdout)
        assert dist["refused"] == []
        assert len(dist["started"]) == 6
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) == 5)
        (failed,) = monitor.of_kind(TransferFailed)
        assert (failed.guid, failed.reason) == (fleet.guids[1], "LIMITS_EXCEEDED")
        assert failed.detail == "block of 512 B > CH max_block"
        stats = await fleet.stats()
        await fleet.close()
        assert stats[fleet.guids[0]].held == {release.sha256: release.sha256}
        assert stats[fleet.guids[0]].max_outstanding <= 2
        # the measure itself sees more than two where the CH allows eight
        assert max(stats[g].max_outstanding for g in fleet.guids[2:]) > 2
        assert stats[fleet.guids[1]].blocks == 0
        assert stats[fleet.guids[1]].offers == 0
        assert_clean_log(otad)


@pytest.mark.timeout(90)
async def test_the_segment_rate_cap_paces_the_blocks_of_a_shared_cell(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rate = 200.0
    release = make_release(tmp_path / "release", firmware_bytes=64 * 1024)
    config = otad_config(transfer={"segment_rate": rate})
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=8, procs=0, segments=1, config=config
    ) as setup:  # every CH in the same cell
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        setup.import_and_distribute()
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) == 8)
        await fleet.close()
        times = monitor.block_times
        assert len(times) >= 8 * release.blocks
        busiest = max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times))
        elapsed = times[-1] - times[0]
        mean = len(times) / elapsed
        print(f"\nrate cap {rate:.0f}/s: busiest second {busiest} blocks, mean {mean:.0f}/s")
        assert busiest <= 1.15 * (rate + 20)  # the rate plus the burst (a tenth of a second)
        assert mean >= 0.6 * rate  # and it is not slower than it needs to be
        assert_clean_log(otad)
