"""Protocol 1.0 and 1.1 CHs side by side against the real otad and Mosquitto (SPEC §5).

A CH built from SPEC 1.0 announces with ``HubAnnounced`` and knows no ``Refused``; it must be
served exactly as before. A 1.1 CH announces with ``HubAnnouncedVersioned`` and is told why
otad refused a message of it. Monitors see every refusal either way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from otad_harness import otactl, otactl_json, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from loadtest.runner import HubFleet
from mqttio import MqttSettings, create_client
from otad.events import HubOnline, HubRefused, TransferHeld
from protocol.wire import topics
from protocol.wire.messages import HubAnnounced, declaring_minor

pytestmark = [pytest.mark.broker]


@pytest.mark.timeout(120)
async def test_chs_of_1_0_and_1_1_are_served_side_by_side_and_only_1_1_is_told_refusals(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=64 * 1024)
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=4, protocol_minor=0, seed=0
    ) as setup:
        monitor, old = setup.monitor, setup.fleet
        async with HubFleet(
            broker=(broker.host, broker.port),
            state_dir=tmp_path / "hubs-1.1",
            count=4,
            procs=1,
            seed=1,
            trust_dir=release.trust_dir,
            protocol_minor=1,
        ) as new:
            await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == 8)
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            dist = otactl(broker, "distribute", release.sha256[:12], "--all-matching")
            assert "8 started" in dist.stdout, dist.stdout + dist.stderr
            await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= 8, 60)
            rows = otactl_json(broker, "transfers")
            assert sorted(r["state"] for r in rows) == ["held"] * 8

            # a firmware bug: each of two CHs publishes an announcement otad must refuse
            bad_firmware = create_client(
                "gmqtt",
                MqttSettings(client_id="bad-firmware", host=broker.host, port=broker.port),
            )
            await bad_firmware.connect()
            for fleet, minor in ((old, 0), (new, 1)):
                guid = fleet.guids[0]
                tab = HubAnnounced(
                    guid=guid, fw_version=1, hw_version=1, supplier="Acme\tLtd", segment="cell-0"
                )
                bad = declaring_minor(tab, minor)
                bad_firmware.publish(topics.state(guid), bad.encode(), 1, False)
            await monitor.wait_for(lambda: len(monitor.of_kind(HubRefused)) == 2, 20)
            await bad_firmware.disconnect()
            refused = {e.guid: e for e in monitor.of_kind(HubRefused)}
            assert refused[old.guids[0]].told is False  # a 1.0 CH would not understand it
            assert refused[new.guids[0]].told is True
            assert {e.reason for e in refused.values()} == {"MALFORMED"}
            assert all("supplier" in e.detail for e in refused.values())
            for _ in range(50):  # the Refused reaches the 1.1 CH
                new_stats = await new.stats()
                if new_stats[new.guids[0]].refused:
                    break
                await asyncio.sleep(0.1)
            old_stats = await old.stats()

    told = new_stats[new.guids[0]]
    assert told.refused == {"MALFORMED": 1}
    # the 1.0 CHs never saw a message type they do not know, and held the image like the rest
    assert all(s.undecodable == {} and s.refused == {} for s in old_stats.values())
    assert all(s.held.get(release.sha256) == release.sha256 for s in old_stats.values())
    assert all(s.held.get(release.sha256) == release.sha256 for s in new_stats.values())
