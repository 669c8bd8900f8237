"""The stall signal: a transfer, or a whole distribution, that makes no progress is reported.

Before, a distribution that stopped moving (the budget deadlock) sat at 0 blocks/s with nothing
logged and nothing published, and the progress display showed an ETA that grew for ever.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from otad_harness import assert_clean_log, otactl, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from otad.events import DistributionResumed, DistributionStalled, TransferHeld, TransferStalled

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUBS = 10
# one cell at 120 blocks/s: the distribution takes long enough to hang CHs in the middle of it
CONFIG = otad_config(
    transfer={"segment_rate": 120.0, "stall_after_s": 2.0},
    events={"progress_interval_s": 0.5},
)


@pytest.mark.timeout(180)
async def test_hung_chs_and_a_stalled_distribution_are_reported_and_recover(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=128 * 1024)
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=HUBS, segments=1, config=CONFIG, wiretap=False
    ) as setup:
        monitor, otad, fleet = setup.monitor, setup.otad, setup.fleet
        setup.import_and_distribute()
        await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) >= 0.2)

        # 1. three CHs hang (connection up, no answers): each gets one transfer.stalled
        hung = fleet.guids[:3]
        await fleet.mute_hubs(hung)
        await monitor.wait_for(
            lambda: {e.guid for e in monitor.of_kind(TransferStalled)} == set(hung), 30
        )
        await monitor.wait_for(  # the retained status counts them too
            lambda: monitor.status["distributions"][release.sha256]["stalled_transfers"] == 3,
            10,
        )
        await fleet.mute_hubs(hung, muted=False)  # they come back: the probes get answers

        # 2. every CH drops off: the distribution as a whole is stalled (none of its
        # transfers is at fault: they are all offline), and otactl watch says so
        await fleet.stop_hubs(fleet.guids, crash=True)
        await monitor.wait_for(lambda: bool(monitor.of_kind(DistributionStalled)), 30)
        (stalled,) = monitor.of_kind(DistributionStalled)
        assert stalled.image == release.sha256
        assert stalled.offline == stalled.active > 0
        await monitor.wait_for(
            lambda: monitor.status["distributions"][release.sha256]["stalled"], 10
        )
        watch = otactl(broker, "watch", "--once")
        assert watch.returncode == 0, watch.stderr
        assert "STALLED" in watch.stdout
        await asyncio.sleep(0.5)

        # 3. they come back: the distribution resumes and completes
        await fleet.start_hubs(fleet.guids)
        await monitor.wait_for(lambda: bool(monitor.of_kind(DistributionResumed)), 30)
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) == HUBS, 90)
        stats = await fleet.stats()
        await fleet.close()
        assert all(s.held.get(release.sha256) == release.sha256 for s in stats.values())
        # transfers of offline CHs are suspended, not stalled: no transfer.stalled for them
        stalled_guids = [e.guid for e in monitor.of_kind(TransferStalled)]
        assert sorted(stalled_guids) == sorted(hung)
        log = otad.log()
        assert "made no progress for 2 s" in log
        assert f"distribution of {release.sha256[:16]} stalled" in log
        final = json.loads(otactl(broker, "status", "--json").stdout)
        assert final["stalled"] == 0
        assert otad.terminate() == 0
        assert_clean_log(otad)
