"""The strict CBOR policy in front of cbor2: each rule refuses with its own reason."""

from __future__ import annotations

import cbor2
import pytest

from protocol import cbor
from protocol.errors import ProtocolError, Reason


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
