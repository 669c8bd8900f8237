"""The firmware manifest: what a signed image promises about itself.

A manifest is a CBOR map (text keys, see SPEC.md "Manifest") carried as the payload of a
COSE_Sign1 (:mod:`protocol.release.cose`). It names the target (vendor, device type, hardware
range),
orders releases (``sequence``, monotonic per vendor and device type, the anti-rollback counter),
and pins the bytes: whole-image SHA-256 and size, the block size, and one SHA-256 per block so a
receiver checks each block on arrival and re-fetches a corrupt one alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor
from protocol.wire.limits import (
    HASH_LEN,
    MAX_BLOCK_BYTES,
    MAX_SIGNED_MANIFEST_BYTES,
    MAX_U16,
    MAX_U32,
    MAX_U64,
)
from protocol.wire.limits import MAX_IMAGE_BYTES as MAX_IMAGE_BYTES  # re-exported for otad

MANIFEST_VERSION = 1
MIN_BLOCK_SIZE = 16


class DeviceType(StrEnum):
    """Device types of a GB smart-metering premises (B1-B4: Alt HAN point-to-point bridges)."""

    CH = "CH"
    ESME = "ESME"
    GSME = "GSME"
    PPMID = "PPMID"
    HCALCS = "HCALCS"
    B1 = "B1"
    B2 = "B2"
    B3 = "B3"
    B4 = "B4"

    @classmethod
    def parse(cls, value: object) -> DeviceType:
        """Return the member named ``value`` or raise ``ProtocolError(MALFORMED)``."""
        try:
            return cls(str(value)) if isinstance(value, str) else cls("\0")
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"unknown device type {value!r}") from None


def block_count(size: int, block_size: int) -> int:
    """Number of blocks an image of ``size`` bytes splits into (at least one)."""
    return max(1, -(-size // block_size))


def block_hashes(image: bytes, block_size: int) -> bytes:
    """Concatenated SHA-256 of each ``block_size`` slice of ``image``."""
    n = block_count(len(image), block_size)
    return b"".join(
        hashlib.sha256(image[i * block_size : (i + 1) * block_size]).digest() for i in range(n)
    )


@dataclass(frozen=True, slots=True)
class Manifest:
    """A release of one image for one device type. Field meanings: SPEC.md "Manifest"."""

    vendor: int  # ZigBee manufacturer code (u16)
    image_type: int  # ZigBee OTA image type (u16)
    device_type: DeviceType
    hw_min: int  # inclusive hardware-version range (u16)
    hw_max: int
    fw_version: int  # ZigBee OTA file version (u32)
    sequence: int  # monotonic release counter (u64), the anti-rollback value
    size: int  # image bytes
    sha256: bytes  # digest of the whole image; the image id on the wire
    block_size: int
    block_hashes: bytes  # HASH_LEN bytes per block, concatenated
    created: int  # unix seconds
    expires: int  # unix seconds; refused at or after this instant

    @property
    def block_count(self) -> int:
        """Number of blocks of ``block_size`` bytes (the last may be shorter)."""
        return block_count(self.size, self.block_size)

    def block_hash(self, index: int) -> bytes:
        """The signed SHA-256 of block ``index``."""
        if not 0 <= index < self.block_count:
            raise ProtocolError(Reason.BLOCK_OUT_OF_RANGE, f"block {index} of {self.block_count}")
        return self.block_hashes[index * HASH_LEN : (index + 1) * HASH_LEN]

    def block_length(self, index: int) -> int:
        """Exact byte length block ``index`` must have."""
        start = index * self.block_size  # on the sender's hot path: no block count computed
        if index < 0 or start >= self.size:
            raise ProtocolError(Reason.BLOCK_OUT_OF_RANGE, f"block {index} of {self.block_count}")
        return min(self.block_size, self.size - start)

    def to_cbor(self) -> bytes:
        """Deterministic CBOR encoding (the COSE_Sign1 payload)."""
        return cbor.dumps(
            {
                "v": MANIFEST_VERSION,
                "vendor": self.vendor,
                "image_type": self.image_type,
                "device_type": self.device_type.value,
                "hw_min": self.hw_min,
                "hw_max": self.hw_max,
                "fw_version": self.fw_version,
                "sequence": self.sequence,
                "size": self.size,
                "sha256": self.sha256,
                "block_size": self.block_size,
                "block_hashes": self.block_hashes,
                "created": self.created,
                "expires": self.expires,
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> Manifest:
        """Strictly decode and validate a manifest; raises ``ProtocolError`` only."""
        raw = cbor.loads(data, max_size=MAX_SIGNED_MANIFEST_BYTES, max_depth=2)
        if not isinstance(raw, dict):
            raise ProtocolError(Reason.MALFORMED, "manifest is not a map")
        fields = {
            "v",
            "vendor",
            "image_type",
            "device_type",
            "hw_min",
            "hw_max",
            "fw_version",
            "sequence",
            "size",
            "sha256",
            "block_size",
            "block_hashes",
            "created",
            "expires",
        }
        unknown = set(raw) - fields
        if unknown:
            raise ProtocolError(Reason.UNKNOWN_KEY, f"manifest keys {sorted(map(str, unknown))}")
        missing = fields - set(raw)
        if missing:
            raise ProtocolError(Reason.MALFORMED, f"manifest lacks {sorted(missing)}")
        if _uint(raw, "v", MAX_U16) != MANIFEST_VERSION:
            raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"manifest version {raw['v']}")
        manifest = cls(
            vendor=_uint(raw, "vendor", MAX_U16),
            image_type=_uint(raw, "image_type", MAX_U16),
            device_type=DeviceType.parse(raw["device_type"]),
            hw_min=_uint(raw, "hw_min", MAX_U16),
            hw_max=_uint(raw, "hw_max", MAX_U16),
            fw_version=_uint(raw, "fw_version", MAX_U32),
            sequence=_uint(raw, "sequence", MAX_U64),
            size=_uint(raw, "size", MAX_IMAGE_BYTES),
            sha256=_bytes(raw, "sha256", HASH_LEN),
            block_size=_uint(raw, "block_size", MAX_BLOCK_BYTES),
            block_hashes=_bytes(raw, "block_hashes", None),
            created=_uint(raw, "created", MAX_U64),
            expires=_uint(raw, "expires", MAX_U64),
        )
        manifest.check_consistent()
        return manifest

    def check_consistent(self) -> None:
        """Raise ``ProtocolError(MALFORMED)`` when the fields contradict each other."""
        if self.hw_min > self.hw_max:
            raise ProtocolError(Reason.MALFORMED, "hw_min > hw_max")
        if self.block_size < MIN_BLOCK_SIZE:
            raise ProtocolError(Reason.MALFORMED, f"block size {self.block_size} too small")
        if self.size == 0:
            raise ProtocolError(Reason.MALFORMED, "empty image")
        if len(self.block_hashes) != HASH_LEN * self.block_count:
            raise ProtocolError(Reason.MALFORMED, "block hash list does not match size")
        if self.expires <= self.created:
            raise ProtocolError(Reason.MALFORMED, "expires before it was created")

    @classmethod
    def for_image(
        cls,
        image: bytes,
        *,
        vendor: int,
        image_type: int,
        device_type: DeviceType,
        hw_min: int,
        hw_max: int,
        fw_version: int,
        sequence: int,
        block_size: int,
        created: int,
        expires: int,
    ) -> Manifest:
        """Build the manifest of ``image``, computing its digest and per-block hashes."""
        manifest = cls(
            vendor=vendor,
            image_type=image_type,
            device_type=device_type,
            hw_min=hw_min,
            hw_max=hw_max,
            fw_version=fw_version,
            sequence=sequence,
            size=len(image),
            sha256=hashlib.sha256(image).digest(),
            block_size=block_size,
            block_hashes=block_hashes(image, block_size),
            created=created,
            expires=expires,
        )
        manifest.check_consistent()
        return manifest


def _uint(raw: dict[Any, Any], key: str, maximum: int) -> int:
    value = raw[key]
    if type(value) is not int or not 0 <= value <= maximum:
        raise ProtocolError(Reason.MALFORMED, f"manifest {key} is not an integer in 0..{maximum}")
    return value


def _bytes(raw: dict[Any, Any], key: str, length: int | None) -> bytes:
    value = raw[key]
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        raise ProtocolError(Reason.MALFORMED, f"manifest {key} is not a byte string of {length}")
    return value
