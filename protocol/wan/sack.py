"""Block bitmaps and the selective-acknowledgement (SACK) encoding of ``TransferAcked``.

Theory of operation
-------------------

Both ends of a WAN transfer keep one bit per block: the receiver for the blocks it holds, the
sender for the blocks it knows are acknowledged (and, separately, the blocks it has ever sent).
:class:`Bitmap` is that set: a ``bytearray`` of ``ceil(size / 8)`` bytes, bit ``i`` of the image
is bit ``i % 8`` (least significant first) of byte ``i // 8``, padding bits past ``size`` always
zero. The same layout is what the daemon persists (:meth:`Bitmap.to_bytes`) and what a CH
snapshot stores, so 256 blocks cost 32 bytes.

On the wire a receiver's state is a SACK (``TransferAcked``)::

    base    the lowest block index NOT held (== block count when every block is held);
            every block < base is held
    bitmap  bit i (LSB first, byte i // 8) set  <=>  block base + 1 + i is held
            (block ``base`` itself is missing by definition, so it needs no bit);
            trailing zero bytes are not sent; at most MAX_BITMAP_BYTES (65,536 blocks past
            the base) -- a sender never sends a block beyond that horizon

:meth:`Bitmap.sack` produces it, :func:`check_sack` validates one against a block count (a bit
for a block that does not exist is a lie, refused with ``MALFORMED``), :func:`sack_indexes`
lists the held indexes it names and :func:`covers` asks it about one block. Nothing here
allocates more than the bitmap it was given.
"""

from __future__ import annotations

from collections.abc import Iterator

from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import MAX_BITMAP_BYTES

#: Blocks past the base a SACK can name: a sender never sends beyond ``base + SACK_SPAN``.
SACK_SPAN = MAX_BITMAP_BYTES * 8

# Set bit positions of every byte value, so decoding a bitmap walks only the set bits.
_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)
)


