"""otad's side of activation and confirmation (SPEC §8.10), on the in-memory daemon shell.

The CH's up messages are built from real protocol machines: each HAN device is a
:class:`protocol.device.device.Device` holding really signed images and answering really signed
activation commands (with really signed alerts) behind the shell's :class:`HanRelay`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from shellkit import WALL0, Shell, SimCH, shell

from otad.catalogue import Image
from otad.config import ActivationConfig
from otad.ctl import imagetool
from otad.devices import TRANSITIONS, DeviceState, Proof
from otad.events import DeviceConfirmed, DeviceFailed, decode_event, supplier_topic_id
from otad.keyfiles import load_private_key, write_keypair
from protocol.device.activation import (
    ActivationAlert,
    ActivationCommand,
    ActivationResponse,
    VersionReport,
)
from protocol.device.device import (
    AlertRaised,
    Device,
    DeviceIdentity,
    FirmwareInfo,
    MemorySlotStore,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import SignedImage, verify
from protocol.release.trust import TrustStore
from protocol.release.zigbee_ota import OtaLayout
from protocol.wire.devices import JoinMode
from protocol.wire.messages import (
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    HanDevice,
    ReadVersion,
    declaring_minor,
    decode,
)

GUID = "00DB1234567890AA"
OLD_FW = 0x0002_0000
NEW_FW = 0x0002_0001
ACTIVATION = {
    "response_timeout_s": 30.0,
    "read_back_attempts": 3,
    "read_back_backoff_s": 10.0,
    "han_timeout_s": 600.0,
}


def device_id(n: int) -> str:
    return f"00DB12345678{0xB0 + n:04X}"


@dataclass
class Premises:
    """One CH of protocol 1.1 with B2 bridges, a B2 image held by the CH, otad's keys."""

    sh: Shell
    ch: SimCH
    image: Image
    ota: bytes  # the OTA file the devices store
    devices: dict[str, Device]
    activation_key: ec.EllipticCurvePrivateKey

    @property
    def devices_api(self) -> Any:
        return self.sh.daemon.devices

    def state(self, device: str) -> DeviceState:
        return self.devices_api.records[(device, self.image.sha256)].state

    def record(self, device: str) -> Any:
        return self.devices_api.records[(device, self.image.sha256)]

    async def relay(self, *devices: str) -> None:
        """The CH relays the image to ``devices`` (all by default) and reports it."""
        for device in devices or tuple(self.devices):
            reports = self.ch.han.deliver(
                device, self.image.sha256, self.image.signed_manifest, self.ota, time.time()
            )
            self.sh.send_up(GUID, *reports)
        await self.sh.run_until_handled(
            lambda: all(
                self.state(d) is DeviceState.HELD_BY_DEVICE for d in devices or self.devices
            )
        )

    async def activate(self, *devices: str, at: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"image": self.image.hex, "devices": list(devices)}
        if at is not None:
            args["at"] = at
        return await self.sh.daemon.commands.activate(args)

    async def until(self, condition: Callable[[], bool], max_s: float = 600.0) -> float:
        return await self.sh.run_until_handled(condition, max_s)

    async def alerts(self) -> list[Any]:
        """The alerts published since the last call (the outbox flushed first)."""
        await self.sh.events.flush()
        return [(p.topic, decode_event(p.payload)) for p in self.sh.client.take("ota/v1/alerts/#")]

    def downlink(self) -> list[Any]:
        """Every message otad sent the CH."""
        return [decode(p.payload) for p in self.sh.downlink]

    def commands_sent(self) -> list[ActivationCommand]:
        trust = TrustStore([self.activation_key.public_key()])
        return [
            ActivationCommand.verify(m.command, trust)
            for m in self.downlink()
            if isinstance(m, Activate)
        ]


