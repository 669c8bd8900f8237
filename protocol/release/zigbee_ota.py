"""The ZigBee OTA Upgrade file (ZCL spec, OTA Upgrade cluster, "OTA Upgrade File Format").

SPEC §6.5 gives the layout (all integers little-endian): a header of fixed fields and optional
ones chosen by its field control, then the body, in one of two layouts (:class:`OtaLayout`):

* ``SUB_ELEMENTS`` (ZCL): sub-elements to the end of the file (tag u16, length u32, data; tag
  0x0000 is the Upgrade Image), as third-party ZigBee OTA files are;
* ``GBCS``: the Manufacturer Image, opaque, to the end of the file (GBCS Upgrade Images, the DCC's
  DUIS 11.1 sample; zigpy's ``HueSBLOTAImage`` models the same "header + raw body").

Which layout a file has is never guessed from its bytes: the signer states it and the manifest
records it (SPEC §6.2). :meth:`OtaFile.parse` is strict for the layout it is told: every byte is
accounted for and any inconsistency raises :class:`ProtocolError`. :meth:`OtaHeader.parse` reads
the header alone.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from enum import StrEnum

from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import MAX_IMAGE_BYTES, MAX_U16, MAX_U32

MAGIC = 0x0BEEF11E
HEADER_VERSION = 0x0100
BASE_HEADER_LEN = 56
HEADER_STRING_LEN = 32
FC_SECURITY_CREDENTIAL = 0x0001
FC_DEVICE_SPECIFIC = 0x0002
FC_HW_VERSIONS = 0x0004
_FC_KNOWN = FC_SECURITY_CREDENTIAL | FC_DEVICE_SPECIFIC | FC_HW_VERSIONS
TAG_UPGRADE_IMAGE = 0x0000
SUB_ELEMENT_HEADER_LEN = 6
WILDCARD_U16 = 0xFFFF  # manufacturer code / image type wildcard of queries, never in a file

_BASE = struct.Struct("<IHHHHHIH32sI")


class OtaLayout(StrEnum):
    """What follows the OTA header (SPEC §6.5); the value is the manifest's ``layout`` text."""

    SUB_ELEMENTS = "subelements"  # ZCL sub-elements, tiling the rest of the file
    GBCS = "gbcs"  # the Manufacturer Image, unframed, to the end of the file


_SUB = struct.Struct("<HI")


