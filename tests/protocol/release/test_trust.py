"""Trust store and manifest verification against the update-security attacks (arbitrary
software, rollback and replay, freeze, wrong target, decoding before verifying) and revocation."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, parse_sign1, sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, Target, TrustStore, verify_manifest
from protocol.wire import cbor

CREATED = 1_700_000_000
EXPIRES = 1_700_000_000 + 365 * 86_400
NOW = CREATED + 3600
IMAGE = bytes(range(256)) * 9


@pytest.fixture(scope="module")
def release_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def attacker_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def trust(release_key: ec.EllipticCurvePrivateKey) -> TrustStore:
    return TrustStore([release_key.public_key()])


def manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "vendor": 0x121D,
        "image_type": 0x0001,
        "device_type": DeviceType.ESME,
        "hw_min": 0x1111,
        "hw_max": 0x1211,
        "fw_version": 0x0200,
        "sequence": 10,
        "block_size": 512,
        "created": CREATED,
        "expires": EXPIRES,
    }
    fields.update(changes)
    return Manifest.for_image(IMAGE, **fields)


def signed(key: ec.EllipticCurvePrivateKey, **changes: Any) -> bytes:
    return sign1(manifest(**changes).encode(), key)


TARGET = Target(device_type=DeviceType.ESME, hw_version=0x1200, installed_sequence=9, vendor=0x121D)


def refused(data: bytes, trust: TrustStore, **kwargs: Any) -> Reason:
    kwargs.setdefault("now", NOW)
    with pytest.raises(ProtocolError) as info:
        verify_manifest(data, trust, **kwargs)
    return info.value.reason


def test_valid_manifest_verifies(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    got = verify_manifest(signed(release_key), trust, now=NOW, target=TARGET)
    assert got == manifest()


def test_without_target_only_signature_and_expiry(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    data = signed(release_key, device_type=DeviceType.GSME, sequence=1)
    assert verify_manifest(data, trust, now=NOW).device_type is DeviceType.GSME


# --------------------------------------------------------------------------- arbitrary software


def test_a01_unknown_key(attacker_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    assert refused(signed(attacker_key), trust) is Reason.UNKNOWN_KEY_ID


def test_a01_attacker_claims_trusted_kid(
    release_key: ec.EllipticCurvePrivateKey,
    attacker_key: ec.EllipticCurvePrivateKey,
    trust: TrustStore,
) -> None:
    forged = sign1(manifest().encode(), attacker_key, kid=key_id(release_key.public_key()))
    assert refused(forged, trust) is Reason.BAD_SIGNATURE


def test_a01_bad_signature(release_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    data = bytearray(signed(release_key))
    data[-10] ^= 0x40  # inside the 64 signature bytes at the end
    assert refused(bytes(data), trust) is Reason.BAD_SIGNATURE


def test_a01_tampered_payload(release_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    good = parse_sign1(signed(release_key), max_size=MAX_SIGNED_MANIFEST_BYTES)
    evil = dataclasses.replace(manifest(), hw_max=0xFFFF).encode()
    assert len(evil) == len(good.payload)
    tampered = cbor.dumps(cbor2.CBORTag(18, [good.protected, {4: good.kid}, evil, good.signature]))
    assert refused(tampered, trust) is Reason.BAD_SIGNATURE


def test_a01_every_single_byte_change_is_refused(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    data = signed(release_key, block_size=2304)  # one block: a short message, every byte tried
    for position in range(len(data)):
        mutated = bytearray(data)
        mutated[position] ^= 0x01
        with pytest.raises(ProtocolError):
            verify_manifest(bytes(mutated), trust, now=NOW)


def test_garbage_is_malformed(trust: TrustStore) -> None:
    assert refused(b"\x00not cose", trust) is Reason.MALFORMED
    assert refused(manifest().encode(), trust) is Reason.MALFORMED  # an unsigned manifest


# --------------------------------------------------------------------------- rollback, replay


def test_a02_rollback(release_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    assert refused(signed(release_key, sequence=8), trust, target=TARGET) is Reason.ROLLBACK


def test_a02_replayed_manifest(release_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    assert refused(signed(release_key, sequence=9), trust, target=TARGET) is Reason.REPLAYED


def test_a02_sequence_not_firmware_version_orders_releases(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    # a deliberate downgrade of the firmware ships under a higher sequence and is accepted
    data = signed(release_key, sequence=11, fw_version=0x0100)
    assert verify_manifest(data, trust, now=NOW, target=TARGET).fw_version == 0x0100


# --------------------------------------------------------------------------- freeze


def test_a03_expired_at_the_instant(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    data = signed(release_key)
    assert verify_manifest(data, trust, now=EXPIRES - 1).expires == EXPIRES
    assert refused(data, trust, now=EXPIRES) is Reason.EXPIRED
    assert refused(data, trust, now=EXPIRES + 10**6) is Reason.EXPIRED


def test_a03_expiry_is_checked_before_the_target(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    data = signed(release_key, sequence=1)  # would also be a rollback
    assert refused(data, trust, now=EXPIRES, target=TARGET) is Reason.EXPIRED


# --------------------------------------------------------------------------- wrong target


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (dataclasses.replace(TARGET, device_type=DeviceType.GSME), Reason.WRONG_DEVICE_TYPE),
        (dataclasses.replace(TARGET, hw_version=0x1110), Reason.HARDWARE_OUT_OF_RANGE),
        (dataclasses.replace(TARGET, hw_version=0x1212), Reason.HARDWARE_OUT_OF_RANGE),
        (dataclasses.replace(TARGET, vendor=0x1234), Reason.WRONG_VENDOR),
        # vendor first, then device type, then hardware, then sequence
        (Target(DeviceType.PPMID, 0, 99, vendor=0x1234), Reason.WRONG_VENDOR),
        (Target(DeviceType.PPMID, 0, 99), Reason.WRONG_DEVICE_TYPE),
        (Target(DeviceType.ESME, 0, 99), Reason.HARDWARE_OUT_OF_RANGE),
    ],
)
def test_a05_wrong_target(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore, target: Target, reason: Reason
) -> None:
    assert refused(signed(release_key), trust, target=target) is reason


@pytest.mark.parametrize("hw", [0x1111, 0x1211])
def test_a05_hardware_range_is_inclusive(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore, hw: int
) -> None:
    target = dataclasses.replace(TARGET, hw_version=hw, vendor=None)
    assert verify_manifest(signed(release_key), trust, now=NOW, target=target).hw_min == 0x1111


# --------------------------------------------------------------------------- verify first


_HOSTILE = [
    ("deep nesting", b"\x81" * 40 + b"\x00", Reason.TOO_DEEP),
    ("indefinite map", b"\xbf\x61a\x01\xff", Reason.INDEFINITE_LENGTH),
    ("duplicate key", b"\xa2\x61a\x01\x61a\x02", Reason.DUPLICATE_KEY),
    ("2**64-byte string", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", Reason.MALFORMED),
    ("float", b"\xa1\x61v\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00", Reason.MALFORMED),
    ("unknown tag", b"\xc1\x00", Reason.MALFORMED),
]


@pytest.mark.parametrize(
    ("payload", "decode_reason"), [pytest.param(p, r, id=i) for i, p, r in _HOSTILE]
)
def test_a11_hostile_payload_under_bad_signature_is_bad_signature(
    release_key: ec.EllipticCurvePrivateKey,
    attacker_key: ec.EllipticCurvePrivateKey,
    trust: TrustStore,
    payload: bytes,
    decode_reason: Reason,
) -> None:
    """The payload is never decoded before its signature verifies."""
    forged = sign1(payload, attacker_key, kid=key_id(release_key.public_key()))
    assert refused(forged, trust) is Reason.BAD_SIGNATURE
    # the same bytes under a good signature do reach the decoder, which refuses them itself
    assert refused(sign1(payload, release_key), trust) is decode_reason


def test_a11_signature_covers_exact_bytes(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    """A payload re-encoded to the same value (non-canonically) is not the signed payload."""
    good = parse_sign1(signed(release_key), max_size=MAX_SIGNED_MANIFEST_BYTES)
    # replace the 1-byte head of the small integer "v": 1 (0x01) by its 2-byte form (0x18 0x01)
    payload = good.payload.replace(b"\x61v\x01", b"\x61v\x18\x01", 1)
    assert payload != good.payload
    data = cbor.dumps(cbor2.CBORTag(18, [good.protected, {4: good.kid}, payload, good.signature]))
    assert refused(data, trust) is Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- revocation, keys


def test_revoked_key(release_key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    data = signed(release_key)
    verify_manifest(data, trust, now=NOW)
    kid = key_id(release_key.public_key())
    trust.revoke(kid)
    assert refused(data, trust) is Reason.REVOKED_KEY
    assert kid not in trust.kids
    assert kid in trust.revoked


def test_revocation_wins_over_later_add(release_key: ec.EllipticCurvePrivateKey) -> None:
    kid = key_id(release_key.public_key())
    store = TrustStore(revoked=[kid])
    assert store.add(release_key.public_key()) == kid
    assert store.kids == frozenset()
    assert refused(signed(release_key), store) is Reason.REVOKED_KEY


def test_revoked_but_not_held_is_reported_revoked(release_key: ec.EllipticCurvePrivateKey) -> None:
    store = TrustStore(revoked=[key_id(release_key.public_key())])
    assert refused(signed(release_key), store) is Reason.REVOKED_KEY


def test_several_keys_selected_by_kid() -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    store = TrustStore(k.public_key() for k in keys)
    assert store.kids == {key_id(k.public_key()) for k in keys}
    for n, key in enumerate(keys):
        assert verify_manifest(signed(key, sequence=n + 1), store, now=NOW).sequence == n + 1
    # key 1's signature labelled with key 0's kid is checked against key 0 and fails
    mislabelled = sign1(manifest().encode(), keys[1], kid=key_id(keys[0].public_key()))
    assert refused(mislabelled, store) is Reason.BAD_SIGNATURE
    # revoking one key leaves the others working
    store.revoke(key_id(keys[0].public_key()))
    assert refused(signed(keys[0]), store) is Reason.REVOKED_KEY
    assert verify_manifest(signed(keys[2]), store, now=NOW).sequence == 10


def test_add_is_idempotent_and_p256_only(release_key: ec.EllipticCurvePrivateKey) -> None:
    store = TrustStore()
    kid = store.add(release_key.public_key())
    assert store.add(release_key.public_key()) == kid
    assert store.kids == {kid}
    assert store.public_key(kid) is not None
    with pytest.raises(ValueError, match="P-256"):
        store.add(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError):
        store.revoke(b"")


def test_trust_verify_returns_exact_payload_bytes(
    release_key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    assert trust.verify(sign1(b"\xff\x00raw", release_key), max_size=1024) == b"\xff\x00raw"


# --------------------------------------------------------------------------- fuzz


_CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=12)
    | st.sampled_from([d.value for d in DeviceType]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELDS = [*manifest().__dataclass_fields__, "v"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_manifest_from_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Manifest.decode(data)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(_FIELDS), _CBOR_VALUES, max_size=len(_FIELDS)),
    st.dictionaries(st.text(max_size=4), _CBOR_VALUES, max_size=2),
    st.booleans(),
)
def test_fuzz_manifest_structured(
    changes: dict[str, object], extra: dict[str, object], drop: bool
) -> None:
    """Valid manifests with fields replaced, removed or added decode or raise ProtocolError."""
    raw: dict[str, object] = cbor2.loads(manifest().encode())
    raw.update(changes)
    if drop and changes:
        del raw[next(iter(changes))]
    raw.update(extra)
    with contextlib.suppress(ProtocolError):
        Manifest.decode(bytes(cbor2.dumps(raw)))


_FUZZ_KEY = ec.generate_private_key(ec.SECP256R1())
_FUZZ_STORE = TrustStore([_FUZZ_KEY.public_key()])
_FUZZ_SIGNED = sign1(manifest(block_size=2304).encode(), _FUZZ_KEY)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, len(_FUZZ_SIGNED) - 1), st.integers(1, 255), st.integers(0, len(_FUZZ_SIGNED))
)
def test_fuzz_signed_manifest_mutations_are_refused(position: int, xor: int, cut: int) -> None:
    mutated = bytearray(_FUZZ_SIGNED)
    mutated[position] ^= xor
    for data in (bytes(mutated), _FUZZ_SIGNED[:cut]):
        if data == _FUZZ_SIGNED:
            continue
        with pytest.raises(ProtocolError):
            verify_manifest(data, _FUZZ_STORE, now=NOW)
