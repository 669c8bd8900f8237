"""A signed release for the demo, the benchmarks and the tests: key, trust directory, image.

:func:`make_release` does what an operator does with ``otactl keys new`` and ``otactl image
sign`` (the same functions, :mod:`otad.ctl.imagetool`, in-process): a P-256 signing key (unless one
is given), its public half in ``<workdir>/trust``, random firmware wrapped into a ZigBee OTA
file and signed into an ``.otaimg``, then decoded and verified against that trust directory.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from otad.ctl import imagetool
from otad.keyfiles import load_trust_dir, public_key_path
from protocol.clock import UnixTime
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import SignedImage, verify

__all__ = ["Release", "make_release"]


@dataclass(frozen=True)
class Release:
    """A signed image on disk, its key and the trust directory that accepts it."""

    path: Path  # the .otaimg
    manifest: Manifest
    key: Path  # the private signing key
    trust_dir: Path  # holds the key's public half

    @property
    def sha256(self) -> str:
        """The image's digest, hex (its name for otactl)."""
        return self.manifest.sha256.hex()

    @property
    def size(self) -> int:
        """Bytes of the image (the OTA file the manifest covers)."""
        return self.manifest.size

    @property
    def blocks(self) -> int:
        """Blocks of the image."""
        return self.manifest.block_count

    @property
    def block_size(self) -> int:
        """Bytes per block."""
        return self.manifest.block_size


def make_release(
    workdir: Path,
    *,
    firmware_bytes: int = 256 * 1024,
    block_size: int = 1024,
    device_type: DeviceType = DeviceType.CH,
    name: str = "fw",
    key: Path | None = None,
    version: int = 0x01020304,
    sequence: int | None = None,
) -> Release:
    """Sign ``firmware_bytes`` random bytes for ``device_type``, hardware 0x0000-0xFFFF, into
    ``workdir/<name>.otaimg``. Without ``key`` a new one is made (``workdir/<name>-key.pem``) and
    its public half put into ``workdir/trust``; a given ``key``'s public half must already be
    there. ``sequence`` defaults to the signing time."""
    workdir.mkdir(parents=True, exist_ok=True)
    trust = workdir / "trust"
    trust.mkdir(exist_ok=True)
    if key is None:
        key = workdir / f"{name}-key.pem"
        imagetool.keys_new(key)
        shutil.copy(public_key_path(key), trust / f"{name}.pem")
    firmware = workdir / f"{name}.bin"
    firmware.write_bytes(os.urandom(firmware_bytes))
    out = workdir / f"{name}.otaimg"
    now = int(time.time())
    imagetool.sign_image(
        key=key,
        source=firmware,
        out=out,
        device_type=device_type,
        now=now,
        version=version,
        hw_min=0,
        hw_max=0xFFFF,
        sequence=sequence,
        block_size=block_size,
    )
    manifest, _ota = verify(
        SignedImage.decode(out.read_bytes()), load_trust_dir(trust), now=UnixTime(now)
    )
    return Release(path=out, manifest=manifest, key=key, trust_dir=trust)