@dataclass(frozen=True, slots=True)
class OtaHeader:
    """The OTA file header. Optional fields are ``None`` when the field control omits them."""

    manufacturer_code: int
    image_type: int
    file_version: int
    stack_version: int
    header_string: bytes  # exactly 32 bytes as in the file (NUL padded by :func:`wrap`)
    total_image_size: int
    security_credential_version: int | None = None
    upgrade_file_destination: bytes | None = None  # 8-byte IEEE address
    hw_min: int | None = None
    hw_max: int | None = None

    def __post_init__(self) -> None:
        for name, value, top in (
            ("manufacturer_code", self.manufacturer_code, MAX_U16),
            ("image_type", self.image_type, MAX_U16),
            ("file_version", self.file_version, MAX_U32),
            ("stack_version", self.stack_version, MAX_U16),
            ("total_image_size", self.total_image_size, MAX_U32),
        ):
            if type(value) is not int or not 0 <= value <= top:
                raise ValueError(f"{name} must be an integer in 0..{top}")
        if (
            not isinstance(self.header_string, bytes)
            or len(self.header_string) != HEADER_STRING_LEN
        ):
            raise ValueError("header_string must be exactly 32 bytes")
        if self.security_credential_version is not None and not (
            0 <= self.security_credential_version <= 0xFF
        ):
            raise ValueError("security_credential_version must be a byte")
        if self.upgrade_file_destination is not None and len(self.upgrade_file_destination) != 8:
            raise ValueError("upgrade_file_destination must be 8 bytes")
        if (self.hw_min is None) != (self.hw_max is None):
            raise ValueError("hw_min and hw_max come together")
        if (
            self.hw_min is not None
            and self.hw_max is not None
            and not (0 <= self.hw_min <= self.hw_max <= MAX_U16)
        ):
            raise ValueError("need 0 <= hw_min <= hw_max <= 0xffff")

    @property
    def field_control(self) -> int:
        """The header field control bits implied by which optional fields are present."""
        fc = 0
        if self.security_credential_version is not None:
            fc |= FC_SECURITY_CREDENTIAL
        if self.upgrade_file_destination is not None:
            fc |= FC_DEVICE_SPECIFIC
        if self.hw_min is not None:
            fc |= FC_HW_VERSIONS
        return fc

    @property
    def header_length(self) -> int:
        """Header length in bytes, optional fields included."""
        return _header_length(self.field_control)

    @property
    def text(self) -> str:
        """The header string up to its first NUL, decoded leniently for display."""
        return self.header_string.split(b"\0", 1)[0].decode("utf-8", "replace")

    def encode(self) -> bytes:
        """The header bytes."""
        out = bytearray(
            _BASE.pack(
                MAGIC,
                HEADER_VERSION,
                self.header_length,
                self.field_control,
                self.manufacturer_code,
                self.image_type,
                self.file_version,
                self.stack_version,
                self.header_string,
                self.total_image_size,
            )
        )
        if self.security_credential_version is not None:
            out.append(self.security_credential_version)
        if self.upgrade_file_destination is not None:
            out += self.upgrade_file_destination
        if self.hw_min is not None and self.hw_max is not None:
            out += struct.pack("<HH", self.hw_min, self.hw_max)
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> OtaHeader:
        """Strictly parse the header at the start of ``data`` (the rest is not looked at).

        Checks magic, header version, field control, header length, wildcard codes, the
        hardware range and that the declared total size covers the header and fits the cap;
        raises :class:`ProtocolError` only.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(Reason.MALFORMED, "input is not bytes")
        data = bytes(data)
        if len(data) < BASE_HEADER_LEN:
            raise ProtocolError(Reason.MALFORMED, f"{len(data)} bytes: shorter than an OTA header")
        (magic, version, header_len, fc, mfr, image_type, file_version, stack, string, total) = (
            _BASE.unpack_from(data)
        )
        if magic != MAGIC:
            raise ProtocolError(Reason.MALFORMED, f"bad OTA file identifier 0x{magic:08x}")
        if version != HEADER_VERSION:
            raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"OTA header version 0x{version:04x}")
        if fc & ~_FC_KNOWN:
            raise ProtocolError(Reason.MALFORMED, f"unknown header field control bits 0x{fc:04x}")
        if header_len != _header_length(fc):
            raise ProtocolError(
                Reason.MALFORMED,
                f"header length {header_len}, field control 0x{fc:04x} needs {_header_length(fc)}",
            )
        if len(data) < header_len:
            raise ProtocolError(Reason.MALFORMED, "truncated OTA header")
        if mfr == WILDCARD_U16 or image_type == WILDCARD_U16:
            raise ProtocolError(Reason.MALFORMED, "wildcard manufacturer code or image type")
        if total < header_len:
            raise ProtocolError(Reason.MALFORMED, f"total image size {total} < header {header_len}")
        if total > MAX_IMAGE_BYTES:
            raise ProtocolError(Reason.TOO_LARGE, f"total image size {total} > {MAX_IMAGE_BYTES}")
        pos = BASE_HEADER_LEN
        security: int | None = None
        destination: bytes | None = None
        hw_min: int | None = None
        hw_max: int | None = None
        if fc & FC_SECURITY_CREDENTIAL:
            security = data[pos]
            pos += 1
        if fc & FC_DEVICE_SPECIFIC:
            destination = data[pos : pos + 8]
            pos += 8
        if fc & FC_HW_VERSIONS:
            hw_min, hw_max = struct.unpack_from("<HH", data, pos)
            if hw_min > hw_max:
                raise ProtocolError(
                    Reason.MALFORMED, f"hardware range 0x{hw_min:04x} > 0x{hw_max:04x}"
                )
        return cls(
            manufacturer_code=mfr,
            image_type=image_type,
            file_version=file_version,
            stack_version=stack,
            header_string=string,
            total_image_size=total,
            security_credential_version=security,
            upgrade_file_destination=destination,
            hw_min=hw_min,
            hw_max=hw_max,
        )


def _header_length(fc: int) -> int:
    length = BASE_HEADER_LEN
    if fc & FC_SECURITY_CREDENTIAL:
        length += 1
    if fc & FC_DEVICE_SPECIFIC:
        length += 8
    if fc & FC_HW_VERSIONS:
        length += 4
    return length


@dataclass(frozen=True, slots=True)
class SubElement:
    """One tagged sub-element of an OTA file (tag 0x0000: the Upgrade Image)."""

    tag: int
    data: bytes

    def __post_init__(self) -> None:
        if type(self.tag) is not int or not 0 <= self.tag <= MAX_U16:
            raise ValueError("sub-element tag must be a u16")
        if not isinstance(self.data, bytes) or len(self.data) > MAX_U32:
            raise ValueError("sub-element data must be bytes of at most 2**32-1")

    def encode(self) -> bytes:
        """Tag, length, data."""
        return _SUB.pack(self.tag, len(self.data)) + self.data


@dataclass(frozen=True, slots=True)
class OtaFile:
    """A whole OTA file: header plus its body, sizes consistent.

    ``SUB_ELEMENTS`` layout: at least one sub-element in ``elements``, ``raw_body`` empty.
    ``GBCS`` layout: no sub-elements, ``raw_body`` the (non-empty) Manufacturer Image."""

    header: OtaHeader
    elements: tuple[SubElement, ...]
    layout: OtaLayout = OtaLayout.SUB_ELEMENTS
    raw_body: bytes = b""

    def __post_init__(self) -> None:
        if self.layout is OtaLayout.SUB_ELEMENTS:
            if not self.elements:
                raise ValueError("an OTA file needs at least one sub-element")
            if self.raw_body:
                raise ValueError("a sub-element OTA file has no raw body")
        else:
            if self.elements or not self.raw_body:
                raise ValueError("a GBCS OTA file has a raw body and no sub-elements")
        size = (
            self.header.header_length
            + len(self.raw_body)
            + sum(SUB_ELEMENT_HEADER_LEN + len(e.data) for e in self.elements)
        )
        if size != self.header.total_image_size:
            raise ValueError(
                f"header total_image_size {self.header.total_image_size} != actual {size}"
            )

    @property
    def upgrade_image(self) -> bytes | None:
        """The firmware: data of the first Upgrade Image (tag 0x0000) sub-element, or the
        Manufacturer Image of a GBCS file; ``None`` for a sub-element file without tag 0."""
        if self.layout is OtaLayout.GBCS:
            return self.raw_body
        for element in self.elements:
            if element.tag == TAG_UPGRADE_IMAGE:
                return element.data
        return None

    @property
    def body(self) -> bytes:
        """Every byte after the OTA header: what the activation digest covers (SPEC §8.7)."""
        return self.raw_body + b"".join(e.encode() for e in self.elements)

    def encode(self) -> bytes:
        """The file bytes."""
        return self.header.encode() + self.body

    @classmethod
    def parse(cls, data: bytes, layout: OtaLayout = OtaLayout.SUB_ELEMENTS) -> OtaFile:
        """Strictly parse a whole OTA file of ``layout``; raises :class:`ProtocolError` only.

        On top of :meth:`OtaHeader.parse`: the total image size equals ``len(data)``; then, for
        ``SUB_ELEMENTS``, the sub-elements exactly tile the rest of the file (no truncated
        header, no length running past the end, no trailing bytes), with at least one; for
        ``GBCS``, at least one byte of Manufacturer Image follows the header.
        """
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > MAX_IMAGE_BYTES:
            raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > {MAX_IMAGE_BYTES}")
        header = OtaHeader.parse(data)
        data = bytes(data)
        if header.total_image_size != len(data):
            raise ProtocolError(
                Reason.MALFORMED,
                f"total image size {header.total_image_size} but the file has {len(data)} bytes",
            )
        pos = header.header_length
        if layout is OtaLayout.GBCS:
            if pos == len(data):
                raise ProtocolError(Reason.MALFORMED, "GBCS OTA file has no Manufacturer Image")
            return cls(header, (), OtaLayout.GBCS, data[pos:])
        elements: list[SubElement] = []
        while pos < len(data):
            if len(data) - pos < SUB_ELEMENT_HEADER_LEN:
                raise ProtocolError(Reason.MALFORMED, f"truncated sub-element header at {pos}")
            tag, length = _SUB.unpack_from(data, pos)
            pos += SUB_ELEMENT_HEADER_LEN
            if length > len(data) - pos:
                raise ProtocolError(
                    Reason.MALFORMED,
                    f"sub-element 0x{tag:04x} at {pos - 6} declares {length} bytes, "
                    f"{len(data) - pos} remain",
                )
            elements.append(SubElement(tag, data[pos : pos + length]))
            pos += length
        if not elements:
            raise ProtocolError(Reason.MALFORMED, "OTA file has no sub-elements")
        return cls(header, tuple(elements))


def manufacturer_image_digest(ota_file: bytes) -> bytes:
    """SHA-256 of every byte after the OTA header of ``ota_file``: the activation digest of a
    v2 manifest (SPEC §8.7). For a GBCS file that is its Manufacturer Image; for a sub-element
    file, all its sub-elements as framed (tag, length, data). Raises ``ProtocolError`` when the
    header does not parse."""
    header = OtaHeader.parse(ota_file)
    return hashlib.sha256(bytes(ota_file)[header.header_length :]).digest()


def wrap(
    firmware: bytes,
    *,
    manufacturer_code: int,
    image_type: int,
    file_version: int,
    hw_min: int | None = None,
    hw_max: int | None = None,
    stack_version: int = 2,
    header_string: str = "",
    layout: OtaLayout = OtaLayout.SUB_ELEMENTS,
) -> bytes:
    """Build an OTA file holding ``firmware``: as its Upgrade Image (tag 0x0000) sub-element, or
    (``layout=GBCS``) as the Manufacturer Image right after the header.

    ``hw_min``/``hw_max`` together set field control bit 2. ``header_string`` is UTF-8, at most
    32 bytes, NUL padded. Raises ``ValueError`` for arguments out of range.
    """
    if not firmware:
        raise ValueError("firmware is empty")
    for name, value in (("manufacturer_code", manufacturer_code), ("image_type", image_type)):
        if value == WILDCARD_U16:
            raise ValueError(f"{name} 0xffff is the wildcard, not a real value")
    string = header_string.encode("utf-8")
    if len(string) > HEADER_STRING_LEN:
        raise ValueError(f"header string is {len(string)} bytes, at most 32")
    header = OtaHeader(
        manufacturer_code=manufacturer_code,
        image_type=image_type,
        file_version=file_version,
        stack_version=stack_version,
        header_string=string.ljust(HEADER_STRING_LEN, b"\0"),
        total_image_size=0,
        hw_min=hw_min,
        hw_max=hw_max,
    )
    if layout is OtaLayout.GBCS:
        total = header.header_length + len(firmware)
        elements: tuple[SubElement, ...] = ()
        raw = bytes(firmware)
    else:
        elements = (SubElement(TAG_UPGRADE_IMAGE, bytes(firmware)),)
        total = header.header_length + SUB_ELEMENT_HEADER_LEN + len(firmware)
        raw = b""
    if total > MAX_IMAGE_BYTES:
        raise ValueError(f"OTA file would be {total} bytes, over {MAX_IMAGE_BYTES}")
    return OtaFile(replace(header, total_image_size=total), elements, layout, raw).encode()
