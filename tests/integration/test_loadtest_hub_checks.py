"""The virtual CH's whole-image check (SPEC §6.4 checks 14-17 on an assembled transfer, §7.9):
what it reports after re-reading the stored image. No broker needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from loadtest.hub import _check_stored
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.zigbee_ota import wrap

OTA = wrap(b"firmware" * 300, manufacturer_code=0x1234, image_type=1, file_version=7, hw_min=1,
           hw_max=9)  # fmt: skip


def manifest_for(data: bytes, **changes: int) -> Manifest:
    fields = {"hw_min": 1, "hw_max": 9, "fw_version": 7, **changes}
    return Manifest.for_image(
        data, vendor=0x1234, image_type=1, device_type=DeviceType.ESME, sequence=1,
        block_size=256, created=1, expires=2, **fields,
    )  # fmt: skip


def test_a_good_stored_image_gives_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(OTA)
    assert _check_stored(path, manifest_for(OTA)) == hashlib.sha256(OTA).digest()


def test_a_corrupt_stored_image_gives_the_wrong_digest(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(OTA[:-1] + b"\x00")
    result = _check_stored(path, manifest_for(OTA))
    assert result == hashlib.sha256(OTA[:-1] + b"\x00").digest()
    assert _check_stored(tmp_path / "gone", manifest_for(OTA)) == hashlib.sha256(b"").digest()


def test_an_image_whose_header_disagrees_is_refused_not_held(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(OTA)
    result = _check_stored(path, manifest_for(OTA, fw_version=8))
    assert isinstance(result, ProtocolError)
    assert result.reason is Reason.HEADER_MISMATCH
    not_ota = b"\x00" * len(OTA)
    path.write_bytes(not_ota)
    result = _check_stored(path, manifest_for(not_ota))
    assert isinstance(result, ProtocolError)
    assert result.reason is Reason.MALFORMED
