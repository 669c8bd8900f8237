"""The virtual premises (loadtest/premises.py) in virtual time: relay to the right devices with
K transfers at a time over lossy links, a sleepy GSME, the CH's own image, activation with its
evidence by join mode, self-test rollback, hash mismatch, replay, future-dated and cancelled
activations, read-back, credential replacement (the next alert verifies only with the new key;
replayed, forged and CAD-bound commands refused), and 100 premises with bridges."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from loadtest.hanlink import Direction, HanClock, HanLink, LinkConfig
from loadtest.hub import HubIdentity, make_identity
from loadtest.premises import (
    ActivationAnswered,
    ActivationRefused,
    AlertReceived,
    CredentialsRefused,
    CredentialsReplaced,
    Premises,
    PremisesConfig,
    PremisesEvent,
    TransferEnded,
    TransferOutcome,
    TransferProgressed,
    VersionReported,
)
from otad.ctl.imagetool import DEFAULT_IMAGE_TYPE, DEFAULT_MANUFACTURER
from protocol.clock import UnixTime
from protocol.device.activation import (
    ActivationAlert,
    ActivationCancelled,
    ActivationCommand,
    ActivationScheduled,
    Outcome,
)
from protocol.device.credentials import CredentialsCommand, adopt_new_key
from protocol.device.device import SlotState
from protocol.errors import ProtocolError, Reason
from protocol.release import otaimg, zigbee_ota
from protocol.release.cose import key_id
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore, verify_manifest
from protocol.wire.devices import JoinMode
from protocol.wire.messages import HanDevice

RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())  # signs manifests
OPS_KEY = ec.generate_private_key(ec.SECP256R1())  # otad: signs activation commands
ROGUE_KEY = ec.generate_private_key(ec.SECP256R1())
TRUST = TrustStore([RELEASE_KEY.public_key()])
ACTIVATION_TRUST = TrustStore([OPS_KEY.public_key()])
T0 = UnixTime(1_750_000_000.0)
OLD, NEW = 0x0100, 0x0200


@dataclass(frozen=True)
class Release:
    image: bytes
    manifest: Manifest
    signed: bytes


def release(
    device_type: DeviceType,
    *,
    size: int = 2048,
    fw_version: int = NEW,
    hw: tuple[int, int] = (1, 3),
    seed: int = 1,
    expires: int = int(T0) + 30 * 86_400,
) -> Release:
    ota = zigbee_ota.wrap(
        random.Random(seed).randbytes(size),
        manufacturer_code=DEFAULT_MANUFACTURER,
        image_type=DEFAULT_IMAGE_TYPE,
        file_version=fw_version,
        hw_min=hw[0],
        hw_max=hw[1],
    )
    signed = otaimg.build(
        ota,
        RELEASE_KEY,
        device_type=device_type,
        sequence=10 + seed,
        block_size=1024,
        created=int(T0) - 60,
        expires=expires,
    )
    manifest = verify_manifest(signed.signed_manifest, TRUST, now=T0)
    return Release(signed.image, manifest, signed.signed_manifest)


def bridge_id(index: int, slot: int) -> str:
    return f"00124B{index:06X}00B{slot}"


def identity(
    bridges: Iterable[tuple[DeviceType, JoinMode] | tuple[DeviceType, JoinMode, int]],
    index: int = 0,
) -> HubIdentity:
    """Hub ``index``'s identity with its ESME, GSME, PPMID and exactly these bridges."""
    base = make_identity(7, index)
    han = list(base.han[:3])
    for slot, spec in enumerate(bridges):
        kind, mode, *hw = spec
        han.append(HanDevice(bridge_id(index, slot), kind, mode, OLD, hw[0] if hw else 1))
    return replace(base, han=tuple(han))


def premises(ident: HubIdentity, **config: Any) -> Premises:
    on_reboot: Callable[[int], None] | None = config.pop("on_ch_reboot", None)
    return Premises(
        ident,
        trust=TRUST,
        activation_trust=ACTIVATION_TRUST,
        now=T0,
        config=PremisesConfig(**config),
        on_ch_reboot=on_reboot,
    )


