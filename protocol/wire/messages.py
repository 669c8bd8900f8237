"""Wire messages between otad and a Communications Hub (the WAN hop).

Each message is one frozen, slotted dataclass. On the wire it is a CBOR map with text keys: the
type code under ``"t"`` and one entry per field, nothing else (SPEC.md "Messages"). Decoding is
strict: size cap first, then :func:`protocol.wire.cbor.loads`, then an exact key set and a type and
range check on every field. Any failure is a :class:`ProtocolError` with a reason code.

Direction and topic (see :mod:`protocol.wire.topics`):

* otad -> CH on ``.../down``: :class:`Offer`, :class:`Block`, :class:`Cancel`, :class:`Poll`
* CH -> otad on ``.../up``: :class:`TransferAcked`, :class:`ImageHeld`, :class:`TransferRejected`
* CH -> otad on ``.../state`` (retained; the CH's last will is :class:`HubWentOffline`):
  :class:`HubAnnounced`

Names of messages a peer sends *to us about something that happened* are past tense.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cbor2

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor
from protocol.wire.limits import (
    HASH_LEN,
    MAX_BITMAP_BYTES,
    MAX_BLOCK_BYTES,
    MAX_SIGNED_MANIFEST_BYTES,
    MAX_U16,
    MAX_U32,
    MAX_U64,
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # hard cap on anything read from the broker
MAX_TEXT = 256
MAX_HAN_DEVICES = 16


def _u(maximum: int = MAX_U64) -> Any:
    return field(metadata={"max": maximum})


def _b(length: int | None = None, maximum: int = MAX_MESSAGE_BYTES) -> Any:
    return field(metadata={"len": length, "max": maximum})


def _s(maximum: int = MAX_TEXT) -> Any:
    return field(metadata={"max": maximum})


# --------------------------------------------------------------------------- nested records


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver can take: the sender never exceeds any of these."""

    max_block: int = _u(MAX_BLOCK_BYTES)  # largest block payload it accepts, bytes
    window: int = _u(MAX_U16)  # most blocks unacknowledged at once
    buffer: int = _u(MAX_U32)  # most bytes unacknowledged at once


