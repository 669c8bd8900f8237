"""The device verifier/activator: manifest checks before storage, per-block and whole-image
checks, signed activation (replay, wrong device, hash, TOCTOU, self-test rollback, future
dating and cancel), confirmation evidence by join mode and the alert after a credential
replacement. Virtual time, in-memory flash."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device.activation import (
    ActivationAlert,
    ActivationCancelled,
    ActivationCommand,
    ActivationResponse,
    ActivationScheduled,
    Outcome,
    VersionReport,
)
from protocol.device.credentials import CredentialsCommand, adopt_new_key
from protocol.device.device import (
    ActivationState,
    AlertRaised,
    CredentialsConfirmed,
    Device,
    DeviceIdentity,
    FirmwareInfo,
    JoinMode,
    MemorySlotStore,
    SlotState,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore

RELEASE_KEY = ec.derive_private_key(0x5EED1, ec.SECP256R1())  # signs manifests
OPS_KEY = ec.derive_private_key(0x5EED2, ec.SECP256R1())  # otad: signs activations
DEVICE_KEY = ec.derive_private_key(0x5EED3, ec.SECP256R1())  # the bridge's own key
ROGUE_KEY = ec.derive_private_key(0x5EED4, ec.SECP256R1())
VENDOR, IMAGE_TYPE = 0x1234, 0x0B02
DEVICE_ID, OTHER_ID = "00124B0001A2B3C4", "00124B0001A2B3C5"
NOW = 1_750_000_000.0
OLD_IMAGE = b"old firmware " * 100
OLD = FirmwareInfo(fw_version=0x0100, sequence=5, sha256=hashlib.sha256(OLD_IMAGE).digest())


def image_bytes(size: int = 5000, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def signed_manifest(
    image: bytes, key: ec.EllipticCurvePrivateKey = RELEASE_KEY, **fields: Any
) -> tuple[Manifest, bytes]:
    args: dict[str, Any] = {
        "vendor": VENDOR,
        "image_type": IMAGE_TYPE,
        "device_type": DeviceType.B2,
        "hw_min": 1,
        "hw_max": 3,
        "fw_version": 0x0200,
        "sequence": 6,
        "block_size": 1024,
        "created": int(NOW) - 60,
        "expires": int(NOW) + 86_400,
    }
    args.update(fields)
    manifest = Manifest.for_image(image, **args)
    return manifest, sign1(manifest.encode(), key)


def make_device(
    join_mode: JoinMode = JoinMode.CAD, store: MemorySlotStore | None = None, **kwargs: Any
) -> Device:
    identity = DeviceIdentity(DEVICE_ID, DeviceType.B2, 2, VENDOR, IMAGE_TYPE, join_mode)
    return Device(
        identity,
        TrustStore([RELEASE_KEY.public_key()]),
        store if store is not None else MemorySlotStore(OLD_IMAGE),
        running=OLD,
        activation_trust=TrustStore([OPS_KEY.public_key()]),
        signing_key=DEVICE_KEY if join_mode.can_sign else None,
        **kwargs,
    )


def download(device: Device, signed: bytes, image: bytes, chunk: int = 50) -> None:
    device.manifest_received(signed, NOW)
    offset = 0
    while offset < len(image):
        offset = device.image_data_received(offset, image[offset : offset + chunk])


def held_device(join_mode: JoinMode = JoinMode.CAD, **kwargs: Any) -> tuple[Device, bytes]:
    image = image_bytes()
    device = make_device(join_mode, **kwargs)
    _, signed = signed_manifest(image)
    download(device, signed, image)
    return device, image


def activate(device: Device, image: bytes, counter: int, **kwargs: Any) -> list[Any]:
    command = ActivationCommand(DEVICE_ID, hashlib.sha256(image).digest(), counter, **kwargs)
    return device.activation_received(command.sign(OPS_KEY), NOW)


def outcome(outputs: list[Any]) -> Outcome:
    response = outputs[0]
    assert isinstance(response, ActivationResponse)
    return response.outcome


def store_of(device: Device) -> MemorySlotStore:
    assert isinstance(device.store, MemorySlotStore)
    return device.store


# --------------------------------------------------------------------------- distribution


def test_verified_image_is_held_block_by_block() -> None:
    image = image_bytes()
    device = make_device()
    manifest, signed = signed_manifest(image)
    download(device, signed, image)
    store = store_of(device)
    assert device.slot_state is SlotState.HELD
    assert bytes(store.pending) == image
    assert store.writes == manifest.block_count  # whole manifest blocks, each after its check
    assert device.running == OLD  # holding is not activating


@pytest.mark.parametrize(
    ("fields", "key", "expected"),
    [
        ({"device_type": DeviceType.B1}, RELEASE_KEY, Reason.WRONG_DEVICE_TYPE),
        ({"hw_min": 3, "hw_max": 4}, RELEASE_KEY, Reason.HARDWARE_OUT_OF_RANGE),
        ({"sequence": 4}, RELEASE_KEY, Reason.ROLLBACK),
        ({"sequence": 5}, RELEASE_KEY, Reason.REPLAYED),
        ({"vendor": 0x4321}, RELEASE_KEY, Reason.WRONG_VENDOR),
        ({"image_type": 0x0B03}, RELEASE_KEY, Reason.WRONG_DEVICE_TYPE),
        ({"expires": int(NOW)}, RELEASE_KEY, Reason.EXPIRED),
        ({}, ROGUE_KEY, Reason.UNKNOWN_KEY_ID),
    ],
    ids=["device-type", "hw-range", "rollback", "replay", "vendor", "image-type", "expired", "key"],
)
def test_bad_manifest_is_refused_before_anything_is_stored(
    fields: dict[str, Any], key: ec.EllipticCurvePrivateKey, expected: Reason
) -> None:
    device = make_device()
    _, signed = signed_manifest(image_bytes(), key, **fields)
    with pytest.raises(ProtocolError) as info:
        device.manifest_received(signed, NOW)
    assert info.value.reason is expected
    store = store_of(device)
    assert (store.writes, store.erases, device.slot_state) == (0, 0, SlotState.EMPTY)
    with pytest.raises(ProtocolError) as info:  # and no image byte is taken
        device.image_data_received(0, b"x" * 50)
    assert info.value.reason is Reason.NO_TRANSFER


def test_corrupt_block_never_reaches_flash_and_is_fetched_again() -> None:
    image = image_bytes()
    device = make_device()
    _, signed = signed_manifest(image)
    device.manifest_received(signed, NOW)
    offset = 0
    while offset < 1000:  # first 1000 bytes of the first 1024-byte manifest block
        offset = device.image_data_received(offset, image[offset : offset + 50])
    bad = bytearray(image[1000:1050])
    bad[3] ^= 0xFF
    with pytest.raises(ProtocolError) as info:
        device.image_data_received(1000, bytes(bad))
    assert info.value.reason is Reason.BLOCK_HASH
    assert device.next_offset == 0  # the whole manifest block is fetched again
    assert store_of(device).writes == 0
    download(device, signed, image)
    assert device.slot_state is SlotState.HELD


def test_out_of_order_and_excess_bytes_are_refused() -> None:
    image = image_bytes(200)
    device = make_device()
    _, signed = signed_manifest(image, block_size=64)
    device.manifest_received(signed, NOW)
    with pytest.raises(ProtocolError) as info:
        device.image_data_received(50, image[50:100])
    assert info.value.reason is Reason.BLOCK_OUT_OF_RANGE
    device.image_data_received(0, image[:150])
    with pytest.raises(ProtocolError) as info:
        device.image_data_received(150, image[150:] + b"extra")
    assert info.value.reason is Reason.TOO_MANY_BYTES


class FlakyFlash(MemorySlotStore):
    """Flips a bit in the n-th write: what was verified in RAM is not what is stored."""

    def __init__(self, active: bytes, bad_write: int) -> None:
        super().__init__(active)
        self.bad_write = bad_write

    def write_pending(self, offset: int, data: bytes) -> None:
        if self.writes + 1 == self.bad_write:
            data = bytes([data[0] ^ 0x01]) + data[1:]
        super().write_pending(offset, data)


def test_whole_image_is_re_read_from_storage_before_it_is_held() -> None:
    image = image_bytes()
    device = make_device(store=FlakyFlash(OLD_IMAGE, bad_write=2))
    _, signed = signed_manifest(image)
    with pytest.raises(ProtocolError) as info:
        download(device, signed, image)
    assert info.value.reason is Reason.IMAGE_HASH
    assert device.slot_state is SlotState.EMPTY
    assert store_of(device).pending == bytearray()  # erased


def test_same_manifest_resumes_from_the_last_verified_block() -> None:
    image = image_bytes()
    device = make_device()
    _, signed = signed_manifest(image)
    device.manifest_received(signed, NOW)
    offset = 0
    while offset < 2500:
        offset = device.image_data_received(offset, image[offset : offset + 50])
    assert device.stored_bytes == 2048
    device.manifest_received(signed, NOW)  # e.g. the client restarted
    assert device.next_offset == 2048
    assert store_of(device).erases == 1  # not erased again
    while device.next_offset < len(image):
        o = device.next_offset
        device.image_data_received(o, image[o : o + 50])
    assert device.slot_state is SlotState.HELD


def test_pending_image_cannot_be_replaced_by_an_older_release() -> None:
    device = make_device()
    image = image_bytes()
    _, pending = signed_manifest(image, sequence=8, fw_version=0x0300)
    download(device, pending, image)
    _, older = signed_manifest(image_bytes(seed=2), sequence=7, fw_version=0x0250)
    with pytest.raises(ProtocolError) as info:  # above the active image, below the pending one
        device.manifest_received(older, NOW)
    assert info.value.reason is Reason.ROLLBACK
    _, same_seq = signed_manifest(image_bytes(seed=3), sequence=8)
    with pytest.raises(ProtocolError) as info:  # the pending image's sequence, other bytes
        device.manifest_received(same_seq, NOW)
    assert info.value.reason is Reason.REPLAYED
    assert device.slot_state is SlotState.HELD
    assert store_of(device).erases == 1
    _, newer = signed_manifest(image_bytes(seed=4), sequence=9)
    device.manifest_received(newer, NOW)
    assert device.slot_state is SlotState.RECEIVING


# --------------------------------------------------------------------------- activation


def test_activation_success_cad_bridge_gives_a_version_report() -> None:
    device, image = held_device(JoinMode.CAD)
    out = activate(device, image, counter=1)
    assert out == [
        ActivationResponse(DEVICE_ID, 1, Outcome.SUCCESS, 0x0200),
        VersionReport(DEVICE_ID, 0x0200, 1, 1),
    ]
    assert device.running == FirmwareInfo(0x0200, 6, hashlib.sha256(image).digest())
    store = store_of(device)
    assert bytes(store.active) == image
    assert bytes(store.pending) == OLD_IMAGE
    assert device.slot_state is SlotState.EMPTY
    # the installed release is now the anti-rollback floor
    _, again = signed_manifest(image)
    with pytest.raises(ProtocolError) as info:
        device.manifest_received(again, NOW)
    assert info.value.reason is Reason.REPLAYED


def test_activation_success_ppmid_bridge_signs_an_alert() -> None:
    device, image = held_device(JoinMode.PPMID)
    response, evidence = activate(device, image, counter=9)
    assert response.outcome is Outcome.SUCCESS
    assert isinstance(evidence, AlertRaised)
    alert = ActivationAlert.verify(evidence.signed, TrustStore([DEVICE_KEY.public_key()]))
    assert alert == ActivationAlert(DEVICE_ID, 0x0200, hashlib.sha256(image).digest(), 9)
    with pytest.raises(ProtocolError):  # only the device's key makes it evidence
        ActivationAlert.verify(evidence.signed, TrustStore([OPS_KEY.public_key()]))


def test_after_a_credential_replacement_the_activation_alert_is_signed_by_the_new_key() -> None:
    new_key = ec.derive_private_key(0x5EED5, ec.SECP256R1())
    device, image = held_device(JoinMode.PPMID, key_generator=lambda: new_key)
    command = CredentialsCommand(DEVICE_ID, 1, key_id(DEVICE_KEY.public_key()))
    (confirmed,) = device.credentials_received(command.sign(OPS_KEY), NOW)
    assert isinstance(confirmed, CredentialsConfirmed)
    adopted = adopt_new_key(
        confirmed.signed, trusted_key=DEVICE_KEY.public_key(), device_id=DEVICE_ID, counter=1
    )
    response, evidence = activate(device, image, counter=2)
    assert response.outcome is Outcome.SUCCESS
    assert isinstance(evidence, AlertRaised)
    alert = ActivationAlert.verify(evidence.signed, TrustStore([adopted]))
    assert alert == ActivationAlert(DEVICE_ID, 0x0200, hashlib.sha256(image).digest(), 2)
    with pytest.raises(ProtocolError) as info:  # a verifier still on the old key refuses it
        ActivationAlert.verify(evidence.signed, TrustStore([DEVICE_KEY.public_key()]))
    assert info.value.reason is Reason.UNKNOWN_KEY_ID


def test_replayed_activation_is_refused() -> None:
    device, image = held_device()
    command = ActivationCommand(DEVICE_ID, hashlib.sha256(image).digest(), 3, cancel=False)
    signed = command.sign(OPS_KEY)
    assert outcome(device.activation_received(signed, NOW)) is Outcome.SUCCESS
    for replay in (signed, ActivationCommand(DEVICE_ID, command.image_sha256, 2).sign(OPS_KEY)):
        with pytest.raises(ProtocolError) as info:
            device.activation_received(replay, NOW)
        assert info.value.reason is Reason.REPLAYED
    assert device.last_counter == 3


def test_activation_for_another_device_is_refused_and_consumes_no_counter() -> None:
    device, image = held_device()
    signed = ActivationCommand(OTHER_ID, hashlib.sha256(image).digest(), 50).sign(OPS_KEY)
    with pytest.raises(ProtocolError) as info:
        device.activation_received(signed, NOW)
    assert info.value.reason is Reason.WRONG_DEVICE
    assert device.last_counter == 0
    assert activate(device, image, counter=1)[0].outcome is Outcome.SUCCESS


def test_activation_signed_by_an_untrusted_key_is_refused() -> None:
    device, image = held_device()
    signed = ActivationCommand(DEVICE_ID, hashlib.sha256(image).digest(), 1).sign(RELEASE_KEY)
    with pytest.raises(ProtocolError) as info:  # release key: manifests only
        device.activation_received(signed, NOW)
    assert info.value.reason is Reason.UNKNOWN_KEY_ID
    assert device.running == OLD
    assert device.last_counter == 0


def test_activation_with_the_wrong_hash_is_a_hash_mismatch_and_keeps_the_image() -> None:
    device, image = held_device()
    signed = ActivationCommand(DEVICE_ID, hashlib.sha256(b"other").digest(), 1).sign(OPS_KEY)
    assert device.activation_received(signed, NOW) == [
        ActivationResponse(DEVICE_ID, 1, Outcome.HASH_MISMATCH, 0x0100, Reason.HASH_MISMATCH)
    ]
    assert device.slot_state is SlotState.HELD
    assert store_of(device).swaps == 0
    assert activate(device, image, counter=2)[0].outcome is Outcome.SUCCESS


def test_activation_without_a_pending_image_is_no_image_held() -> None:
    device = make_device()
    out = activate(device, image_bytes(), counter=1)
    assert out == [
        ActivationResponse(DEVICE_ID, 1, Outcome.NO_IMAGE_HELD, 0x0100, Reason.NO_IMAGE_HELD)
    ]
    device, image = held_device()
    activate(device, image, counter=1)
    assert activate(device, image, counter=2)[0].outcome is Outcome.NO_IMAGE_HELD


def test_tampered_storage_after_download_is_a_hash_mismatch() -> None:
    device, image = held_device()
    store = store_of(device)
    store.pending[len(image) // 2] ^= 0x40  # flash changed after verification
    assert activate(device, image, counter=1) == [
        ActivationResponse(DEVICE_ID, 1, Outcome.HASH_MISMATCH, 0x0100, Reason.HASH_MISMATCH)
    ]
    assert store.swaps == 0
    assert device.running == OLD
    assert device.slot_state is SlotState.EMPTY  # unusable image discarded


def test_self_test_failure_rolls_back_to_the_old_image() -> None:
    tested: list[int] = []

    def self_test(manifest: Manifest) -> bool:
        tested.append(manifest.fw_version)
        return False

    device, image = held_device(self_test=self_test)
    assert activate(device, image, counter=1) == [
        ActivationResponse(DEVICE_ID, 1, Outcome.ACTIVATION_FAILED, 0x0100, Reason.SELF_TEST_FAILED)
    ]
    store = store_of(device)
    assert tested == [0x0200]  # the new image really ran its self-test
    assert device.running == OLD
    assert bytes(store.active) == OLD_IMAGE
    assert store.swaps == 2
    assert device.boot_count == 2
    assert device.slot_state is SlotState.EMPTY


def test_future_dated_activation_fires_at_its_time() -> None:
    device, image = held_device()
    at = int(NOW) + 3600
    assert activate(device, image, counter=1, execute_at=at) == [
        ActivationScheduled(DEVICE_ID, 1, at)
    ]
    assert device.activation_state is ActivationState.SCHEDULED
    assert device.next_deadline() == at
    assert device.handle_timer(at - 0.5) == []
    assert device.running == OLD
    out = device.handle_timer(at)
    assert out[0] == ActivationResponse(DEVICE_ID, 1, Outcome.SUCCESS, 0x0200)
    assert device.running.fw_version == 0x0200
    assert device.next_deadline() is None
    assert device.handle_timer(at + 1) == []


def test_cancel_before_the_time_means_nothing_happens() -> None:
    device, image = held_device()
    at = int(NOW) + 3600
    activate(device, image, counter=1, execute_at=at)
    assert activate(device, image, counter=2, cancel=True) == [ActivationCancelled(DEVICE_ID, 2, 1)]
    assert device.next_deadline() is None
    assert device.handle_timer(at + 10) == []
    assert device.running == OLD
    assert store_of(device).swaps == 0
    assert device.slot_state is SlotState.HELD
    assert activate(device, image, counter=3, cancel=True) == [
        ActivationCancelled(DEVICE_ID, 3, None)
    ]


def test_future_dated_activation_re_hashes_at_execution_time() -> None:
    device, image = held_device()
    at = int(NOW) + 600
    activate(device, image, counter=1, execute_at=at)  # image intact when scheduled
    store_of(device).pending[0] ^= 0x01  # ... changed before the time comes
    assert outcome(device.handle_timer(at)) is Outcome.HASH_MISMATCH
    assert device.running == OLD


def test_an_activation_time_in_the_past_executes_now() -> None:
    device, image = held_device()
    out = activate(device, image, counter=1, execute_at=int(NOW) - 5)
    assert out[0].outcome is Outcome.SUCCESS


def test_a_signing_join_mode_needs_a_key() -> None:
    identity = DeviceIdentity(DEVICE_ID, DeviceType.B3, 1, VENDOR, IMAGE_TYPE, JoinMode.PPMID)
    with pytest.raises(ValueError, match="signing key"):
        Device(identity, TrustStore(), MemorySlotStore(), running=OLD)
    assert JoinMode.CAD.can_sign is False
    assert JoinMode.NATIVE.can_sign is True