class Driver:
    """Drives one premises in virtual (shell) time, as the virtual CH will: timer and inputs."""

    def __init__(self, p: Premises) -> None:
        self.p = p
        self.now = T0
        self.log: list[PremisesEvent] = []

    def collect(self) -> list[PremisesEvent]:
        new = self.p.events()
        self.log.extend(new)
        return new

    def run(self, until: float, done: Callable[[], bool] | None = None) -> None:
        """Fire the premises' timer at each deadline up to shell time ``until`` (or ``done``)."""
        while done is None or not done():
            deadline = self.p.next_deadline()
            if deadline is None or deadline > until:
                self.now = UnixTime(until)
                self.p.handle_timer(self.now)
                self.collect()
                return
            self.now = UnixTime(max(self.now, deadline))
            self.p.handle_timer(self.now)
            self.collect()

    def of(self, kind: type[Any], device_id: str | None = None) -> list[Any]:
        return [e for e in self.log if isinstance(e, kind) and device_id in (None, e.device_id)]

    def ended(self, device_id: str) -> list[TransferEnded]:
        return self.of(TransferEnded, device_id)

    def held(self, *device_ids: str) -> Callable[[], bool]:
        return lambda: all(
            any(e.outcome is TransferOutcome.HELD for e in self.ended(d)) for d in device_ids
        )


def ids_of(p: Premises, kind: DeviceType) -> list[str]:
    return [d.device_id for d in p.inventory() if d.device_type is kind]


def command(device_id: str, r: Release, counter: int, key: Any = OPS_KEY, **kw: Any) -> bytes:
    return ActivationCommand(device_id, r.manifest.activation_digest, counter, **kw).sign(key)


def relayed(
    bridges: list[tuple[DeviceType, JoinMode]], r: Release, **config: Any
) -> tuple[Driver, list[str]]:
    """A premises with ``bridges`` whose devices of ``r``'s type hold ``r``."""
    d = Driver(premises(identity(bridges), **config))
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    targets = ids_of(d.p, r.manifest.device_type)
    d.run(T0 + 3600, d.held(*targets))
    assert d.held(*targets)()
    return d, targets


# ----------------------------------------------------------------------------- relay


def test_an_image_for_b2_reaches_every_b2_and_nothing_else() -> None:
    r = release(DeviceType.B2, size=4096)
    bridges = [
        (DeviceType.B2, JoinMode.CAD),
        (DeviceType.B3, JoinMode.PPMID),
        (DeviceType.B2, JoinMode.PPMID),
    ]
    d, b2s = relayed(bridges, r)
    assert len(b2s) == 2
    for device_id in d.p.device_ids:
        device = d.p.device(device_id)
        if device_id in b2s:
            assert device.holds_image
            assert device.pending_manifest == r.manifest
            assert [e.outcome for e in d.ended(device_id)] == [TransferOutcome.HELD]
            steps = [e.bytes_done for e in d.of(TransferProgressed, device_id)]
            assert steps == sorted(steps)
            assert 5 <= len(steps) <= 10
        else:
            assert device.slot_state is SlotState.EMPTY
            assert d.ended(device_id) == []
            assert d.p.server.session(device_id) is None
    assert d.p.device(d.p.identity.guid).slot_state is SlotState.EMPTY  # nor the CH


def test_hardware_outside_the_range_is_reported_and_not_served() -> None:
    r = release(DeviceType.B2, hw=(1, 3))
    d = Driver(
        premises(identity([(DeviceType.B2, JoinMode.CAD, 9), (DeviceType.B2, JoinMode.CAD)]))
    )
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    odd, fits = ids_of(d.p, DeviceType.B2)
    d.run(T0 + 3600, d.held(fits))
    (mismatch,) = d.ended(odd)
    assert (mismatch.outcome, mismatch.reason) == (
        TransferOutcome.HARDWARE_MISMATCH,
        Reason.HARDWARE_OUT_OF_RANGE,
    )
    assert d.p.server.session(odd) is None
    assert not d.p.device(odd).holds_image


def test_an_image_for_a_type_not_on_the_premises_is_refused() -> None:
    r = release(DeviceType.B4)
    p = premises(identity([(DeviceType.B2, JoinMode.CAD)]))
    with pytest.raises(ProtocolError) as exc:
        p.image_held(r.manifest, r.signed, r.image, T0)
    assert exc.value.reason is Reason.WRONG_DEVICE_TYPE


