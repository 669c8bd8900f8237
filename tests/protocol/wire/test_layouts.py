"""The fixed layouts of Block and TransferAcked: the in-place read accepts exactly what the general
decoder accepts (and hands everything else to it), the template write is the codec's bytes."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.wire import codec, layouts, messages
from protocol.wire.limits import HASH_LEN, MAX_BLOCK_BYTES, MAX_U16, MAX_U32
from protocol.wire.messages import Block, Message, TransferAcked

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE = bytes(range(HASH_LEN))
#: every length and integer at a head boundary (RFC 8949 §3: 24, 2**8, 2**16, 2**32)
LENGTHS = [0, 1, 23, 24, 255, 256, 1024, 65535, MAX_BLOCK_BYTES]
INTEGERS = [0, 1, 23, 24, 255, 256, 65535, 65536, MAX_U32]


def general(data: bytes) -> Message | ProtocolError:
    """What the general decoder makes of ``data`` (a ``bytearray`` never takes the layout
    path), as a value or the error."""
    try:
        return messages.decode(bytearray(data))
    except ProtocolError as exc:
        return exc


def decoded(data: bytes) -> Message | ProtocolError:
    try:
        return messages.decode(data)
    except ProtocolError as exc:
        return exc


def same(a: Message | ProtocolError, b: Message | ProtocolError) -> bool:
    if isinstance(a, ProtocolError) or isinstance(b, ProtocolError):
        return (
            isinstance(a, ProtocolError) and isinstance(b, ProtocolError) and (a.reason is b.reason)
        )
    return a == b


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("index", INTEGERS)
def test_every_head_form_of_a_block_is_read_in_place(length: int, index: int) -> None:
    for ack_now in (False, True):
        block = Block(IMAGE, index, bytes([length % 251]) * length, ack_now)
        data = codec.encode(block)
        assert layouts.read_block(data) == (IMAGE, index, block.data, ack_now)
        assert messages.decode(data) == block == general(data)


@pytest.mark.parametrize("bitmap_len", [0, 1, 23, 24, 255, 256, 8192])
@pytest.mark.parametrize("value", INTEGERS)
def test_transfer_acked_template_is_the_codecs_encoding(bitmap_len: int, value: int) -> None:
    credit = min(value, MAX_U16)
    acked = TransferAcked(IMAGE, value, b"\x5a" * bitmap_len, credit)
    assert acked.encode() == codec.encode(acked)
    assert messages.decode(acked.encode()) == acked


def _block_bytes(data_head: bytes, data: bytes, index_head: bytes, flag: bytes = b"\xf4") -> bytes:
    return (
        b"\xa5\x61t\x02\x64data" + data_head + data + b"\x65image\x58\x20" + IMAGE
        + b"\x65index" + index_head + b"\x67ack_now" + flag
    )  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_block_bytes(b"\x58\x0a", b"x" * 10, b"\x05"), Reason.NON_CANONICAL),  # length 10 long
        (_block_bytes(b"\x59\x00\x20", b"x" * 32, b"\x05"), Reason.NON_CANONICAL),
        (_block_bytes(b"\x5a\x00\x00\x04\x00", b"x" * 1024, b"\x05"), Reason.NON_CANONICAL),
        (_block_bytes(b"\x4a", b"x" * 10, b"\x18\x05"), Reason.NON_CANONICAL),  # index 5 long
        (_block_bytes(b"\x4a", b"x" * 10, b"\x19\x00\xff"), Reason.NON_CANONICAL),
        (_block_bytes(b"\x4a", b"x" * 10, b"\x1a\x00\x00\xff\xff"), Reason.NON_CANONICAL),
        (_block_bytes(b"\x4a", b"x" * 10, b"\x1b" + (MAX_U32 + 1).to_bytes(8, "big")),
         Reason.MALFORMED),  # index past u32
        (_block_bytes(b"\x4a", b"x" * 10, b"\x05") + b"\x00", Reason.MALFORMED),  # trailing
        (_block_bytes(b"\x4a", b"x" * 10, b"\x05")[:-1], Reason.MALFORMED),  # truncated
        (_block_bytes(b"\x4a", b"x" * 10, b"\x05", b"\xf6"), Reason.MALFORMED),  # null flag
        (_block_bytes(b"\x4a", b"x" * 10, b"\x05", b"\x01"), Reason.MALFORMED),  # int flag
        (_block_bytes(b"\x5a\x00\x01\x00\x01", b"x" * (MAX_BLOCK_BYTES + 1), b"\x05"),
         Reason.TOO_LARGE),  # data past the cap
        (_block_bytes(b"\x5f", b"\x4ax" + b"x" * 9 + b"\xff", b"\x05"),
         Reason.INDEFINITE_LENGTH),
    ],
)  # fmt: skip
def test_non_canonical_and_out_of_range_blocks_are_refused_as_before(
    frame: bytes, reason: Reason
) -> None:
    assert layouts.read_block(frame) is None
    with pytest.raises(ProtocolError) as info:
        messages.decode(frame)
    assert info.value.reason is reason
    assert same(general(frame), info.value)


def test_keys_in_another_order_go_to_the_general_decoder_and_are_accepted() -> None:
    block = Block(IMAGE, 7, b"abc", True)
    raw = codec.schema(Block).to_wire(block)
    reordered = bytes(cbor2.dumps(dict(reversed(list(raw.items())))))  # SPEC §3: any key order
    assert reordered != block.encode()
    assert layouts.read_block(reordered) is None
    assert messages.decode(reordered) == block


def test_a_smaller_size_cap_is_still_applied_first() -> None:
    data = Block(IMAGE, 1, b"x" * 1024, False).encode()
    with pytest.raises(ProtocolError) as info:
        messages.decode(data, max_size=len(data) - 1)
    assert info.value.reason is Reason.TOO_LARGE
    with pytest.raises(ProtocolError) as exact:
        TransferAcked.decode(data)
    assert exact.value.reason is Reason.UNKNOWN_TYPE


blocks = st.builds(
    Block,
    st.binary(min_size=HASH_LEN, max_size=HASH_LEN),
    st.integers(0, MAX_U32),
    st.binary(max_size=600),
    st.booleans(),
)


@FUZZ
@given(blocks, st.data())
def test_a_mutated_block_is_decoded_exactly_as_the_general_decoder_does(
    block: Block, draw: st.DataObject
) -> None:
    data = bytearray(codec.encode(block))
    for _ in range(draw.draw(st.integers(1, 3))):
        kind = draw.draw(st.sampled_from(("flip", "cut", "append", "insert")))
        at = draw.draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw.draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "append":
            data += draw.draw(st.binary(min_size=1, max_size=9))
        else:
            data[at:at] = draw.draw(st.binary(min_size=1, max_size=4))
    frame = bytes(data)
    assert same(decoded(frame), general(frame))
    fields = layouts.read_block(frame)
    if fields is not None:
        assert Block(*fields) == general(frame)
