"""The firmware manifest: what a signed image promises about itself (SPEC §6.2).

A manifest is a record of :mod:`protocol.wire.codec` (its format version under ``"v"``) carried as
the payload of a COSE_Sign1 (:mod:`protocol.release.cose`). It names the target (vendor, device
type, hardware range), orders releases (``sequence``, monotonic per vendor and device type, the
anti-rollback counter), and pins the bytes: whole-image SHA-256 and size, the block size, and one
SHA-256 per block so a receiver checks each block on arrival and re-fetches a corrupt one alone.

Two format versions decode (SPEC §6.2): **v1** (:class:`Manifest`), whose OTA file has ZigBee
sub-elements and whose activation digest is the whole-file ``sha256``, and **v2**
(:class:`ManifestV2`), which adds the body ``layout`` the signer chose (sub-elements or GBCS) and
``activation_sha256``, the digest of the Manufacturer Image a device hashes before it activates
(GBCS; SPEC §8.7). :meth:`Manifest.decode` picks the class by ``v``; every caller reads
:attr:`Manifest.body_layout` and :attr:`Manifest.activation_digest`, which both versions answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from protocol.errors import ProtocolError, Reason
from protocol.release.zigbee_ota import OtaLayout, manufacturer_image_digest
from protocol.wire import cbor, codec
from protocol.wire.codec import byte_string, uint
from protocol.wire.devices import DeviceType as DeviceType  # re-exported: callers import it here
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
MANIFEST_V2 = 2
MIN_BLOCK_SIZE = 16


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
    """A release of one image for one device type. Field meanings: SPEC §6.2."""

    vendor: int = field(metadata=uint(MAX_U16))  # ZigBee manufacturer code
    image_type: int = field(metadata=uint(MAX_U16))  # ZigBee OTA image type
    device_type: DeviceType
    hw_min: int = field(metadata=uint(MAX_U16))  # inclusive hardware-version range
    hw_max: int = field(metadata=uint(MAX_U16))
    fw_version: int = field(metadata=uint(MAX_U32))  # ZigBee OTA file version
    sequence: int = field(metadata=uint(MAX_U64))  # release counter: the anti-rollback value
    size: int = field(metadata=uint(MAX_IMAGE_BYTES))  # image bytes
    sha256: bytes = field(metadata=byte_string(HASH_LEN))  # of the whole image: its wire id
    block_size: int = field(metadata=uint(MAX_BLOCK_BYTES))
    # HASH_LEN bytes per block, concatenated
    block_hashes: bytes = field(metadata=byte_string(maximum=MAX_SIGNED_MANIFEST_BYTES))
    created: int = field(metadata=uint(MAX_U64))  # unix seconds
    expires: int = field(metadata=uint(MAX_U64))  # unix seconds; refused at or after this instant

    @property
    def body_layout(self) -> OtaLayout:
        """What follows the OTA header in the image (v1: always ZigBee sub-elements)."""
        return OtaLayout.SUB_ELEMENTS

    @property
    def activation_digest(self) -> bytes:
        """The SHA-256 an activation command names and a device re-computes before it
        switches (SPEC §8.7); v1: the whole OTA file's ``sha256``."""
        return self.sha256

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

    def encode(self) -> bytes:
        """Deterministic CBOR encoding (the COSE_Sign1 payload)."""
        return codec.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Strictly decode and validate a manifest; raises ``ProtocolError`` only.

        The codec's checks (SPEC §3's order: the version ``v``, exactly these keys, each field),
        then :meth:`check_consistent`."""
        raw = cbor.loads(data, max_size=MAX_SIGNED_MANIFEST_BYTES, max_depth=2)
        version = raw.get("v") if isinstance(raw, dict) else None
        record: type[Manifest] = ManifestV2 if version == MANIFEST_V2 else Manifest
        manifest = codec.decode(record, raw)
        manifest.check_consistent()
        return manifest

    #: The earlier name of :meth:`decode`, kept while otad/catalogue.py still calls it.
    from_cbor = decode

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
        layout: OtaLayout | None = None,
    ) -> Manifest:
        """Build the manifest of ``image``, computing its digest and per-block hashes.

        With a ``layout`` it is a :class:`ManifestV2` recording it and the Manufacturer Image's
        digest (``image`` must then start with a valid OTA header); without, a v1 manifest."""
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
        if layout is not None:
            v1 = {f.name: getattr(manifest, f.name) for f in dataclasses.fields(Manifest)}
            manifest = ManifestV2(
                **v1, layout=layout, activation_sha256=manufacturer_image_digest(image)
            )
        manifest.check_consistent()
        return manifest


@dataclass(frozen=True, slots=True)
class ManifestV2(Manifest):
    """Manifest format version 2: v1's fields plus the body layout and the activation digest."""

    layout: OtaLayout  # what follows the OTA header, as the signer declared it
    activation_sha256: bytes = field(metadata=byte_string(HASH_LEN))  # of the bytes after it

    @property
    def body_layout(self) -> OtaLayout:
        """The layout the signer declared."""
        return self.layout

    @property
    def activation_digest(self) -> bytes:
        """SHA-256 of the Manufacturer Image: every byte after the OTA header (SPEC §8.7)."""
        return self.activation_sha256


codec.register(Manifest, codec.Tag("v", MANIFEST_VERSION, Reason.UNSUPPORTED_VERSION))
codec.register(ManifestV2, codec.Tag("v", MANIFEST_V2, Reason.UNSUPPORTED_VERSION))
