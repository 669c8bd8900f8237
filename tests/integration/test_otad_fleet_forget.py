"""``otactl fleet forget`` against a real otad and a real Mosquitto: a hub announced by some
client (retained, as anyone could before the broker had ACLs) is forgotten, stays forgotten
while the broker replays its retained announcement across an otad restart, and comes back when
it announces itself live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, assert_clean_log, otactl, otactl_json

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttSettings, create_client
from otad.events import HubForgotten, HubOnline
from protocol.wire import topics
from protocol.wire.messages import HubAnnounced, Limits

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FAKE = "00FA4E0000000001"


def fleet(broker: MosquittoBroker) -> list[str]:
    return [h["guid"] for h in otactl_json(broker, "fleet", "list")]


async def announce(broker: MosquittoBroker, *, retain: bool) -> None:
    """Some client announces :data:`FAKE` (retained: the broker keeps and replays it)."""
    client = create_client(
        "gmqtt",
        MqttSettings(client_id=f"rogue-{os.getpid()}", host=broker.host, port=broker.port),
    )
    await client.connect()
    hello = HubAnnounced(
        guid=FAKE,
        fw_version=1,
        hw_version=1,
        supplier="NOBODY",
        segment="cell-x",
        limits=Limits(max_block=1024, window=4, buffer=65536),
        han=(),
    )
    client.publish(topics.state(FAKE), hello.encode(), 1, retain)
    await client.disconnect()


@pytest.mark.timeout(120)
async def test_a_forgotten_hub_stays_forgotten_across_a_restart_until_it_announces_live(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    monitor = await Monitor().start(broker, wiretap=False)
    otad = Otad(broker, tmp_path / "otad", release.trust_dir)
    otad.start()
    try:
        await monitor.wait_online(otad)
        await announce(broker, retain=True)
        await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == 1)
        assert fleet(broker) == [FAKE]

        forgot = otactl(broker, "fleet", "forget", FAKE)
        assert forgot.returncode == 0, forgot.stderr
        assert "1 forgotten, 0 refused" in forgot.stdout
        await monitor.wait_for(lambda: len(monitor.of_kind(HubForgotten)) == 1)
        assert fleet(broker) == []
        again = otactl(broker, "fleet", "forget", FAKE, "not-a-guid")
        assert again.returncode == 2
        assert "UNKNOWN_HUB" in again.stdout
        assert "BAD_IDENTIFIER" in again.stdout

        assert otad.terminate() == 0
        otad.start()  # the broker replays the retained announcement to the new session
        await monitor.wait_online(otad)
        assert fleet(broker) == []

        await announce(broker, retain=False)  # the CH itself, live
        await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == 2)
        assert fleet(broker) == [FAKE]
        assert_clean_log(otad)
        assert otad.terminate() == 0
    finally:
        otad.stop_quietly()
        await monitor.close()