def test_a_device_that_refuses_the_image_is_reported_discarded_with_its_reason() -> None:
    r = release(DeviceType.B2, expires=int(T0) + 60)
    d = Driver(premises(identity([(DeviceType.B2, JoinMode.CAD)])))
    d.run(T0 + 100)  # the CH verified it in time; the device checks it after it expired
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    (b2,) = ids_of(d.p, DeviceType.B2)
    d.run(T0 + 1200, lambda: bool(d.ended(b2)))
    (ended,) = d.ended(b2)
    assert (ended.outcome, ended.reason) == (TransferOutcome.DISCARDED, Reason.EXPIRED)
    assert d.p.device(b2).slot_state is SlotState.EMPTY


@pytest.mark.parametrize("k", [1, 2])
def test_at_most_k_transfers_at_once(k: int) -> None:
    r = release(DeviceType.B2, size=4096)
    d, b2s = relayed(
        [
            (DeviceType.B2, JoinMode.CAD),
            (DeviceType.B2, JoinMode.PPMID),
            (DeviceType.B2, JoinMode.CAD),
        ],
        r,
        max_transfers=k,
    )
    assert len(b2s) == 3
    assert d.p.stats.max_concurrent_transfers == k


def test_a_lossy_link_still_delivers_byte_for_byte() -> None:
    r = release(DeviceType.B3, size=6000)
    d, (b3,) = relayed(
        [(DeviceType.B3, JoinMode.CAD), (DeviceType.B1, JoinMode.CAD)],
        r,
        link=LinkConfig(block_size=41, loss=0.15, latency=0.05, frame_rate=25.0),
        seed=3,
    )
    link = d.p.link(b3)
    assert link.frames_lost > 20  # the loss really happened
    device = d.p.device(b3)
    assert bytes(device.store.pending) == r.image  # type: ignore[attr-defined]
    assert device.holds_image


def test_a_sleepy_gsme_is_served_within_its_wake_interval() -> None:
    wake = 1200.0
    r = release(DeviceType.GSME, size=2048, hw=(0, 0xFFFF))
    acceleration = 60.0
    d = Driver(premises(identity([]), wake_interval=wake, acceleration=acceleration))
    (gsme,) = ids_of(d.p, DeviceType.GSME)
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    d.run(T0 + 2 * wake, d.held(gsme))
    (held,) = d.ended(gsme)
    assert held.outcome is TransferOutcome.HELD
    # HAN seconds pass `acceleration` times as fast: wake interval plus a minute's transfer
    assert held.at - T0 <= (wake + 60.0) / acceleration
    assert d.p.stats.frames_held_asleep >= 1  # the ImageNotify waited for it to wake


def test_the_ch_holds_its_own_image_at_once_and_reboots_into_it() -> None:
    reboots: list[int] = []
    ident = identity([])
    r = release(DeviceType.CH, hw=(0, 0xFFFF), fw_version=0x0200_0000)
    d = Driver(premises(ident, on_ch_reboot=reboots.append))
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    assert [(e.outcome, e.at) for e in d.p.events()] == [(TransferOutcome.HELD, T0)]
    assert d.p.stats.frames_sent == 0  # no HAN transfer
    d.p.activation_received(ident.guid, command(ident.guid, r, 1), d.now)
    d.collect()
    (answer,) = d.of(ActivationAnswered, ident.guid)
    assert answer.answer.outcome is Outcome.SUCCESS
    assert reboots == [0x0200_0000]
    assert d.p.ch_fw_version == 0x0200_0000
    (alert,) = d.of(AlertReceived, ident.guid)
    key = d.p.public_key(ident.guid)
    assert key is not None
    assert ActivationAlert.verify(alert.signed, TrustStore([key])).fw_version == 0x0200_0000


# ----------------------------------------------------------------------------- activation


def activate(d: Driver, device_id: str, signed: bytes, after: float = 60.0) -> None:
    d.p.activation_received(device_id, signed, d.now)
    d.run(d.now + after)


