"""Wire messages between otad and a Communications Hub (the WAN hop): SPEC §3.

Each message is one frozen, slotted dataclass, encoded by :mod:`protocol.wire.codec`: a CBOR map
with text keys, the type code under ``"t"`` and one entry per field, nothing else. Decoding
(:func:`decode`) is strict, in the order SPEC §3 gives: the size caps, the CBOR policy of
:func:`protocol.wire.cbor.loads`, then the schema. Any failure is a :class:`ProtocolError`.

Direction and topic (see :mod:`protocol.wire.topics`):

* otad -> CH on ``.../down``: :class:`Offer`, :class:`Block`, :class:`Cancel`, :class:`Poll`;
  :class:`Refused`, :class:`Activate`, :class:`ReadVersion` (protocol 1.1, only to a CH that
  declared it)
* CH -> otad on ``.../up``: :class:`TransferAcked`, :class:`ImageHeld`, :class:`TransferRejected`;
  :class:`DeviceTransferReported`, :class:`DeviceReported` (1.1: the HAN carried over the WAN,
  SPEC §8.10)
* CH -> otad on ``.../state`` (retained; the CH's last will is :class:`HubWentOffline`):
  :class:`HubAnnounced` (protocol 1.0) or :class:`HubAnnouncedVersioned` (1.1 and later)

Minor versions of protocol 1 (SPEC §5): a CH declares the highest one it implements by announcing
itself with :class:`HubAnnouncedVersioned`; :func:`minor_version` reads it from either form.

Names of messages a peer sends *to us about something that happened* are past tense.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor, codec, layouts
from protocol.wire.codec import array, byte_string, eui64, text, uint
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.limits import (
    HASH_LEN,
    MAX_BITMAP_BYTES,
    MAX_BLOCK_BYTES,
    MAX_SIGNED_MANIFEST_BYTES,
    MAX_U8,
    MAX_U16,
    MAX_U32,
    MAX_U64,
)

MAX_MESSAGE_BYTES = codec.DEFAULT_MAX_BYTES  # hard cap on anything read from the broker
MAX_TEXT = 256
MAX_HAN_DEVICES = 16
MAX_DEVICE_RECORD_BYTES = 512
"""The largest device activation record a message carries: a signed one (SPEC §8.7)."""
MINOR_VERSION = 1
"""The highest minor version of protocol 1 this code implements (SPEC §5): 1.1."""


# --------------------------------------------------------------------------- nested records


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver can take: the sender never exceeds any of these."""

    max_block: int = field(metadata=uint(MAX_BLOCK_BYTES))  # largest block payload it takes
    window: int = field(metadata=uint(MAX_U16))  # most blocks unacknowledged at once
    buffer: int = field(metadata=uint(MAX_U32))  # most bytes unacknowledged at once


@dataclass(frozen=True, slots=True)
class HanDevice:
    """One device on the CH's home area network, as the CH reports it.

    ``device_type`` and ``join_mode`` may be given as their plain strings (``"B2"``, ``"CAD"``):
    they are taken as the members, and an unknown one is a ``ValueError``."""

    device_id: str = field(metadata=eui64())
    device_type: DeviceType
    join_mode: JoinMode  # CAD or PPMID for Alt HAN bridges (DP170 Q4), NATIVE for the others
    fw_version: int = field(metadata=uint(MAX_U32))
    hw_version: int = field(metadata=uint(MAX_U16))

    def __post_init__(self) -> None:
        if type(self.device_type) is not DeviceType:
            object.__setattr__(self, "device_type", DeviceType(self.device_type))
        if type(self.join_mode) is not JoinMode:
            object.__setattr__(self, "join_mode", JoinMode(self.join_mode))
        check_han_device(self.device_id, self.device_type, self.join_mode)


#: Alt HAN bridges, the only HAN devices that join as a CAD or a PPMID (SPEC §3, DP170 Q4).
ALT_HAN_BRIDGES: frozenset[DeviceType] = frozenset(
    {DeviceType.B1, DeviceType.B2, DeviceType.B3, DeviceType.B4}
)


def check_han_device(device_id: str, device_type: DeviceType, join_mode: JoinMode) -> None:
    """Raise ``ValueError`` (``MALFORMED`` on the wire) unless one HAN entry is coherent (SPEC §3):
    never the CH itself, and a join mode its type can have (``CAD``/``PPMID`` for B1-B4,
    ``NATIVE`` for every other type)."""
    if device_type is DeviceType.CH:
        raise ValueError(f"HAN device {device_id} has type CH: the CH does not list itself")
    allowed = (
        (JoinMode.CAD, JoinMode.PPMID) if device_type in ALT_HAN_BRIDGES else (JoinMode.NATIVE,)
    )
    if join_mode not in allowed:
        raise ValueError(
            f"HAN device {device_id}: a {device_type.value} joins "
            f"{' or '.join(m.value for m in allowed)}, not {join_mode.value}"
        )


