"""Huge messages on the control topic during a distribution, through a Mosquitto that lets them
through (no ``max_packet_size``): an 80 MiB one (under the control session's limit, refused by
the control plane as not JSON) and a 100 MiB one (over it, skipped unread by the adapter).
Blocks keep flowing, otad logs one line for each, and the next valid request is answered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from otad_harness import otactl, otactl_json, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from otad.daemon import CONTROL_MAX_PACKET

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUBS = 20
UNDER = 80 * 1024 * 1024
OVER = 100 * 1024 * 1024
#: The longest pause in block traffic allowed while the huge messages go through (the broker
#: itself copies 180 MiB in and out in that time; without the bound gmqtt took > 120 s).
MAX_BLOCK_GAP_S = 2.0
PACED = otad_config(transfer={"segment_rate": 300.0}, events={"progress_interval_s": 0.5})

#: A separate process publishes (so the test's own loop, which times the blocks, stays free).
PUBLISHER = """
import asyncio, sys
from mqttio import MqttSettings, create_client, wait_acknowledged
async def main(host, port, topic, size):
    client = create_client("gmqtt", MqttSettings(client_id="huge-publisher", host=host,
                                                 port=int(port)))
    await client.connect()
    client.publish(topic, b"x" * int(size), 1)
    assert await wait_acknowledged(client, 60.0), "no PUBACK"
    await client.disconnect()
asyncio.run(main(*sys.argv[1:]))
"""


def publish_huge(broker: MosquittoBroker, size: int) -> subprocess.Popen[bytes]:
    """Start a process that publishes ``size`` bytes at QoS 1 on a control request topic."""
    topic = "ota/v1/ctl/intruder/req"
    args = [sys.executable, "-c", PUBLISHER, broker.host, str(broker.port), topic, str(size)]
    return subprocess.Popen(args)


@pytest.fixture
def open_broker(tmp_path: Path) -> MosquittoBroker:
    """A broker with no packet limit of its own (MQTT's 256 MiB)."""
    broker = MosquittoBroker(
        workdir=tmp_path / "mosquitto", extra_config="max_packet_size 268435455"
    )
    broker.start()
    return broker


@pytest.mark.timeout(180)
async def test_huge_control_messages_do_not_stall_transfers(
    open_broker: MosquittoBroker, tmp_path: Path, mqtt_library: str
) -> None:
    assert UNDER < CONTROL_MAX_PACKET < OVER  # one on each side of the limit
    broker = open_broker
    release = make_release(tmp_path / "release", firmware_bytes=512 * 1024)
    try:
        async with otad_with_fleet(
            broker, tmp_path, release, hubs=HUBS, library=mqtt_library, config=PACED
        ) as setup:
            monitor, otad = setup.monitor, setup.otad
            setup.import_and_distribute()
            await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) > 0.1)
            began = time.monotonic()
            for size in (UNDER, OVER):
                publisher = publish_huge(broker, size)
                assert await asyncio.to_thread(publisher.wait, 60) == 0
            asked = time.monotonic()
            status = otactl_json(broker, "status")  # the next valid request
            answered = time.monotonic() - asked
            assert status["state"] == "online"
            assert answered < 5.0
            window = [t for t in monitor.block_times if t >= began]
            assert window, "no block was sent while the huge messages went through"
            gaps = [b - a for a, b in zip([began, *window], [*window, asked], strict=True)]
            assert max(gaps) < MAX_BLOCK_GAP_S, f"blocks paused {max(gaps):.2f} s"
            for _ in range(240):
                rows = otactl_json(broker, "transfers")
                if all(r["state"] == "held" for r in rows):
                    break
                await asyncio.sleep(0.5)
            assert [r["state"] for r in rows] == ["held"] * HUBS
            log = otad.log()
            assert log.count("refused control request of intruder: MALFORMED") == 1, log[-3000:]
            assert log.count(f"dropped a PUBLISH of {OVER + 2 + 23 + 2 + 5}") == 1, log[-3000:]
            assert "Traceback" not in log
            assert otactl(broker, "status").returncode == 0
    finally:
        broker.stop()