@dataclass(frozen=True, slots=True)
class HanDevice:
    """One device on the CH's home area network, as the CH reports it."""

    device_id: str = _s(64)  # EUI-64 as 16 hex digits
    device_type: str = _s(8)  # protocol.release.manifest.DeviceType value
    join_mode: str = _s(8)  # "CAD" or "PPMID" (DP170 Q4); "NATIVE" for ESME/GSME/...
    fw_version: int = _u(MAX_U32)
    hw_version: int = _u(MAX_U16)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base class: subclasses set ``TYPE`` (the wire code) and ``MAX_BYTES``."""

    TYPE: ClassVar[int] = 0
    MAX_BYTES: ClassVar[int] = 4096

    def encode(self) -> bytes:
        """CBOR bytes of this message."""
        return encode(self)


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """otad offers an image (or resumes offering it): the signed manifest, COSE_Sign1 bytes."""

    TYPE: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = MAX_SIGNED_MANIFEST_BYTES + 1024
    image: bytes = _b(HASH_LEN)
    manifest: bytes = _b(None, MAX_SIGNED_MANIFEST_BYTES)


@dataclass(frozen=True, slots=True)
class Block(Message):
    """One block of an image: content-addressed by (image digest, index).

    ``ack_now`` asks the receiver for an immediate ``TransferAcked`` instead of a delayed one:
    the sender sets it on the last block it can send before its window, credit or buffer is full
    (or it has nothing new left), so a sender window below the receiver's ack threshold never
    waits for the receiver's ack-delay timer (QUIC's IMMEDIATE_ACK idea)."""

    TYPE: ClassVar[int] = 2
    MAX_BYTES: ClassVar[int] = MAX_BLOCK_BYTES + 256
    image: bytes = _b(HASH_LEN)
    index: int = _u(MAX_U32)
    data: bytes = _b(None, MAX_BLOCK_BYTES)
    ack_now: bool = False


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """otad abandons a transfer; the CH discards what it holds of the image."""

    TYPE: ClassVar[int] = 3
    image: bytes = _b(HASH_LEN)
    reason: int = _u(MAX_U16)


@dataclass(frozen=True, slots=True)
class Poll(Message):
    """otad asks the CH to re-announce itself and report every transfer it holds state for."""

    TYPE: ClassVar[int] = 4
    nonce: int = _u(MAX_U64)


@dataclass(frozen=True, slots=True)
class TransferAcked(Message):
    """Selective acknowledgement: blocks ``< base`` held; bit i of ``bitmap`` (LSB first) set
    means block ``base + 1 + i`` held. ``credit`` is how many more blocks the CH will take now."""

    TYPE: ClassVar[int] = 16
    MAX_BYTES: ClassVar[int] = MAX_BITMAP_BYTES + 256
    image: bytes = _b(HASH_LEN)
    base: int = _u(MAX_U32)
    bitmap: bytes = _b(None, MAX_BITMAP_BYTES)
    credit: int = _u(MAX_U16)


@dataclass(frozen=True, slots=True)
class ImageHeld(Message):
    """The CH holds the whole image and verified it; ``sha256`` is the digest it computed."""

    TYPE: ClassVar[int] = 17
    image: bytes = _b(HASH_LEN)
    sha256: bytes = _b(HASH_LEN)


@dataclass(frozen=True, slots=True)
class TransferRejected(Message):
    """The CH refused an offer or aborted a transfer, with a :class:`Reason` code."""

    TYPE: ClassVar[int] = 18
    image: bytes = _b(HASH_LEN)
    reason: int = _u(MAX_U16)
    detail: str = _s()


@dataclass(frozen=True, slots=True)
class HubAnnounced(Message):
    """A CH says who it is, what it can take, and what is on its HAN (retained on ``state``)."""

    TYPE: ClassVar[int] = 32
    MAX_BYTES: ClassVar[int] = 16 * 1024
    guid: str = _s(16)
    fw_version: int = _u(MAX_U32)
    hw_version: int = _u(MAX_U16)
    supplier: str = _s(64)
    segment: str = _s(64)
    limits: Limits = field(default_factory=lambda: Limits(1024, 8, 64 * 1024))
    han: tuple[HanDevice, ...] = field(default=(), metadata={"max": MAX_HAN_DEVICES})


@dataclass(frozen=True, slots=True)
class HubWentOffline(Message):
    """The CH's last will, retained on ``state``: the broker lost the connection."""

    TYPE: ClassVar[int] = 33
    guid: str = _s(16)


# --------------------------------------------------------------------------- codec

_REGISTRY: dict[int, type[Message]] = {}
_FIELDS: dict[type[Any], tuple[tuple[str, Any, dict[str, Any]], ...]] = {}
_CHECKERS: dict[type[Any], dict[str, Callable[[Any], Any]]] = {}
_WIRE_ORDER: dict[type[Any], tuple[str, ...]] = {}


def _register(*classes: type[Any]) -> None:
    for cls in classes:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = tuple(
            (f.name, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)
        )
        _CHECKERS[cls] = {
            name: _checker(cls.__name__, name, hint, meta) for name, hint, meta in _FIELDS[cls]
        }
        keys = [name for name, _, _ in _FIELDS[cls]]
        _WIRE_ORDER[cls] = _canonical_order([*keys, "t"] if issubclass(cls, Message) else keys)
        if issubclass(cls, Message):
            if cls.TYPE in _REGISTRY:
                raise RuntimeError(f"duplicate message type {cls.TYPE}")
            _REGISTRY[cls.TYPE] = cls


def _to_wire(value: Any) -> Any:
    if type(value) is tuple:
        return [_to_wire(v) for v in value]
    cls = type(value)
    if cls not in _WIRE_ORDER:
        return value
    wire: dict[str, Any] = {}
    for name in _WIRE_ORDER[cls]:
        wire[name] = cls.TYPE if name == "t" else _to_wire(getattr(value, name))
    return wire


def _canonical_order(names: list[str]) -> tuple[str, ...]:
    """Keys in deterministic-CBOR map order (shorter encodings first, then bytewise): building
    each map in this order lets plain ``cbor2.dumps`` produce the canonical bytes without
    canonical mode's sort on every call (1.4 vs 3.2 us per message measured)."""
    encoded = {name: cbor.dumps(name) for name in names}
    return tuple(sorted(names, key=lambda name: (len(encoded[name]), encoded[name])))


