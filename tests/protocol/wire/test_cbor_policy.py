"""The strict CBOR policy in front of cbor2: each rule refuses with its own reason."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor


def refused(data: bytes, **kwargs: object) -> Reason:
    with pytest.raises(ProtocolError) as info:
        cbor.loads(data, max_size=kwargs.pop("max_size", 1024), **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_round_trip_of_allowed_values() -> None:
    value = {"a": [1, -5, b"\x00\xff", "text", True, False, None], 7: {"n": 2**40}}
    assert cbor.loads(cbor.dumps(value), max_size=1024) == value


def test_encoding_is_deterministic() -> None:
    assert cbor.dumps({"b": 1, "a": 2}) == cbor.dumps({"a": 2, "b": 1})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"\x5f\x41a\xff", Reason.INDEFINITE_LENGTH),  # indefinite byte string
        (b"\x9f\x01\xff", Reason.INDEFINITE_LENGTH),  # indefinite array
        (b"\xbf\x61a\x01\xff", Reason.INDEFINITE_LENGTH),  # indefinite map
        (b"\xa2\x61a\x01\x61a\x02", Reason.DUPLICATE_KEY),
        (b"\xa2\x01\x01\x01\x02", Reason.DUPLICATE_KEY),
        (b"\x18\x05", Reason.NON_CANONICAL),  # 5 encoded in two bytes
        (b"\x19\x00\x10", Reason.NON_CANONICAL),
        (b"\xfb" + b"\x00" * 8, Reason.MALFORMED),  # float
        (b"\xf7", Reason.MALFORMED),  # undefined
        (b"\xc1\x01", Reason.MALFORMED),  # tag not allowed
        (b"\x5a\xff\xff\xff\xff", Reason.MALFORMED),  # absurd declared length
        (b"\x9b" + b"\xff" * 8, Reason.MALFORMED),  # absurd array length
        (b"\x01\x02", Reason.MALFORMED),  # trailing bytes
        (b"\xa1\x41k\x01", Reason.MALFORMED),  # byte-string map key
        (b"\xff", Reason.MALFORMED),  # lone break
        (b"\x1c", Reason.MALFORMED),  # reserved additional info
        (bytes.fromhex("c249010000000000000000"), Reason.MALFORMED),  # bignum 2**64 (tag 2)
        (bytes.fromhex("a1c249010000000000000000f6"), Reason.MALFORMED),  # ... as a map key
    ],
)
def test_hostile_input_is_refused_with_its_reason(data: bytes, reason: Reason) -> None:
    assert refused(data) is reason


def test_size_cap_is_checked_before_parsing() -> None:
    assert refused(b"\x01" * 2000, max_size=1000) is Reason.TOO_LARGE


def test_depth_cap() -> None:
    nested = b"\x81" * 20 + b"\x01"
    assert refused(nested, max_depth=8) is Reason.TOO_DEEP
    assert cbor.loads(b"\x81" * 3 + b"\x01", max_size=10, max_depth=8) == [[[1]]]


def test_allowed_tag_passes() -> None:
    data = cbor2.dumps(cbor2.CBORTag(18, [1, 2]))
    value = cbor.loads(data, max_size=100, allowed_tags=frozenset({18}))
    assert value.tag == 18


def test_non_bytes_input_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        cbor.loads("text", max_size=10)  # type: ignore[arg-type]


# The fast path (cbor2 + re-encode + type walk) and the byte scanner must accept exactly the same
# inputs: the scanner is what names the reason when the fast path refuses.

_leaves = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.binary(max_size=20),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.integers(-5, 5), st.text(max_size=3)), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from([2, 18, 24, 1000]), inner),
    ),
    max_leaves=12,
)


def _scanner_accepts(data: bytes) -> bool:
    try:
        end = cbor._scan(data, cbor.DEFAULT_MAX_DEPTH, frozenset({18}))
        cbor2.loads(data)
    except Exception:
        return False
    return end == len(data)


def _fast_accepts(data: bytes) -> bool:
    try:
        cbor.loads(data, max_size=1 << 20, allowed_tags=frozenset({18}))
    except ProtocolError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(_values, st.binary(max_size=3), st.integers(0, 40), st.integers(0, 255))
def test_fast_path_and_scanner_agree(value: object, tail: bytes, at: int, byte: int) -> None:
    try:
        data = cbor2.dumps(value)
    except Exception:
        return
    mutated = bytearray(data + tail)
    if mutated and at < len(mutated):
        mutated[at] = byte
    for candidate in (data, data + tail, bytes(mutated)):
        assert _fast_accepts(candidate) == _scanner_accepts(candidate), candidate.hex()


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\x18\x05", "integer 5"),  # the reviewer's `base` as 18 05
        (b"\x38\x05", "negative integer 5"),
        (b"\x58\x01\x00", "byte string length 1"),
        (b"\x78\x01a", "text string length 1"),
        (b"\x98\x01\x00", "array length 1"),
        (b"\xb8\x01\x00\x00", "map length 1"),
    ],
)
def test_a_non_minimal_head_is_refused_naming_what_was_not_minimal(data: bytes, what: str) -> None:
    with pytest.raises(ProtocolError) as info:
        cbor.loads(data, max_size=64)
    assert info.value.reason is Reason.NON_CANONICAL
    assert info.value.detail.startswith(f"{what} not minimally encoded")


def test_a_non_minimal_tag_number_is_named_a_tag() -> None:
    with pytest.raises(ProtocolError) as info:
        cbor.loads(b"\xd8\x12\x00", max_size=64, allowed_tags=frozenset({18}))
    assert info.value.reason is Reason.NON_CANONICAL
    assert info.value.detail.startswith("tag number 18 not minimally encoded")


def test_map_keys_in_any_order_are_accepted_and_depth_counts_the_top_item_as_1() -> None:
    unsorted = b"\xa2\x62bb\x01\x61a\x02"  # {"bb": 1, "a": 2}: not in deterministic order
    assert cbor.loads(unsorted, max_size=64) == {"bb": 1, "a": 2}
    assert cbor.loads(b"\x81\x00", max_size=64, max_depth=1) == [0]  # one level: depth 1
    with pytest.raises(ProtocolError) as info:
        cbor.loads(b"\x81\x81\x00", max_size=64, max_depth=1)
    assert info.value.reason is Reason.TOO_DEEP
