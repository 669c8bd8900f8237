"""Block bitmaps and the SACK encoding of TransferAcked (SPEC §7.3), on their own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.wan.sack import SACK_SPAN, Bitmap, check_sack, covers, sack_indexes
from protocol.wire.limits import MAX_BITMAP_BYTES


def bitmap_of(size: int, *held: int) -> Bitmap:
    bitmap = Bitmap(size)
    for index in held:
        bitmap.add(index)
    return bitmap


def test_the_spec_example() -> None:
    # SPEC §7.3: held {0, 1, 2, 4, 7, 9, 19} -> base 3, bitmap 29 80 (bits 0, 3, 5, 15)
    bitmap = bitmap_of(20, 0, 1, 2, 4, 7, 9, 19)
    assert bitmap.sack() == (3, bytes.fromhex("2980"))
    assert list(sack_indexes(3, bytes.fromhex("2980"))) == [4, 7, 9, 19]


def test_set_operations_and_counts() -> None:
    bitmap = Bitmap(10)
    assert (bitmap.size, bitmap.count, bitmap.highest()) == (10, 0, -1)
    assert bitmap.add(3)
    assert not bitmap.add(3)  # already there
    assert 3 in bitmap
    assert 4 not in bitmap
    assert -1 not in bitmap
    assert 10 not in bitmap
    assert "3" not in bitmap
    assert bitmap.count == 1
    assert bitmap.discard(3)
    assert not bitmap.discard(3)
    assert bitmap.count == 0
    with pytest.raises(IndexError):
        bitmap.add(10)
    for index in range(10):
        bitmap.add(index)
    assert bitmap.full()
    bitmap.clear()
    assert (bitmap.count, bitmap.full()) == (0, False)
    with pytest.raises(ValueError):
        Bitmap(-1)


def test_first_missing_skips_full_bytes() -> None:
    bitmap = bitmap_of(40, *range(25))
    assert bitmap.first_missing() == 25
    assert bitmap.first_missing(30) == 30
    bitmap.add(30)
    assert bitmap.first_missing(30) == 31
    assert bitmap_of(3, 0, 1, 2).first_missing() == 3  # none missing: the size
    assert Bitmap(0).first_missing() == 0


def test_persisted_form_round_trips_and_is_checked() -> None:
    bitmap = bitmap_of(12, 0, 5, 11)
    data = bitmap.to_bytes()
    assert data == bytes([0b0010_0001, 0b0000_1000])
    again = Bitmap.from_bytes(data, 12)
    assert (again.to_bytes(), again.count) == (data, 3)
    with pytest.raises(ProtocolError) as info:
        Bitmap.from_bytes(data + b"\x00", 12)  # wrong length
    assert info.value.reason is Reason.MALFORMED
    with pytest.raises(ProtocolError) as info:
        Bitmap.from_bytes(bytes([0, 0b0001_0000]), 12)  # a padding bit past block 11
    assert info.value.reason is Reason.MALFORMED


def test_the_bitmap_never_names_blocks_past_the_span() -> None:
    size = SACK_SPAN + 40
    bitmap = bitmap_of(size, size - 1, 1 + SACK_SPAN - 1)
    base, bits = bitmap.sack()
    assert base == 0
    assert len(bits) <= MAX_BITMAP_BYTES
    assert list(sack_indexes(base, bits)) == [SACK_SPAN]  # size - 1 is beyond the horizon


def test_trailing_zero_bytes_are_not_sent() -> None:
    assert bitmap_of(64, 0, 2).sack() == (1, b"\x01")
    assert bitmap_of(64, 0, 1).sack() == (2, b"")
    assert bitmap_of(3, 0, 1, 2).sack() == (3, b"")


def test_check_sack_refuses_what_cannot_be() -> None:
    check_sack(8, b"", 8)
    check_sack(0, b"\x40", 8)  # block 7, the last one
    for base, bits, reason in (
        (9, b"", Reason.MALFORMED),  # base past the image
        (-1, b"", Reason.MALFORMED),
        (0, b"\x80", Reason.MALFORMED),  # names block 8 of 8
        (7, b"\x01", Reason.MALFORMED),  # names block 8 of 8
        (0, bytes(MAX_BITMAP_BYTES + 1), Reason.TOO_LARGE),
    ):
        with pytest.raises(ProtocolError) as info:
            check_sack(base, bits, 8)
        assert info.value.reason is reason


def test_merge_adds_only_what_is_new() -> None:
    bitmap = bitmap_of(16, 0, 5)
    assert bitmap.merge_sack(3, b"\x09") == [1, 2, 4, 7]  # blocks < 3, and 4 and 7
    assert bitmap.merge_sack(3, b"\x09") == []  # the same SACK again: nothing new
    assert bitmap.count == 6
    assert bitmap.first_missing() == 3


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 300),
    held=st.sets(st.integers(0, 299)),
    base=st.integers(0, 300),
    bits=st.binary(max_size=8),
)
def test_merge_from_a_known_start_finds_what_a_merge_from_zero_finds(
    size: int, held: set[int], base: int, bits: bytes
) -> None:
    held = {i for i in held if i < size}
    base = min(base, size)
    bits = bits[: max(0, (size - base - 1) // 8)]  # whole bytes within the image: a valid SACK
    check_sack(base, bits, size)
    full, partial = bitmap_of(size, *held), bitmap_of(size, *held)
    start = partial.first_missing()  # everything below it is held: a sender's lowest unacked
    assert partial.merge_sack(base, bits, start) == full.merge_sack(base, bits)
    assert partial.to_bytes() == full.to_bytes()


def test_replace_makes_the_set_exactly_the_sack() -> None:
    bitmap = bitmap_of(20, 15, 16, 17)
    bitmap.replace_with_sack(10, b"\x05")
    assert sorted(i for i in range(20) if i in bitmap) == [*range(10), 11, 13]
    assert bitmap.count == 12


def test_covers_one_block() -> None:
    assert covers(0, 3, b"")
    assert covers(2, 3, b"")
    assert not covers(3, 3, b"\xff")  # the base is missing by definition
    assert covers(4, 3, b"\x01")
    assert not covers(5, 3, b"\x01")
    assert not covers(11, 3, b"\x00\x01")
    assert covers(12, 3, b"\x00\x01")  # bit 8: block base + 1 + 8
    assert not covers(20, 3, b"\x00\x01")  # past the bitmap


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.binary(max_size=6), st.integers(0, 300))
def test_covers_agrees_with_the_listed_indexes(base: int, bits: bytes, index: int) -> None:
    held = set(range(base)) | set(sack_indexes(base, bits))
    assert covers(index, base, bits) is (index in held)