class DeviceTransferState(StrEnum):
    """Where a HAN transfer of an image to one device stands, as its CH reports it (SPEC §8.10;
    the outcomes are GBCS's firmware transfer alert's)."""

    TRANSFERRING = "transferring"  # blocks flowing over the HAN (bytes_held of size)
    HELD = "held"  # the device holds the whole image and verified it
    REFUSED = "refused"  # the device refused the manifest (reason: the device's check)
    HARDWARE_MISMATCH = "hardware_mismatch"  # the device's hardware version is out of range
    DISCARDED = "discarded"  # the device discarded the image it held (e.g. IMAGE_HASH)
    FAILED = "failed"  # the HAN transfer failed (reason)
    TIMED_OUT = "timed_out"  # the device stopped asking for blocks


class Evidence(StrEnum):
    """Who produced a record a :class:`DeviceReported` relays (SPEC §8.10)."""

    DEVICE = "device"  # relayed verbatim from the device
    CH = "ch"  # the CH's own observation (a CAD bridge's reboot and the version it then reports)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base class: each subclass sets ``TYPE`` (its wire code ``t``), ``QOS`` (the MQTT QoS it
    is published with: SPEC §1-2, 0 for blocks and acknowledgements, which the transfer repairs
    and repeats itself, 1 for control messages and reports) and, when not 4096, ``MAX_BYTES``
    (its size cap). SPEC §3's table lists all three per message."""

    TYPE: ClassVar[int] = 0
    QOS: ClassVar[int]
    MAX_BYTES: ClassVar[int] = 4096

    def encode(self) -> bytes:
        """The deterministic CBOR bytes of this message."""
        return codec.encode(self)

    @classmethod
    def decode(cls: type[_M], data: bytes) -> _M:
        """Strictly decode a message of this class (``Message.decode``: of any class).

        Raises :class:`ProtocolError` and nothing else; a message of another class is
        ``UNKNOWN_TYPE``."""
        message = decode(data, max_size=cls.MAX_BYTES if cls is not Message else MAX_MESSAGE_BYTES)
        if not isinstance(message, cls):
            raise ProtocolError(Reason.UNKNOWN_TYPE, f"expected {cls.__name__}")
        return message


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """otad offers an image (or resumes offering it): the signed manifest, COSE_Sign1 bytes."""

    TYPE: ClassVar[int] = 1
    QOS: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = MAX_SIGNED_MANIFEST_BYTES + 1024
    image: bytes = field(metadata=byte_string(HASH_LEN))
    manifest: bytes = field(metadata=byte_string(None, MAX_SIGNED_MANIFEST_BYTES))


@dataclass(frozen=True, slots=True)
class Block(Message):
    """One block of an image: content-addressed by (image digest, index).

    ``ack_now`` asks the receiver for an immediate ``TransferAcked`` instead of a delayed one:
    the sender sets it on the last block it can send before its window, credit or buffer is full
    (or it has nothing new left), so a sender window below the receiver's ack threshold never
    waits for the receiver's ack-delay timer (QUIC's IMMEDIATE_ACK idea)."""

    TYPE: ClassVar[int] = 2
    QOS: ClassVar[int] = 0
    MAX_BYTES: ClassVar[int] = MAX_BLOCK_BYTES + 256
    image: bytes = field(metadata=byte_string(HASH_LEN))
    index: int = field(metadata=uint(MAX_U32))
    data: bytes = field(metadata=byte_string(None, MAX_BLOCK_BYTES))
    ack_now: bool = False


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """otad abandons a transfer; the CH discards what it holds of the image."""

    TYPE: ClassVar[int] = 3
    QOS: ClassVar[int] = 1
    image: bytes = field(metadata=byte_string(HASH_LEN))
    reason: int = field(metadata=uint(MAX_U16))


@dataclass(frozen=True, slots=True)
class Poll(Message):
    """otad asks the CH to re-announce itself and report every transfer it holds state for."""

    TYPE: ClassVar[int] = 4
    QOS: ClassVar[int] = 1
    nonce: int = field(metadata=uint(MAX_U64))


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """otad refused a message of the CH, and says which and why (protocol 1.1, SPEC §5; sent
    only to a CH that declared minor version 1 or later). ``of`` is the refused message's type
    code, 0 when it did not decode that far; ``reason`` a :class:`Reason` code."""

    TYPE: ClassVar[int] = 5
    QOS: ClassVar[int] = 1
    of: int = field(metadata=uint(MAX_U8))
    reason: int = field(metadata=uint(MAX_U16))
    detail: str = field(metadata=text())


