"""GB images (a ZigBee OTA header + an unframed Manufacturer Image) and manifest v2 (SPEC §6.2,
§6.4 check 18, §6.5): the layout is declared at signing, recorded, and never guessed; v1 manifests
verify as before; third-party sub-element files parse exactly as they did."""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release import otaimg
from protocol.release.cose import sign1
from protocol.release.manifest import DeviceType, Manifest, ManifestV2
from protocol.release.trust import TrustStore, verify_manifest
from protocol.release.zigbee_ota import (
    OtaFile,
    OtaHeader,
    OtaLayout,
    SubElement,
    manufacturer_image_digest,
    wrap,
)
from protocol.wire import cbor, codec

KEY = ec.derive_private_key(0x6B01, ec.SECP256R1())
TRUST = TrustStore([KEY.public_key()])
NOW = 1_750_000_000


def gb_image(body_len: int = 301, seed: int = 7) -> bytes:
    """A file shaped like the DCC's DUIS 11.1 sample: 60-byte header (field control 0x0004,
    SMARTDCC 0x121D, image type 0, version 0xACDCACDC, hardware 0x1111-0x1211), then an opaque
    Manufacturer Image whose first six bytes read as a sub-element header declare far more bytes
    than the file has."""
    body = bytearray(random.Random(seed).randbytes(body_len))
    body[0:6] = struct.pack("<HI", 0x002A, 0xB36D_0101)  # 'sub-element 0x002a, 3010265345 bytes'
    header = OtaHeader(
        manufacturer_code=0x121D,
        image_type=0x0000,
        file_version=0xACDC_ACDC,
        stack_version=2,
        header_string=b"GB test image".ljust(32, b"\0"),
        total_image_size=60 + body_len,
        hw_min=0x1111,
        hw_max=0x1211,
    )
    return header.encode() + bytes(body)


def sign(ota: bytes, layout: OtaLayout, manifest_version: int = 2) -> otaimg.SignedImage:
    return otaimg.build(
        ota,
        KEY,
        device_type=DeviceType.ESME,
        sequence=3,
        block_size=64,
        created=NOW - 60,
        expires=NOW + 86_400,
        layout=layout,
        manifest_version=manifest_version,
    )


def test_a_gb_image_parses_only_in_the_layout_it_is_declared() -> None:
    data = gb_image()
    assert len(data) == 361  # the DCC sample's size
    with pytest.raises(ProtocolError) as refused:
        OtaFile.parse(data)  # the default (sub-element) layout is strict, as before
    assert refused.value.reason is Reason.MALFORMED
    assert "3010265345" in refused.value.detail
    ota = OtaFile.parse(data, OtaLayout.GBCS)
    assert ota.layout is OtaLayout.GBCS
    assert ota.elements == ()
    assert ota.header.header_length == 60
    assert ota.header.manufacturer_code == 0x121D
    assert ota.upgrade_image == ota.body == data[60:]
    assert ota.encode() == data


def test_gbcs_layout_keeps_the_header_and_size_rules() -> None:
    data = gb_image()
    with pytest.raises(ProtocolError) as short:
        OtaFile.parse(data[:-1], OtaLayout.GBCS)  # total image size no longer the file length
    assert short.value.reason is Reason.MALFORMED
    header_only = OtaHeader.parse(data)
    bare = replace(header_only, total_image_size=60).encode()
    with pytest.raises(ProtocolError, match="no Manufacturer Image"):
        OtaFile.parse(bare, OtaLayout.GBCS)


def test_wrap_builds_either_layout() -> None:
    firmware = bytes(range(200))
    gb = wrap(
        firmware, manufacturer_code=0xFFF1, image_type=1, file_version=2, layout=OtaLayout.GBCS
    )
    assert gb[56:] == firmware
    assert OtaFile.parse(gb, OtaLayout.GBCS).raw_body == firmware
    zcl = wrap(firmware, manufacturer_code=0xFFF1, image_type=1, file_version=2)
    assert OtaFile.parse(zcl).elements == (SubElement(0, firmware),)


def test_a_gb_image_signs_and_verifies_under_a_v2_manifest() -> None:
    data = gb_image()
    signed = sign(data, OtaLayout.GBCS)
    assert signed.image == data  # carried unchanged
    manifest, ota = otaimg.verify(signed, TRUST, now=UnixTime(NOW))
    assert isinstance(manifest, ManifestV2)
    assert manifest.body_layout is OtaLayout.GBCS
    assert manifest.sha256 == hashlib.sha256(data).digest()  # the image id: the whole file
    # the activation digest: the Manufacturer Image, every byte after the 60-byte header
    assert manifest.activation_digest == hashlib.sha256(data[60:]).digest()
    assert manufacturer_image_digest(data) == manifest.activation_sha256
    assert ota.raw_body == data[60:]
    assert (manifest.hw_min, manifest.hw_max, manifest.vendor) == (0x1111, 0x1211, 0x121D)


def test_the_layout_is_never_guessed() -> None:
    with pytest.raises(ProtocolError) as refused:
        sign(gb_image(), OtaLayout.SUB_ELEMENTS)
    assert refused.value.reason is Reason.MALFORMED
    # and a sub-element file declared GBCS verifies as GBCS: its body is then opaque
    zcl = wrap(
        b"firmware" * 20, manufacturer_code=0xFFF1, image_type=1, file_version=2, hw_min=1, hw_max=1
    )
    manifest, ota = otaimg.verify(sign(zcl, OtaLayout.GBCS), TRUST, now=UnixTime(NOW))
    assert manifest.body_layout is OtaLayout.GBCS
    assert ota.raw_body == zcl[60:]


