"""otad's broker check (``otad.brokercheck``, SPEC §1.1) against real Mosquittos.

The daemon runs as a subprocess and is read as an operator would: its log and its retained
status. The checks themselves also run in-process against brokers that break one requirement
each, several times over, so a flaky measure shows here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from otad_harness import Monitor, Otad, assert_clean_log

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttSettings, create_client
from otad.brokercheck import BUDGET_S, BrokerCheck

pytestmark = pytest.mark.timeout(90)


async def otad_status(broker: MosquittoBroker, tmp_path: Path) -> tuple[Otad, dict[str, object]]:
    """Start otad on ``broker``, wait until its broker check has ended (its log says all is met,
    or its status lists a warning), stop it cleanly; return it and its last status."""
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    monitor = await Monitor().start(broker, wiretap=False)
    otad = Otad(broker, tmp_path / "otad", release.trust_dir)
    otad.start()
    try:
        await monitor.wait_online(otad)
        await monitor.wait_for(
            lambda: (
                "broker check: every requirement" in otad.log()
                or bool(monitor.status.get("broker_warnings"))
            ),
            20,
        )
        assert otad.terminate() == 0
        await monitor.wait_for(lambda: monitor.status.get("state") == "offline", 10)
        status = dict(monitor.status)  # the clean stop's status: the figures at the end
    finally:
        otad.stop_quietly()
        await monitor.close()
    return otad, status


async def test_the_projects_broker_gives_no_warning(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    otad, status = await otad_status(broker, tmp_path)
    assert status["broker_warnings"] == []
    assert "broker check: every requirement it can see is met" in otad.log()
    assert "WARNING" not in otad.log()
    assert_clean_log(otad)


async def test_a_broker_with_nagle_on_gives_the_warning_in_the_log_and_the_status(
    tmp_path: Path,
) -> None:
    with MosquittoBroker(workdir=tmp_path / "mosquitto", tcp_nodelay=False) as broker:
        otad, status = await otad_status(broker, tmp_path)
    warnings = status["broker_warnings"]
    assert isinstance(warnings, list)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("set_tcp_nodelay true (SPEC §1.1)"), warnings
    log_lines = [line for line in otad.log().splitlines() if "WARNING" in line]
    assert len(log_lines) == 1, log_lines
    assert "set_tcp_nodelay true (SPEC §1.1)" in log_lines[0]
    assert_clean_log(otad)


async def check(broker: MosquittoBroker) -> tuple[list[str], float]:
    """One in-process run of the check on ``broker``: its warnings and how long it took."""
    probe = BrokerCheck(
        MqttSettings(client_id="otad-test", host=broker.host, port=broker.port), create_client
    )
    started = time.monotonic()
    probe.connection_up()
    await probe.wait()
    took = time.monotonic() - started
    assert probe.runs == 1
    return probe.warnings, took


@pytest.mark.parametrize(
    ("options", "requirement"),
    [
        ({}, None),
        ({"tcp_nodelay": False}, "set_tcp_nodelay true"),
        ({"extra_config": "max_packet_size 1000000"}, "max_packet_size >= 2,098,216 bytes"),
        ({"extra_config": "message_size_limit 1000000"}, "max_packet_size >= 2,098,216 bytes"),
        ({"extra_config": "retain_available false"}, "retained messages"),
    ],
    ids=["compliant", "nagle", "max_packet_size", "message_size_limit", "no_retain"],
)
async def test_each_broken_requirement_is_one_warning_every_time(
    tmp_path: Path, options: dict[str, object], requirement: str | None
) -> None:
    with MosquittoBroker(workdir=tmp_path / "mosquitto", **options) as broker:  # type: ignore[arg-type]
        for _ in range(3):
            warnings, took = await check(broker)
            assert took < BUDGET_S + 0.2
            if requirement is None:
                assert warnings == []
            else:
                assert len(warnings) == 1, warnings
                assert warnings[0].startswith(f"{requirement} (SPEC §1.1)"), warnings


async def test_an_unreachable_broker_neither_warns_nor_blocks() -> None:
    probe = BrokerCheck(MqttSettings(client_id="otad-test", port=1), create_client)  # nothing there
    started = time.monotonic()
    probe.connection_up()
    await probe.wait()
    assert time.monotonic() - started < BUDGET_S + 0.2
    assert probe.warnings == []
    assert probe.runs == 0  # nothing measured


async def test_a_connection_coming_up_during_a_run_does_not_start_another(
    broker: MosquittoBroker,
) -> None:
    probe = BrokerCheck(MqttSettings(client_id="otad-test", port=broker.port), create_client)
    probe.connection_up()
    probe.connection_up()  # while the first run is going
    await probe.wait()
    assert probe.runs == 1
    probe.connection_up()  # a later (re)connection: measured again
    await probe.wait()
    assert probe.runs == 2
    await probe.close()
