"""HAN frames: the ZigBee OTA Upgrade cluster (0x0019) commands, plus the manifest extension.

Every frame is a ZCL frame as a real ZigBee stack puts it in an APS payload (all integers
little-endian)::

    ZCL header
      u8   frame control   bits 0-1 frame type (00 global, 01 cluster specific)
                           bit 2    manufacturer specific (then the u16 below is present)
                           bit 3    direction (0 client->server, 1 server->client)
                           bit 4    disable default response
                           bits 5-7 reserved, must be 0
      u16  manufacturer code       only with bit 2
      u8   transaction sequence number
      u8   command id
    payload (per command, below)

Standard cluster commands (ZCL, OTA Upgrade cluster):

====  ======  ==========================  ================================================
 id   dir     class                       payload
====  ======  ==========================  ================================================
0x00  s->c    ImageNotify                 u8 payload type (0-3), u8 query jitter (1-100),
                                          [u16 mfr code, [u16 image type, [u32 version]]]
0x01  c->s    QueryNextImageRequest       u8 field control (bit0: hw version present),
                                          u16 mfr, u16 image type, u32 current version,
                                          [u16 hardware version]
0x02  s->c    QueryNextImageResponse      u8 status SUCCESS, u16 mfr, u16 image type,
                                          u32 file version, u32 image size
              QueryNextImageRefused       u8 status (NO_IMAGE_AVAILABLE, NOT_AUTHORIZED)
0x03  c->s    ImageBlockRequest           u8 field control (bit0: IEEE address present,
                                          bit1: minimum block period present), u16 mfr,
                                          u16 image type, u32 version, u32 file offset,
                                          u8 max data size, [u64 IEEE address],
                                          [u16 minimum block period]
0x05  s->c    ImageBlockResponse          u8 status SUCCESS, u16 mfr, u16 image type,
                                          u32 version, u32 file offset, u8 data size, data
              ImageBlockWait              u8 status WAIT_FOR_DATA, u32 current time,
                                          u32 request time, u16 minimum block period
              ImageBlockAbort             u8 status (ABORT, NO_IMAGE_AVAILABLE, ...)
0x06  c->s    UpgradeEndRequest           u8 status, u16 mfr, u16 image type, u32 version
0x07  s->c    UpgradeEndResponse          u16 mfr, u16 image type, u32 version,
                                          u32 current time, u32 upgrade time
====  ======  ==========================  ================================================

Manufacturer-specific extension (bit 2 set; the header's manufacturer code is the extension's
owner, :data:`EXTENSION_MANUFACTURER_CODE` unless configured, never the image's vendor), carrying
the COSE_Sign1 manifest to the device before any image byte, by the same client-pulled
offset/length mechanics as image blocks (SPEC §8.2):

====  ======  ==========================  ================================================
0x00  c->s    ManifestBlockRequest        u16 image mfr, u16 image type, u32 version,
                                          u32 offset, u8 max data size,
                                          u16 minimum block period
0x01  s->c    ManifestBlockResponse       u8 status SUCCESS, u16 image mfr, u16 image type,
                                          u32 version, u32 manifest size, u32 offset,
                                          u8 data size, data
              ManifestBlockWait           u8 status WAIT_FOR_DATA, u32 current time,
                                          u32 request time, u16 minimum block period
              ManifestBlockAbort          u8 status (ABORT, NO_IMAGE_AVAILABLE, ...)
====  ======  ==========================  ================================================

and the global Default Response (frame type 00, command 0x0B: u8 command id, u8 status), which
a stack sends for a frame it could not act on (MALFORMED_COMMAND, UNSUP_CLUSTER_COMMAND...).

Times (current/request/upgrade time) are ZigBee UTCTime (:func:`zigbee_time`); a receiver uses
only their differences, as ZCL prescribes for devices without a synchronised clock. The
MinimumBlockPeriod's unit (milliseconds, or seconds as SE 1.2b) is a property of each client
(:class:`BlockPeriodUnit`), not of the frame.

:func:`decode_frame` follows ZCL's forward compatibility for the standard commands: bytes after a
command's last field and reserved bits of the frame control and field controls are ignored (and
counted in a :class:`Tolerated`). Everything else is strict: known status values, frame type
0 or 1, a known command of a known manufacturer code, at most :data:`MAX_FRAME_BYTES`; and the
manifest extension, which carries signed data, takes no trailing byte. It raises
:class:`~protocol.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import ClassVar

from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import MAX_U8, MAX_U16, MAX_U32, MAX_U64

CLUSTER_OTA_UPGRADE = 0x0019
MAX_FRAME_BYTES = 127  # an IEEE 802.15.4 PHY frame; an APS payload is always smaller
MIN_BLOCK_DATA = 40  # the range a HAN server may cap its block data to (see ServerConfig)
MAX_BLOCK_DATA = 63  # largest block payload without APS fragmentation (SiLabs)
MAX_QUERY_JITTER = 100
UPGRADE_TIME_WAIT = 0xFFFF_FFFF  # "wait for the server's activation command"
#: The ZigBee epoch, 2000-01-01 00:00:00 UTC, in Unix seconds: ZCL UTCTime counts from it.
ZIGBEE_EPOCH = 946_684_800
#: Default manufacturer code of the ManifestBlock extension's header: the CSA test vendor code
#: 0xFFF1 (no company's, so no vendor's own OTA-cluster commands can collide with ours); a
#: deployment configures its own CSA-assigned code on its CHs and devices (SPEC §8.2).
EXTENSION_MANUFACTURER_CODE = 0xFFF1

FC_FRAME_TYPE_MASK = 0x03
FC_GLOBAL = 0x00
FC_CLUSTER_SPECIFIC = 0x01
FC_MANUFACTURER_SPECIFIC = 0x04
FC_SERVER_TO_CLIENT = 0x08
FC_DISABLE_DEFAULT_RESPONSE = 0x10
FC_RESERVED = 0xE0

CMD_DEFAULT_RESPONSE = 0x0B  # global command


class BlockPeriodUnit(Enum):
    """The unit a client reads MinimumBlockPeriod in: ZCL 095264r23 §6.7.10 says milliseconds,
    SE 1.2b (15-0324-02) §11.10.10 says seconds; SiLabs' client makes it a build option."""

    MILLISECONDS = "ms"
    SECONDS = "s"

    @property
    def ms(self) -> int:
        """Milliseconds in one unit."""
        return 1 if self is BlockPeriodUnit.MILLISECONDS else 1000

    def to_wire(self, period_ms: int) -> int:
        """``period_ms`` in this unit, rounded up (never shorter), capped to a u16."""
        return min(-(-period_ms // self.ms), MAX_U16)

    def from_wire(self, value: int) -> int:
        """A MinimumBlockPeriod ``value`` in this unit, in milliseconds."""
        return value * self.ms


class Tolerated:
    """What :func:`decode_frame` accepted and ignored under ZCL's forward-compatibility rules:
    how many frames had bytes after their last field, and how many had reserved bits set
    (frame control or a field control). Mutable; a server or client owns one."""

    __slots__ = ("reserved_bits", "trailing_bytes")

    def __init__(self) -> None:
        self.trailing_bytes = 0
        self.reserved_bits = 0


class ZclStatus(IntEnum):
    """ZCL status codes used by the OTA Upgrade cluster."""

    SUCCESS = 0x00
    FAILURE = 0x01
    NOT_AUTHORIZED = 0x7E
    MALFORMED_COMMAND = 0x80
    UNSUP_CLUSTER_COMMAND = 0x81
    UNSUP_GENERAL_COMMAND = 0x82
    UNSUP_MANUF_CLUSTER_COMMAND = 0x83
    INVALID_FIELD = 0x85
    ABORT = 0x95
    INVALID_IMAGE = 0x96
    WAIT_FOR_DATA = 0x97
    NO_IMAGE_AVAILABLE = 0x98
    REQUIRE_MORE_IMAGE = 0x99


class Command(IntEnum):
    """OTA Upgrade cluster command ids (standard, and the manufacturer-specific extension)."""

    IMAGE_NOTIFY = 0x00
    QUERY_NEXT_IMAGE_REQUEST = 0x01
    QUERY_NEXT_IMAGE_RESPONSE = 0x02
    IMAGE_BLOCK_REQUEST = 0x03
    IMAGE_BLOCK_RESPONSE = 0x05
    UPGRADE_END_REQUEST = 0x06
    UPGRADE_END_RESPONSE = 0x07


class MfrCommand(IntEnum):
    """Manufacturer-specific command ids (their own id space: only with the mfr-specific bit)."""

    MANIFEST_BLOCK_REQUEST = 0x00
    MANIFEST_BLOCK_RESPONSE = 0x01


_UPGRADE_END_STATUSES = frozenset(
    {ZclStatus.SUCCESS, ZclStatus.ABORT, ZclStatus.INVALID_IMAGE, ZclStatus.REQUIRE_MORE_IMAGE}
)
_REFUSAL_STATUSES = frozenset({ZclStatus.NO_IMAGE_AVAILABLE, ZclStatus.NOT_AUTHORIZED})
_BLOCK_ABORT_STATUSES = frozenset(
    {
        ZclStatus.ABORT,
        ZclStatus.NO_IMAGE_AVAILABLE,
        ZclStatus.UNSUP_CLUSTER_COMMAND,
        ZclStatus.MALFORMED_COMMAND,
        ZclStatus.NOT_AUTHORIZED,
        ZclStatus.INVALID_FIELD,
    }
)


# --------------------------------------------------------------------------- time


def zigbee_time(now: UnixTime) -> int:
    """``now`` as ZCL UTCTime: the u32 whole seconds since 2000-01-01 00:00 UTC that every time
    field of a HAN frame carries (SPEC §8.1).

    Raises ``ValueError`` for an instant UTCTime cannot hold: before 2000, or from 2136 on
    (``0xFFFFFFFF`` is never a time; as an upgrade time it means "wait for the activation
    command", :data:`UPGRADE_TIME_WAIT`). A monotonic clock passed where wall time belongs is
    usually such an instant, so the mistake shows at once."""
    seconds = int(now) - ZIGBEE_EPOCH
    if not 0 <= seconds < UPGRADE_TIME_WAIT:
        raise ValueError(f"{now!r} is not a wall-clock time ZigBee UTCTime can carry")
    return seconds


def unix_time(zigbee: int) -> UnixTime:
    """A ZCL UTCTime field's value as Unix seconds: the inverse of :func:`zigbee_time`."""
    return UnixTime(float(ZIGBEE_EPOCH + zigbee))


# --------------------------------------------------------------------------- helpers


def _check(name: str, value: int, top: int, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
        raise ValueError(f"{name}={value!r} is not an integer in {low}..{top}")


def _check_data(data: bytes) -> None:
    if not isinstance(data, bytes) or len(data) > MAX_U8:
        raise ValueError("data must be bytes of at most 255")


class _Reader:
    """Cursor over a frame payload; every shortfall is ``ProtocolError(MALFORMED)``."""

    __slots__ = ("data", "pos", "reserved", "trailing")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos
        self.trailing = 0  # bytes after the last field, set by end()
        self.reserved = False  # a field control had reserved bits set

    def take(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProtocolError(Reason.MALFORMED, "truncated frame")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def u8(self) -> int:
        return self.take("<B")[0]

    def u16(self) -> int:
        return self.take("<H")[0]

    def u32(self) -> int:
        return self.take("<I")[0]

    def u64(self) -> int:
        return self.take("<Q")[0]

    def data_u8(self) -> bytes:
        length = self.u8()
        if self.pos + length > len(self.data):
            raise ProtocolError(Reason.MALFORMED, "data size longer than the frame")
        out = self.data[self.pos : self.pos + length]
        self.pos += length
        return out

    def end(self) -> None:
        """The command's fields are read: what follows is a later ZCL revision's, ignored."""
        self.trailing = len(self.data) - self.pos

    def end_strict(self) -> None:
        """The command's fields are read and nothing may follow (the manifest extension)."""
        if self.pos != len(self.data):
            raise ProtocolError(Reason.MALFORMED, f"{len(self.data) - self.pos} trailing bytes")


def _status(value: int, allowed: frozenset[ZclStatus]) -> ZclStatus:
    if value not in allowed:
        raise ProtocolError(Reason.MALFORMED, f"status 0x{value:02x} not allowed here")
    return ZclStatus(value)


def _header(seq: int, command: int, *, to_client: bool, manufacturer: int | None) -> bytes:
    _check("seq", seq, MAX_U8)
    fc = FC_CLUSTER_SPECIFIC
    if to_client:
        fc |= FC_SERVER_TO_CLIENT | FC_DISABLE_DEFAULT_RESPONSE
    if manufacturer is None:
        return struct.pack("<BBB", fc, seq, command)
    _check("manufacturer_code", manufacturer, MAX_U16)
    return struct.pack("<BHBB", fc | FC_MANUFACTURER_SPECIFIC, manufacturer, seq, command)


# --------------------------------------------------------------------------- standard frames


@dataclass(frozen=True, slots=True)
class ImageNotify:
    """Server -> client: a new image is available (payload type = how many ids are present)."""

    COMMAND: ClassVar[int] = Command.IMAGE_NOTIFY
    seq: int
    query_jitter: int  # 1-100: the client queries only if its random draw 1..100 is <= this
    manufacturer_code: int | None = None
    image_type: int | None = None
    file_version: int | None = None

    @property
    def payload_type(self) -> int:
        """0: jitter only; 1: + manufacturer code; 2: + image type; 3: + file version."""
        ids = (self.manufacturer_code, self.image_type, self.file_version)
        n = 0
        while n < 3 and ids[n] is not None:
            n += 1
        return n

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("query_jitter", self.query_jitter, MAX_QUERY_JITTER, 1)
        ptype = self.payload_type
        ids = (self.manufacturer_code, self.image_type, self.file_version)
        if any(v is not None for v in ids[ptype:]):
            raise ValueError("image ids must be given as a prefix: mfr, then type, then version")
        out = _header(self.seq, self.COMMAND, to_client=True, manufacturer=None)
        out += struct.pack("<BB", ptype, self.query_jitter)
        if self.manufacturer_code is not None:
            _check("manufacturer_code", self.manufacturer_code, MAX_U16)
            out += struct.pack("<H", self.manufacturer_code)
        if self.image_type is not None:
            _check("image_type", self.image_type, MAX_U16)
            out += struct.pack("<H", self.image_type)
        if self.file_version is not None:
            _check("file_version", self.file_version, MAX_U32)
            out += struct.pack("<I", self.file_version)
        return out

    @classmethod
    def _decode(cls, seq: int, r: _Reader) -> ImageNotify:
        ptype, jitter = r.u8(), r.u8()
        if ptype > 3:
            raise ProtocolError(Reason.MALFORMED, f"ImageNotify payload type {ptype}")
        if not 1 <= jitter <= MAX_QUERY_JITTER:
            raise ProtocolError(Reason.MALFORMED, f"query jitter {jitter} not in 1..100")
        mfr = r.u16() if ptype >= 1 else None
        itype = r.u16() if ptype >= 2 else None
        version = r.u32() if ptype >= 3 else None
        r.end()
        return cls(seq, jitter, mfr, itype, version)


@dataclass(frozen=True, slots=True)
class QueryNextImageRequest:
    """Client -> server: "I run this version; is there another image for me?"."""

    COMMAND: ClassVar[int] = Command.QUERY_NEXT_IMAGE_REQUEST
    seq: int
    manufacturer_code: int
    image_type: int
    file_version: int  # the version the client runs now
    hardware_version: int | None = None

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        out = _header(self.seq, self.COMMAND, to_client=False, manufacturer=None)
        fc = 0x01 if self.hardware_version is not None else 0x00
        out += struct.pack("<BHHI", fc, self.manufacturer_code, self.image_type, self.file_version)
        if self.hardware_version is not None:
            _check("hardware_version", self.hardware_version, MAX_U16)
            out += struct.pack("<H", self.hardware_version)
        return out

    @classmethod
    def _decode(cls, seq: int, r: _Reader) -> QueryNextImageRequest:
        fc, mfr, itype, version = r.take("<BHHI")
        r.reserved = bool(fc & ~0x01)
        hw = r.u16() if fc & 0x01 else None
        r.end()
        return cls(seq, mfr, itype, version, hw)


@dataclass(frozen=True, slots=True)
class QueryNextImageResponse:
    """Server -> client, status SUCCESS: the image the client should fetch."""

    COMMAND: ClassVar[int] = Command.QUERY_NEXT_IMAGE_RESPONSE
    seq: int
    manufacturer_code: int
    image_type: int
    file_version: int
    image_size: int

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("image_size", self.image_size, MAX_U32)
        return _header(self.seq, self.COMMAND, to_client=True, manufacturer=None) + struct.pack(
            "<BHHII",
            ZclStatus.SUCCESS,
            self.manufacturer_code,
            self.image_type,
            self.file_version,
            self.image_size,
        )


@dataclass(frozen=True, slots=True)
class QueryNextImageRefused:
    """Server -> client: no image for this client (status only)."""

    COMMAND: ClassVar[int] = Command.QUERY_NEXT_IMAGE_RESPONSE
    seq: int
    status: ZclStatus = ZclStatus.NO_IMAGE_AVAILABLE

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        if self.status not in _REFUSAL_STATUSES:
            raise ValueError(f"{self.status!r} is not a refusal status")
        return _header(self.seq, self.COMMAND, to_client=True, manufacturer=None) + bytes(
            [self.status]
        )


def _decode_query_response(seq: int, r: _Reader) -> QueryNextImageResponse | QueryNextImageRefused:
    status = r.u8()
    if status == ZclStatus.SUCCESS:
        mfr, itype, version, size = r.take("<HHII")
        r.end()
        return QueryNextImageResponse(seq, mfr, itype, version, size)
    refused = QueryNextImageRefused(seq, _status(status, _REFUSAL_STATUSES))
    r.end()
    return refused


@dataclass(frozen=True, slots=True)
class ImageBlockRequest:
    """Client -> server: send ``max_data_size`` bytes of the image from ``file_offset``."""

    COMMAND: ClassVar[int] = Command.IMAGE_BLOCK_REQUEST
    seq: int
    manufacturer_code: int
    image_type: int
    file_version: int
    file_offset: int
    max_data_size: int  # 1..255; the server may send less
    request_node_address: int | None = None  # the client's IEEE address (EUI-64)
    minimum_block_period: int | None = None  # between requests, in the client's unit

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("file_offset", self.file_offset, MAX_U32)
        _check("max_data_size", self.max_data_size, MAX_U8, 1)
        fc = (0x01 if self.request_node_address is not None else 0) | (
            0x02 if self.minimum_block_period is not None else 0
        )
        out = _header(self.seq, self.COMMAND, to_client=False, manufacturer=None)
        out += struct.pack(
            "<BHHIIB",
            fc,
            self.manufacturer_code,
            self.image_type,
            self.file_version,
            self.file_offset,
            self.max_data_size,
        )
        if self.request_node_address is not None:
            _check("request_node_address", self.request_node_address, MAX_U64)
            out += struct.pack("<Q", self.request_node_address)
        if self.minimum_block_period is not None:
            _check("minimum_block_period", self.minimum_block_period, MAX_U16)
            out += struct.pack("<H", self.minimum_block_period)
        return out

    @classmethod
    def _decode(cls, seq: int, r: _Reader) -> ImageBlockRequest:
        fc, mfr, itype, version, offset, max_size = r.take("<BHHIIB")
        r.reserved = bool(fc & ~0x03)
        if max_size == 0:
            raise ProtocolError(Reason.MALFORMED, "maximum data size 0")
        node = r.u64() if fc & 0x01 else None
        period = r.u16() if fc & 0x02 else None
        r.end()
        return cls(seq, mfr, itype, version, offset, max_size, node, period)


@dataclass(frozen=True, slots=True)
class ImageBlockResponse:
    """Server -> client, status SUCCESS: ``data`` is the image from ``file_offset``."""

    COMMAND: ClassVar[int] = Command.IMAGE_BLOCK_RESPONSE
    seq: int
    manufacturer_code: int
    image_type: int
    file_version: int
    file_offset: int
    data: bytes

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("file_offset", self.file_offset, MAX_U32)
        _check_data(self.data)
        return (
            _header(self.seq, self.COMMAND, to_client=True, manufacturer=None)
            + struct.pack(
                "<BHHIIB",
                ZclStatus.SUCCESS,
                self.manufacturer_code,
                self.image_type,
                self.file_version,
                self.file_offset,
                len(self.data),
            )
            + self.data
        )


@dataclass(frozen=True, slots=True)
class ImageBlockWait:
    """Server -> client, status WAIT_FOR_DATA: ask again at ``request_time`` (back-pressure)."""

    COMMAND: ClassVar[int] = Command.IMAGE_BLOCK_RESPONSE
    seq: int
    current_time: int  # server clock, seconds
    request_time: int  # when to ask again, same clock
    minimum_block_period: int  # between block requests from now on, in the client's unit

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        return _header(self.seq, self.COMMAND, to_client=True, manufacturer=None) + _wait_body(
            self.current_time, self.request_time, self.minimum_block_period
        )


@dataclass(frozen=True, slots=True)
class ImageBlockAbort:
    """Server -> client: stop this download (status ABORT or another failure)."""

    COMMAND: ClassVar[int] = Command.IMAGE_BLOCK_RESPONSE
    seq: int
    status: ZclStatus = ZclStatus.ABORT

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        if self.status not in _BLOCK_ABORT_STATUSES:
            raise ValueError(f"{self.status!r} is not a block failure status")
        return _header(self.seq, self.COMMAND, to_client=True, manufacturer=None) + bytes(
            [self.status]
        )


def _wait_body(current: int, request: int, period: int) -> bytes:
    _check("current_time", current, MAX_U32)
    _check("request_time", request, MAX_U32)
    _check("minimum_block_period", period, MAX_U16)
    return struct.pack("<BIIH", ZclStatus.WAIT_FOR_DATA, current, request, period)


def _decode_block_response(
    seq: int, r: _Reader
) -> ImageBlockResponse | ImageBlockWait | ImageBlockAbort:
    status = r.u8()
    if status == ZclStatus.SUCCESS:
        mfr, itype, version, offset = r.take("<HHII")
        data = r.data_u8()
        r.end()
        return ImageBlockResponse(seq, mfr, itype, version, offset, data)
    if status == ZclStatus.WAIT_FOR_DATA:
        current, request, period = r.take("<IIH")
        r.end()
        return ImageBlockWait(seq, current, request, period)
    abort = ImageBlockAbort(seq, _status(status, _BLOCK_ABORT_STATUSES))
    r.end()
    return abort


@dataclass(frozen=True, slots=True)
class UpgradeEndRequest:
    """Client -> server: download finished (SUCCESS: image verified and held) or failed."""

    COMMAND: ClassVar[int] = Command.UPGRADE_END_REQUEST
    seq: int
    status: ZclStatus
    manufacturer_code: int
    image_type: int
    file_version: int

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        if self.status not in _UPGRADE_END_STATUSES:
            raise ValueError(f"{self.status!r} is not an UpgradeEnd status")
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        return _header(self.seq, self.COMMAND, to_client=False, manufacturer=None) + struct.pack(
            "<BHHI", self.status, self.manufacturer_code, self.image_type, self.file_version
        )

    @classmethod
    def _decode(cls, seq: int, r: _Reader) -> UpgradeEndRequest:
        status, mfr, itype, version = r.take("<BHHI")
        r.end()
        return cls(seq, _status(status, _UPGRADE_END_STATUSES), mfr, itype, version)


@dataclass(frozen=True, slots=True)
class UpgradeEndResponse:
    """Server -> client: when to switch to the new image (0xFFFFFFFF: wait for activation)."""

    COMMAND: ClassVar[int] = Command.UPGRADE_END_RESPONSE
    seq: int
    manufacturer_code: int
    image_type: int
    file_version: int
    current_time: int
    upgrade_time: int

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("current_time", self.current_time, MAX_U32)
        _check("upgrade_time", self.upgrade_time, MAX_U32)
        return _header(self.seq, self.COMMAND, to_client=True, manufacturer=None) + struct.pack(
            "<HHIII",
            self.manufacturer_code,
            self.image_type,
            self.file_version,
            self.current_time,
            self.upgrade_time,
        )

    @classmethod
    def _decode(cls, seq: int, r: _Reader) -> UpgradeEndResponse:
        mfr, itype, version, current, upgrade = r.take("<HHIII")
        r.end()
        return cls(seq, mfr, itype, version, current, upgrade)


# --------------------------------------------------------------------------- extension frames


@dataclass(frozen=True, slots=True)
class ManifestBlockRequest:
    """Client -> server (manufacturer specific): send part of the signed manifest."""

    COMMAND: ClassVar[int] = MfrCommand.MANIFEST_BLOCK_REQUEST
    seq: int
    manufacturer_code: int  # the image's (in the payload)
    image_type: int
    file_version: int
    offset: int
    max_data_size: int
    minimum_block_period: int  # in the client's unit, as in ImageBlockRequest
    extension_code: int = EXTENSION_MANUFACTURER_CODE  # in the ZCL header

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("offset", self.offset, MAX_U32)
        _check("max_data_size", self.max_data_size, MAX_U8, 1)
        _check("minimum_block_period", self.minimum_block_period, MAX_U16)
        return _header(
            self.seq, self.COMMAND, to_client=False, manufacturer=self.extension_code
        ) + struct.pack(
            "<HHIIBH",
            self.manufacturer_code,
            self.image_type,
            self.file_version,
            self.offset,
            self.max_data_size,
            self.minimum_block_period,
        )

    @classmethod
    def _decode(cls, seq: int, extension: int, r: _Reader) -> ManifestBlockRequest:
        mfr, itype, version, offset, max_size, period = r.take("<HHIIBH")
        if max_size == 0:
            raise ProtocolError(Reason.MALFORMED, "maximum data size 0")
        r.end_strict()
        return cls(seq, mfr, itype, version, offset, max_size, period, extension)


@dataclass(frozen=True, slots=True)
class ManifestBlockResponse:
    """Server -> client (manufacturer specific), status SUCCESS: manifest bytes from ``offset``."""

    COMMAND: ClassVar[int] = MfrCommand.MANIFEST_BLOCK_RESPONSE
    seq: int
    manufacturer_code: int  # the image's (in the payload)
    image_type: int
    file_version: int
    manifest_size: int  # total bytes of the signed manifest
    offset: int
    data: bytes
    extension_code: int = EXTENSION_MANUFACTURER_CODE  # in the ZCL header

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("manufacturer_code", self.manufacturer_code, MAX_U16)
        _check("image_type", self.image_type, MAX_U16)
        _check("file_version", self.file_version, MAX_U32)
        _check("manifest_size", self.manifest_size, MAX_U32)
        _check("offset", self.offset, MAX_U32)
        _check_data(self.data)
        return (
            _header(self.seq, self.COMMAND, to_client=True, manufacturer=self.extension_code)
            + struct.pack(
                "<BHHIIIB",
                ZclStatus.SUCCESS,
                self.manufacturer_code,
                self.image_type,
                self.file_version,
                self.manifest_size,
                self.offset,
                len(self.data),
            )
            + self.data
        )


@dataclass(frozen=True, slots=True)
class ManifestBlockWait:
    """Server -> client (manufacturer specific), status WAIT_FOR_DATA: ask again later."""

    COMMAND: ClassVar[int] = MfrCommand.MANIFEST_BLOCK_RESPONSE
    seq: int
    extension_code: int  # the ZCL header's manufacturer code
    current_time: int
    request_time: int
    minimum_block_period: int

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        return _header(
            self.seq, self.COMMAND, to_client=True, manufacturer=self.extension_code
        ) + _wait_body(self.current_time, self.request_time, self.minimum_block_period)


@dataclass(frozen=True, slots=True)
class ManifestBlockAbort:
    """Server -> client (manufacturer specific): no manifest for that image, stop."""

    COMMAND: ClassVar[int] = MfrCommand.MANIFEST_BLOCK_RESPONSE
    seq: int
    extension_code: int  # the ZCL header's manufacturer code
    status: ZclStatus = ZclStatus.ABORT

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        if self.status not in _BLOCK_ABORT_STATUSES:
            raise ValueError(f"{self.status!r} is not a block failure status")
        return _header(
            self.seq, self.COMMAND, to_client=True, manufacturer=self.extension_code
        ) + bytes([self.status])


def _decode_manifest_response(
    seq: int, extension: int, r: _Reader
) -> ManifestBlockResponse | ManifestBlockWait | ManifestBlockAbort:
    status = r.u8()
    if status == ZclStatus.SUCCESS:
        mfr, itype, version, size, offset = r.take("<HHIII")
        data = r.data_u8()
        r.end_strict()
        return ManifestBlockResponse(seq, mfr, itype, version, size, offset, data, extension)
    if status == ZclStatus.WAIT_FOR_DATA:
        current, request, period = r.take("<IIH")
        r.end_strict()
        return ManifestBlockWait(seq, extension, current, request, period)
    abort = ManifestBlockAbort(seq, extension, _status(status, _BLOCK_ABORT_STATUSES))
    r.end_strict()
    return abort


# --------------------------------------------------------------------------- global frame


@dataclass(frozen=True, slots=True)
class DefaultResponse:
    """ZCL global Default Response: the outcome of a command that has no response of its own."""

    COMMAND: ClassVar[int] = CMD_DEFAULT_RESPONSE
    seq: int
    command_id: int  # the command this answers
    status: ZclStatus
    to_client: bool  # direction of *this* frame
    manufacturer_code: int | None = None

    def encode(self) -> bytes:
        """The ZCL frame bytes."""
        _check("seq", self.seq, MAX_U8)
        _check("command_id", self.command_id, MAX_U8)
        if not isinstance(self.status, ZclStatus):
            raise ValueError("status must be a ZclStatus")
        fc = FC_GLOBAL | FC_DISABLE_DEFAULT_RESPONSE
        if self.to_client:
            fc |= FC_SERVER_TO_CLIENT
        if self.manufacturer_code is None:
            head = struct.pack("<BBB", fc, self.seq, self.COMMAND)
        else:
            _check("manufacturer_code", self.manufacturer_code, MAX_U16)
            head = struct.pack(
                "<BHBB",
                fc | FC_MANUFACTURER_SPECIFIC,
                self.manufacturer_code,
                self.seq,
                self.COMMAND,
            )
        return head + struct.pack("<BB", self.command_id, self.status)


Frame = (
    ImageNotify
    | QueryNextImageRequest
    | QueryNextImageResponse
    | QueryNextImageRefused
    | ImageBlockRequest
    | ImageBlockResponse
    | ImageBlockWait
    | ImageBlockAbort
    | UpgradeEndRequest
    | UpgradeEndResponse
    | ManifestBlockRequest
    | ManifestBlockResponse
    | ManifestBlockWait
    | ManifestBlockAbort
    | DefaultResponse
)
"""Any frame :func:`decode_frame` returns."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The ZCL header of a frame, readable even when its payload is not (for Default Response)."""

    seq: int
    command_id: int
    to_client: bool
    manufacturer_code: int | None
    cluster_specific: bool
    reserved_bits: int = 0  # frame-control bits 5-7 as received (ignored, ZCL)


def decode_header(data: bytes) -> tuple[FrameHeader, int]:
    """Parse the ZCL header; return it and the payload offset. Raises ``ProtocolError`` only."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "frame is not bytes")
    data = bytes(data)
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)}-byte frame > {MAX_FRAME_BYTES}")
    r = _Reader(data, 0)
    fc = r.u8()
    ftype = fc & FC_FRAME_TYPE_MASK
    if ftype not in (FC_GLOBAL, FC_CLUSTER_SPECIFIC):
        raise ProtocolError(Reason.MALFORMED, f"frame type {ftype}")
    mfr = r.u16() if fc & FC_MANUFACTURER_SPECIFIC else None
    seq, command = r.u8(), r.u8()
    header = FrameHeader(
        seq=seq,
        command_id=command,
        to_client=bool(fc & FC_SERVER_TO_CLIENT),
        manufacturer_code=mfr,
        cluster_specific=ftype == FC_CLUSTER_SPECIFIC,
        reserved_bits=fc & FC_RESERVED,
    )
    return header, r.pos


def decode_frame(
    data: bytes,
    *,
    extension_code: int = EXTENSION_MANUFACTURER_CODE,
    tolerated: Tolerated | None = None,
) -> Frame:
    """Decode one OTA-cluster ZCL frame. Raises :class:`ProtocolError` and nothing else.

    ``TOO_LARGE`` over :data:`MAX_FRAME_BYTES`; ``UNKNOWN_TYPE`` for a command this cluster does
    not define in that direction, or a manufacturer-specific one under a code other than
    ``extension_code`` (the ManifestBlock extension's); ``MALFORMED`` for everything else that is
    wrong. Trailing bytes and reserved bits of the standard commands are accepted and counted in
    ``tolerated`` (module docstring).
    """
    h, pos = decode_header(data)
    r = _Reader(bytes(data), pos)
    frame = _decode_payload(h, r, extension_code)
    if tolerated is not None:
        tolerated.trailing_bytes += r.trailing > 0
        tolerated.reserved_bits += bool(h.reserved_bits) or r.reserved
    return frame


def _decode_payload(h: FrameHeader, r: _Reader, extension_code: int) -> Frame:
    if not h.cluster_specific:
        if h.command_id != CMD_DEFAULT_RESPONSE:
            raise ProtocolError(Reason.UNKNOWN_TYPE, f"global command 0x{h.command_id:02x}")
        command_id, status = r.u8(), r.u8()
        r.end()
        if status not in ZclStatus._value2member_map_:
            raise ProtocolError(Reason.MALFORMED, f"unknown status 0x{status:02x}")
        return DefaultResponse(
            h.seq, command_id, ZclStatus(status), h.to_client, h.manufacturer_code
        )
    if h.manufacturer_code is not None:
        if h.manufacturer_code == extension_code:
            if not h.to_client and h.command_id == MfrCommand.MANIFEST_BLOCK_REQUEST:
                return ManifestBlockRequest._decode(h.seq, h.manufacturer_code, r)
            if h.to_client and h.command_id == MfrCommand.MANIFEST_BLOCK_RESPONSE:
                return _decode_manifest_response(h.seq, h.manufacturer_code, r)
        raise ProtocolError(
            Reason.UNKNOWN_TYPE,
            f"manufacturer-specific command 0x{h.command_id:02x} of 0x{h.manufacturer_code:04x}",
        )
    if h.to_client:
        if h.command_id == Command.IMAGE_NOTIFY:
            return ImageNotify._decode(h.seq, r)
        if h.command_id == Command.QUERY_NEXT_IMAGE_RESPONSE:
            return _decode_query_response(h.seq, r)
        if h.command_id == Command.IMAGE_BLOCK_RESPONSE:
            return _decode_block_response(h.seq, r)
        if h.command_id == Command.UPGRADE_END_RESPONSE:
            return UpgradeEndResponse._decode(h.seq, r)
    else:
        if h.command_id == Command.QUERY_NEXT_IMAGE_REQUEST:
            return QueryNextImageRequest._decode(h.seq, r)
        if h.command_id == Command.IMAGE_BLOCK_REQUEST:
            return ImageBlockRequest._decode(h.seq, r)
        if h.command_id == Command.UPGRADE_END_REQUEST:
            return UpgradeEndRequest._decode(h.seq, r)
    direction = "server->client" if h.to_client else "client->server"
    raise ProtocolError(Reason.UNKNOWN_TYPE, f"{direction} command 0x{h.command_id:02x}")