def test_activation_evidence_by_join_mode() -> None:
    r = release(DeviceType.B2)
    d, (cad, ppmid) = relayed([(DeviceType.B2, JoinMode.CAD), (DeviceType.B2, JoinMode.PPMID)], r)
    activate(d, cad, command(cad, r, 1))
    activate(d, ppmid, command(ppmid, r, 1))
    for device_id in (cad, ppmid):
        (answered,) = d.of(ActivationAnswered, device_id)
        assert answered.answer.outcome is Outcome.SUCCESS
        assert answered.answer.running_fw_version == NEW
    # CAD: it cannot sign; the CH's evidence is its reboot and the new version in its next query
    assert d.of(AlertReceived, cad) == []
    assert d.p.public_key(cad) is None
    (report,) = d.of(VersionReported, cad)
    assert (report.report.fw_version, report.report.counter) == (NEW, 1)
    (cad_answer,) = d.of(ActivationAnswered, cad)
    assert report.at > cad_answer.at  # seen in the query the device sends after its reboot
    assert report.report.boot_count == 1
    # PPMID-joined: an alert signed by the device's own key, for this command
    assert d.of(VersionReported, ppmid) == []
    (alert,) = d.of(AlertReceived, ppmid)
    key = d.p.public_key(ppmid)
    assert key is not None
    verified = ActivationAlert.verify(alert.signed, TrustStore([key]))
    assert (verified.fw_version, verified.image_sha256, verified.counter) == (
        NEW,
        r.manifest.sha256,
        1,
    )
    other = d.p.public_key(d.p.device_ids[0])  # the ESME's
    assert other is not None
    with pytest.raises(ProtocolError):  # another device's key does not verify it
        ActivationAlert.verify(alert.signed, TrustStore([other]))
    assert {h.device_id: h.fw_version for h in d.p.inventory()}[cad] == NEW


def test_a_self_test_failure_rolls_back_and_reports_the_reason() -> None:
    r = release(DeviceType.B2)
    d, (b2,) = relayed([(DeviceType.B2, JoinMode.PPMID)], r, self_test_failure_share=1.0)
    activate(d, b2, command(b2, r, 1))
    (answered,) = d.of(ActivationAnswered, b2)
    assert (answered.answer.outcome, answered.answer.reason) == (
        Outcome.ACTIVATION_FAILED,
        Reason.SELF_TEST_FAILED,
    )
    assert answered.answer.running_fw_version == OLD
    assert d.p.device(b2).running.fw_version == OLD
    assert d.of(AlertReceived, b2) == []


def test_a_seeded_share_of_devices_fails_self_test() -> None:
    r = release(DeviceType.B2)

    def failed(seed: int) -> list[int]:
        out = []
        for i in range(40):
            d = Driver(
                premises(
                    identity([(DeviceType.B2, JoinMode.CAD)], index=i),
                    self_test_failure_share=0.25,
                    seed=seed,
                    acceleration=100.0,
                )
            )
            d.p.image_held(r.manifest, r.signed, r.image, d.now)
            (b2,) = ids_of(d.p, DeviceType.B2)
            d.run(T0 + 60, d.held(b2))
            activate(d, b2, command(b2, r, 1), after=5.0)
            (answered,) = d.of(ActivationAnswered, b2)
            if answered.answer.outcome is Outcome.ACTIVATION_FAILED:
                assert answered.answer.reason is Reason.SELF_TEST_FAILED
                assert d.p.device(b2).running.fw_version == OLD
                out.append(i)
        return out

    first = failed(seed=1)
    assert 3 <= len(first) <= 18  # about a quarter of 40
    assert failed(seed=1) == first  # seeded: the same devices fail again


def test_a_device_holding_another_image_refuses_with_hash_mismatch() -> None:
    held, other = release(DeviceType.B2, seed=1), release(DeviceType.B2, seed=2)
    d, (b2,) = relayed([(DeviceType.B2, JoinMode.CAD)], held)
    activate(d, b2, command(b2, other, 1))
    (answered,) = d.of(ActivationAnswered, b2)
    assert answered.answer.outcome is Outcome.HASH_MISMATCH
    assert d.p.device(b2).holds_image  # its own image is kept


