"""Hostile and broken input: refused with a typed, logged reason, nothing stored, otad goes on."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from otad_harness import assert_clean_log, otactl, otactl_json, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttSettings, create_client
from otad.ctl.client import CtlClient
from protocol.wire import topics
from protocol.wire.messages import HubAnnounced, Limits, TransferAcked

pytestmark = [pytest.mark.broker]

STRANGER = "00000000DEADBEEF"


@pytest.mark.timeout(90)
async def test_bad_input_is_refused_with_a_reason_and_changes_nothing(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=8 * 1024)
    rogue = make_release(tmp_path / "rogue", firmware_bytes=8 * 1024, name="rogue")  # untrusted
    attacker = create_client(
        "gmqtt", MqttSettings(client_id="attacker", host=broker.host, port=broker.port)
    )
    try:
        async with otad_with_fleet(
            broker, tmp_path, release, hubs=1, procs=0, wiretap=False
        ) as setup:
            otad, fleet = setup.otad, setup.fleet
            guid = fleet.guids[0]
            fleet_before = otactl_json(broker, "fleet", "list")
            await attacker.connect()

            def send(topic: str, payload: bytes) -> None:
                attacker.publish(topic, payload, 1, False)

            # 1. malformed CBOR on an up topic, from a known hub and from a stranger
            send(topics.up(guid), b"\xa1\x61t\xff not cbor")
            # 2. an announcement whose GUID differs from its topic's (a hub posing as another)
            impostor = HubAnnounced(
                guid=STRANGER,
                fw_version=1,
                hw_version=1,
                supplier="S",
                segment="cell-0",
                limits=Limits(1024, 8, 65536),
            )
            send(topics.state(guid), impostor.encode())
            # 3. oversized messages on the state and up topics
            send(topics.state(STRANGER), os.urandom(64 * 1024))
            send(topics.up(guid), os.urandom(64 * 1024))
            # 4. an acknowledgement from a hub that never announced itself
            ack = TransferAcked(image=bytes(32), base=0, bitmap=b"", credit=8)
            send(topics.up(STRANGER), ack.encode())
            # 5. garbage on the control plane
            send(topics.ctl_request("attacker"), b"{not json")
            send(topics.ctl_request("attacker"), json.dumps({"id": "x", "cmd": "rm -rf"}).encode())
            await asyncio.sleep(1.0)

            # 6. an image signed by a key the trust store does not hold
            refused = otactl(broker, "image", "import", str(rogue.path))
            assert refused.returncode == 2
            assert "UNKNOWN_KEY_ID" in refused.stderr
            assert "Traceback" not in refused.stderr
            # ... and a file that is not an image at all
            junk = tmp_path / "junk.otaimg"
            junk.write_bytes(os.urandom(4096))
            refused = otactl(broker, "image", "import", str(junk))
            assert refused.returncode == 2
            assert "MALFORMED" in refused.stderr
            # 7. distribution requests that cannot be honoured
            unknown = otactl(broker, "distribute", "abcdef12", "--to", guid)
            assert unknown.returncode == 2
            assert "UNKNOWN_IMAGE" in unknown.stderr

            fleet_after = otactl_json(broker, "fleet", "list")
            images = otactl_json(broker, "transfers")
            async with CtlClient(broker.host, broker.port) as ctl:
                status = await ctl.call("status")
            await fleet.close()
            # nothing changed: the hub is as it announced itself, the stranger is unknown
            assert [h["guid"] for h in fleet_after] == [guid]
            assert fleet_after[0]["supplier"] == fleet_before[0]["supplier"]
            assert images == []
            assert not any((otad.state_dir / "images").glob("*"))
            # every refusal was logged with its typed reason, and counted
            log = otad.log()
            for reason in (
                "MALFORMED", "BAD_IDENTIFIER", "TOO_LARGE", "UNKNOWN_HUB", "UNKNOWN_KEY_ID",
            ):  # fmt: skip
                assert f": {reason}: " in log, f"{reason} not logged"
            assert status["rejected"]["TOO_LARGE"] >= 2
            assert otad.alive
            assert_clean_log(otad)
            assert otad.terminate() == 0
            with otad.db() as db:
                assert db.execute("SELECT count(*) FROM images").fetchone() == (0,)
                assert db.execute("SELECT guid FROM hubs").fetchall() == [(guid,)]
            # 8. with otad stopped, otactl says so clearly and fails
            silent = otactl(broker, "fleet", "list", "--timeout", "1.5")
            assert silent.returncode == 2
            assert "did not answer" in silent.stderr
            assert "Traceback" not in silent.stderr
    finally:
        await attacker.disconnect()
