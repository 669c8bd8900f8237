"""From "the CH holds it" to "the device runs it, proven", end to end: a real otad subprocess, a
real Mosquitto, and virtual premises (loadtest/premises.py behind loadtest/chhan.py) whose CHs
relay images over their HAN, carry signed activation commands and report back (SPEC §8.10).
Everything is checked from outside: otactl, the monitoring and alert feeds, the wiretap on the
CHs' down topics, and the devices' own state."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from otad_harness import otactl, otactl_json, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.hub import BRIDGE_SHARE
from loadtest.premises import device_key
from loadtest.release import make_release
from loadtest.runner import FleetConfig
from mqttio import MqttSettings, create_client
from otad.events import HubOffline, TransferHeld, supplier_topic_id
from otad.keyfiles import load_private_key, write_keypair
from protocol.device.activation import (
    ActivationAlert,
    ActivationCommand,
    ActivationResponse,
    Outcome,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType
from protocol.release.trust import TrustStore
from protocol.wire import topics
from protocol.wire.devices import JoinMode
from protocol.wire.messages import Activate, DeviceReported, Message, decode

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PREMISES = 100
HAN_ACCELERATION = 200.0  # five minutes of HAN time in 1.5 s


@dataclass(frozen=True)
class Activation:
    """otad's activation key and its config, and the fleet whose devices trust it."""

    key: Path  # otad's private activation key
    trust: Path  # a trust directory holding its public half: what the virtual devices trust
    fleet: FleetConfig  # the fleet's identities (the HubFleet is started with the same options)
    config: str  # otad's TOML: [activation] key, device_keys (unless none), the settings


def activation_setup(
    broker: MosquittoBroker,
    workdir: Path,
    hubs: int,
    *,
    bridge_share: float = BRIDGE_SHARE,
    device_keys: bool = True,
    **settings: float,
) -> Activation:
    """An activation key pair (``otad.keyfiles.write_keypair``), the devices' trust directory,
    and otad's ``[activation]`` config with ``settings``; with ``device_keys`` the public keys of
    every virtual device that signs (``FleetConfig.write_device_keys``)."""
    pair = write_keypair(workdir / "activation.pem")
    trust = workdir / "activation-trust"
    trust.mkdir()
    shutil.copy(pair.public_path, trust / "otad.pub.pem")
    fleet = FleetConfig(
        host=broker.host, port=broker.port, state_dir="", count=hubs, bridge_share=bridge_share
    )
    activation: dict[str, object] = {"key": str(pair.private_path), **settings}
    if device_keys:
        keys = workdir / "device-keys"
        assert fleet.write_device_keys(keys) > 0
        activation["device_keys"] = str(keys)
    return Activation(pair.private_path, trust, fleet, otad_config(activation=activation))


async def wait_devices(
    broker: MosquittoBroker, done: Any, wait_s: float, image: str
) -> list[dict[str, Any]]:
    """Poll ``otactl devices --json`` (of ``image``) until ``done(rows)``; return the rows."""
    deadline = time.monotonic() + wait_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = otactl_json(broker, "devices", "--image", image)
        if done(rows):
            return rows
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"devices not done after {wait_s:.0f} s: {sorted(r['state'] for r in rows)}"
    )


