"""Strict CBOR for untrusted input.

What may be decoded (the policy), checked before any value is handed on:

* a size cap (checked first) and a nesting-depth cap;
* definite lengths only, declared lengths no longer than the bytes that remain;
* preferred (minimal) length encoding of every head;
* map keys are integers or text, and no key appears twice in one map;
* no floats, no ``undefined``, no simple values other than false/true/null;
* tags only from an allow-list (by default none; COSE_Sign1 callers allow tag 18);
* exactly one item, no trailing bytes.

How (every message otad and every virtual hub receives goes through here, so the common case
stays in C): cbor2 decodes with its own duplicate-key, indefinite-length and depth checks; the
value is re-encoded, and the bytes must come back identical (that proves minimal heads, no
trailing bytes and no non-preferred number forms); a walk over the decoded value checks the types
and tags. Only input that fails is scanned byte by byte (:func:`_scan`), to name the precise
:class:`~protocol.errors.Reason`; hostile input never surfaces as another exception.

Encoding (:func:`dumps`) uses cbor2's canonical mode (RFC 8949 §4.2.3, length-first map keys),
so what we sign and what we send is deterministic; for the text-keyed maps of the messages this
is the same bytes as the core deterministic encoding SPEC §3 names (see
:mod:`protocol.wire.codec`, which builds its maps in that order instead of sorting them).
"""

from __future__ import annotations

from typing import Any

import cbor2

from protocol.errors import ProtocolError, Reason

DEFAULT_MAX_DEPTH = 8

_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
#: What a head's argument is, by major type: named in a NON_CANONICAL refusal.
_HEAD_ARGUMENT = (
    "integer",
    "negative integer",
    "byte string length",
    "text string length",
    "array length",
    "map length",
    "tag number",
)
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
    try:
        value = cbor2.loads(
            data, max_depth=max_depth, allow_indefinite=False, allow_duplicate_keys=False
        )
        if cbor2.dumps(value) == data and _plain(value, allowed_tags):
            return value
        problem = "not in preferred encoding"
    except Exception as exc:  # cbor2's errors, and anything else hostile input provokes
        problem = f"cbor2: {exc}"[:200]
    # Refused: find out exactly why.
    end = _scan(data, max_depth, allowed_tags)
    if end != len(data):
        raise ProtocolError(Reason.MALFORMED, f"{len(data) - end} trailing bytes")
    raise ProtocolError(Reason.MALFORMED, problem)  # e.g. text that is not UTF-8


_SCALARS = (bytes, str, bool, type(None))
# CBOR's own integers; anything wider was a bignum (tag 2 or 3), which cbor2 turns into an int
_INT_MIN, _INT_END = -(1 << 64), 1 << 64


def _plain(value: Any, allowed_tags: frozenset[int]) -> bool:
    """True when a decoded value holds only what the policy allows (types and tags)."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is int:
        return bool(_INT_MIN <= value < _INT_END)
    if kind is dict or kind is cbor2.frozendict:  # inside tags cbor2 6 makes maps immutable
        return all(
            (type(k) is str or (type(k) is int and _INT_MIN <= k < _INT_END))
            and (type(v) in _SCALARS or _plain(v, allowed_tags))
            for k, v in value.items()
        )
    if kind is list or kind is tuple:
        return all(type(v) in _SCALARS or _plain(v, allowed_tags) for v in value)
    if kind is cbor2.CBORTag:
        return value.tag in allowed_tags and _plain(value.value, allowed_tags)
    return False


def _scan(data: bytes, max_depth: int, allowed_tags: frozenset[int]) -> int:
    """Walk one item iteratively; return the position after it or raise ``ProtocolError``.

    ``stack`` holds, per open container, how many items it still expects; map keys are checked
    for type and uniqueness (by their bytes) as they are read. One loop, no call per item: this
    runs on every message otad and every virtual hub receive.
    """
    size = len(data)
    pos = 0
    stack: list[int] = []  # items still expected by each open array/map (maps count 2 per entry)
    keysets: list[set[bytes] | None] = []  # per open container: keys seen (maps) or None
    while True:
        if pos >= size:
            raise ProtocolError(Reason.MALFORMED, "truncated item")
        # a map entry's key sits where the container's remaining count is even
        is_key = bool(stack) and keysets[-1] is not None and stack[-1] % 2 == 0
        start = pos
        initial = data[pos]
        major = initial >> 5
        info = initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if pos + width > size:
                raise ProtocolError(Reason.MALFORMED, "truncated head")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if major != _MAJOR_SIMPLE and arg < (24 if width == 1 else 1 << (4 * width)):
                raise ProtocolError(
                    Reason.NON_CANONICAL,
                    f"{_HEAD_ARGUMENT[major]} {arg} not minimally encoded (at byte {start})",
                )
        elif info == 31:
            if major == _MAJOR_SIMPLE:
                raise ProtocolError(Reason.MALFORMED, "unexpected break")
            raise ProtocolError(Reason.INDEFINITE_LENGTH, "indefinite-length item")
        else:
            raise ProtocolError(Reason.MALFORMED, f"reserved additional info {info}")
        if is_key and major not in (_MAJOR_UINT, _MAJOR_NINT, _MAJOR_TEXT):
            raise ProtocolError(Reason.MALFORMED, "map key is not an integer or text")
        if major <= _MAJOR_NINT:
            pass
        elif major <= _MAJOR_TEXT:
            if arg > size - pos:
                raise ProtocolError(Reason.MALFORMED, "string longer than the input")
            pos += arg
        elif major in (_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG):
            if major == _MAJOR_TAG:
                if arg not in allowed_tags:
                    raise ProtocolError(Reason.MALFORMED, f"tag {arg} not allowed here")
                count = 1  # a tag wraps exactly one item
            else:
                count = arg if major == _MAJOR_ARRAY else 2 * arg
                if count > size - pos:  # every item takes at least one byte
                    raise ProtocolError(Reason.MALFORMED, "container longer than the input")
            if count:
                if len(stack) >= max_depth:  # its items would sit deeper than allowed
                    raise ProtocolError(Reason.TOO_DEEP, f"nesting deeper than {max_depth}")
                stack.append(count)
                keysets.append(set() if major == _MAJOR_MAP else None)
                continue
            # an empty container is finished at once, like a scalar
        elif info not in (_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL):
            raise ProtocolError(Reason.MALFORMED, "floats and other simple values are not allowed")
        if is_key:
            key = data[start:pos]
            seen = keysets[-1]
            assert seen is not None
            if key in seen:
                raise ProtocolError(Reason.DUPLICATE_KEY, f"duplicate map key {key.hex()}")
            seen.add(key)
        # one item finished: close every container it completes
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
            keysets.pop()
        if not stack:
            return pos