def encode(message: Message) -> bytes:
    """Encode a message to CBOR (type code under ``"t"``), in deterministic encoding."""
    return bytes(cbor2.dumps(_to_wire(message)))


def decode(data: bytes, *, max_size: int = MAX_MESSAGE_BYTES) -> Message:
    """Strictly decode one message. Raises :class:`ProtocolError` and nothing else."""
    raw = cbor.loads(data, max_size=min(max_size, MAX_MESSAGE_BYTES), max_depth=4)
    if not isinstance(raw, dict):
        raise ProtocolError(Reason.MALFORMED, "message is not a map")
    type_code = raw.pop("t", None)
    if type(type_code) is not int:
        raise ProtocolError(Reason.MALFORMED, "message has no integer type 't'")
    cls = _REGISTRY.get(type_code)
    if cls is None:
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"message type {type_code}")
    if len(data) > cls.MAX_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, f"{cls.__name__} of {len(data)} bytes")
    message = _from_wire(cls, raw)
    assert isinstance(message, Message)
    return message


def decode_as(cls: type[_M], data: bytes) -> _M:
    """Decode and require a particular message class (``WRONG_TYPE`` is ``UNKNOWN_TYPE``)."""
    message = decode(data, max_size=cls.MAX_BYTES)
    if not isinstance(message, cls):
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"expected {cls.__name__}")
    return message


_M = typing.TypeVar("_M", bound=Message)


def _from_wire(cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ProtocolError(Reason.MALFORMED, f"{cls.__name__} is not a map")
    checkers = _CHECKERS[cls]
    if len(raw) != len(checkers) or not all(k in checkers for k in raw):
        unknown = [k for k in raw if k not in checkers]
        if unknown:
            raise ProtocolError(Reason.UNKNOWN_KEY, f"{cls.__name__} keys {unknown!r}"[:200])
        missing = [k for k in checkers if k not in raw]
        raise ProtocolError(Reason.MALFORMED, f"{cls.__name__} lacks {missing!r}")
    return cls(**{name: check(raw[name]) for name, check in checkers.items()})


def _checker(owner: str, name: str, hint: Any, meta: dict[str, Any]) -> Any:
    """Build the validator of one field once, at import, so decoding does no type dispatch."""
    where = f"{owner}.{name}"
    if hint is int:
        maximum = meta.get("max", MAX_U64)

        def check_int(value: Any) -> int:
            if type(value) is not int or not 0 <= value <= maximum:
                raise ProtocolError(Reason.MALFORMED, f"{where} is not an integer in range")
            return value

        return check_int
    if hint is bytes:
        length = meta.get("len")
        longest = meta.get("max", MAX_MESSAGE_BYTES)

        def check_bytes(value: Any) -> bytes:
            if type(value) is not bytes:
                raise ProtocolError(Reason.MALFORMED, f"{where} is not a byte string")
            if length is not None and len(value) != length:
                raise ProtocolError(Reason.MALFORMED, f"{where} must be {length} bytes")
            if len(value) > longest:
                raise ProtocolError(Reason.TOO_LARGE, f"{where} longer than {longest}")
            return value

        return check_bytes
    if hint is str:
        longest = meta.get("max", MAX_TEXT)

        def check_str(value: Any) -> str:
            if type(value) is not str or len(value) > longest:
                raise ProtocolError(Reason.MALFORMED, f"{where} is not text of bounded length")
            return value

        return check_str
    if hint is bool:

        def check_bool(value: Any) -> bool:
            if type(value) is not bool:
                raise ProtocolError(Reason.MALFORMED, f"{where} is not a boolean")
            return value

        return check_bool
    if typing.get_origin(hint) is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        most = meta.get("max", 64)

        def check_tuple(value: Any) -> tuple[Any, ...]:
            if not isinstance(value, (list, tuple)) or len(value) > most:
                raise ProtocolError(Reason.MALFORMED, f"{where} is not a bounded array")
            return tuple(_from_wire(item_hint, item) for item in value)

        return check_tuple
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        record = hint

        def check_record(value: Any) -> Any:
            return _from_wire(record, value)

        return check_record
    raise RuntimeError(f"unsupported field type {hint!r} for {where}")  # a bug, not input


_register(Limits, HanDevice)
_register(Offer, Block, Cancel, Poll, TransferAcked, ImageHeld, TransferRejected)
_register(HubAnnounced, HubWentOffline)