@pytest.mark.timeout(240)
async def test_an_image_for_b2_reaches_every_b2_and_nothing_else_and_every_b2_is_confirmed(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(
        tmp_path / "release", firmware_bytes=3 * 1024, device_type=DeviceType.B2, version=0x0200
    )
    act = activation_setup(broker, tmp_path, PREMISES, bridge_share=1.0)
    fleet_config, config, trust = act.fleet, act.config, act.trust
    async with otad_with_fleet(
        broker,
        tmp_path,
        release,
        hubs=PREMISES,
        config=config,
        bridge_share=1.0,
        activation_trust_dir=trust,
        han_acceleration=HAN_ACCELERATION,
    ) as setup:
        monitor, fleet = setup.monitor, setup.fleet
        b2 = {
            d.device_id: (fleet_config.identity(i).guid, d.join_mode.value)
            for i in range(PREMISES)
            for d in fleet_config.identity(i).han
            if d.device_type is DeviceType.B2
        }
        carriers = {guid for guid, _mode in b2.values()}
        assert 0 < len(carriers) < PREMISES  # some premises have a B2, some do not
        assert {mode for _guid, mode in b2.values()} == {"CAD", "PPMID"}
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        dist = otactl_json(broker, "distribute", release.sha256, "--all-matching")
        assert set(dist["started"]) == carriers  # only premises with a B2
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= len(carriers), 60)
        rows = await wait_devices(
            broker,
            lambda rs: len(rs) == len(b2) and all(r["state"] == "held_by_device" for r in rs),
            60,
            release.sha256,
        )
        assert {r["device_id"] for r in rows} == set(b2)  # every B2, and nothing else
        # one WAN copy per CH, however many of its devices need it
        for guid in carriers:
            assert monitor.block_bytes[guid] <= 1.05 * release.size, guid
        activated = otactl(broker, "activate", release.sha256, "--all-held")
        assert activated.returncode == 0, activated.stderr
        rows = await wait_devices(
            broker,
            lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
            90,
            release.sha256,
        )
        stats = await fleet.stats()
    assert [r for r in rows if r["state"] != "confirmed"] == []
    proofs = {r["device_id"]: r["proof"] for r in rows}
    for device_id, (_guid, mode) in b2.items():
        # a PPMID-joined bridge signs its alert; a CAD-joined one cannot: the CH's evidence
        assert proofs[device_id] == ("signed_alert" if mode == "PPMID" else "ch_evidence"), mode
    assert all(s.held.get(release.sha256) == release.sha256 for g, s in stats.items()
               if g in carriers)  # fmt: skip
    by_proof = {p: sum(1 for v in proofs.values() if v == p) for p in set(proofs.values())}
    print(f"\n{PREMISES} premises, {len(carriers)} with a B2, {len(b2)} B2 devices confirmed: "
          f"{by_proof}")  # fmt: skip


