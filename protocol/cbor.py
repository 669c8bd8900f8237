"""Strict CBOR for untrusted input.

cbor2 decodes; this module decides what it may be given. Before ``cbor2.loads`` sees a byte, a
single linear scan checks the whole item against the policy below and raises a typed
:class:`~protocol.errors.ProtocolError` otherwise, so hostile input costs bounded time and memory
and never surfaces as another exception:

* a size cap (checked first) and a nesting-depth cap;
* definite lengths only, declared lengths no longer than the bytes that remain;
* preferred (minimal) length encoding of every head, so equal values have equal bytes;
* map keys are integers or text, and no key appears twice in one map (compared by bytes,
  which the minimal-encoding rule makes equivalent to comparing values);
* no floats, no ``undefined``, no simple values other than false/true/null;
* tags only from an allow-list (by default none; COSE_Sign1 callers allow tag 18);
* exactly one item, no trailing bytes.

Encoding uses cbor2's canonical mode, so what we sign and what we send is deterministic.
"""

from __future__ import annotations

from typing import Any

import cbor2

from protocol.errors import ProtocolError, Reason

DEFAULT_MAX_DEPTH = 8

_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL = 20, 21, 22


def dumps(value: Any) -> bytes:
    """Encode ``value`` deterministically (cbor2 canonical mode)."""
    return bytes(cbor2.dumps(value, canonical=True))


def loads(
    data: bytes,
    *,
    max_size: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allowed_tags: frozenset[int] = frozenset(),
) -> Any:
    """Validate ``data`` against the strict policy, then decode it with cbor2.

    Raises :class:`ProtocolError` (and nothing else) when the input is refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "input is not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > cap {max_size}")
    if not data:
        raise ProtocolError(Reason.MALFORMED, "empty input")
    end = _Scanner(data, max_depth, allowed_tags).item(0, 0)
    if end != len(data):
        raise ProtocolError(Reason.MALFORMED, f"{len(data) - end} trailing bytes")
    try:
        return cbor2.loads(data)
    except Exception as exc:  # the scan should make this unreachable; keep the contract anyway
        raise ProtocolError(Reason.MALFORMED, f"cbor2: {exc}") from None


class _Scanner:
    __slots__ = ("allowed_tags", "data", "max_depth")

    def __init__(self, data: bytes, max_depth: int, allowed_tags: frozenset[int]) -> None:
        self.data = data
        self.max_depth = max_depth
        self.allowed_tags = allowed_tags

    def head(self, pos: int) -> tuple[int, int, int, int]:
        """Return (major, additional info, argument, position after the head)."""
        data = self.data
        if pos >= len(data):
            raise ProtocolError(Reason.MALFORMED, "truncated item")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            return major, info, info, pos
        if info == 31:
            if major == _MAJOR_SIMPLE:
                raise ProtocolError(Reason.MALFORMED, "unexpected break")
            raise ProtocolError(Reason.INDEFINITE_LENGTH, "indefinite-length item")
        if info > 27:
            raise ProtocolError(Reason.MALFORMED, f"reserved additional info {info}")
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise ProtocolError(Reason.MALFORMED, "truncated head")
        arg = int.from_bytes(data[pos : pos + width], "big")
        if major != _MAJOR_SIMPLE and arg < (24 if width == 1 else 1 << (4 * width)):
            raise ProtocolError(Reason.NON_CANONICAL, "length not minimally encoded")
        return major, info, arg, pos + width

    def item(self, pos: int, depth: int) -> int:
        if depth > self.max_depth:
            raise ProtocolError(Reason.TOO_DEEP, f"nesting deeper than {self.max_depth}")
        major, info, arg, pos = self.head(pos)
        remaining = len(self.data) - pos
        if major in (_MAJOR_UINT, _MAJOR_NINT):
            return pos
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            if arg > remaining:
                raise ProtocolError(Reason.MALFORMED, "string longer than the input")
            return pos + arg
        if major == _MAJOR_ARRAY:
            if arg > remaining:  # each element takes at least one byte
                raise ProtocolError(Reason.MALFORMED, "array longer than the input")
            for _ in range(arg):
                pos = self.item(pos, depth + 1)
            return pos
        if major == _MAJOR_MAP:
            if 2 * arg > remaining:
                raise ProtocolError(Reason.MALFORMED, "map longer than the input")
            seen: set[bytes] = set()
            for _ in range(arg):
                key_major = self.data[pos] >> 5 if pos < len(self.data) else -1
                if key_major not in (_MAJOR_UINT, _MAJOR_NINT, _MAJOR_TEXT):
                    raise ProtocolError(Reason.MALFORMED, "map key is not an integer or text")
                key_end = self.item(pos, depth + 1)
                key = self.data[pos:key_end]
                if key in seen:
                    raise ProtocolError(Reason.DUPLICATE_KEY, f"duplicate map key {key.hex()}")
                seen.add(key)
                pos = self.item(key_end, depth + 1)
            return pos
        if major == _MAJOR_TAG:
            if arg not in self.allowed_tags:
                raise ProtocolError(Reason.MALFORMED, f"tag {arg} not allowed here")
            return self.item(pos, depth + 1)
        # major 7: only false, true, null
        if info in (_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL):
            return pos
        raise ProtocolError(Reason.MALFORMED, "floats and other simple values are not allowed")