def b2_image(sh: Shell, workdir: Path, *, name: str = "b2", version: int = NEW_FW) -> Path:
    """A GB image (v2 manifest: its activation digest is not its sha256) for B2, signed with
    the shell's release key."""
    workdir.mkdir(parents=True, exist_ok=True)
    firmware = workdir / f"{name}.bin"
    firmware.write_bytes(os.urandom(6000))
    out = workdir / f"{name}.otaimg"
    imagetool.sign_image(
        key=sh.release.key,
        source=firmware,
        out=out,
        device_type=DeviceType.B2,
        now=int(time.time()),
        version=version,
        hw_min=0,
        hw_max=0xFFFF,
        block_size=1024,
        layout=OtaLayout.GBCS,
    )
    return out


def ota_of(path: Path, trust: TrustStore) -> tuple[Manifest, bytes]:
    signed = SignedImage.decode(path.read_bytes())
    from protocol.clock import UnixTime

    manifest, _ = verify(signed, trust, now=UnixTime(time.time()))
    return manifest, signed.image


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@asynccontextmanager
async def premises(
    tmp_path: Path,
    joins: tuple[JoinMode, ...] = (JoinMode.PPMID, JoinMode.CAD),
    *,
    self_test: Callable[[Manifest], bool] | None = None,
    shell_options: dict[str, Any] | None = None,
    restart_of: Premises | None = None,
) -> AsyncIterator[Premises]:
    """A premises whose CH holds the B2 image, its devices not yet sent it."""
    keys = tmp_path / "device-keys"
    key_path = tmp_path / "activation.pem"
    if restart_of is None:
        keys.mkdir()
        write_keypair(key_path)
    config = ActivationConfig(key=key_path, device_keys=keys, **ACTIVATION)
    options = dict(shell_options or {})
    if restart_of is not None:
        options.update(release=restart_of.sh.release, clock=restart_of.sh.clock)
    activation_key = load_private_key(key_path)
    han = tuple(
        HanDevice(device_id(n), DeviceType.B2, join, OLD_FW, 1) for n, join in enumerate(joins)
    )
    signing = {
        d.device_id: ec.generate_private_key(ec.SECP256R1()) for d in han if d.join_mode.can_sign
    }
    if restart_of is None:
        for device, key in signing.items():
            (keys / f"{device}.pem").write_bytes(pem(key))
    async with shell(tmp_path, activation=config, **options) as sh:
        if restart_of is not None:
            sh.chs = restart_of.sh.chs
            ch = sh.chs[GUID]
            image = sh.catalogue.images[restart_of.image.sha256]
            yield Premises(sh, ch, image, restart_of.ota, restart_of.devices, activation_key)
            return
        path = b2_image(sh, tmp_path / "b2")
        image, _ = await sh.catalogue.import_image(path.read_bytes())
        manifest, ota = ota_of(path, sh.trust)
        assert manifest.activation_digest != manifest.sha256  # v2: the Manufacturer Image
        ch = sh.add_ch(GUID, han=han)
        ch.announcement = declaring_minor(ch.announcement, 1)
        devices: dict[str, Device] = {}
        for entry in han:
            identity = DeviceIdentity(
                entry.device_id,
                DeviceType.B2,
                1,
                manifest.vendor,
                manifest.image_type,
                entry.join_mode,
            )
            devices[entry.device_id] = ch.han.add(
                Device(
                    identity,
                    sh.trust,
                    MemorySlotStore(),
                    running=FirmwareInfo(OLD_FW, 0),
                    activation_trust=TrustStore([activation_key.public_key()]),
                    signing_key=signing.get(entry.device_id),
                    self_test=self_test,
                )
            )
        sh.announce(GUID)
        await sh.registry.flushed()
        result = await sh.daemon.commands.distribute({"image": image.hex, "to": [GUID]})
        assert result["devices"] == len(han)
        p = Premises(sh, ch, image, ota, devices, activation_key)
        assert all(p.state(d) is DeviceState.OFFERED for d in devices)
        await sh.run_until_handled(
            lambda: all(p.state(d) is DeviceState.HELD_BY_CH for d in devices)
        )
        yield p


# --------------------------------------------------------------------------- the machine


