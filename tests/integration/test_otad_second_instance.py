"""A second otad on the same broker (its own state directory, so its own client id) is refused:
two would answer the same CHs and fight over every transfer (issue 11). A retained "online"
left by a dead otad (a broker that kept it across a crash) does not keep a new one out."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, otad_config

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttSettings, create_client
from protocol.wire import topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CONFIG = otad_config(events={"status_heartbeat_s": 2.0})


async def test_a_second_otad_is_refused_and_the_first_keeps_serving(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=1024)
    monitor = await Monitor().start(broker, wiretap=False)
    first = Otad(broker, tmp_path / "first", release.trust_dir, config=CONFIG)
    second = Otad(broker, tmp_path / "second", release.trust_dir, config=CONFIG)
    try:
        first.start()
        await monitor.wait_online(first)
        second.start()
        began = time.monotonic()
        assert second.proc is not None
        status = await asyncio.to_thread(second.proc.wait, 30)
        took = time.monotonic() - began
        await asyncio.sleep(3)  # a heartbeat of the first: still the status
        current = monitor.status
        assert first.alive
    finally:
        first.stop_quietly()
        second.stop_quietly()
        await monitor.close()
    assert status == 2
    assert took < 10  # the first's heartbeat (2 s) proves it alive
    assert "another otad is online on this broker" in second.log()
    assert "another otad" not in first.log()  # its own status is never taken for another's
    assert first.log().count("a second otad") <= 2  # the newcomer's one status, at most twice
    assert current["state"] == "online"
    assert current["pid"] == first.pid


async def test_a_stale_retained_online_status_delays_but_does_not_refuse(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=1024)
    ghost = {"v": 1, "state": "online", "pid": 999_999, "started_at": 1.0,
             "started_at_iso": "1970-01-01T00:00:01Z", "version": "0.0.1"}  # fmt: skip
    client = create_client("gmqtt", MqttSettings(client_id="ghost", host=broker.host,
                                                 port=broker.port))  # fmt: skip
    await client.connect()
    client.publish(topics.OTAD_STATUS, json.dumps(ghost).encode(), 1, True)
    await client.disconnect()
    monitor = await Monitor().start(broker, wiretap=False)
    otad = Otad(broker, tmp_path / "otad", release.trust_dir, config=CONFIG)
    try:
        began = time.monotonic()
        otad.start()
        await monitor.wait_online(otad)
        took = time.monotonic() - began
    finally:
        otad.stop_quietly()
        await monitor.close()
    assert took >= 3.0  # 1.5 heartbeats waited for a sign of life from the ghost
    log = otad.log()
    assert "the broker holds another otad's status saying online (pid 999999" in log
    assert "its status was a stale copy" in log
