"""ZigBee OTA Upgrade file: header layout, strict parsing, the builder, and the DCC sample."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.release.zigbee_ota import (
    FC_HW_VERSIONS,
    TAG_UPGRADE_IMAGE,
    OtaFile,
    OtaHeader,
    SubElement,
    wrap,
)

# The FirmwareImage of DCC's public DUIS template 11.1 "Update Firmware"
# (SmartDCCInnovation/duis-templates, templates/11.1_UPDATE_FIRMWARE_REQUEST_DUIS.XML).
DCC_SAMPLE = base64.b64decode(
    "HvHuCwABPAAEAB0SAADcrNysAgBJIGFtIGEgR0ZJIEVTTUVbXSBmaXJtd2FyZSBpbWFnZWkBAAARERESQ3JpdGljYWxT"
    "b2Z0d2FyZSBzYW1wbGUgZmlybXdhcmUgaW1hZ2VfQ3JpdGljYWxTb2Z0d2FyZSBzYW1wbGUgZmlybXdhcmUgaW1hZ2Vf"
    "Q3JpdGljYWxTb2Z0d2FyZSBzYW1wbGUgZmlybXdhcmUgaW1hZ2VfQ3JpdGljYWxTb2Z0d2FyZSBzYW1wbGUgZmlybXdh"
    "cmUgaW1hZ2VfQ3JpdGljYWxTb2Z0d2FyZSBzYW1wbGUgZmlybXdhcmUgaW1hZ2VfQ3JpdGljYWxTb2Z0d2FyZSBzYW1w"
    "bGUgZmlybXdhcmUgaW1hZ2VfCgBADrSpxyECeQ1Wkuw1K/y0l99SBhP+Ha5IQWXZIHG1KhzJtGn1HDyUkxr/S6yNQC+J"
    "wUE5DNH70LlBqk4Tsl++Ig=="
)

FIRMWARE = bytes(range(256)) * 3 + b"tail"


def _file(**kwargs: object) -> bytes:
    args: dict[str, object] = {
        "manufacturer_code": 0x121D,
        "image_type": 0x0001,
        "file_version": 0x01020304,
        "hw_min": 0x1111,
        "hw_max": 0x1211,
    }
    args.update(kwargs)
    return wrap(FIRMWARE, **args)  # type: ignore[arg-type]


def _reason(data: bytes) -> Reason:
    with pytest.raises(ProtocolError) as info:
        OtaFile.parse(data)
    return info.value.reason


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# --------------------------------------------------------------------------- DCC sample


def test_dcc_sample_header_facts() -> None:
    assert len(DCC_SAMPLE) == 361
    header = OtaHeader.parse(DCC_SAMPLE)
    assert header.header_length == 60
    assert header.field_control == FC_HW_VERSIONS == 0x0004
    assert header.manufacturer_code == 0x121D
    assert header.image_type == 0x0000
    assert header.file_version == 0xACDCACDC
    assert header.stack_version == 0x0002
    assert header.text == "I am a GFI ESME[] firmware image"
    assert header.total_image_size == 361 == len(DCC_SAMPLE)
    assert (header.hw_min, header.hw_max) == (0x1111, 0x1211)
    assert header.security_credential_version is None
    assert header.upgrade_file_destination is None
    assert header.encode() == DCC_SAMPLE[:60]


def test_dcc_sample_body_is_not_sub_element_framed() -> None:
    """The GBCS sample carries its manufacturer image straight after the header, not as ZCL
    sub-elements: the strict whole-file parse refuses it (its first "length" runs past the end).
    """
    assert DCC_SAMPLE[60:76] == b"CriticalSoftware"
    assert _reason(DCC_SAMPLE) is Reason.MALFORMED


def test_our_wrap_of_the_dcc_header_fields_matches_its_header_bytes() -> None:
    data = wrap(
        b"x",
        manufacturer_code=0x121D,
        image_type=0x0000,
        file_version=0xACDCACDC,
        hw_min=0x1111,
        hw_max=0x1211,
        header_string="I am a GFI ESME[] firmware image",
    )
    # identical except the total image size at offset 52
    assert data[:52] == DCC_SAMPLE[:52]
    assert data[56:60] == DCC_SAMPLE[56:60]
    assert struct.unpack_from("<I", data, 52)[0] == len(data) == 60 + 6 + 1


# --------------------------------------------------------------------------- builder and layout


def test_wrap_layout_byte_by_byte() -> None:
    data = _file(header_string="meter fw")
    assert data[0:4] == bytes.fromhex("1ef1ee0b")  # 0x0BEEF11E little-endian
    assert data[4:6] == bytes.fromhex("0001")  # header version 0x0100
    assert struct.unpack_from("<HH", data, 6) == (60, 0x0004)
    assert struct.unpack_from("<HHIH", data, 10) == (0x121D, 0x0001, 0x01020304, 2)
    assert data[20:52] == b"meter fw" + bytes(24)
    assert struct.unpack_from("<I", data, 52)[0] == len(data)
    assert struct.unpack_from("<HH", data, 56) == (0x1111, 0x1211)
    assert struct.unpack_from("<HI", data, 60) == (TAG_UPGRADE_IMAGE, len(FIRMWARE))
    assert data[66:] == FIRMWARE
    assert len(data) == 60 + 6 + len(FIRMWARE)


def test_wrap_parse_round_trip() -> None:
    data = _file()
    ota = OtaFile.parse(data)
    assert ota.upgrade_image == FIRMWARE
    assert ota.elements == (SubElement(TAG_UPGRADE_IMAGE, FIRMWARE),)
    assert ota.header.file_version == 0x01020304
    assert ota.encode() == data


def test_wrap_without_hardware_range() -> None:
    ota = OtaFile.parse(wrap(b"fw", manufacturer_code=1, image_type=2, file_version=3))
    assert ota.header.header_length == 56
    assert ota.header.field_control == 0
    assert ota.header.hw_min is None
    assert ota.header.stack_version == 2


def test_all_optional_fields_and_several_elements_round_trip() -> None:
    elements = (SubElement(0x0000, b"image"), SubElement(0x0001, bytes(72)), SubElement(7, b""))
    body = sum(6 + len(e.data) for e in elements)
    header = OtaHeader(
        manufacturer_code=0x1049,
        image_type=0x0002,
        file_version=0xFFFFFFFE,
        stack_version=2,
        header_string=b"x" * 32,
        total_image_size=56 + 1 + 8 + 4 + body,
        security_credential_version=0x02,
        upgrade_file_destination=bytes.fromhex("0011223344556677"),
        hw_min=0,
        hw_max=0xFFFF,
    )
    assert header.field_control == 0x0007
    assert header.header_length == 69
    ota = OtaFile(header, elements)
    data = ota.encode()
    assert OtaFile.parse(data) == ota
    assert data[56] == 0x02
    assert data[57:65] == bytes.fromhex("0011223344556677")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"header_string": "x" * 33},
        {"manufacturer_code": 0xFFFF},
        {"image_type": 0xFFFF},
        {"manufacturer_code": 0x10000},
        {"file_version": -1},
        {"hw_min": 5},  # without hw_max
        {"hw_min": 5, "hw_max": 4},
    ],
)
def test_wrap_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _file(**{"hw_min": None, "hw_max": None, **kwargs})


def test_wrap_refuses_empty_firmware() -> None:
    with pytest.raises(ValueError):
        wrap(b"", manufacturer_code=1, image_type=1, file_version=1)


def test_ota_file_refuses_inconsistent_size() -> None:
    header = OtaHeader.parse(_file())
    with pytest.raises(ValueError, match="total_image_size"):
        OtaFile(header, (SubElement(0, b"short"),))
    with pytest.raises(ValueError):
        OtaFile(dataclasses.replace(header, total_image_size=56), ())


# --------------------------------------------------------------------------- strict parsing


def test_parse_refusals() -> None:
    good = _file()
    n = len(good)
    cases = {
        "bad magic": (_patch(good, 0, "<I", 0x0BEEF11F), Reason.MALFORMED),
        "header version": (_patch(good, 4, "<H", 0x0200), Reason.UNSUPPORTED_VERSION),
        "header length short": (_patch(good, 6, "<H", 56), Reason.MALFORMED),
        "header length long": (_patch(good, 6, "<H", 64), Reason.MALFORMED),
        "unknown fc bit": (_patch(good, 8, "<H", 0x0014), Reason.MALFORMED),
        "fc without hw": (_patch(good, 8, "<H", 0x0000), Reason.MALFORMED),
        "wildcard manufacturer": (_patch(good, 10, "<H", 0xFFFF), Reason.MALFORMED),
        "wildcard image type": (_patch(good, 12, "<H", 0xFFFF), Reason.MALFORMED),
        "total size +1": (_patch(good, 52, "<I", n + 1), Reason.MALFORMED),
        "total size -1": (_patch(good, 52, "<I", n - 1), Reason.MALFORMED),
        "total < header": (_patch(good, 52, "<I", 10), Reason.MALFORMED),
        "total over cap": (_patch(good, 52, "<I", 0xFFFFFFFF), Reason.TOO_LARGE),
        "trailing byte": (_patch(good + b"\x00", 52, "<I", n + 1), Reason.MALFORMED),
        "hw min > max": (_patch(good, 56, "<H", 0x1212), Reason.MALFORMED),
        "element too long": (_patch(good, 62, "<I", len(FIRMWARE) + 1), Reason.MALFORMED),
        "element short by one": (_patch(good, 62, "<I", len(FIRMWARE) - 1), Reason.MALFORMED),
        "element length 2**32-1": (_patch(good, 62, "<I", 0xFFFFFFFF), Reason.MALFORMED),
        "truncated": (good[:-1], Reason.MALFORMED),
        "header only": (_patch(good[:60], 52, "<I", 60), Reason.MALFORMED),
        "short sub-element header": (_patch(good[:60] + bytes(5), 52, "<I", 65), Reason.MALFORMED),
        "shorter than a header": (good[:55], Reason.MALFORMED),
        "optional fields cut": (_patch(good[:58], 52, "<I", 58), Reason.MALFORMED),
        "empty": (b"", Reason.MALFORMED),
    }
    got = {name: _reason(data) for name, (data, _) in cases.items()}
    assert got == {name: reason for name, (_, reason) in cases.items()}


def test_trailing_empty_sub_element_is_framed_and_kept() -> None:
    # 6 extra zero bytes after the image are a complete empty sub-element (tag 0, length 0):
    # framing is fine and the parse keeps it; the builder never writes one
    good = _file()
    data = _patch(good + bytes(6), 52, "<I", len(good) + 6)
    ota = OtaFile.parse(data)
    assert ota.elements[-1] == SubElement(0, b"")


def test_header_parse_refuses_non_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        OtaHeader.parse([1, 2, 3])  # type: ignore[arg-type]
    assert info.value.reason is Reason.MALFORMED


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        OtaFile.parse(data)
    with contextlib.suppress(ProtocolError):
        OtaHeader.parse(data)


_GOOD = wrap(
    b"firmware!" * 20, manufacturer_code=1, image_type=2, file_version=3, hw_min=1, hw_max=2
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, len(_GOOD) - 1),
    st.integers(1, 255),
    st.integers(0, len(_GOOD)),
    st.binary(max_size=12),
)
def test_fuzz_mutations(position: int, xor: int, cut: int, extra: bytes) -> None:
    mutated = bytearray(_GOOD)
    mutated[position] ^= xor
    for data in (bytes(mutated), _GOOD[:cut] + extra, bytes(mutated[:cut]) + extra):
        try:
            ota = OtaFile.parse(data)
        except ProtocolError:
            continue
        # whatever parses re-encodes to the same bytes: nothing is skipped or invented
        assert ota.encode() == data