@dataclass(frozen=True, slots=True)
class Activate(Message):
    """otad asks the CH to relay a signed ActivationCommand (SPEC §8.7, a COSE_Sign1 of at most
    512 bytes) verbatim to the HAN device ``device_id``, or to act on it itself when
    ``device_id`` is the CH's own GUID (protocol 1.1, SPEC §8.10)."""

    TYPE: ClassVar[int] = 6
    QOS: ClassVar[int] = 1
    device_id: str = field(metadata=eui64())
    command: bytes = field(metadata=byte_string(None, MAX_DEVICE_RECORD_BYTES))


@dataclass(frozen=True, slots=True)
class ReadVersion(Message):
    """otad asks which firmware a device runs (the read-back of SPEC §8.10, after a lost
    activation response); the CH answers with a :class:`DeviceReported` carrying a
    ``VersionReport``. ``nonce`` is opaque, as :class:`Poll`'s."""

    TYPE: ClassVar[int] = 7
    QOS: ClassVar[int] = 1
    device_id: str = field(metadata=eui64())
    nonce: int = field(metadata=uint(MAX_U64))


@dataclass(frozen=True, slots=True)
class TransferAcked(Message):
    """Selective acknowledgement: blocks ``< base`` held; bit i of ``bitmap`` (LSB first) set
    means block ``base + 1 + i`` held. ``credit`` is how many more blocks the CH will take now."""

    TYPE: ClassVar[int] = 16
    QOS: ClassVar[int] = 0
    MAX_BYTES: ClassVar[int] = MAX_BITMAP_BYTES + 256
    image: bytes = field(metadata=byte_string(HASH_LEN))
    base: int = field(metadata=uint(MAX_U32))
    bitmap: bytes = field(metadata=byte_string(None, MAX_BITMAP_BYTES))
    credit: int = field(metadata=uint(MAX_U16))

    def encode(self) -> bytes:
        """The deterministic CBOR bytes (from the fixed layout: :mod:`protocol.wire.layouts`)."""
        return layouts.transfer_acked_bytes(self.image, self.base, self.bitmap, self.credit)


@dataclass(frozen=True, slots=True)
class ImageHeld(Message):
    """The CH holds the whole image and verified it; ``sha256`` is the digest it computed."""

    TYPE: ClassVar[int] = 17
    QOS: ClassVar[int] = 1
    image: bytes = field(metadata=byte_string(HASH_LEN))
    sha256: bytes = field(metadata=byte_string(HASH_LEN))


@dataclass(frozen=True, slots=True)
class TransferRejected(Message):
    """The CH refused an offer or aborted a transfer, with a :class:`Reason` code."""

    TYPE: ClassVar[int] = 18
    QOS: ClassVar[int] = 1
    image: bytes = field(metadata=byte_string(HASH_LEN))
    reason: int = field(metadata=uint(MAX_U16))
    detail: str = field(metadata=text())


@dataclass(frozen=True, slots=True)
class DeviceTransferReported(Message):
    """The CH reports how its HAN transfer of ``image`` to ``device_id`` stands (protocol 1.1,
    SPEC §8.10): ``bytes_held`` of ``size`` while ``transferring`` (rate-limited by the CH), the
    outcome otherwise, ``reason`` a :class:`Reason` code (0: none)."""

    TYPE: ClassVar[int] = 19
    QOS: ClassVar[int] = 1
    image: bytes = field(metadata=byte_string(HASH_LEN))
    device_id: str = field(metadata=eui64())
    state: DeviceTransferState
    bytes_held: int = field(metadata=uint(MAX_U32))
    size: int = field(metadata=uint(MAX_U32))
    reason: int = field(metadata=uint(MAX_U16))

    def __post_init__(self) -> None:
        if type(self.state) is not DeviceTransferState:
            object.__setattr__(self, "state", DeviceTransferState(self.state))


@dataclass(frozen=True, slots=True)
class DeviceReported(Message):
    """The CH relays a device activation record of SPEC §8.7 (an ActivationResponse,
    ActivationScheduled, ActivationCancelled or VersionReport CBOR map, or a signed
    ActivationAlert COSE_Sign1) about ``device_id``, verbatim (protocol 1.1, SPEC §8.10).
    ``evidence`` says whether the device produced it or the CH observed it."""

    TYPE: ClassVar[int] = 20
    QOS: ClassVar[int] = 1
    device_id: str = field(metadata=eui64())
    record: bytes = field(metadata=byte_string(None, MAX_DEVICE_RECORD_BYTES))
    evidence: Evidence

    def __post_init__(self) -> None:
        if type(self.evidence) is not Evidence:
            object.__setattr__(self, "evidence", Evidence(self.evidence))