def test_a_replayed_or_forged_command_is_refused() -> None:
    r = release(DeviceType.B2)
    d, (b2,) = relayed([(DeviceType.B2, JoinMode.PPMID)], r)
    forged = command(b2, r, 5, key=ROGUE_KEY)
    activate(d, b2, forged)
    signed = command(b2, r, 1)
    activate(d, b2, signed)
    activate(d, b2, signed)
    refused = [e.reason for e in d.of(ActivationRefused, b2)]
    assert refused == [Reason.UNKNOWN_KEY_ID, Reason.REPLAYED]
    assert [e.answer.outcome for e in d.of(ActivationAnswered, b2)] == [Outcome.SUCCESS]


def replace_credentials(
    d: Driver, device_id: str, counter: int, trusted: ec.EllipticCurvePublicKey, **kw: Any
) -> None:
    signer = kw.pop("key", OPS_KEY)
    signed = CredentialsCommand(device_id, counter, key_id(trusted)).sign(signer)
    activate(d, device_id, signed, **kw)


def test_a_ppmid_bridge_replaced_its_credentials_its_next_alert_verifies_only_with_them() -> None:
    r = release(DeviceType.B2)
    d, (b2,) = relayed([(DeviceType.B2, JoinMode.PPMID)], r)
    old = d.p.public_key(b2)
    assert old is not None
    replace_credentials(d, b2, 1, old)
    (replaced,) = d.of(CredentialsReplaced, b2)
    new = adopt_new_key(replaced.signed, trusted_key=old, device_id=b2, counter=1)
    current = d.p.public_key(b2)
    assert current is not None
    assert current.public_numbers() == new.public_numbers() != old.public_numbers()
    # its next alert (an activation on the same counter sequence) is signed by the new key
    activate(d, b2, command(b2, r, 2))
    (alert,) = d.of(AlertReceived, b2)
    assert ActivationAlert.verify(alert.signed, TrustStore([new])).counter == 2
    with pytest.raises(ProtocolError) as info:
        ActivationAlert.verify(alert.signed, TrustStore([old]))
    assert info.value.reason is Reason.UNKNOWN_KEY_ID
    # a replayed replacement command is refused, and the key stays
    replace_credentials(d, b2, 1, old)
    assert [e.reason for e in d.of(CredentialsRefused, b2)] == [Reason.REPLAYED]
    assert len(d.of(CredentialsReplaced, b2)) == 1
    after = d.p.public_key(b2)
    assert after is not None
    assert after.public_numbers() == new.public_numbers()
    assert d.of(ActivationRefused, b2) == []


def test_a_cad_bridge_refuses_credentials_and_a_forged_command_is_refused() -> None:
    d = Driver(premises(identity([(DeviceType.B2, JoinMode.CAD), (DeviceType.B4, JoinMode.PPMID)])))
    cad, ppmid = d.p.device_ids[3:]
    esme_key = d.p.public_key(d.p.device_ids[0])
    ppmid_key = d.p.public_key(ppmid)
    assert esme_key is not None
    assert ppmid_key is not None
    replace_credentials(d, cad, 1, esme_key)
    replace_credentials(d, ppmid, 1, ppmid_key, key=ROGUE_KEY)
    assert [e.reason for e in d.of(CredentialsRefused, cad)] == [Reason.NO_CREDENTIALS]
    assert [e.reason for e in d.of(CredentialsRefused, ppmid)] == [Reason.UNKNOWN_KEY_ID]
    assert d.of(CredentialsReplaced) == []
    assert d.p.public_key(cad) is None
    unchanged = d.p.public_key(ppmid)
    assert unchanged is not None
    assert unchanged.public_numbers() == ppmid_key.public_numbers()
    assert d.p.device(ppmid).last_counter == 0  # refusals consume no counter


def test_native_devices_and_the_ch_replace_credentials_too() -> None:
    ident = identity([])
    d = Driver(premises(ident))
    esme = d.p.device_ids[0]
    for device_id in (esme, ident.guid):
        old = d.p.public_key(device_id)
        assert old is not None
        replace_credentials(d, device_id, 1, old)
        (replaced,) = d.of(CredentialsReplaced, device_id)
        new = adopt_new_key(replaced.signed, trusted_key=old, device_id=device_id, counter=1)
        current = d.p.public_key(device_id)
        assert current is not None
        assert current.public_numbers() == new.public_numbers()