def test_a_sub_element_file_keeps_working_and_says_which_bytes_activation_hashes() -> None:
    elements = (SubElement(0x0000, b"\x11" * 300), SubElement(0x0001, b"\x22" * 64))
    body = b"".join(e.encode() for e in elements)
    header = OtaHeader(0x117C, 7, 0x0203, 2, bytes(32), 60 + len(body), hw_min=1, hw_max=4)
    data = header.encode() + body
    manifest, ota = otaimg.verify(sign(data, OtaLayout.SUB_ELEMENTS), TRUST, now=UnixTime(NOW))
    assert ota == OtaFile.parse(data)
    assert ota.elements == elements
    assert manifest.body_layout is OtaLayout.SUB_ELEMENTS
    # all sub-elements as framed (tag, length, data), not just tag 0's data
    assert manifest.activation_digest == hashlib.sha256(body).digest()
    assert manifest.activation_digest != hashlib.sha256(elements[0].data).digest()


def test_a_sub_element_file_is_signed_under_a_v1_manifest_unless_asked() -> None:
    data = wrap(b"firmware" * 20, manufacturer_code=0xFFF1, image_type=1, file_version=2,
                hw_min=1, hw_max=1)  # fmt: skip
    signed = otaimg.build(data, KEY, device_type=DeviceType.ESME, sequence=3, block_size=64,
                          created=NOW - 60, expires=NOW + 86_400)  # fmt: skip
    manifest, _ota = otaimg.verify(signed, TRUST, now=UnixTime(NOW))
    assert not isinstance(manifest, ManifestV2)  # every CH of protocol 1.0 reads it
    assert manifest.activation_digest == hashlib.sha256(data).digest()  # v1: the whole file
    with pytest.raises(ValueError, match="v1 manifest cannot describe a gbcs image"):
        otaimg.build(gb_image(), KEY, device_type=DeviceType.ESME, sequence=3, block_size=64,
                     created=NOW - 60, expires=NOW + 86_400, layout=OtaLayout.GBCS,
                     manifest_version=1)  # fmt: skip


def _resigned(signed: otaimg.SignedImage, **changes: object) -> otaimg.SignedImage:
    manifest = verify_manifest(signed.signed_manifest, TRUST, now=UnixTime(NOW))
    wire = {**codec.schema(type(manifest)).to_wire(manifest), **changes}
    return otaimg.SignedImage(sign1(cbor.dumps(wire), KEY, deterministic=True), signed.image)


def test_check_18_refuses_an_activation_digest_that_is_not_the_image() -> None:
    signed = _resigned(sign(gb_image(), OtaLayout.GBCS), activation_sha256=bytes(32))
    with pytest.raises(ProtocolError) as refused:
        otaimg.verify(signed, TRUST, now=UnixTime(NOW))
    assert refused.value.reason is Reason.IMAGE_HASH
    assert "activation" in refused.value.detail


def test_an_unknown_layout_and_mixed_versions_are_refused() -> None:
    signed = sign(gb_image(), OtaLayout.GBCS)
    for changes, reason in (
        ({"layout": "hue"}, Reason.MALFORMED),
        ({"v": 1}, Reason.UNKNOWN_KEY),  # v1 has no layout / activation_sha256
        ({"v": 3}, Reason.UNSUPPORTED_VERSION),
    ):
        with pytest.raises(ProtocolError) as refused:
            otaimg.verify(_resigned(signed, **changes), TRUST, now=UnixTime(NOW))
        assert refused.value.reason is reason, changes
    manifest = verify_manifest(signed.signed_manifest, TRUST, now=UnixTime(NOW))
    wire = codec.schema(ManifestV2).to_wire(manifest)
    del wire["layout"]
    with pytest.raises(ProtocolError) as lacking:
        Manifest.decode(cbor.dumps(wire))
    assert lacking.value.reason is Reason.MALFORMED


def test_a_v1_manifest_verifies_exactly_as_before() -> None:
    zcl = wrap(
        b"legacy" * 50, manufacturer_code=0xFFF1, image_type=1, file_version=2, hw_min=1, hw_max=1
    )
    v1 = Manifest.for_image(
        zcl,
        vendor=0xFFF1,
        image_type=1,
        device_type=DeviceType.ESME,
        hw_min=1,
        hw_max=1,
        fw_version=2,
        sequence=3,
        block_size=64,
        created=NOW - 60,
        expires=NOW + 86_400,
    )
    assert type(v1) is Manifest
    payload = v1.encode()
    assert cbor.loads(payload, max_size=1 << 20, max_depth=2)["v"] == 1
    signed = otaimg.SignedImage(sign1(payload, KEY, deterministic=True), zcl)
    manifest, ota = otaimg.verify(signed, TRUST, now=UnixTime(NOW))
    assert manifest == v1
    assert type(manifest) is Manifest
    assert manifest.body_layout is OtaLayout.SUB_ELEMENTS
    assert manifest.activation_digest == manifest.sha256 == hashlib.sha256(zcl).digest()
    assert ota == OtaFile.parse(zcl)
