"""The stall signal: a transfer, or a whole distribution, that makes no progress is reported.

Before, a distribution that stopped moving (the budget deadlock) sat at 0 blocks/s with nothing
logged and nothing published, and the progress display showed an ETA that grew for ever.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, assert_clean_log, make_release, otactl, otad_config

from loadtest.broker import MosquittoBroker
from loadtest.runner import HubFleet

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
    release = make_release(tmp_path / "release", size=128 * 1024)
    monitor = await Monitor().start(broker, wiretap=False)
    otad = Otad(broker, tmp_path / "otad", release.trust_dir, config=CONFIG)
    otad.start()
    try:
        await monitor.wait_online(otad)
        async with HubFleet(
            broker=(broker.host, broker.port),
            state_dir=tmp_path / "hubs",
            count=HUBS,
            procs=1,
            segments=1,
            trust_dir=release.trust_dir,
        ) as fleet:
            await monitor.wait_for(lambda: len(monitor.of_kind("hub.online")) == HUBS)
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            assert otactl(broker, "distribute", release.sha256, "--all-matching").returncode == 0
            await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) >= 0.2)

            # 1. three CHs hang (connection up, no answers): each gets one transfer.stalled
            hung = fleet.guids[:3]
            await fleet.mute_hubs(hung)
            await monitor.wait_for(
                lambda: {e["guid"] for e in monitor.of_kind("transfer.stalled")} == set(hung), 30
            )
            await monitor.wait_for(  # the retained status counts them too
                lambda: (
                    monitor.status[-1]["distributions"][release.sha256]["stalled_transfers"] == 3
                ),
                10,
            )
            await fleet.mute_hubs(hung, muted=False)  # they come back: the probes get answers

            # 2. every CH drops off: the distribution as a whole is stalled (none of its
            # transfers is at fault: they are all offline), and otactl watch says so
            await fleet.stop_hubs(fleet.guids, crash=True)
            await monitor.wait_for(lambda: bool(monitor.of_kind("distribution.stalled")), 30)
            (stalled,) = monitor.of_kind("distribution.stalled")
            assert stalled["image"] == release.sha256
            assert stalled["offline"] == stalled["active"] > 0
            await monitor.wait_for(
                lambda: monitor.status[-1]["distributions"][release.sha256]["stalled"], 10
            )
            watch = otactl(broker, "watch", "--once")
            assert watch.returncode == 0, watch.stderr
            assert "STALLED" in watch.stdout
            await asyncio.sleep(0.5)

            # 3. they come back: the distribution resumes and completes
            await fleet.start_hubs(fleet.guids)
            await monitor.wait_for(lambda: bool(monitor.of_kind("distribution.resumed")), 30)
            await monitor.wait_for(lambda: len(monitor.of_kind("transfer.held")) == HUBS, 90)
            stats = await fleet.stats()
        assert all(s.held.get(release.sha256) == release.sha256 for s in stats.values())
        # transfers of offline CHs are suspended, not stalled: no transfer.stalled for them
        stalled_guids = [e["guid"] for e in monitor.of_kind("transfer.stalled")]
        assert sorted(stalled_guids) == sorted(hung)
        log = otad.log()
        assert "made no progress for 2 s" in log
        assert f"distribution of {release.sha256[:16]} stalled" in log
        final = json.loads(otactl(broker, "status", "--json").stdout)
        assert final["stalled"] == 0
        assert otad.terminate() == 0
        assert_clean_log(otad)
    finally:
        otad.stop_quietly()
        await monitor.close()