class Bitmap:
    """A set of block indexes ``0 <= i < size`` as a compact, LSB-first bitmap."""

    __slots__ = ("_bits", "_count", "_size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("bitmap size must be >= 0")
        self._size = size
        self._bits = bytearray((size + 7) // 8)
        self._count = 0

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> Bitmap:
        """Rebuild a bitmap persisted by :meth:`to_bytes`.

        Raises ``ProtocolError(MALFORMED)`` when the length is not ``ceil(size / 8)`` or a padding
        bit past ``size`` is set.
        """
        bitmap = cls(size)
        if not isinstance(data, (bytes, bytearray)) or len(data) != len(bitmap._bits):
            raise ProtocolError(Reason.MALFORMED, f"bitmap of {size} blocks has a wrong length")
        if size % 8 and data[-1] >> (size % 8):
            raise ProtocolError(Reason.MALFORMED, "bitmap has bits past the last block")
        bitmap._bits[:] = data
        bitmap._count = int.from_bytes(data, "little").bit_count()
        return bitmap

    @property
    def size(self) -> int:
        """Number of blocks the bitmap covers."""
        return self._size

    @property
    def count(self) -> int:
        """Number of indexes in the set."""
        return self._count

    def full(self) -> bool:
        """True when every index is in the set."""
        return self._count == self._size

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self._size:
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def add(self, index: int) -> bool:
        """Add ``index``; return True if it was not already present."""
        byte, mask = index >> 3, 1 << (index & 7)
        if not 0 <= index < self._size:
            raise IndexError(index)
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        self._count += 1
        return True

    def discard(self, index: int) -> bool:
        """Remove ``index``; return True if it was present."""
        if index not in self:
            return False
        self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        self._count -= 1
        return True

    def clear(self) -> None:
        """Remove every index."""
        self._bits[:] = bytes(len(self._bits))
        self._count = 0

    def first_missing(self, start: int = 0) -> int:
        """Lowest index ``>= start`` not in the set, or ``size`` if there is none."""
        size, bits = self._size, self._bits
        i = max(start, 0)
        while i < size and i & 7:
            if not bits[i >> 3] >> (i & 7) & 1:
                return i
            i += 1
        byte = i >> 3
        nbytes = len(bits)
        while byte < nbytes and bits[byte] == 0xFF:
            byte += 1
        i = byte << 3
        while i < size:
            if not bits[i >> 3] >> (i & 7) & 1:
                return i
            i += 1
        return size

    def highest(self) -> int:
        """The highest index in the set, or -1 if it is empty."""
        trimmed = bytes(self._bits).rstrip(b"\x00")
        if not trimmed:
            return -1
        return 8 * (len(trimmed) - 1) + trimmed[-1].bit_length() - 1

    def to_bytes(self) -> bytes:
        """The persisted form: ``ceil(size / 8)`` bytes, LSB first."""
        return bytes(self._bits)

    def sack(self, base: int | None = None) -> tuple[int, bytes]:
        """The (base, bitmap) pair of a ``TransferAcked`` describing this set.

        ``base`` may be passed when the caller already knows :meth:`first_missing`.
        """
        if base is None:
            base = self.first_missing()
        start = base + 1
        if start >= self._size:
            return base, b""
        value = int.from_bytes(self._bits[start >> 3 :], "little") >> (start & 7)
        if value.bit_length() > SACK_SPAN:
            value &= (1 << SACK_SPAN) - 1
        return base, value.to_bytes((value.bit_length() + 7) // 8, "little")

    def merge_sack(self, base: int, bitmap: bytes, start: int = 0) -> list[int]:
        """Add every index a validated SACK names; return the ones that were new, ascending.

        ``start``: every index below it is known to be in the set already (a sender's lowest
        unacknowledged block), so the search for new ones begins there."""
        newly: list[int] = []
        i = self.first_missing(start)
        end = min(base, self._size)
        while i < end:
            if self.add(i):
                newly.append(i)
            i = self.first_missing(i + 1)
        newly.extend(index for index in sack_indexes(base, bitmap) if self.add(index))
        return newly

    def replace_with_sack(self, base: int, bitmap: bytes) -> None:
        """Make the set exactly what a validated SACK names."""
        self.clear()
        if base:
            full, rest = divmod(base, 8)
            self._bits[:full] = b"\xff" * full
            if rest:
                self._bits[full] = (1 << rest) - 1
            self._count = base
        for index in sack_indexes(base, bitmap):
            self.add(index)


def check_sack(base: int, bitmap: bytes, count: int) -> None:
    """Raise ``ProtocolError(MALFORMED)`` unless (base, bitmap) is a possible SACK of ``count``
    blocks: ``base <= count`` and no bit names a block ``>= count``."""
    if not 0 <= base <= count:
        raise ProtocolError(Reason.MALFORMED, f"SACK base {base} past {count} blocks")
    if len(bitmap) > MAX_BITMAP_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, "SACK bitmap too long")
    trimmed = bytes(bitmap).rstrip(b"\x00")
    if trimmed:
        highest = base + 8 * (len(trimmed) - 1) + trimmed[-1].bit_length()
        if highest >= count:
            raise ProtocolError(
                Reason.MALFORMED, f"SACK names block {highest} of an image of {count}"
            )


def covers(index: int, base: int, bitmap: bytes) -> bool:
    """Whether the SACK (``base``, ``bitmap``) says block ``index`` is held.

    Every block below ``base`` is; block ``base`` is not; block ``base + 1 + i`` is when bit
    ``i`` of ``bitmap`` is set. The SACK is taken as it is (validate it first with
    :func:`check_sack`); an index past the bitmap is not covered.
    """
    if index < base:
        return True
    bit = index - base - 1
    if bit < 0 or bit >= len(bitmap) * 8:
        return False
    return bool(bitmap[bit >> 3] >> (bit & 7) & 1)


def sack_indexes(base: int, bitmap: bytes) -> Iterator[int]:
    """Absolute block indexes whose bit is set in a SACK bitmap, ascending."""
    first = base + 1
    for offset, byte in enumerate(bitmap):
        if byte:
            start = first + 8 * offset
            for bit in _BITS[byte]:
                yield start + bit