def test_a_lost_confirmation_is_recovered_by_naming_the_old_key_again() -> None:
    d = Driver(premises(identity([(DeviceType.B3, JoinMode.PPMID)]), activation_answer_loss=1.0))
    (b3,) = ids_of(d.p, DeviceType.B3)
    old = d.p.public_key(b3)
    assert old is not None
    replace_credentials(d, b3, 1, old)
    assert d.of(CredentialsReplaced, b3) == []  # the confirmation was lost
    assert d.p.stats.answers_dropped == 1
    d.p.config = replace(d.p.config, activation_answer_loss=0.0)
    replace_credentials(d, b3, 2, old)  # otad still trusts the old key
    (replaced,) = d.of(CredentialsReplaced, b3)
    new = adopt_new_key(replaced.signed, trusted_key=old, device_id=b3, counter=2)
    current = d.p.public_key(b3)
    assert current is not None
    assert current.public_numbers() == new.public_numbers()


def test_a_future_dated_activation_fires_at_its_time_and_a_cancelled_one_never() -> None:
    r = release(DeviceType.B2)
    d, (kept, cancelled) = relayed(
        [(DeviceType.B2, JoinMode.CAD), (DeviceType.B2, JoinMode.PPMID)], r
    )
    at = int(d.now) + 600
    d.p.activation_received(kept, command(kept, r, 1, execute_at=at), d.now)
    d.p.activation_received(cancelled, command(cancelled, r, 1, execute_at=at), d.now)
    d.run(d.now + 60)
    assert all(isinstance(e.answer, ActivationScheduled) for e in d.of(ActivationAnswered))
    d.p.activation_received(cancelled, command(cancelled, r, 2, cancel=True), d.now)
    d.run(at - 1)
    (cancel,) = [
        e for e in d.of(ActivationAnswered, cancelled) if isinstance(e.answer, ActivationCancelled)
    ]
    assert cancel.answer.cancelled_counter == 1
    assert d.p.device(kept).running.fw_version == OLD  # not before its time
    d.run(at + 600)
    fired = [
        e for e in d.of(ActivationAnswered, kept) if not isinstance(e.answer, ActivationScheduled)
    ]
    assert [e.answer.outcome for e in fired] == [Outcome.SUCCESS]
    assert at <= fired[0].at <= at + 1
    assert d.p.device(kept).running.fw_version == NEW
    assert len(d.of(ActivationAnswered, cancelled)) == 2  # scheduled, cancelled: never fired
    assert d.p.device(cancelled).running.fw_version == OLD
    assert d.p.device(cancelled).holds_image


def test_a_sleepy_gsme_gets_its_activation_when_it_wakes() -> None:
    wake = 900.0
    r = release(DeviceType.GSME, hw=(0, 0xFFFF))
    d, (gsme,) = relayed([], r, wake_interval=wake)
    d.run(d.now + 60)  # it went back to sleep
    sent_at = d.now
    held_before = d.p.stats.frames_held_asleep
    activate(d, gsme, command(gsme, r, 1), after=wake + 60)
    assert d.p.stats.frames_held_asleep == held_before + 1  # kept for it while it slept
    (answered,) = d.of(ActivationAnswered, gsme)
    assert answered.answer.outcome is Outcome.SUCCESS
    assert sent_at < answered.at <= sent_at + wake + 1
    assert len(d.of(AlertReceived, gsme)) == 1  # a native device signs


def test_an_hcalcs_in_the_inventory_is_a_target_like_any_device() -> None:
    base = identity([])
    hcalcs = HanDevice("00124B00000C0001", DeviceType.HCALCS, JoinMode.NATIVE, OLD, 1)
    d = Driver(premises(replace(base, han=(*base.han, hcalcs))))
    r = release(DeviceType.HCALCS)
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    d.run(T0 + 3600, d.held(hcalcs.device_id))
    activate(d, hcalcs.device_id, command(hcalcs.device_id, r, 1))
    assert d.p.device(hcalcs.device_id).running.fw_version == NEW