@pytest.mark.timeout(240)
async def test_self_test_failures_roll_back_and_lost_responses_are_confirmed_by_read_back(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """A share of devices fails its self-test and rolls back; every activation answer (response
    and alert) is lost on the HAN: all the others are still confirmed, by read-back."""
    release = make_release(
        tmp_path / "release", firmware_bytes=2 * 1024, device_type=DeviceType.ESME, version=0x0300
    )
    hubs = 40
    act = activation_setup(broker, tmp_path, hubs, response_timeout_s=2.0, read_back_backoff_s=1.0)
    config, trust = act.config, act.trust
    async with otad_with_fleet(
        broker,
        tmp_path,
        release,
        hubs=hubs,
        config=config,
        activation_trust_dir=trust,
        han_acceleration=HAN_ACCELERATION,
        self_test_failure_share=0.2,
        activation_answer_loss=1.0,
    ):
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        otactl_json(broker, "distribute", release.sha256, "--all-matching")
        await wait_devices(
            broker,
            lambda rs: len(rs) == hubs and all(r["state"] == "held_by_device" for r in rs),
            60,
            release.sha256,
        )
        assert otactl(broker, "activate", release.sha256, "--all-held").returncode == 0
        rows = await wait_devices(
            broker,
            lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
            120,
            release.sha256,
        )
    failed = [r for r in rows if r["state"] == "failed"]
    confirmed = [r for r in rows if r["state"] == "confirmed"]
    assert failed, "the scenario's self-test failures"
    assert len(failed) + len(confirmed) == hubs  # none timed out, none stuck
    # a rolled-back device is reported with its reason and never counted as upgraded
    assert {r["reason"] for r in failed} <= {"SELF_TEST_FAILED", "ACTIVATION_FAILED"}
    assert {r["proof"] for r in confirmed} == {"read_back"}  # every answer was lost
    assert {r["proof"] for r in failed} == {None}
    print(f"\n{hubs} ESMEs: {len(confirmed)} confirmed by read-back, {len(failed)} rolled back")


@pytest.mark.timeout(240)
async def test_a_ch_image_reboots_every_ch_into_it_and_alerts_its_own_supplier_only(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    version = 0x0102_0000
    release = make_release(
        tmp_path / "release", firmware_bytes=4 * 1024, device_type=DeviceType.CH, version=version
    )
    hubs = 20
    act = activation_setup(broker, tmp_path, hubs, device_keys=False, response_timeout_s=2.0,
                           read_back_backoff_s=1.0)  # fmt: skip
    fleet_config, config, trust = act.fleet, act.config, act.trust
    suppliers = {fleet_config.identity(i).guid: fleet_config.identity(i).supplier
                 for i in range(hubs)}  # fmt: skip
    assert len(set(suppliers.values())) > 1
    alerts: list[tuple[str, dict[str, Any]]] = []
    watcher = create_client(
        "gmqtt", MqttSettings(client_id="alert-watcher", host=broker.host, port=broker.port)
    )
    watcher.set_message_handler(lambda t, p, r: alerts.append((t, json.loads(p))))
    await watcher.subscribe("ota/v1/alerts/#", 1)
    await watcher.connect()
    try:
        async with otad_with_fleet(
            broker,
            tmp_path,
            release,
            hubs=hubs,
            config=config,
            activation_trust_dir=trust,
            han_acceleration=HAN_ACCELERATION,
        ) as setup:
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            otactl_json(broker, "distribute", release.sha256, "--all-matching")
            await setup.monitor.wait_for(
                lambda: len(setup.monitor.of_kind(TransferHeld)) == hubs, 60
            )
            await wait_devices(
                broker,
                lambda rs: (
                    len(rs) == hubs
                    and all(r["state"] in ("held_by_ch", "held_by_device") for r in rs)
                ),
                30,
                release.sha256,
            )
            assert otactl(broker, "activate", release.sha256, "--all-held").returncode == 0
            rows = await wait_devices(
                broker,
                lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
                90,
                release.sha256,
            )
            fleet = otactl_json(broker, "fleet", "list")
            stats = await setup.fleet.stats()
            rebooted = {e.guid for e in setup.monitor.of_kind(HubOffline)}
            for _ in range(50):
                if len([a for a in alerts if "/device.confirmed/" in a[0]]) >= hubs:
                    break
                await asyncio.sleep(0.1)
    finally:
        await watcher.disconnect()
    assert [r["state"] for r in rows] == ["confirmed"] * hubs
    assert {r["device_id"] for r in rows} == set(suppliers)  # the CH itself is the device
    assert all(s.reboots == 1 for s in stats.values())  # each rebooted into the new image...
    assert rebooted == set(suppliers)  # (its connection dropped: the broker published its will)
    assert all(h["online"] for h in fleet)  # and it came back
    assert {h["guid"]: h["fw_version"] for h in fleet} == dict.fromkeys(suppliers, version)
    confirmed = [(t, a) for t, a in alerts if "/device.confirmed/" in t]
    assert {a["guid"] for _t, a in confirmed} == set(suppliers)
    for topic, alert in confirmed:  # ...and its supplier's alert carries the new version
        assert alert["fw_version"] == version
        assert alert["supplier"] == suppliers[alert["guid"]]
        # under that supplier's own prefix: an ACL per prefix gives each supplier only its own
        assert topic == f"ota/v1/alerts/{supplier_topic_id(alert['supplier'])}/device.confirmed/"\
            f"{alert['guid']}"  # fmt: skip
    prefixes = {t.split("/")[3] for t, _a in confirmed}
    assert len(prefixes) == len(set(suppliers.values()))  # one prefix per supplier


@pytest.mark.timeout(240)
async def test_otad_killed_between_issuing_activations_and_their_outcomes_loses_none(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """SIGKILL right after the commands are issued, with their execution a few seconds ahead
    (HAN time at 1x): the outcomes arrive while otad is down. After the restart every device is
    confirmed under the counter it was issued before the kill: none activated twice (a
    re-published command is refused as a replay), none lost."""
    release = make_release(
        tmp_path / "release", firmware_bytes=1024, device_type=DeviceType.ESME, version=0x0300
    )
    hubs = 10
    act = activation_setup(broker, tmp_path, hubs, response_timeout_s=3.0, read_back_backoff_s=1.0)
    config, trust = act.config, act.trust
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=hubs, config=config, activation_trust_dir=trust
    ) as setup:
        otad = setup.otad
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        otactl_json(broker, "distribute", release.sha256, "--all-matching")
        await wait_devices(
            broker,
            lambda rs: len(rs) == hubs and all(r["state"] == "held_by_device" for r in rs),
            90,
            release.sha256,
        )
        at = str(int(time.time()) + 4)
        assert otactl(broker, "activate", release.sha256, "--all-held", "--at", at).returncode == 0
        issued = {r["device_id"]: r["counter"] for r in otactl_json(broker, "devices")}
        assert all(issued.values())  # committed (and reported) before anything was sent
        otad.kill()  # SIGKILL: the devices execute at their time with otad gone
        await asyncio.sleep(6)
        otad.start()
        await setup.monitor.wait_online(otad)
        rows = await wait_devices(
            broker,
            lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
            90,
            release.sha256,
        )
    assert [r["state"] for r in rows] == ["confirmed"] * hubs
    assert {r["device_id"]: r["counter"] for r in rows} == issued  # no second command


@pytest.mark.timeout(240)
async def test_wrong_image_replayed_and_forged_commands_are_refused_by_the_device(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Commands that did not come from otad's flow, published on a CH's down topic as a rogue
    (or a replaying) party would: the device holding another image answers HASH_MISMATCH; a
    replay of a command it already took and a command signed by the wrong key get nothing, and
    the device keeps running what it ran (read back through otad)."""
    release = make_release(
        tmp_path / "release", firmware_bytes=1024, device_type=DeviceType.ESME, version=0x0300
    )
    act = activation_setup(broker, tmp_path, 1, device_keys=False, response_timeout_s=30.0)
    config, trust = act.config, act.trust
    otad_key = load_private_key(act.key)
    rogue = ec.generate_private_key(ec.SECP256R1())
    up: list[Message] = []
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=1, config=config, activation_trust_dir=trust,
        han_acceleration=HAN_ACCELERATION,
    ) as setup:  # fmt: skip
        guid = setup.fleet.guids[0]
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        otactl_json(broker, "distribute", release.sha256, "--all-matching")
        (row,) = await wait_devices(
            broker, lambda rs: [r["state"] for r in rs] == ["held_by_device"], 60, release.sha256
        )
        esme = row["device_id"]
        spy = create_client(
            "gmqtt", MqttSettings(client_id="rogue", host=broker.host, port=broker.port)
        )
        spy.set_message_handler(lambda t, p, r: up.append(decode(p)))
        await spy.subscribe(topics.up(guid), 1)
        await spy.connect()
        try:
            counter = int(time.time() * 1000) + 10**9  # above anything otad issued
            other = ActivationCommand(device_id=esme, image_sha256=bytes(32), counter=counter)
            command = other.sign(otad_key)
            spy.publish(topics.down(guid), Activate(esme, command).encode(), 1, False)
            answers = await _device_answers(up, esme, 1)
            response = ActivationResponse.decode(answers[0].record)
            assert response.outcome is Outcome.HASH_MISMATCH
            assert response.reason == int(Reason.HASH_MISMATCH)
            before = len(up)
            spy.publish(topics.down(guid), Activate(esme, command).encode(), 1, False)  # replay
            forged = ActivationCommand(device_id=esme, image_sha256=bytes(32), counter=counter + 1)
            spy.publish(topics.down(guid), Activate(esme, forged.sign(rogue)).encode(), 1, False)
            await asyncio.sleep(1.0)
            assert [m for m in up[before:] if isinstance(m, DeviceReported)] == []
        finally:
            await spy.disconnect()
        version = otactl_json(broker, "firmware-version", esme)
    assert version["fw_version"] != 0x0300  # it still runs its old firmware


async def _device_answers(up: list[Message], device_id: str, n: int) -> list[DeviceReported]:
    for _ in range(100):
        answers = [m for m in up if isinstance(m, DeviceReported) and m.device_id == device_id]
        if len(answers) >= n:
            return answers
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {n} answers from {device_id}: {up}")


@pytest.mark.timeout(240)
async def test_a_dated_activation_fires_at_its_time_and_a_cancelled_one_never(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(
        tmp_path / "release", firmware_bytes=1024, device_type=DeviceType.ESME, version=0x0300
    )
    act = activation_setup(broker, tmp_path, 2)
    config, trust = act.config, act.trust
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=2, config=config, activation_trust_dir=trust
    ):
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        otactl_json(broker, "distribute", release.sha256, "--all-matching")
        rows = await wait_devices(
            broker,
            lambda rs: len(rs) == 2 and all(r["state"] == "held_by_device" for r in rs),
            90,
            release.sha256,
        )
        fires, cancelled = sorted(r["device_id"] for r in rows)
        at = int(time.time()) + 5
        for device in (fires, cancelled):
            activated = otactl(broker, "activate", release.sha256, "--device", device,
                               "--at", str(at))  # fmt: skip
            assert activated.returncode == 0, activated.stderr
        cancel = otactl(broker, "activate", "cancel", release.sha256, "--device", cancelled)
        assert cancel.returncode == 0, cancel.stderr
        early = {r["device_id"]: r["state"] for r in otactl_json(broker, "devices")}
        assert early[fires] == "activation_pending"  # not before its time
        rows = await wait_devices(
            broker,
            lambda rs: {r["device_id"]: r["state"] for r in rs}.get(fires) == "confirmed",
            60,
            release.sha256,
        )
        assert time.time() >= at
        await asyncio.sleep(2.0)  # past its time: the cancelled one must still not have fired
        states = {r["device_id"]: r for r in otactl_json(broker, "devices")}
        version = otactl_json(broker, "firmware-version", cancelled)
    assert states[cancelled]["state"] == "held_by_device"
    assert states[cancelled]["reason"] == "CANCELLED"
    assert version["fw_version"] != 0x0300


@pytest.mark.timeout(240)
async def test_a_ppmid_bridge_gets_new_credentials_and_its_next_alert_verifies_only_with_them(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    hubs = 30
    act = activation_setup(broker, tmp_path, hubs, bridge_share=1.0, credentials_timeout_s=30.0)
    fleet_config, config, trust = act.fleet, act.config, act.trust
    index, bridge = next(
        (i, d)
        for i in range(hubs)
        for d in fleet_config.identity(i).han
        if d.device_type in (DeviceType.B1, DeviceType.B2, DeviceType.B3, DeviceType.B4)
        and d.join_mode is JoinMode.PPMID
    )
    guid = fleet_config.identity(index).guid
    release = make_release(tmp_path / "release", firmware_bytes=1024,
                           device_type=bridge.device_type, version=0x0300)  # fmt: skip
    down: list[Message] = []
    up: list[Message] = []
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=hubs, config=config, bridge_share=1.0,
        activation_trust_dir=trust, han_acceleration=HAN_ACCELERATION,
    ):  # fmt: skip
        spy = create_client(
            "gmqtt", MqttSettings(client_id="spy", host=broker.host, port=broker.port)
        )
        spy.set_message_handler(
            lambda t, p, r: (down if t.endswith("/down") else up).append(decode(p))
        )
        await spy.subscribe(topics.down(guid), 1)
        await spy.subscribe(topics.up(guid), 1)
        await spy.connect()
        try:
            replaced = otactl(broker, "credentials", "replace", "--device", bridge.device_id)
            assert replaced.returncode == 0, replaced.stderr
            for _ in range(100):
                listing = otactl_json(broker, "credentials", "list")
                if [r["state"] for r in listing] == ["replaced"]:
                    break
                await asyncio.sleep(0.2)
            (record,) = otactl_json(broker, "credentials", "list")
            assert record["state"] == "replaced", record
            assert record["new_kid"] != record["old_kid"]
            # a replay of the replacement command (as a rogue party could capture it): refused
            await asyncio.sleep(0.5)  # otactl ran in this loop's thread: let the spy read
            (command,) = [m for m in down if isinstance(m, Activate)]
            answers = len([m for m in up if isinstance(m, DeviceReported)])
            spy.publish(topics.down(guid), command.encode(), 1, False)
            await asyncio.sleep(1.0)
            assert len([m for m in up if isinstance(m, DeviceReported)]) == answers
            # its next activation: the alert is signed by the new key, and only that verifies
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            otactl(broker, "distribute", release.sha256, "--to", guid)
            await wait_devices(broker, lambda rs: [r["state"] for r in rs if r["device_id"]
                               == bridge.device_id] == ["held_by_device"], 60,
                               release.sha256)  # fmt: skip
            up.clear()
            activated = otactl(broker, "activate", release.sha256, "--device", bridge.device_id)
            assert activated.returncode == 0, activated.stderr
            rows = await wait_devices(broker, lambda rs: any(r["device_id"] == bridge.device_id
                                      and r["state"] == "confirmed" for r in rs), 60,
                                      release.sha256)  # fmt: skip
        finally:
            await spy.disconnect()
    (row,) = [r for r in rows if r["device_id"] == bridge.device_id]
    assert row["proof"] == "signed_alert"
    seed = (fleet_config.seed << 32) + index
    old_key, new_key = (device_key(seed, bridge.device_id, g).public_key() for g in (0, 1))
    alerts = [m.record for m in up if isinstance(m, DeviceReported) and m.record[:1] == b"\xd2"]
    assert alerts
    assert ActivationAlert.verify(alerts[-1], TrustStore([new_key])).fw_version == 0x0300
    with pytest.raises(ProtocolError):
        ActivationAlert.verify(alerts[-1], TrustStore([old_key]))