def test_every_state_is_in_the_table_and_confirmed_is_final() -> None:
    assert set(TRANSITIONS) == set(DeviceState)
    assert TRANSITIONS[DeviceState.CONFIRMED] == frozenset()
    # nothing but CONFIRMED is reached from the proof states, and every in-progress state
    # can end TIMED_OUT or FAILED: never stuck
    for state in (
        DeviceState.HELD_BY_CH,
        DeviceState.HAN_TRANSFER,
        DeviceState.ACTIVATION_PENDING,
        DeviceState.ACTIVATED,
    ):
        assert {DeviceState.TIMED_OUT, DeviceState.FAILED} <= TRANSITIONS[state]


# --------------------------------------------------------------------------- confirmation


async def test_a_ppmid_bridge_is_confirmed_by_its_signed_alert(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        await p.alerts()
        await p.relay()
        listing = await p.sh.daemon.commands.devices({})
        assert [(r["state"], r["percent"]) for r in listing] == [("held_by_device", 100)]
        result = await p.activate(device)
        assert [i["device_id"] for i in result["issued"]] == [device]
        assert not result["refused"]
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED)
        assert p.record(device).proof is Proof.SIGNED_ALERT
        (command,) = p.commands_sent()
        manifest = p.image.manifest
        assert command.image_sha256 == manifest.activation_digest != manifest.sha256
        assert p.devices[device].running.fw_version == NEW_FW
        # the alert goes to the supplier's own topic, with the premises and the new version
        ((topic, alert),) = await p.alerts()
        level = supplier_topic_id(p.ch.announcement.supplier)
        assert topic == f"ota/v1/alerts/{level}/device.confirmed/{GUID}"
        assert isinstance(alert, DeviceConfirmed)
        assert (alert.device_id, alert.device_type, alert.guid, alert.fw_version, alert.proof) == (
            device,
            "B2",
            GUID,
            NEW_FW,
            "signed_alert",
        )
        # what otactl reports is what the store holds
        (row,) = await p.sh.store.devices()
        assert (row.state, row.proof, row.counter) == ("confirmed", "signed_alert", command.counter)


async def test_a_cad_bridge_is_confirmed_by_the_chs_evidence(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.CAD,)) as p:
        (device,) = p.devices
        await p.relay()
        await p.activate(device)
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED)
        assert p.record(device).proof is Proof.CH_EVIDENCE
        assert not [m for m in p.downlink() if isinstance(m, ReadVersion)]


async def test_a_forged_alert_or_one_for_another_cycle_confirms_nothing(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        await p.relay()
        p.ch.han.lose = lambda output: isinstance(output, (AlertRaised, ActivationResponse))
        await p.activate(device)
        await p.until(lambda: bool(p.ch.han.lost))
        counter = p.record(device).counter
        m = p.image.manifest
        forger = ec.generate_private_key(ec.SECP256R1())
        forged = ActivationAlert(device, NEW_FW, m.sha256, counter).sign(forger)
        stale = ActivationAlert(device, NEW_FW, m.sha256, counter - 1).sign(
            p.devices[device].signing_key  # type: ignore[arg-type]
        )
        refused = dict(p.sh.daemon.rejects.counts)
        p.sh.send_up(
            GUID,
            DeviceReported(device, forged, Evidence.DEVICE),
            DeviceReported(device, stale, Evidence.DEVICE),
        )
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        assert p.state(device) is DeviceState.ACTIVATION_PENDING
        assert p.sh.daemon.rejects.counts["UNKNOWN_KEY_ID"] == refused["UNKNOWN_KEY_ID"] + 1
        # the read-back still proves it
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED)
        assert p.record(device).proof is Proof.READ_BACK


async def test_every_activation_answer_dropped_still_confirms_by_read_back(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID, JoinMode.CAD)) as p:
        await p.relay()
        lost_answers = p.ch.han.lost

        def drop_answers(output: Any) -> bool:
            return not isinstance(output, VersionReport) or output.boot_count > 0

        p.ch.han.lose = drop_answers
        await p.activate(*p.devices)
        took = await p.until(lambda: all(p.state(d) is DeviceState.CONFIRMED for d in p.devices))
        assert all(p.record(d).proof is Proof.READ_BACK for d in p.devices)
        assert len(lost_answers) == 4  # a response and the evidence, per device
        assert 30 <= took < 60  # the response timeout, then the first read-back answers
        assert all(
            dev.running.fw_version == NEW_FW and dev.boot_count == 1 for dev in p.devices.values()
        )