def test_lost_answers_leave_read_back() -> None:
    r = release(DeviceType.B2)
    d, (b2,) = relayed([(DeviceType.B2, JoinMode.PPMID)], r, activation_answer_loss=1.0)
    activate(d, b2, command(b2, r, 1))
    assert d.of(ActivationAnswered, b2) == []
    assert d.of(AlertReceived, b2) == []
    assert d.p.stats.answers_dropped == 2  # the response and the alert
    d.p.version_read(b2, d.now)
    d.run(d.now + 30)
    (report,) = d.of(VersionReported, b2)
    assert (report.report.fw_version, report.report.counter) == (NEW, 1)


def test_an_unknown_device_is_refused() -> None:
    p = premises(identity([]))
    with pytest.raises(ProtocolError) as exc:
        p.activation_received("00124B00DEADBEEF", b"x", T0)
    assert exc.value.reason is Reason.WRONG_DEVICE


# ----------------------------------------------------------------------------- the clock, scale


def test_the_clock_maps_shell_time_to_han_time_in_one_place() -> None:
    clock = HanClock(T0, 100.0)
    assert clock.han(UnixTime(T0 + 3.0)) == T0 + 300.0
    assert clock.shell(clock.han(UnixTime(T0 + 3.0))) == pytest.approx(T0 + 3.0)
    link = HanLink(LinkConfig(frame_rate=10.0, latency=0.5), seed=1)
    first = link.transmit(Direction.TO_DEVICE, T0)
    second = link.transmit(Direction.TO_DEVICE, T0)  # waits for the first one's airtime
    back = link.transmit(Direction.TO_CH, T0)  # the other way is free
    assert (first, second, back) == pytest.approx((T0 + 0.6, T0 + 0.7, T0 + 0.6))


def test_a_hundred_premises_with_bridges_in_seconds() -> None:
    r = release(DeviceType.B2, size=2048)
    kinds = [DeviceType.B1, DeviceType.B3, DeviceType.B4]
    drivers: list[Driver] = []
    for i in range(100):
        rng = random.Random(i)
        bridges: list[tuple[DeviceType, JoinMode]] = [
            (DeviceType.B2, rng.choice((JoinMode.CAD, JoinMode.PPMID)))
        ]
        bridges += [
            (k, rng.choice((JoinMode.CAD, JoinMode.PPMID)))
            for k in rng.sample(kinds, rng.choice((1, 2)))
        ]
        drivers.append(Driver(premises(identity(bridges, index=i), acceleration=100.0, seed=i)))
    started = time.perf_counter()
    for d in drivers:
        d.p.image_held(r.manifest, r.signed, r.image, d.now)
        (b2,) = ids_of(d.p, DeviceType.B2)
        d.run(T0 + 60, d.held(b2))
        d.p.activation_received(b2, command(b2, r, 1), d.now)
        d.run(d.now + 5)
        (answered,) = d.of(ActivationAnswered, b2)
        assert answered.answer.outcome is Outcome.SUCCESS
        mode = d.p.device(b2).identity.join_mode
        evidence = d.of(AlertReceived if mode is JoinMode.PPMID else VersionReported, b2)
        assert len(evidence) == 1
        others = [x for x in d.p.device_ids if x != b2]
        assert all(d.ended(x) == [] for x in others)
    assert time.perf_counter() - started < 30


def test_devices_no_image_is_for_do_not_poll_but_a_sleepy_one_keeps_waking() -> None:
    # an always-on device with nothing to fetch only ever hears NO_IMAGE_AVAILABLE: its
    # periodic queries are not simulated (10,000 premises at 300x made them 45,000 a second)
    ident = identity([(DeviceType.B2, JoinMode.PPMID)])
    hours = 4
    d = Driver(premises(ident, query_interval=300.0, wake_interval=1800.0))
    d.run(T0 + hours * 3600)
    idle = d.p.stats.frames_sent
    nodes = len(ident.han)
    # each device's first query (and its answer) at start, then only the GSME's wake-ups
    assert idle <= 2 * nodes + 2 * (hours * 2 + 1)
    # the B2 an image is for polls again (and is served)
    r = release(DeviceType.B2, size=1024)
    d.p.image_held(r.manifest, r.signed, r.image, d.now)
    (b2,) = ids_of(d.p, DeviceType.B2)
    d.run(d.now + 3600, d.held(b2))
    assert d.held(b2)()