@dataclass(frozen=True, slots=True)
class HubAnnounced(Message):
    """A CH says who it is, what it can take, and what is on its HAN (retained on ``state``)."""

    TYPE: ClassVar[int] = 32
    QOS: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = 16 * 1024
    guid: str = field(metadata=text(16))
    fw_version: int = field(metadata=uint(MAX_U32))
    hw_version: int = field(metadata=uint(MAX_U16))
    supplier: str = field(metadata=text(64))
    segment: str = field(metadata=text(64))
    limits: Limits = field(default_factory=lambda: Limits(1024, 8, 64 * 1024))
    han: tuple[HanDevice, ...] = field(default=(), metadata=array(MAX_HAN_DEVICES))


@dataclass(frozen=True, slots=True)
class HubAnnouncedVersioned(HubAnnounced):
    """A :class:`HubAnnounced` that also declares ``minor``, the highest minor version of
    protocol 1 the CH implements (SPEC §5). A 1.0 CH sends the plain :class:`HubAnnounced`."""

    TYPE: ClassVar[int] = 34
    minor: int = field(default=MINOR_VERSION, metadata=uint(MAX_U8))


def minor_version(announcement: HubAnnounced) -> int:
    """The minor version of protocol 1 a CH declared: 0 for a plain :class:`HubAnnounced`."""
    return announcement.minor if isinstance(announcement, HubAnnouncedVersioned) else 0


def declaring_minor(announcement: HubAnnounced, minor: int) -> HubAnnounced:
    """``announcement`` as a CH of minor version ``minor`` sends it: the plain
    :class:`HubAnnounced` for 0, else a :class:`HubAnnouncedVersioned` with the same fields."""
    base = {f.name: getattr(announcement, f.name) for f in fields(HubAnnounced)}
    if minor == 0:
        return HubAnnounced(**base)
    return HubAnnouncedVersioned(**base, minor=minor)


def peek_type(data: bytes) -> int:
    """The type code ``t`` a payload claims, if it is a CBOR map with an integer ``t`` within a
    byte, else 0: what a :class:`Refused` names as ``of`` when the message itself was refused."""
    try:
        raw = cbor.loads(data, max_size=MAX_MESSAGE_BYTES, max_depth=4)
    except ProtocolError:
        return 0
    type_code = raw.get("t") if isinstance(raw, dict) else None
    return type_code if type(type_code) is int and 0 <= type_code <= MAX_U8 else 0


@dataclass(frozen=True, slots=True)
class HubWentOffline(Message):
    """The CH's last will, retained on ``state``: the broker lost the connection."""

    TYPE: ClassVar[int] = 33
    QOS: ClassVar[int] = 1
    guid: str = field(metadata=text(16))


# --------------------------------------------------------------------------- codec

_M = typing.TypeVar("_M", bound=Message)
_REGISTRY: dict[int, type[Message]] = {}
#: Every message class by its type code ``t`` (SPEC §3's table).
MESSAGE_TYPES: Mapping[int, type[Message]] = MappingProxyType(_REGISTRY)


def decode(data: bytes, *, max_size: int = MAX_MESSAGE_BYTES) -> Message:
    """Strictly decode one message of any type. Raises :class:`ProtocolError` and nothing else.

    A ``Block`` in its deterministic layout is read in place (:func:`protocol.wire.layouts.
    read_block`: the same checks, without re-encoding its payload); anything else goes through
    the general path below, which accepts or refuses it with the precise reason."""
    if type(data) is bytes and len(data) <= max_size:
        fields = layouts.read_block(data)
        if fields is not None:
            return Block(*fields)
    raw = cbor.loads(data, max_size=min(max_size, MAX_MESSAGE_BYTES), max_depth=4)
    if not isinstance(raw, dict):
        raise ProtocolError(Reason.MALFORMED, "message is not a map")
    type_code = raw.get("t")
    if type(type_code) is not int:
        raise ProtocolError(Reason.MALFORMED, "message has no integer type 't'")
    cls = _REGISTRY.get(type_code)
    if cls is None:
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"message type {type_code}")
    if len(data) > cls.MAX_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, f"{cls.__name__} of {len(data)} bytes")
    return codec.decode(cls, raw)


codec.register(Limits)
codec.register(HanDevice)
for _cls in (
    Offer,
    Block,
    Cancel,
    Poll,
    Refused,
    Activate,
    ReadVersion,
    TransferAcked,
    ImageHeld,
    TransferRejected,
    DeviceTransferReported,
    DeviceReported,
    HubAnnounced,
    HubWentOffline,
    HubAnnouncedVersioned,
):
    if _cls.TYPE in _REGISTRY:
        raise RuntimeError(f"duplicate message type {_cls.TYPE}")
    if getattr(_cls, "QOS", None) not in (0, 1):
        raise RuntimeError(f"{_cls.__name__} declares no QoS of 0 or 1")
    codec.register(_cls, codec.Tag("t", _cls.TYPE, Reason.UNKNOWN_TYPE))
    _REGISTRY[_cls.TYPE] = _cls
del _cls
