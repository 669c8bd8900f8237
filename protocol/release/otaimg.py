"""The ``.otaimg`` release file: a signed manifest and the ZigBee OTA file it covers.

SPEC §6.6 gives the layout (integers big-endian): an 8-byte magic with the format version, the
signed manifest's length (u32), the COSE_Sign1 bytes exactly as signed, then the ZigBee OTA file
the manifest's ``size`` and ``sha256`` are of.

:meth:`SignedImage.decode` checks the container only; :func:`verify` checks everything: the
signature and manifest (:func:`protocol.release.trust.verify_manifest`), the bytes against the
signed digest, size and block hashes, and the OTA header against the manifest.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import sign1
from protocol.release.manifest import DeviceType, Manifest, ManifestV2, block_hashes
from protocol.release.trust import Target, TrustStore, verify_manifest
from protocol.release.zigbee_ota import OtaFile, OtaLayout, manufacturer_image_digest
from protocol.wire.limits import MAX_IMAGE_BYTES, MAX_SIGNED_MANIFEST_BYTES

MAGIC = b"OTAIMG\x00\x01"
_MAGIC_FAMILY = MAGIC[:6]
_PREFIX = struct.Struct(">8sI")
PREFIX_LEN = _PREFIX.size
MAX_OTAIMG_BYTES = PREFIX_LEN + MAX_SIGNED_MANIFEST_BYTES + MAX_IMAGE_BYTES


@dataclass(frozen=True, slots=True)
class SignedImage:
    """A signed manifest and the OTA file bytes it covers (neither checked by construction)."""

    signed_manifest: bytes
    image: bytes

    def encode(self) -> bytes:
        """The ``.otaimg`` bytes."""
        return _PREFIX.pack(MAGIC, len(self.signed_manifest)) + self.signed_manifest + self.image

    @classmethod
    def decode(cls, data: bytes) -> SignedImage:
        """Split an ``.otaimg`` into its two parts; raises :class:`ProtocolError` only.

        ``MALFORMED``: not this format, truncated, empty manifest or image;
        ``UNSUPPORTED_VERSION``: another version of this format; ``TOO_LARGE``: over the caps.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(Reason.MALFORMED, "input is not bytes")
        if len(data) > MAX_OTAIMG_BYTES:
            raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > {MAX_OTAIMG_BYTES}")
        data = bytes(data)
        if len(data) < PREFIX_LEN:
            raise ProtocolError(Reason.MALFORMED, "shorter than the .otaimg prefix")
        magic, manifest_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            if magic[:6] == _MAGIC_FAMILY:
                raise ProtocolError(
                    Reason.UNSUPPORTED_VERSION, f".otaimg version {magic[6:].hex()}"
                )
            raise ProtocolError(Reason.MALFORMED, "not an .otaimg file (bad magic)")
        if manifest_len == 0:
            raise ProtocolError(Reason.MALFORMED, "empty signed manifest")
        if manifest_len > MAX_SIGNED_MANIFEST_BYTES:
            raise ProtocolError(Reason.TOO_LARGE, f"signed manifest of {manifest_len} bytes")
        end = PREFIX_LEN + manifest_len
        if end > len(data):
            raise ProtocolError(Reason.MALFORMED, "truncated signed manifest")
        image = data[end:]
        if not image:
            raise ProtocolError(Reason.MALFORMED, "no image after the manifest")
        if len(image) > MAX_IMAGE_BYTES:
            raise ProtocolError(Reason.TOO_LARGE, f"image of {len(image)} bytes")
        return cls(signed_manifest=data[PREFIX_LEN:end], image=image)