async def test_a_failed_self_test_is_reported_and_never_counted_upgraded(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,), self_test=lambda m: False) as p:
        (device,) = p.devices
        await p.relay()
        await p.alerts()
        await p.activate(device)
        await p.until(lambda: p.state(device) is DeviceState.FAILED)
        assert p.record(device).reason == "SELF_TEST_FAILED"
        assert p.devices[device].running.fw_version == OLD_FW  # rolled back
        ((topic, alert),) = await p.alerts()
        assert isinstance(alert, DeviceFailed)
        assert topic.endswith(f"/device.failed/{GUID}")
        assert (alert.reason, alert.rolled_back, alert.fw_version) == (
            "SELF_TEST_FAILED",
            True,
            OLD_FW,
        )
        p.sh.run_for(300.0)  # no read-back turns it into an upgrade
        await p.sh.daemon.devices.flushed()
        assert p.state(device) is DeviceState.FAILED
        assert not [a for _, a in await p.alerts() if isinstance(a, DeviceConfirmed)]


async def test_a_device_holding_another_image_refuses_with_hash_mismatch(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        # the device holds another B2 image, while its CH reports it holds ours
        other_path = b2_image(p.sh, tmp_path / "other", name="other", version=NEW_FW)
        other, other_ota = ota_of(other_path, p.sh.trust)
        signed_other = SignedImage.decode(other_path.read_bytes()).signed_manifest
        p.ch.han.deliver(device, other.sha256, signed_other, other_ota, time.time())
        assert p.devices[device].holds_image
        size = len(p.ota)
        p.sh.send_up(
            GUID,
            DeviceTransferReported(p.image.sha256, device, DeviceTransferState.HELD, size, size, 0),
        )
        await p.until(lambda: p.state(device) is DeviceState.HELD_BY_DEVICE)
        await p.activate(device)
        await p.until(lambda: p.state(device) is DeviceState.FAILED)
        assert p.record(device).reason == "HASH_MISMATCH"
        assert p.devices[device].running.fw_version == OLD_FW


async def test_replayed_and_forged_commands_are_refused_by_the_device(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        await p.relay()
        await p.activate(device)
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED)
        (sent,) = [p for p in p.sh.downlink if isinstance(decode(p.payload), Activate)]
        boots = p.devices[device].boot_count
        # the same command again (a replay), and one signed by someone else
        forger = ec.generate_private_key(ec.SECP256R1())
        counter = p.record(device).counter + 1
        forged = ActivationCommand(device, p.image.manifest.activation_digest, counter).sign(forger)
        for payload in (sent.payload, Activate(device, forged).encode()):
            p.sh._send(p.sh.clock.now, "down", GUID, payload)
        p.sh.run_for(1.0)
        reasons = [reason for _, reason in p.ch.han.refused]
        assert reasons[0] is Reason.REPLAYED
        assert reasons[1] in (Reason.UNKNOWN_KEY_ID, Reason.BAD_SIGNATURE)
        assert p.devices[device].boot_count == boots  # activated once


# --------------------------------------------------------------------------- timing


async def test_a_future_dated_activation_fires_and_a_cancelled_one_never(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID, JoinMode.CAD)) as p:
        fires, cancelled = p.devices
        await p.relay()
        at = int(WALL0 + p.sh.clock.now) + 3600
        await p.activate(fires, cancelled, at=at)
        await p.until(
            lambda: (
                p.record(fires).execute_at == at
                and all(p.devices[d].scheduled is not None for d in p.devices)
            )
        )
        result = await p.sh.daemon.commands.activate_cancel(
            {"image": p.image.hex, "devices": [cancelled]}
        )
        assert [i["cancel"] for i in result["issued"]] == [True]
        await p.until(lambda: p.state(cancelled) is DeviceState.HELD_BY_DEVICE)
        assert p.devices[cancelled].scheduled is None
        assert p.state(fires) is DeviceState.ACTIVATION_PENDING
        took = await p.until(lambda: p.state(fires) is DeviceState.CONFIRMED, max_s=7200)
        assert WALL0 + p.sh.clock.now >= at  # not before its time
        assert took < 3600 + 5
        assert p.devices[cancelled].running.fw_version == OLD_FW
        p.sh.run_for(7200.0)
        await p.sh.daemon.devices.flushed()
        assert p.devices[cancelled].boot_count == 0
        assert p.state(cancelled) is DeviceState.HELD_BY_DEVICE


