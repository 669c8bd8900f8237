"""The declarative record codec on its own: field kinds, check order, deterministic encoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar

import cbor2
import pytest

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor, codec
from protocol.wire.codec import Tag, array, byte_string, eui64, text, uint


class Colour(StrEnum):
    RED = "RED"
    GREEN = "GREEN"


class Level(IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class Part:
    serial: str = field(metadata=eui64())
    colour: Colour = Colour.RED

    def __post_init__(self) -> None:
        codec.validate(self)


codec.register(Part)


@dataclass(frozen=True, slots=True)
class Sample:
    TYPE: ClassVar[str] = "sample"
    count: int = field(metadata=uint(1000))
    limit: int | None = field(metadata=uint(10))
    digest: bytes = field(metadata=byte_string(4))
    blob: bytes = field(metadata=byte_string(maximum=8))
    name: str = field(metadata=text(5))
    flag: bool = False
    level: Level = Level.LOW
    floor: Level | None = None
    part: Part = Part("0011223344556677")
    parts: tuple[Part, ...] = field(default=(), metadata=array(2))

    def __post_init__(self) -> None:
        codec.validate(self)
        if self.flag and self.limit is None:
            raise ValueError("a flagged sample has a limit")


codec.register(Sample, Tag("t", Sample.TYPE, Reason.UNKNOWN_TYPE))

GOOD = Sample(3, 4, b"abcd", b"xy", "name", True, Level.HIGH, None, Part("AABBCCDDEEFF0011"))


def wire(**changes: Any) -> dict[str, Any]:
    raw = cbor.loads(codec.encode(GOOD), max_size=4096)
    assert isinstance(raw, dict)
    raw.update(changes)
    return {key: value for key, value in raw.items() if value is not ...}


def refused(raw: Any) -> Reason:
    with pytest.raises(ProtocolError) as info:
        codec.decode(Sample, raw)
    return info.value.reason


def test_round_trip_and_enum_members_come_back() -> None:
    again = codec.decode(Sample, cbor.loads(codec.encode(GOOD), max_size=4096))
    assert again == GOOD
    assert again.level is Level.HIGH
    assert again.part.colour is Colour.RED


def test_encoding_is_the_deterministic_encoding() -> None:
    data = codec.encode(GOOD)
    assert data == cbor.dumps(cbor.loads(data, max_size=4096))  # cbor2's canonical mode
    raw = cbor2.loads(data)
    assert list(raw) == sorted(raw, key=cbor.dumps)  # RFC 8949 §4.2.1: bytewise key order


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"t": ...}, Reason.MALFORMED),  # no tag
        ({"t": 7}, Reason.MALFORMED),  # a tag of the wrong type
        ({"t": "other"}, Reason.UNKNOWN_TYPE),  # another record
        ({"extra": 1}, Reason.UNKNOWN_KEY),
        ({"count": ...}, Reason.MALFORMED),
        ({"count": 1001}, Reason.MALFORMED),
        ({"count": -1}, Reason.MALFORMED),
        ({"count": True}, Reason.MALFORMED),
        ({"limit": "4"}, Reason.MALFORMED),
        ({"flag": 1}, Reason.MALFORMED),
        ({"digest": b"abc"}, Reason.MALFORMED),
        ({"blob": b"x" * 9}, Reason.TOO_LARGE),
        ({"blob": "xy"}, Reason.MALFORMED),
        ({"name": "toolong"}, Reason.MALFORMED),
        ({"level": 3}, Reason.MALFORMED),
        ({"level": True}, Reason.MALFORMED),
        ({"floor": "1"}, Reason.MALFORMED),
        ({"part": {"serial": "0011223344556677", "colour": "BLUE"}}, Reason.MALFORMED),
        ({"part": {"serial": "00112233445566zz", "colour": "RED"}}, Reason.BAD_IDENTIFIER),
        ({"part": [1]}, Reason.MALFORMED),
        ({"parts": [{"serial": "0011223344556677", "colour": "RED"}] * 3}, Reason.MALFORMED),
        ({"flag": True, "limit": None}, Reason.MALFORMED),  # the record's own rule
    ],
)
def test_every_rule_names_its_reason(changes: dict[str, Any], expected: Reason) -> None:
    assert refused(wire(**changes)) is expected


def test_the_tag_is_checked_before_the_keys() -> None:
    # a map of another type with other keys is another type, not an unknown key
    assert refused(wire(t="other", extra=1)) is Reason.UNKNOWN_TYPE


def test_nulls_are_taken_where_declared() -> None:
    sample = codec.decode(Sample, wire(limit=None, flag=False, floor=2))
    assert (sample.limit, sample.floor) == (None, Level.HIGH)


def test_local_construction_is_checked_with_value_errors() -> None:
    with pytest.raises(ValueError, match="count"):
        Sample(count=5000, limit=1, digest=b"abcd", blob=b"", name="")
    with pytest.raises(ValueError, match="must be a Level"):
        Sample(1, 1, b"abcd", b"", "", level=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="EUI-64"):
        Part("nope")
    with pytest.raises(ValueError, match="flagged"):
        Sample(1, None, b"abcd", b"", "", flag=True)


def test_bad_declarations_are_bugs_found_at_import() -> None:
    @dataclass(frozen=True, slots=True)
    class Undeclared:
        size: int  # no uint(...) bound

    with pytest.raises(RuntimeError, match="unsupported field"):
        codec.register(Undeclared)

    @dataclass(frozen=True, slots=True)
    class Clash:
        t: int = field(metadata=uint())

    with pytest.raises(RuntimeError, match="tag key"):
        codec.register(Clash, Tag("t", 1, Reason.UNKNOWN_TYPE))

    with pytest.raises(RuntimeError, match="twice"):
        codec.register(Part)


def test_the_fields_are_described_for_the_spec_tests() -> None:
    specs = {spec.name: spec for spec in codec.schema(Sample).fields}
    assert (specs["count"].kind, specs["count"].maximum) == ("uint", 1000)
    assert specs["limit"].optional
    assert (specs["digest"].kind, specs["digest"].length) == ("bytes", 4)
    assert (specs["level"].kind, specs["level"].enum) == ("enum", Level)
    assert (specs["parts"].kind, specs["parts"].record, specs["parts"].maximum) == (
        "array",
        Part,
        2,
    )
    assert codec.schema(Sample).order[0] == "t"
