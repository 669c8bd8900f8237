"""HAN frames (ZigBee OTA Upgrade cluster plus the manifest extension): checked byte for byte,
round-tripped and fuzzed.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.han.frames import (
    EXTENSION_MANUFACTURER_CODE,
    MAX_FRAME_BYTES,
    UPGRADE_TIME_WAIT,
    DefaultResponse,
    Frame,
    ImageBlockAbort,
    ImageBlockRequest,
    ImageBlockResponse,
    ImageBlockWait,
    ImageNotify,
    ManifestBlockAbort,
    ManifestBlockRequest,
    ManifestBlockResponse,
    ManifestBlockWait,
    QueryNextImageRefused,
    QueryNextImageRequest,
    QueryNextImageResponse,
    Tolerated,
    UpgradeEndRequest,
    UpgradeEndResponse,
    ZclStatus,
    decode_frame,
    unix_time,
    zigbee_time,
)

# --------------------------------------------------------------------------- frames

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
block = st.binary(min_size=0, max_size=63)
fail = st.sampled_from([ZclStatus.ABORT, ZclStatus.NO_IMAGE_AVAILABLE, ZclStatus.MALFORMED_COMMAND])


@st.composite
def image_notifies(draw: st.DrawFn) -> ImageNotify:
    ptype = draw(st.integers(0, 3))
    ids = [draw(u16), draw(u16), draw(u32)]
    present: list[int | None] = [v if i < ptype else None for i, v in enumerate(ids)]
    return ImageNotify(draw(u8), draw(st.integers(1, 100)), *present)


FRAMES = st.one_of(
    image_notifies(),
    st.builds(QueryNextImageRequest, u8, u16, u16, u32, st.none() | u16),
    st.builds(QueryNextImageResponse, u8, u16, u16, u32, u32),
    st.builds(
        QueryNextImageRefused,
        u8,
        st.sampled_from([ZclStatus.NO_IMAGE_AVAILABLE, ZclStatus.NOT_AUTHORIZED]),
    ),
    st.builds(
        ImageBlockRequest,
        u8,
        u16,
        u16,
        u32,
        u32,
        st.integers(1, 255),
        st.none() | u64,
        st.none() | u16,
    ),
    st.builds(ImageBlockResponse, u8, u16, u16, u32, u32, block),
    st.builds(ImageBlockWait, u8, u32, u32, u16),
    st.builds(ImageBlockAbort, u8, fail),
    st.builds(
        UpgradeEndRequest,
        u8,
        st.sampled_from([ZclStatus.SUCCESS, ZclStatus.ABORT, ZclStatus.INVALID_IMAGE]),
        u16,
        u16,
        u32,
    ),
    st.builds(UpgradeEndResponse, u8, u16, u16, u32, u32, u32),
    st.builds(ManifestBlockRequest, u8, u16, u16, u32, u32, st.integers(1, 255), u16),
    st.builds(ManifestBlockResponse, u8, u16, u16, u32, u32, u32, block),
    st.builds(ManifestBlockWait, u8, st.just(EXTENSION_MANUFACTURER_CODE), u32, u32, u16),
    st.builds(ManifestBlockAbort, u8, st.just(EXTENSION_MANUFACTURER_CODE), fail),
    st.builds(DefaultResponse, u8, u8, st.sampled_from(ZclStatus), st.booleans(), st.none() | u16),
)


@settings(max_examples=300, deadline=None)
@given(frame=FRAMES)
def test_every_frame_round_trips(frame: Frame) -> None:
    data = frame.encode()
    assert len(data) <= MAX_FRAME_BYTES
    assert decode_frame(data) == frame


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=140))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@settings(max_examples=300, deadline=None)
@given(
    frame=FRAMES,
    edits=st.lists(st.tuples(st.integers(0, 200), u8), max_size=4),
    cut=st.integers(0, 90),
    extra=st.binary(max_size=3),
)
def test_fuzz_mutated_frames_raise_only_protocol_errors(
    frame: Frame, edits: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    data = bytearray(frame.encode())
    for position, value in edits:
        data[position % len(data)] = value
    mutated = bytes(data[: max(cut, 1)]) + extra
    try:
        again = decode_frame(mutated)
    except ProtocolError:
        return
    assert decode_frame(again.encode()) == again  # whatever decodes is a well-formed frame


def test_frames_are_little_endian_zcl() -> None:
    request = ImageBlockRequest(0x42, 0x1234, 0x5678, 0x01020304, 0x100, 50, None, 200)
    assert request.encode() == bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 32 c800")
    response = ImageBlockResponse(0x42, 0x1234, 0x5678, 0x01020304, 0x100, b"\xaa\xbb")
    assert response.encode() == bytes.fromhex("19 42 05 00 3412 7856 04030201 00010000 02 aabb")
    wait = ImageBlockWait(7, 1000, 1010, 100)
    assert wait.encode() == bytes.fromhex("19 07 05 97 e8030000 f2030000 6400")
    manifest_req = ManifestBlockRequest(9, 0x1234, 0x0B02, 2, 0, 50, 100)
    # the header carries the extension's own code (SPEC §8.2), the payload the image's vendor
    assert manifest_req.encode() == bytes.fromhex(
        "05 f1ff 09 00 3412 020b 02000000 00000000 32 6400"
    )
    end = UpgradeEndResponse(3, 0x1234, 0x0B02, 2, 500, UPGRADE_TIME_WAIT)
    assert end.encode().endswith(bytes.fromhex("f4010000 ffffffff"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 32 c8"), Reason.MALFORMED),
        (bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 00 c800"), Reason.MALFORMED),
        (bytes.fromhex("02 42 01 00 3412 7856 04030201"), Reason.MALFORMED),  # frame type 2
        (bytes.fromhex("01 42 04 00"), Reason.UNKNOWN_TYPE),  # ImagePageRequest: not spoken
        (bytes.fromhex("05 3412 42 07 00"), Reason.UNKNOWN_TYPE),  # unknown mfr command
        # the ManifestBlock ids under another vendor's code are that vendor's, not ours
        (bytes.fromhex("05 3412 09 00 3412 020b 02000000 00000000 32 6400"), Reason.UNKNOWN_TYPE),
        # the extension carries signed data: no trailing byte
        (bytes.fromhex("05 f1ff 09 00 3412 020b 02000000 00000000 32 6400 00"), Reason.MALFORMED),
        (bytes.fromhex("00 42 01"), Reason.UNKNOWN_TYPE),  # global ReadAttributes
        (bytes.fromhex("19 42 00 00 00"), Reason.MALFORMED),  # jitter 0
        (bytes.fromhex("19 42 00 04 64"), Reason.MALFORMED),  # payload type 4
        (bytes.fromhex("19 42 00 01 64 34"), Reason.MALFORMED),  # truncated mfr code
        (bytes.fromhex("01 42 06 97 3412 7856 04030201"), Reason.MALFORMED),  # End: WAIT status
        (bytes.fromhex("19 42 05 00 3412 7856 04030201 00010000 05 aabb"), Reason.MALFORMED),
        (bytes.fromhex("19 42 05 42"), Reason.MALFORMED),  # unknown status
        (bytes.fromhex("19 42 02 00 3412"), Reason.MALFORMED),
        (bytes.fromhex("18 42 0b 01 42"), Reason.MALFORMED),  # Default Response, bad status
        (b"\x19\x42\x05\x00" + bytes(130), Reason.TOO_LARGE),
        (b"", Reason.MALFORMED),
    ],
)
def test_decoding_is_strict(data: bytes, expected: Reason) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.reason is expected


@pytest.mark.parametrize(
    ("data", "frame", "trailing", "reserved"),
    [
        # ZCL forward compatibility (SPEC §8.1): what a later revision appends is ignored...
        (
            "01 42 03 02 3412 7856 04030201 00010000 32 c800 00",
            ImageBlockRequest(0x42, 0x1234, 0x5678, 0x01020304, 0x100, 50, None, 200),
            1,
            0,
        ),
        # ... as are reserved bits of a field control (bit 2 of ImageBlockRequest's)
        (
            "01 42 03 06 3412 7856 04030201 00010000 32 c800",
            ImageBlockRequest(0x42, 0x1234, 0x5678, 0x01020304, 0x100, 50, None, 200),
            0,
            1,
        ),
        # ... and reserved bits 5-7 of the ZCL frame control
        (
            "21 42 01 00 3412 7856 04030201",
            QueryNextImageRequest(0x42, 0x1234, 0x5678, 0x01020304),
            0,
            1,
        ),
        (
            "01 42 01 02 3412 7856 04030201",
            QueryNextImageRequest(0x42, 0x1234, 0x5678, 0x01020304),
            0,
            1,
        ),
        # zigpy's OTAManager refusal: NO_IMAGE_AVAILABLE with the image fields appended (review #5)
        ("190602983412020b0002000000400000", QueryNextImageRefused(6), 1, 0),
        # zigpy/SiLabs ImageBlockResponse with one extra byte after the data
        (
            "19 42 05 00 3412 7856 04030201 00010000 02 aabb ff",
            ImageBlockResponse(0x42, 0x1234, 0x5678, 0x01020304, 0x100, b"\xaa\xbb"),
            1,
            0,
        ),
    ],
)
def test_forward_compatible_frames_decode_and_are_counted(
    data: str, frame: Frame, trailing: int, reserved: int
) -> None:
    tolerated = Tolerated()
    assert decode_frame(bytes.fromhex(data), tolerated=tolerated) == frame
    assert (tolerated.trailing_bytes, tolerated.reserved_bits) == (trailing, reserved)
    decode_frame(frame.encode(), tolerated=tolerated)  # what we build is never "tolerated"
    assert (tolerated.trailing_bytes, tolerated.reserved_bits) == (trailing, reserved)


def test_the_extension_code_is_configurable() -> None:
    ours = ManifestBlockRequest(9, 0x1234, 0x0B02, 2, 0, 50, 100, extension_code=0x1001)
    assert ours.encode()[1:3] == bytes.fromhex("0110")
    assert decode_frame(ours.encode(), extension_code=0x1001) == ours
    with pytest.raises(ProtocolError) as info:
        decode_frame(ours.encode())  # a stack configured with another code does not speak it
    assert info.value.reason is Reason.UNKNOWN_TYPE


def test_frame_times_are_zigbee_utc_time() -> None:
    # ZCL UTCTime counts seconds from 2000-01-01 00:00 UTC, not from 1970
    assert zigbee_time(946_684_800.0) == 0
    assert zigbee_time(1_750_000_000.7) == 803_315_200  # 2025-06-15 15:06:40 UTC, whole seconds
    assert unix_time(803_315_200) == 1_750_000_000.0
    assert unix_time(zigbee_time(1_750_000_000.0)) == 1_750_000_000.0
    assert zigbee_time(946_684_800.0 + 0xFFFF_FFFE) == 0xFFFF_FFFE  # the last second it holds


@pytest.mark.parametrize("when", [0.0, 12_345.6, 946_684_799.0, 946_684_800.0 + 0xFFFF_FFFF])
def test_an_instant_utc_time_cannot_hold_is_a_caller_error(when: float) -> None:
    # a monotonic clock (loop.time(), a few thousand seconds) is refused, not sent as 1970
    # wrapped into the ZigBee epoch; 0xFFFFFFFF is never a time (it means "wait")
    with pytest.raises(ValueError, match="UTCTime"):
        zigbee_time(when)


def test_local_frame_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="query_jitter"):
        ImageNotify(1, 0).encode()
    with pytest.raises(ValueError, match="prefix"):
        ImageNotify(1, 50, None, 2).encode()
    with pytest.raises(ValueError, match="file_offset"):
        ImageBlockRequest(1, 1, 1, 1, -1, 50).encode()
    with pytest.raises(ValueError, match="UpgradeEnd"):
        UpgradeEndRequest(1, ZclStatus.WAIT_FOR_DATA, 1, 1, 1).encode()