async def test_a_late_held_report_does_not_take_back_an_issued_activation(
    tmp_path: Path,
) -> None:
    # A CH reports its own image held twice (its WAN ImageHeld, then its HAN side's report);
    # the second came after the campaign had issued the activation and put the record back in
    # HELD_BY_DEVICE without a deadline: the CH's answer was then ignored, and it stayed
    # "activating" for ever (a 1,000-CH load test). A transfer report after the command is stale.
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        await p.relay()
        at = int(WALL0 + p.sh.clock.now) + 600
        await p.activate(device, at=at)
        await p.until(lambda: p.record(device).execute_at == at)
        size = len(p.ota)
        for state, held in (
            (DeviceTransferState.HELD, size),
            (DeviceTransferState.TRANSFERRING, 1),
        ):
            p.sh.send_up(GUID, DeviceTransferReported(p.image.sha256, device, state, held, size, 0))
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        assert p.state(device) is DeviceState.ACTIVATION_PENDING
        assert p.record(device).deadline is not None
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED, max_s=1200)


async def test_a_device_that_never_answers_times_out_at_its_deadline(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        await p.relay()
        p.ch.han.lose = lambda output: True
        p.ch.han.devices.pop(device)  # gone from the HAN: nothing answers a read either
        await p.alerts()
        began = p.sh.clock.now
        await p.activate(device)
        await p.until(lambda: p.state(device) is DeviceState.TIMED_OUT, max_s=1000)
        # the response timeout, then 3 read-backs 10, 20 and 40 s apart
        assert p.sh.clock.now - began == pytest.approx(30 + 10 + 20 + 40, abs=1.0)
        reads = [m for m in p.downlink() if isinstance(m, ReadVersion)]
        assert len(reads) == 3
        ((_, alert),) = await p.alerts()
        assert isinstance(alert, DeviceFailed)
        assert (alert.state, alert.reason) == ("timed_out", "TIMED_OUT")


async def test_a_han_transfer_that_stops_reporting_times_out(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.CAD,)) as p:
        (device,) = p.devices
        size = len(p.ota)
        p.sh.send_up(
            GUID,
            DeviceTransferReported(
                p.image.sha256, device, DeviceTransferState.TRANSFERRING, size // 4, size, 0
            ),
        )
        await p.until(lambda: p.state(device) is DeviceState.HAN_TRANSFER)
        listing = await p.sh.daemon.commands.devices({"guid": GUID})
        assert listing[0]["percent"] == 25
        began = p.sh.clock.now
        await p.until(lambda: p.state(device) is DeviceState.TIMED_OUT, max_s=2000)
        assert p.sh.clock.now - began == pytest.approx(600, abs=1.0)


# --------------------------------------------------------------------------- durability