def build(
    ota_file: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    device_type: DeviceType,
    sequence: int,
    block_size: int,
    created: int,
    expires: int,
    hw_min: int | None = None,
    hw_max: int | None = None,
    deterministic: bool = False,
    layout: OtaLayout = OtaLayout.SUB_ELEMENTS,
    manifest_version: int | None = None,
) -> SignedImage:
    """Sign a release of ``ota_file`` (a strict ZigBee OTA file of ``layout``).

    ``manifest_version`` 1 is the manifest every CH understands (protocol 1.0: the activation
    digest is the whole file's); 2 records the layout and the Manufacturer Image's activation
    digest, and only a CH of protocol 1.1 reads it (SPEC §5, §6.2). The default is 1 for the
    sub-element layout and 2 for a GBCS image, which a v1 manifest cannot describe.

    Vendor, image type and firmware version come from the OTA header. The hardware range comes
    from the header when it has one (``hw_min``/``hw_max``, if given, must then be equal) and
    from the arguments otherwise. ``deterministic`` signs with an RFC 6979 nonce (see
    :func:`~protocol.release.cose.sign1`): the same inputs always give the same bytes. Raises
    ``ProtocolError`` if ``ota_file`` does not parse and ``ValueError`` for inconsistent or
    out-of-range arguments.
    """
    version = manifest_version or (1 if layout is OtaLayout.SUB_ELEMENTS else 2)
    if version not in (1, 2) or (version == 1 and layout is not OtaLayout.SUB_ELEMENTS):
        raise ValueError(f"a v{version} manifest cannot describe a {layout.value} image")
    ota = OtaFile.parse(ota_file, layout)
    header = ota.header
    if (hw_min is None) != (hw_max is None):
        raise ValueError("give both hw_min and hw_max, or neither")
    if header.hw_min is not None:
        if hw_min is not None and (hw_min, hw_max) != (header.hw_min, header.hw_max):
            raise ValueError(
                f"hardware range {hw_min:#06x}..{hw_max:#06x} disagrees with the OTA header "
                f"{header.hw_min:#06x}..{header.hw_max:#06x}"
            )
        hw_min, hw_max = header.hw_min, header.hw_max
    if hw_min is None or hw_max is None:
        raise ValueError("the OTA header has no hardware range: give hw_min and hw_max")
    # Inconsistent fields are caller errors here, not untrusted input; the round trip through
    # decode also checks the u16/u32/u64 ranges and the manifest size cap.
    try:
        manifest = Manifest.for_image(
            bytes(ota_file),
            vendor=header.manufacturer_code,
            image_type=header.image_type,
            device_type=device_type,
            hw_min=hw_min,
            hw_max=hw_max,
            fw_version=header.file_version,
            sequence=sequence,
            block_size=block_size,
            created=created,
            expires=expires,
            layout=None if version == 1 else layout,
        )
        payload = manifest.encode()
        Manifest.decode(payload)
    except ProtocolError as exc:
        raise ValueError(f"manifest would not verify: {exc}") from None
    signed = sign1(payload, private_key, deterministic=deterministic)
    if len(signed) > MAX_SIGNED_MANIFEST_BYTES:
        raise ValueError(
            f"signed manifest of {len(signed)} bytes over {MAX_SIGNED_MANIFEST_BYTES}: "
            "use a larger block size"
        )
    return SignedImage(signed_manifest=signed, image=bytes(ota_file))


def verify(
    image: SignedImage, trust: TrustStore, *, now: UnixTime, target: Target | None = None
) -> tuple[Manifest, OtaFile]:
    """Verify a release completely; return its manifest and parsed OTA file.

    Order: :func:`~protocol.release.trust.verify_manifest` (signature first, then decoding, expiry
    and the optional target); ``IMAGE_HASH`` when the image size or SHA-256 differ from the
    manifest; ``BLOCK_HASH`` when the signed per-block hashes do not match the image; the OTA
    file's strict parse (``MALFORMED``...); ``HEADER_MISMATCH`` when the OTA header disagrees with
    the manifest (file version, manufacturer code, image type, hardware range if present, total
    size).
    """
    manifest = verify_manifest(image.signed_manifest, trust, now=now, target=target)
    return manifest, check_image(manifest, image.image)


def check_image(manifest: Manifest, data: bytes) -> OtaFile:
    """The whole-image checks of SPEC §6.4 (14-17) of ``data`` against its verified manifest:
    what otad runs on an ``.otaimg`` and a CH on an assembled transfer before ``ImageHeld``.

    ``IMAGE_HASH`` (length or SHA-256), ``BLOCK_HASH``, the strict OTA parse in the manifest's
    layout (``MALFORMED``...), ``HEADER_MISMATCH`` (:func:`check_header`), and for a v2 manifest
    ``IMAGE_HASH`` when the bytes after the header do not hash to its activation digest;
    returns the parsed file."""
    if len(data) != manifest.size:
        raise ProtocolError(
            Reason.IMAGE_HASH, f"image is {len(data)} bytes, manifest says {manifest.size}"
        )
    if hashlib.sha256(data).digest() != manifest.sha256:
        raise ProtocolError(Reason.IMAGE_HASH, "image SHA-256 differs from the manifest")
    if block_hashes(data, manifest.block_size) != manifest.block_hashes:
        raise ProtocolError(Reason.BLOCK_HASH, "signed block hashes do not match the image")
    ota = OtaFile.parse(data, manifest.body_layout)
    check_header(manifest, ota)
    if isinstance(manifest, ManifestV2) and (
        manufacturer_image_digest(data) != manifest.activation_sha256
    ):
        raise ProtocolError(Reason.IMAGE_HASH, "activation digest differs from the image")
    return ota


def check_header(manifest: Manifest, ota: OtaFile) -> None:
    """Raise ``ProtocolError(HEADER_MISMATCH)`` unless ``ota``'s header agrees with ``manifest``."""
    header = ota.header
    mismatches = []
    if header.file_version != manifest.fw_version:
        mismatches.append(
            f"file version {header.file_version:#010x} != {manifest.fw_version:#010x}"
        )
    if header.manufacturer_code != manifest.vendor:
        mismatches.append(f"vendor {header.manufacturer_code:#06x} != {manifest.vendor:#06x}")
    if header.image_type != manifest.image_type:
        mismatches.append(f"image type {header.image_type:#06x} != {manifest.image_type:#06x}")
    if header.hw_min is not None and (header.hw_min, header.hw_max) != (
        manifest.hw_min,
        manifest.hw_max,
    ):
        mismatches.append("hardware range")
    if header.total_image_size != manifest.size:
        mismatches.append(f"total size {header.total_image_size} != {manifest.size}")
    if mismatches:
        raise ProtocolError(Reason.HEADER_MISMATCH, "; ".join(mismatches))
