"""A cloned hub against a real Mosquitto: two virtual CHs with one GUID (so one MQTT client id)
take the session over from each other (for up to 30 s) while otad distributes to them and to a
normal CH. otad reports it once (one ``hub.flapping``, one WARNING), writes a bounded number of
durable events, and the normal CH's transfer goes on to the end."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, assert_clean_log, otactl, otactl_json, otad_config

from loadtest.broker import MosquittoBroker
from loadtest.hub import HubGroup, HubOptions
from loadtest.release import make_release
from loadtest.runner import load_trust
from otad.events import HubFlapping, HubOnline, TransferHeld, TransferProgress
from otad.flapping import THRESHOLD

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BLOCKS = 200  # of 1 KiB
#: Blocks/s per segment: the transfers last several seconds, so the clone's is under way when
#: the take-over loop begins.
PACED = otad_config(transfer={"segment_rate": 40.0}, events={"progress_interval_s": 0.5})


@pytest.mark.timeout(90)
async def test_a_cloned_hub_is_reported_once_and_writes_bounded_events(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=BLOCKS * 1024)
    monitor = await Monitor().start(broker, wiretap=False)
    otad = Otad(broker, tmp_path / "otad", release.trust_dir, config=PACED)
    otad.start()
    options = HubOptions(host=broker.host, port=broker.port)
    trust = load_trust(release.trust_dir)
    original = HubGroup(options=options, trust=trust, state_dir=tmp_path / "a", indices=[0, 1])
    clone = HubGroup(options=options, trust=trust, state_dir=tmp_path / "b", indices=[0])
    cloned, normal = original.guids
    assert clone.guids == [cloned]
    try:
        await monitor.wait_online(otad)
        await original.start()
        await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == 2)
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        assert otactl(broker, "distribute", release.sha256, "--all-matching").returncode == 0
        await monitor.wait_for(
            lambda: cloned in {e.guid for e in monitor.of_kind(TransferProgress)}, 10.0
        )
        await clone.start()  # the broker now hands client id <cloned> back and forth
        began = time.monotonic()
        await monitor.wait_for(lambda: bool(monitor.of_kind(HubFlapping)), 10.0)
        assert cloned not in {e.guid for e in monitor.of_kind(TransferHeld)}
        await monitor.wait_for(
            lambda: normal in {e.guid for e in monitor.of_kind(TransferHeld)}, 25.0
        )
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - began)))  # a few more flaps
        assert time.monotonic() - began < 30.0
        connects = original.hubs[cloned].stats.connects + clone.hubs[cloned].stats.connects
        assert connects > 4 * THRESHOLD, f"only {connects} connections: no take-over loop"
        rows = {r["guid"]: r for r in otactl_json(broker, "transfers")}
        assert rows[normal]["state"] == "held"
        assert rows[cloned]["state"] == "active"  # suspended, not ended by either clone
        status = otactl_json(broker, "status")
        assert status["hubs"]["flapping"] == 1
    finally:
        await clone.close()
        await original.close()
        await monitor.close()
        exit_status = otad.terminate()
    assert exit_status == 0
    (flapping,) = monitor.of_kind(HubFlapping)
    assert flapping.guid == cloned
    assert flapping.changes == THRESHOLD
    with otad.db() as db:
        durable = dict(
            db.execute(
                "SELECT kind, count(*) FROM events WHERE key LIKE ? GROUP BY kind",
                (f"%:{cloned}:%",),
            ).fetchall()
        )
    presence = durable.get("hub.online", 0) + durable.get("hub.offline", 0)
    assert presence < THRESHOLD, durable  # the probe: 535 + 534 in 30 s
    assert durable["hub.flapping"] == 1
    log = otad.log()
    assert len(re.findall(rf"WARNING .*CH {cloned} is flapping", log)) == 1, log[-3000:]
    assert_clean_log(otad)