async def test_killed_between_commit_and_publish_no_device_is_lost_or_activated_twice(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path, (JoinMode.PPMID, JoinMode.CAD)) as p:
        await p.relay()
        unsent: list[Any] = []
        p.sh.daemon.devices._publish_command = unsent.append  # type: ignore[method-assign]
        await p.activate(*p.devices)
        assert len(unsent) == 2  # committed, then the process died before publishing
        rows = {r.device_id: r for r in await p.sh.store.devices()}
        assert all(rows[d].state == "activation_pending" for d in p.devices)
        p.sh.kill()
    async with premises(tmp_path, restart_of=p) as q:
        assert all(q.state(d) is DeviceState.ACTIVATION_PENDING for d in q.devices)
        took = await q.until(lambda: all(q.state(d) is DeviceState.CONFIRMED for d in q.devices))
        assert took < 1.0  # re-sent at start, not found out by a read-back 30 s later
        assert [c.counter for c in q.commands_sent()] == sorted(r.counter for r in rows.values())
        assert all(dev.boot_count == 1 for dev in q.devices.values())


async def test_killed_after_the_devices_executed_each_still_activates_once(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID, JoinMode.CAD)) as p:
        await p.relay()
        p.ch.han.lose = lambda output: True  # the answers are in flight when otad dies
        await p.activate(*p.devices)
        await p.until(lambda: len(p.ch.han.lost) == 4)
        p.sh.kill()
    async with premises(tmp_path, restart_of=p) as q:
        q.ch.han.lose = lambda output: False
        await q.until(lambda: all(q.state(d) is DeviceState.CONFIRMED for d in q.devices))
        # the re-sent commands were refused as replays: nothing ran twice
        assert sorted(r for _, r in q.ch.han.refused) == [Reason.REPLAYED, Reason.REPLAYED]
        assert all(dev.boot_count == 1 for dev in q.devices.values())
        assert all(q.record(d).proof is Proof.READ_BACK for d in q.devices)


# --------------------------------------------------------------------------- control, versions


async def test_firmware_version_reads_the_device_through_its_ch(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.CAD,)) as p:
        (device,) = p.devices
        call = asyncio.ensure_future(
            p.sh.daemon.commands.firmware_version({"device": device, "wait_s": 5})
        )
        await asyncio.sleep(0)
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        answer = await call
        assert (answer["guid"], answer["fw_version"]) == (GUID, OLD_FW)
        assert answer["evidence"] == "device"
        with pytest.raises(ProtocolError) as info:
            await p.sh.daemon.commands.firmware_version({"device": "00DB1234567890FF"})
        assert info.value.reason is Reason.WRONG_DEVICE


async def test_activation_needs_a_held_image_and_a_ch_of_protocol_1_1(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.CAD, JoinMode.CAD)) as p:
        first, second = p.devices
        result = await p.activate(first)  # held by the CH only
        assert [r["reason"] for r in result["refused"]] == ["NO_IMAGE_HELD"]
        await p.relay(first)
        # the CH comes back speaking protocol 1.0 (a firmware downgrade): none of it is sent
        p.ch.announcement = declaring_minor(p.ch.announcement, 0)
        p.sh.announce(GUID)
        await p.sh.registry.flushed()
        result = await p.activate(first)
        assert [r["reason"] for r in result["refused"]] == ["UNSUPPORTED_VERSION"]
        size = len(p.ota)
        held = DeviceTransferReported(
            p.image.sha256, second, DeviceTransferState.HELD, size, size, 0
        )
        p.sh.send_up(GUID, held)  # a 1.0 CH has no such message: refused
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        assert p.state(second) is DeviceState.HELD_BY_CH
        assert p.sh.daemon.rejects.counts["UNKNOWN_TYPE"] == 1
        assert not [m for m in p.downlink() if isinstance(m, Activate)]


# --------------------------------------------------------------------------- a CH's own firmware


