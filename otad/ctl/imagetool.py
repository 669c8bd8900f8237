"""Key and image commands of ``otactl`` (argparse wiring lives in :mod:`otad.ctl`), offline.

Each function does one command and returns the one summary line to print, or raises
:class:`ToolError` with the one-line reason to print on stderr.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from otad.files import FileError, read_bounded, write_atomic
from otad.keyfiles import KeyFileError, load_private_key, load_trust_dir, write_keypair
from protocol.clock import UnixTime
from protocol.errors import ProtocolError
from protocol.release.cose import parse_sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import MAX_OTAIMG_BYTES, SignedImage, build, verify
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, TrustStore
from protocol.release.zigbee_ota import MAGIC, OtaFile, OtaLayout, wrap
from protocol.wire.limits import MAX_IMAGE_BYTES

#: Raw firmware wrapped without ``--manufacturer`` gets the CSA's Test Vendor 1 code (0xFFF1 of
#: the 0xFFF1-0xFFF4 test range, the shared ZigBee/Matter registry): no company's code (0x1234,
#: the old default, is DSR Corporation's), and no real device takes it. 0xFFFF is the wildcard.
DEFAULT_MANUFACTURER = 0xFFF1
DEFAULT_IMAGE_TYPE = 0x0001
DEFAULT_BLOCK_SIZE = 1024
DEFAULT_EXPIRES_DAYS = 365
_DAY = 86_400
_OTA_MAGIC = MAGIC.to_bytes(4, "little")


class ToolError(Exception):
    """A command failed; ``str(exc)`` is the one-line reason for the operator."""


def keys_new(out: str | os.PathLike[str]) -> str:
    """Generate a signing key at ``out`` and its public key beside it."""
    try:
        files = write_keypair(out)
    except KeyFileError as exc:
        raise ToolError(str(exc)) from None
    return (
        f"wrote {files.private_path} (private, 0600) and {files.public_path}; kid {files.kid.hex()}"
    )


def sign_image(
    *,
    key: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    device_type: DeviceType,
    now: int,
    version: int | None = None,
    hw_min: int | None = None,
    hw_max: int | None = None,
    sequence: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    manufacturer: int | None = None,
    image_type: int | None = None,
    layout: OtaLayout = OtaLayout.SUB_ELEMENTS,
) -> str:
    """Sign ``source`` into an ``.otaimg`` at ``out``.

    ``source`` starting with the OTA file identifier is taken as a ZigBee OTA file of ``layout``
    (sub-elements, or GBCS: the Manufacturer Image unframed after the header; never guessed): its
    header supplies manufacturer, image type, version and (if present) hardware range, and any of
    those also given as arguments must agree. Anything else is raw firmware, wrapped into an OTA
    file of ``layout`` from the arguments (``version``, ``hw_min`` and ``hw_max`` required;
    manufacturer default :data:`DEFAULT_MANUFACTURER`). ``sequence`` defaults to ``now``. The
    layout is recorded in the (v2) manifest. The result is verified with the signing key before
    it is written.
    """
    private_key = _load_key(key)
    data = _read(Path(source), MAX_IMAGE_BYTES)
    if (hw_min is None) != (hw_max is None):
        raise ToolError("give both --hw-min and --hw-max, or neither")
    if expires_days < 1:
        raise ToolError("--expires-days must be at least 1")
    if data[:4] == _OTA_MAGIC:
        ota_bytes = data
        try:
            header = OtaFile.parse(data, layout).header
        except ProtocolError as exc:
            hint = (
                " (a GBCS image, its Manufacturer Image not in sub-elements? --layout gbcs)"
                if layout is OtaLayout.SUB_ELEMENTS
                else ""
            )
            raise ToolError(f"{source}: not a valid ZigBee OTA file: {exc}{hint}") from None
        for flag, given, actual in (
            ("--version", version, header.file_version),
            ("--manufacturer", manufacturer, header.manufacturer_code),
            ("--image-type", image_type, header.image_type),
            ("--hw-min", hw_min, header.hw_min),
            ("--hw-max", hw_max, header.hw_max),
        ):
            if given is not None and actual is not None and given != actual:
                raise ToolError(f"{flag} {given:#x} disagrees with the OTA header ({actual:#x})")
        if header.hw_min is None and hw_min is None:
            raise ToolError("the OTA header has no hardware range: give --hw-min and --hw-max")
    else:
        if version is None or hw_min is None or hw_max is None:
            raise ToolError("raw firmware needs --version, --hw-min and --hw-max")
        try:
            ota_bytes = wrap(
                data,
                manufacturer_code=DEFAULT_MANUFACTURER if manufacturer is None else manufacturer,
                image_type=DEFAULT_IMAGE_TYPE if image_type is None else image_type,
                file_version=version,
                hw_min=hw_min,
                hw_max=hw_max,
                layout=layout,
            )
        except (ValueError, OverflowError) as exc:
            raise ToolError(f"cannot wrap {source}: {exc}") from None
    try:
        signed = build(
            ota_bytes,
            private_key,
            device_type=device_type,
            sequence=now if sequence is None else sequence,
            block_size=block_size,
            created=now,
            expires=now + expires_days * _DAY,
            hw_min=hw_min,
            hw_max=hw_max,
            layout=layout,
        )
        manifest, ota = verify(signed, TrustStore([private_key.public_key()]), now=UnixTime(now))
    except (ValueError, ProtocolError) as exc:
        raise ToolError(f"cannot sign {source}: {exc}") from None
    _write(Path(out), signed.encode())
    return summary(f"signed {out}", manifest, ota, signed)


def verify_image(
    path: str | os.PathLike[str],
    *,
    trust_dir: str | os.PathLike[str],
    now: int,
    revoked_file: str | os.PathLike[str] | None = None,
) -> str:
    """Verify an ``.otaimg`` against the keys in ``trust_dir`` at time ``now``."""
    try:
        trust = load_trust_dir(trust_dir, revoked_file)
    except KeyFileError as exc:
        raise ToolError(str(exc)) from None
    data = _read(Path(path), MAX_OTAIMG_BYTES)
    try:
        image = SignedImage.decode(data)
        manifest, ota = verify(image, trust, now=UnixTime(now))
    except ProtocolError as exc:
        detail = f": {exc.detail}" if exc.detail else ""
        raise ToolError(f"{path}: refused: {exc.reason.name}{detail}") from None
    return summary(f"OK {path}", manifest, ota, image)


def summary(label: str, manifest: Manifest, ota: OtaFile, image: SignedImage) -> str:
    """One line describing a verified release."""
    kid = parse_sign1(image.signed_manifest, max_size=MAX_SIGNED_MANIFEST_BYTES).kid
    expires = _utc(manifest.expires)
    return (
        f"{label}: {manifest.device_type.value} vendor {manifest.vendor:#06x} "
        f"image-type {manifest.image_type:#06x} version {manifest.fw_version:#010x} "
        f"hw {manifest.hw_min:#06x}-{manifest.hw_max:#06x} sequence {manifest.sequence} "
        f"size {manifest.size} blocks {manifest.block_count}x{manifest.block_size} "
        f"layout {manifest.body_layout.value} "
        f"sha256 {manifest.sha256.hex()[:16]} activation {manifest.activation_digest.hex()[:16]} "
        f"kid {kid.hex()} "
        f"expires {expires}" + (f" '{ota.header.text}'" if ota.header.text else "")
    )


def _utc(unix: int) -> str:
    """``unix`` seconds as ISO 8601 UTC, or ``unix N`` past year 9999 (a u64 goes further)."""
    try:
        moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return f"unix {unix}"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    try:
        return load_private_key(path)
    except KeyFileError as exc:
        raise ToolError(str(exc)) from None


def _read(path: Path, cap: int) -> bytes:
    try:
        data = read_bounded(path, cap)
    except FileError as exc:
        raise ToolError(str(exc)) from None
    if not data:
        raise ToolError(f"{path}: empty file")
    return data


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, mode=0o644)
    except FileError as exc:
        raise ToolError(str(exc)) from None
