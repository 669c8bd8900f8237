"""The .otaimg release file: layout, build, and every way verification refuses one."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, parse_sign1, sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import MAGIC, SignedImage, build, verify
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, Target, TrustStore
from protocol.release.zigbee_ota import wrap

CREATED = 1_700_000_000
EXPIRES = CREATED + 30 * 86_400
NOW = CREATED + 60
FIRMWARE = hashlib.sha256(b"seed").digest() * 100  # 3,200 bytes


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def trust(key: ec.EllipticCurvePrivateKey) -> TrustStore:
    return TrustStore([key.public_key()])


def ota_file(*, hw: bool = True, **kwargs: Any) -> bytes:
    args: dict[str, Any] = {
        "manufacturer_code": 0x121D,
        "image_type": 0x0003,
        "file_version": 0x00020001,
    }
    if hw:
        args.update(hw_min=0x0100, hw_max=0x01FF)
    args.update(kwargs)
    return wrap(FIRMWARE, **args)


def release(
    key: ec.EllipticCurvePrivateKey, ota: bytes | None = None, **kwargs: Any
) -> SignedImage:
    args: dict[str, Any] = {
        "device_type": DeviceType.ESME,
        "sequence": 5,
        "block_size": 1024,
        "created": CREATED,
        "expires": EXPIRES,
    }
    args.update(kwargs)
    return build(ota_file() if ota is None else ota, key, **args)


def refused(image: SignedImage, trust: TrustStore, **kwargs: Any) -> Reason:
    kwargs.setdefault("now", NOW)
    with pytest.raises(ProtocolError) as info:
        verify(image, trust, **kwargs)
    return info.value.reason


def decode_reason(data: bytes) -> Reason:
    with pytest.raises(ProtocolError) as info:
        SignedImage.decode(data)
    return info.value.reason


# --------------------------------------------------------------------------- build and layout


def test_build_takes_fields_from_the_ota_header(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    ota = ota_file()
    manifest, parsed = verify(release(key, ota), trust, now=NOW)
    assert manifest.vendor == 0x121D
    assert manifest.image_type == 0x0003
    assert manifest.fw_version == 0x00020001
    assert (manifest.hw_min, manifest.hw_max) == (0x0100, 0x01FF)
    assert manifest.size == len(ota)
    assert manifest.sha256 == hashlib.sha256(ota).digest()
    assert manifest.block_count == -(-len(ota) // 1024) == 4
    assert manifest.device_type is DeviceType.ESME
    assert (manifest.sequence, manifest.created, manifest.expires) == (5, CREATED, EXPIRES)
    assert parsed.upgrade_image == FIRMWARE


def test_layout_byte_by_byte(key: ec.EllipticCurvePrivateKey) -> None:
    image = release(key)
    data = image.encode()
    assert data[:8] == b"OTAIMG\x00\x01" == MAGIC
    (length,) = struct.unpack(">I", data[8:12])
    assert length == len(image.signed_manifest)
    assert data[12 : 12 + length] == image.signed_manifest
    assert data[12 + length :] == image.image == ota_file()
    assert SignedImage.decode(data) == image


def test_hardware_range_from_arguments_when_the_header_has_none(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    image = release(key, ota_file(hw=False), hw_min=3, hw_max=9)
    manifest, parsed = verify(image, trust, now=NOW)
    assert (manifest.hw_min, manifest.hw_max) == (3, 9)
    assert parsed.header.hw_min is None


def test_hardware_arguments_equal_to_the_header_are_accepted(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    image = release(key, hw_min=0x0100, hw_max=0x01FF)
    assert verify(image, trust, now=NOW)[0].hw_max == 0x01FF


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hw_min": 0x0100, "hw_max": 0x0200},  # disagrees with the header
        {"hw_min": 0x0100},  # one without the other
        {"block_size": 8},  # below the minimum block size
        {"block_size": 1 << 20},  # above the maximum
        {"expires": CREATED},  # not after created
        {"sequence": -1},
        {"sequence": 1 << 64},
    ],
)
def test_build_refuses_bad_arguments(
    key: ec.EllipticCurvePrivateKey, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        release(key, **kwargs)


def test_build_needs_a_hardware_range(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="hardware range"):
        release(key, ota_file(hw=False))


def test_build_refuses_a_non_ota_file(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ProtocolError):
        release(key, b"raw firmware, not wrapped")


# --------------------------------------------------------------------------- decode refusals


def test_decode_refusals(key: ec.EllipticCurvePrivateKey) -> None:
    data = release(key).encode()
    length = struct.unpack(">I", data[8:12])[0]
    cases = {
        "bad magic": (b"NOTAIMG\x01" + data[8:], Reason.MALFORMED),
        "another version": (b"OTAIMG\x00\x02" + data[8:], Reason.UNSUPPORTED_VERSION),
        "shorter than prefix": (data[:11], Reason.MALFORMED),
        "empty": (b"", Reason.MALFORMED),
        "manifest truncated": (data[: 12 + length - 1], Reason.MALFORMED),
        "no image": (data[: 12 + length], Reason.MALFORMED),
        "zero manifest length": (data[:8] + bytes(4) + data[12:], Reason.MALFORMED),
        "length past the end": (
            data[:8] + struct.pack(">I", len(data)) + data[12:],
            Reason.MALFORMED,
        ),
        "manifest over cap": (
            data[:8] + struct.pack(">I", MAX_SIGNED_MANIFEST_BYTES + 1) + data[12:],
            Reason.TOO_LARGE,
        ),
    }
    got = {name: decode_reason(d) for name, (d, _) in cases.items()}
    assert got == {name: reason for name, (_, reason) in cases.items()}


# --------------------------------------------------------------------------- verify refusals


def test_image_byte_flipped(key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    image = release(key)
    flipped = bytearray(image.image)
    flipped[2000] ^= 0x80
    assert refused(dataclasses.replace(image, image=bytes(flipped)), trust) is Reason.IMAGE_HASH


def test_truncated_file(key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    data = release(key).encode()
    assert refused(SignedImage.decode(data[:-1]), trust) is Reason.IMAGE_HASH
    assert refused(SignedImage.decode(data + b"\x00"), trust) is Reason.IMAGE_HASH


def test_mix_and_match_images(key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    a = release(key)
    b = release(key, ota_file(file_version=0x00020002), sequence=6)
    assert len(a.image) == len(b.image)
    assert refused(SignedImage(a.signed_manifest, b.image), trust) is Reason.IMAGE_HASH


def test_every_single_byte_change_is_refused(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    data = release(key).encode()
    for position in range(len(data)):
        mutated = bytearray(data)
        mutated[position] ^= 0x01
        with pytest.raises(ProtocolError):
            verify(SignedImage.decode(bytes(mutated)), trust, now=NOW)


def _signed_manifest_for(key: ec.EllipticCurvePrivateKey, image: bytes, **changes: Any) -> bytes:
    """A correctly signed manifest over ``image`` whose fields may disagree with its header."""
    fields: dict[str, Any] = {
        "vendor": 0x121D,
        "image_type": 0x0003,
        "device_type": DeviceType.ESME,
        "hw_min": 0x0100,
        "hw_max": 0x01FF,
        "fw_version": 0x00020001,
        "sequence": 5,
        "block_size": 1024,
        "created": CREATED,
        "expires": EXPIRES,
    }
    fields.update(changes)
    return sign1(Manifest.for_image(image, **fields).encode(), key)


def test_hand_built_manifest_control_case(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    ota = ota_file()
    assert verify(SignedImage(_signed_manifest_for(key, ota), ota), trust, now=NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {"fw_version": 0x00020002},
        {"vendor": 0x1234},
        {"image_type": 0x0004},
        {"hw_min": 0x0101},
        {"hw_max": 0x0200},
    ],
)
def test_header_mismatch(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore, changes: dict[str, int]
) -> None:
    ota = ota_file()
    image = SignedImage(_signed_manifest_for(key, ota, **changes), ota)
    assert refused(image, trust) is Reason.HEADER_MISMATCH


def test_header_without_hardware_range_defers_to_the_manifest(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    ota = ota_file(hw=False)
    image = SignedImage(_signed_manifest_for(key, ota, hw_min=7, hw_max=7), ota)
    assert verify(image, trust, now=NOW)[0].hw_min == 7


def test_total_size_mismatch(key: ec.EllipticCurvePrivateKey, trust: TrustStore) -> None:
    # An OTA file whose header total size disagrees with the signed size cannot parse, so the
    # strict parse refuses it after the hash check.
    ota = bytearray(ota_file())
    struct.pack_into("<I", ota, 52, len(ota) + 1)
    image = SignedImage(_signed_manifest_for(key, bytes(ota)), bytes(ota))
    assert refused(image, trust) is Reason.MALFORMED


def test_signed_non_ota_bytes_are_malformed(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    blob = bytes(3000)
    image = SignedImage(_signed_manifest_for(key, blob), blob)
    assert refused(image, trust) is Reason.MALFORMED


def test_wrong_block_hashes_under_a_good_digest(
    key: ec.EllipticCurvePrivateKey, trust: TrustStore
) -> None:
    ota = ota_file()
    good = Manifest.decode(parse_sign1(release(key, ota).signed_manifest, max_size=1 << 20).payload)
    bad = dataclasses.replace(good, block_hashes=bytes(len(good.block_hashes)))
    image = SignedImage(sign1(bad.encode(), key), ota)
    assert refused(image, trust) is Reason.BLOCK_HASH


def test_signature_and_target_failures_propagate(key: ec.EllipticCurvePrivateKey) -> None:
    image = release(key)
    assert refused(image, TrustStore()) is Reason.UNKNOWN_KEY_ID
    assert refused(image, TrustStore(revoked=[key_id(key.public_key())])) is Reason.REVOKED_KEY
    trust = TrustStore([key.public_key()])
    assert refused(image, trust, now=EXPIRES) is Reason.EXPIRED
    target = Target(DeviceType.ESME, hw_version=0x0150, installed_sequence=5, vendor=0x121D)
    assert refused(image, trust, target=target) is Reason.REPLAYED
    target = dataclasses.replace(target, installed_sequence=4)
    assert verify(image, trust, now=NOW, target=target)[0].sequence == 5


def test_signature_is_checked_before_the_image(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    image = dataclasses.replace(release(other), image=b"garbage")
    assert refused(image, TrustStore([key.public_key()])) is Reason.UNKNOWN_KEY_ID


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_decode_random(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        SignedImage.decode(data)
    with contextlib.suppress(ProtocolError):
        SignedImage.decode(MAGIC + data)


_FUZZ_KEY = ec.generate_private_key(ec.SECP256R1())
_FUZZ_TRUST = TrustStore([_FUZZ_KEY.public_key()])
_FUZZ_DATA = build(
    wrap(b"fw" * 100, manufacturer_code=1, image_type=1, file_version=1, hw_min=1, hw_max=1),
    _FUZZ_KEY,
    device_type=DeviceType.B2,
    sequence=1,
    block_size=64,
    created=CREATED,
    expires=EXPIRES,
).encode()


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, len(_FUZZ_DATA) - 1),
    st.integers(1, 255),
    st.integers(0, len(_FUZZ_DATA) - 1),
    st.binary(max_size=8),
)
def test_fuzz_mutated_files_are_refused(position: int, xor: int, cut: int, extra: bytes) -> None:
    mutated = bytearray(_FUZZ_DATA)
    mutated[position] ^= xor
    for data in (bytes(mutated), _FUZZ_DATA[:cut] + extra):
        if data == _FUZZ_DATA:
            continue
        with pytest.raises(ProtocolError):
            verify(SignedImage.decode(data), _FUZZ_TRUST, now=NOW)


def test_build_refuses_a_manifest_over_the_cap(key: ec.EllipticCurvePrivateKey) -> None:
    # 2 MiB of manifest holds at most ~65,500 block hashes: 1.1 MB in 16-byte blocks is too many
    big = wrap(
        bytes(1_100_000), manufacturer_code=1, image_type=1, file_version=1, hw_min=1, hw_max=1
    )
    with pytest.raises(ValueError, match="manifest"):
        release(key, big, block_size=16)
    assert len(release(key, big, block_size=64).signed_manifest) <= MAX_SIGNED_MANIFEST_BYTES
