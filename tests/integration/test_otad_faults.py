"""Faults mid-transfer: the broker restarts; a fifth of the CHs drop off and come back.

"No CH restarts from zero" is checked from the CHs' own records: the blocks each received over
all its lives (duplicates included) stay within 5 % of the image's block count.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from otad_harness import assert_clean_log, otactl_json, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.hub import HubStats
from loadtest.release import Release, make_release
from otad.events import HubOffline

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUBS = 50
PACED = otad_config(transfer={"segment_rate": 250.0}, events={"progress_interval_s": 0.5})


def assert_all_held_without_restarting(
    rows: list[dict[str, object]], stats: dict[str, HubStats], release: Release
) -> None:
    assert len(rows) == HUBS
    assert all(r["state"] == "held" and r["matches"] is True for r in rows), [
        r for r in rows if r["state"] != "held"
    ][:3]
    assert all(s.held.get(release.sha256) == release.sha256 for s in stats.values())
    worst = max(s.blocks for s in stats.values())
    assert worst <= release.blocks * 1.05, f"a CH received {worst} of {release.blocks} blocks"


@pytest.mark.timeout(120)
async def test_broker_restarted_mid_transfer(
    broker: MosquittoBroker, tmp_path: Path, mqtt_library: str
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=256 * 1024)
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=HUBS, library=mqtt_library, config=PACED, wiretap=False
    ) as setup:
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        setup.import_and_distribute()
        await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) >= 0.4)
        before = await fleet.stats()
        assert sum(1 for s in before.values() if s.held) < HUBS  # mid-way
        broker.restart()  # same port; no persistence: queues and retained messages are gone
        await asyncio.sleep(1.0)
        rows: list[dict[str, object]] = []
        for _ in range(120):
            rows = otactl_json(broker, "transfers")
            if all(r["state"] == "held" for r in rows):
                break
            await asyncio.sleep(0.5)
        stats = await fleet.stats()
        await fleet.close()
        assert_all_held_without_restarting(rows, stats, release)
        assert all(s.connects >= 2 for s in stats.values())  # every CH lost the broker too
        assert otad.alive
        assert "MQTT session lost" in otad.log()
        assert_clean_log(otad)


@pytest.mark.timeout(120)
async def test_a_fifth_of_the_hubs_drop_off_and_come_back_mid_transfer(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=256 * 1024)
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=HUBS, config=PACED, wiretap=False, flush_interval=0.5
    ) as setup:
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        setup.import_and_distribute()
        await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) >= 0.3)
        crashed, left = fleet.guids[0:5], fleet.guids[5:10]  # 20% of the fleet
        before = await fleet.stats()
        await fleet.stop_hubs(crashed, crash=True)  # power cut: the last will fires
        await fleet.stop_hubs(left)  # clean stop: the CH says HubWentOffline itself (SPEC §1.2)
        await monitor.wait_for(lambda: len(monitor.of_kind(HubOffline)) == 10, 20)
        await asyncio.sleep(1.0)
        await fleet.start_hubs(crashed + left)
        rows: list[dict[str, object]] = []
        for _ in range(120):
            rows = otactl_json(broker, "transfers")
            if all(r["state"] == "held" for r in rows):
                break
            await asyncio.sleep(0.5)
        stats = await fleet.stats()
        went_offline = {e.guid for e in monitor.of_kind(HubOffline)}  # before the fleet's stop
        await fleet.close()
        dropped = crashed + left
        # they really were mid-transfer when they dropped, and really came back
        assert all(0 < before[g].blocks < release.blocks for g in dropped)
        assert all(stats[g].connects >= 2 for g in dropped)
        assert went_offline == set(dropped)
        assert_all_held_without_restarting(rows, stats, release)
        assert_clean_log(otad)
