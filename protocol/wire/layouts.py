"""The exact bytes of the two per-block messages, read and written without the general codec.

A ``Block`` (otad -> CH) and a ``TransferAcked`` (CH -> otad) cross the WAN once per block and
once per few blocks; everything else is rare. Deterministically encoded (SPEC §3: preferred
heads, keys in bytewise order of their encodings), each has one fixed layout, varying only in
the heads of its length and integer fields::

    Block           a5 61 't' 02  64 'data' <bstr head> <data>  65 'image' 58 20 <32 bytes>
                    65 'index' <uint head>  67 'ack_now' f4|f5
    TransferAcked   a5 61 't' 10  64 'base' <uint head>  65 'image' 58 20 <32 bytes>
                    66 'bitmap' <bstr head> <bitmap>  66 'credit' <uint head>

:func:`read_block` recognises the ``Block`` layout in place: it checks every fixed byte, that
each variable head is the minimal one for its value (RFC 8949 §4.2.1) and in range, and that
nothing follows, and returns the fields; anything else (another message, keys in another order,
a head that is not minimal, a field out of range, trailing bytes...) is ``None``, and the
caller hands the bytes to the general decoder (:func:`protocol.wire.messages.decode`), which
accepts or refuses them exactly as before, with the precise reason. So this path never accepts
what the general decoder refuses, and never refuses anything itself: it only skips the general
decoder's re-encoding of a 1 KiB payload (its proof of canonical form) for the common case.

:func:`transfer_acked_bytes` writes the deterministic encoding of a ``TransferAcked`` from a
fixed template, the same bytes :func:`protocol.wire.codec.encode` produces (tests compare them).
"""

from __future__ import annotations

from typing import Final

from protocol.wire.limits import HASH_LEN, MAX_BLOCK_BYTES

_BLOCK_START: Final = b"\xa5\x61t\x02\x64data"
_BLOCK_IMAGE: Final = b"\x65image\x58\x20"
_BLOCK_INDEX: Final = b"\x65index"
_BLOCK_ACK_NOW: Final = b"\x67ack_now"
_FALSE, _TRUE = 0xF4, 0xF5

_ACKED_START: Final = b"\xa5\x61t\x10\x64base"
_ACKED_IMAGE: Final = b"\x65image\x58\x20"
_ACKED_BITMAP: Final = b"\x66bitmap"
_ACKED_CREDIT: Final = b"\x66credit"


def read_block(payload: bytes) -> tuple[bytes, int, bytes, bool] | None:
    """``(image, index, data, ack_now)`` when ``payload`` is a ``Block`` in its deterministic
    layout with every field in range; otherwise ``None`` (see the module docstring)."""
    if payload[:9] != _BLOCK_START:
        return None
    size = len(payload)
    if size < 66:  # the shortest Block: no data, index < 24
        return None
    head = payload[9]
    if head == 0x59:
        length = (payload[10] << 8) | payload[11]
        start = 12
        if length < 0x100:
            return None
    elif head < 0x58:
        if head < 0x40:
            return None
        length, start = head - 0x40, 10
    elif head == 0x58:
        length, start = payload[10], 11
        if length < 24:
            return None
    elif head == 0x5A:
        length, start = int.from_bytes(payload[10:14], "big"), 14
        if length < 0x1_0000 or length > MAX_BLOCK_BYTES:
            return None
    else:
        return None
    end = start + length
    # after the data: the image's key and head (8), the image (32), the index's key (6), the
    # index's head of 1, 2, 3 or 5 bytes, the ack_now key (8) and its value (1)
    tail = size - end
    pos = end + 46
    if tail == 56:
        index = payload[pos]
        if index >= 24:
            return None
    elif tail == 58 and payload[pos] == 0x19:
        index = (payload[pos + 1] << 8) | payload[pos + 2]
        if index < 0x100:
            return None
    elif tail == 57 and payload[pos] == 0x18:
        index = payload[pos + 1]
        if index < 24:
            return None
    elif tail == 60 and payload[pos] == 0x1A:
        index = int.from_bytes(payload[pos + 1 : pos + 5], "big")  # at most MAX_U32
        if index < 0x1_0000:
            return None
    else:
        return None
    if (
        payload[end : end + 8] != _BLOCK_IMAGE
        or payload[end + 40 : pos] != _BLOCK_INDEX
        or payload[-9:-1] != _BLOCK_ACK_NOW
    ):
        return None
    flag = payload[-1]
    if flag == 0xF4:
        ack_now = False
    elif flag == 0xF5:
        ack_now = True
    else:
        return None
    return payload[end + 8 : end + 8 + HASH_LEN], index, payload[start:end], ack_now


def _uint_head(value: int) -> bytes:
    """The minimal head of an unsigned integer (major type 0) of at most 64 bits."""
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x1_0000:
        return b"\x19" + value.to_bytes(2, "big")
    if value < 0x1_0000_0000:
        return b"\x1a" + value.to_bytes(4, "big")
    return b"\x1b" + value.to_bytes(8, "big")


def _bytes_head(length: int) -> bytes:
    """The minimal head of a byte string (major type 2) of ``length`` bytes."""
    if length < 24:
        return bytes((0x40 | length,))
    head = _uint_head(length)
    return bytes((head[0] | 0x40,)) + head[1:]


def transfer_acked_bytes(image: bytes, base: int, bitmap: bytes, credit: int) -> bytes:
    """The deterministic CBOR of ``TransferAcked(image, base, bitmap, credit)``; the fields
    must be in range (a 32-byte image, unsigned integers), as the record's own are."""
    return b"".join(
        (
            _ACKED_START,
            _uint_head(base),
            _ACKED_IMAGE,
            image,
            _ACKED_BITMAP,
            _bytes_head(len(bitmap)),
            bitmap,
            _ACKED_CREDIT,
            _uint_head(credit),
        )
    )