async def test_a_ch_image_is_activated_and_confirmed_by_the_chs_new_announcement(
    tmp_path: Path,
) -> None:
    key_path = tmp_path / "activation.pem"
    write_keypair(key_path)
    activation_key = load_private_key(key_path)
    config = ActivationConfig(key=key_path, **ACTIVATION)
    async with shell(tmp_path, activation=config) as sh:
        manifest = sh.release.manifest  # the shell's release is a CH image
        ch = sh.add_ch(GUID)
        ch.announcement = declaring_minor(ch.announcement, 1)
        itself = DeviceIdentity(
            GUID, DeviceType.CH, 0x0100, manifest.vendor, manifest.image_type, JoinMode.NATIVE
        )
        firmware = ch.han.add(
            Device(
                itself,
                sh.trust,
                MemorySlotStore(),
                running=FirmwareInfo(0x0100_0000, 0),
                activation_trust=TrustStore([activation_key.public_key()]),
                signing_key=ec.generate_private_key(ec.SECP256R1()),
            )
        )
        ch.han.lose = lambda output: True  # it reboots before anything reaches otad
        sh.announce(GUID)
        await sh.registry.flushed()
        result = await sh.daemon.commands.distribute({"image": sh.release.sha256, "to": [GUID]})
        assert result["devices"] == 1
        image = sh.catalogue.images[manifest.sha256]
        records = sh.daemon.devices.records
        await sh.run_until_handled(
            lambda: records[(GUID, image.sha256)].state is DeviceState.HELD_BY_CH
        )
        ota = SignedImage.decode(sh.release.path.read_bytes()).image
        ch.han.deliver(GUID, image.sha256, image.signed_manifest, ota, time.time())
        await sh.events.flush()
        sh.client.take("ota/v1/alerts/#")
        issued = await sh.daemon.commands.activate({"image": image.hex, "devices": [GUID]})
        assert [i["device_id"] for i in issued["issued"]] == [GUID]
        sh.pump()
        (sent,) = [
            m for m in map(decode, (p.payload for p in sh.downlink)) if isinstance(m, Activate)
        ]
        assert sent.device_id == GUID
        await sh.run_until_handled(lambda: firmware.running.fw_version == manifest.fw_version)
        # rebooted into it: it announces its new version
        ch.announcement = replace(ch.announcement, fw_version=manifest.fw_version)
        sh.announce(GUID)
        await sh.run_until_handled(
            lambda: records[(GUID, image.sha256)].state is DeviceState.CONFIRMED
        )
        assert records[(GUID, image.sha256)].proof is Proof.READ_BACK
        await sh.events.flush()
        (published,) = sh.client.take("ota/v1/alerts/#")
        alert = decode_event(published.payload)
        assert isinstance(alert, DeviceConfirmed)
        assert (alert.device_type, alert.device_id, alert.fw_version) == (
            "CH",
            GUID,
            manifest.fw_version,
        )
        assert published.topic.startswith(f"ota/v1/alerts/{supplier_topic_id('SUPPLIER-A')}/")


async def test_without_an_activation_key_activate_is_refused(tmp_path: Path) -> None:
    async with shell(tmp_path) as sh:
        with pytest.raises(ProtocolError) as info:
            await sh.daemon.commands.activate({"image": sh.release.sha256, "all_held": True})
        assert info.value.reason is Reason.UNKNOWN_KEY_ID
        for bad in (
            {"image": sh.release.sha256},
            {"image": sh.release.sha256, "all_held": True, "devices": [GUID]},
            {"image": sh.release.sha256, "all_held": True, "at": "noon"},
        ):
            with pytest.raises(ProtocolError) as info:
                await sh.daemon.commands.activate(bad)
            assert info.value.reason is Reason.MALFORMED


async def test_a_device_that_failed_is_offered_again_and_held_by_its_ch_at_once(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path, (JoinMode.CAD,)) as p:
        (device,) = p.devices
        size = len(p.ota)
        refused = DeviceTransferReported(
            p.image.sha256, device, DeviceTransferState.HARDWARE_MISMATCH, 0, size, 0
        )
        p.sh.send_up(GUID, refused)
        await p.until(lambda: p.state(device) is DeviceState.FAILED)
        assert p.record(device).reason == "HARDWARE_OUT_OF_RANGE"
        again = await p.sh.daemon.commands.distribute({"image": p.image.hex, "to": [GUID]})
        assert (again["already"], again["devices"]) == ([GUID], 1)
        assert p.state(device) is DeviceState.HELD_BY_CH  # the CH still holds the image
        await p.relay()
        assert p.record(device).reason is None
