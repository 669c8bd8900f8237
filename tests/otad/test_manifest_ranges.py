"""Every integer field of a correctly signed manifest, at 0, at its maximum and one past it,
through otad's import: imported (and read back, listed and summarised), or refused with a typed
error; either way no traceback, and a refused or failed import leaves no file and no row."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from otad.catalogue import Catalogue
from otad.ctl.imagetool import summary
from otad.store import Store, StoreError
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import sign1
from protocol.release.manifest import MAX_IMAGE_BYTES, DeviceType, Manifest
from protocol.release.otaimg import SignedImage, verify
from protocol.release.trust import TrustStore
from protocol.release.zigbee_ota import wrap
from protocol.wire import cbor
from protocol.wire.limits import MAX_BLOCK_BYTES, MAX_U16, MAX_U32, MAX_U64

WILDCARD = 0xFFFF  # ZigBee OTA: any manufacturer / image type, never a file's own
KEY = ec.generate_private_key(ec.SECP256R1())
TRUST = TrustStore([KEY.public_key()])
NOW = int(time.time())


def release(
    *,
    firmware: bytes = b"\x5a" * 3000,
    header: dict[str, int] | None = None,
    signing_block_size: int = 256,
    **fields: int,
) -> bytes:
    """An ``.otaimg`` signed by :data:`KEY`: an OTA file whose header has ``header``'s values
    (vendor, image_type, fw_version, hw_min, hw_max), a manifest made for it, then ``fields``
    set in the manifest's CBOR as they are (out of range included), signed."""
    h = {"vendor": 0x1234, "image_type": 1, "fw_version": 0x01020304, "hw_min": 0, "hw_max": 9}
    h.update(header or {})
    ota = wrap(
        firmware,
        manufacturer_code=h["vendor"],
        image_type=h["image_type"],
        file_version=h["fw_version"],
        hw_min=h["hw_min"],
        hw_max=h["hw_max"],
    )
    manifest = Manifest.for_image(
        ota,
        vendor=h["vendor"],
        image_type=h["image_type"],
        device_type=DeviceType.CH,
        hw_min=h["hw_min"],
        hw_max=h["hw_max"],
        fw_version=h["fw_version"],
        sequence=7,
        block_size=signing_block_size,
        created=NOW - 10,
        expires=NOW + 86_400,
    )
    raw: dict[str, Any] = cbor.loads(manifest.encode(), max_size=1 << 20, max_depth=2)
    raw.update(fields)
    return SignedImage(sign1(cbor.dumps(raw), KEY), ota).encode()


def header_case(name: str, value: int) -> dict[str, Any]:
    """The header carries the value too (the OTA file must agree with the manifest); what the
    header cannot carry (one past the maximum; 0xFFFF as vendor or image type, ZigBee's
    wildcard) it carries at its own maximum, and only the manifest goes further."""
    maximum = {"fw_version": MAX_U32, "vendor": WILDCARD - 1, "image_type": WILDCARD - 1}
    in_header = min(value, maximum.get(name, MAX_U16))
    header = {name: in_header}
    if name == "hw_min":
        header["hw_max"] = max(in_header, 9)
    if name == "hw_max":
        header["hw_min"] = min(in_header, 0)
    return {"header": header, name: value}


# (manifest field, value, imported?) - one past every maximum, and 0 where 0 is no image
CASES: list[tuple[str, int, bool]] = [
    *[
        (name, value, ok)
        for name, maximum in (("vendor", WILDCARD - 1), ("image_type", WILDCARD - 1))
        for value, ok in ((0, True), (maximum, True), (WILDCARD, False), (MAX_U16 + 1, False))
    ],
    *[
        (name, value, ok)
        for name, maximum in (
            ("hw_min", MAX_U16),
            ("hw_max", MAX_U16),
            ("fw_version", MAX_U32),
        )
        for value, ok in ((0, True), (maximum, True), (maximum + 1, False))
    ],
    ("sequence", 0, True),
    ("sequence", MAX_U64, True),
    ("sequence", MAX_U64 + 1, False),
    ("created", 0, True),
    ("created", MAX_U64, False),  # expires cannot be after it
    ("created", MAX_U64 + 1, False),
    ("expires", 0, False),  # before it was created
    ("expires", MAX_U64, True),  # the reported fault: 2^64-1
    ("expires", MAX_U64 + 1, False),
    ("size", 0, False),
    ("size", MAX_IMAGE_BYTES + 1, False),
    ("block_size", 0, False),
    ("block_size", MAX_BLOCK_BYTES + 1, False),
]


def otaimg_for(name: str, value: int) -> bytes:
    if name in ("vendor", "image_type", "hw_min", "hw_max", "fw_version"):
        options = header_case(name, value)
        return release(header=options.pop("header"), **options)
    return release(**{name: value})


async def check_import(tmp_path: Path, data: bytes, imported: bool) -> Manifest | None:
    images = tmp_path / "images"
    async with await Store.open(tmp_path / "state") as store:
        catalogue = Catalogue(store, TRUST, images)
        if not imported:
            with pytest.raises(ProtocolError) as refused:
                await catalogue.import_image(data)
            assert isinstance(refused.value.reason, Reason)
            assert not images.exists() or not list(images.iterdir())
            assert await store.images() == []
            assert catalogue.images == {}
            return None
        image, new = await catalogue.import_image(data)
        assert new
        json.dumps(image.to_json())
        reloaded = Catalogue(store, TRUST, images)
        await reloaded.load()
        assert reloaded.images[image.sha256].manifest == image.manifest
        signed = SignedImage.decode(data)
        manifest, ota = verify(signed, TRUST, now=NOW)
        assert "refused" not in summary("OK", manifest, ota, signed)
        return image.manifest


@pytest.mark.parametrize(("name", "value", "imported"), CASES)
async def test_every_integer_field_at_its_edges_imports_or_is_refused_typed_leaving_nothing(
    tmp_path: Path, name: str, value: int, imported: bool
) -> None:
    manifest = await check_import(tmp_path, otaimg_for(name, value), imported)
    if manifest is not None:
        assert getattr(manifest, name) == value


async def test_an_expiry_of_2_64_minus_1_is_kept_exact_in_the_manifest_and_listed(
    tmp_path: Path,
) -> None:
    manifest = await check_import(tmp_path, release(expires=MAX_U64), True)
    assert manifest is not None
    assert manifest.expires == MAX_U64
    async with await Store.open(tmp_path / "state") as store:
        (row,) = await store.images()
        assert row.expires == (1 << 63) - 1  # the row's copy saturates; the manifest is exact
        catalogue = Catalogue(store, TRUST, tmp_path / "images")
        await catalogue.load()
        (image,) = catalogue.images.values()
        assert image.to_json()["expires"] == MAX_U64
        signed = SignedImage.decode(release(expires=MAX_U64))
        line = summary("OK", *verify(signed, TRUST, now=NOW), signed)
        assert f"expires unix {MAX_U64}" in line


@pytest.mark.slow
async def test_the_largest_image_and_block_size_import_and_one_byte_more_is_refused(
    tmp_path: Path,
) -> None:
    overhead = len(wrap(b"x", manufacturer_code=1, image_type=1, file_version=1, hw_min=0,
                        hw_max=1)) - 1  # fmt: skip
    largest = release(
        firmware=bytes(MAX_IMAGE_BYTES - overhead), signing_block_size=MAX_BLOCK_BYTES
    )
    manifest = await check_import(tmp_path / "a", largest, True)
    assert manifest is not None
    assert (manifest.size, manifest.block_size) == (MAX_IMAGE_BYTES, MAX_BLOCK_BYTES)
    smallest_block = release(signing_block_size=16)
    assert await check_import(tmp_path / "b", smallest_block, True) is not None
    too_large = SignedImage.decode(largest)
    one_more = SignedImage(too_large.signed_manifest, too_large.image + b"\0").encode()
    with pytest.raises(ProtocolError) as refused:
        await check_import(tmp_path / "c", one_more, True)
    assert refused.value.reason is Reason.TOO_LARGE
    assert not (tmp_path / "c" / "images").exists()


async def test_a_store_failure_during_import_leaves_no_file_behind(tmp_path: Path) -> None:
    images = tmp_path / "images"
    store = await Store.open(tmp_path / "state")
    catalogue = Catalogue(store, TRUST, images)
    await store.close()  # the store fails under the import, after the file was written
    with pytest.raises(StoreError):
        await catalogue.import_image(release())
    assert not list(images.iterdir())
    async with await Store.open(tmp_path / "state") as reopened:
        assert await reopened.images() == []


async def test_a_conflicting_import_keeps_the_file_of_the_image_already_stored(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    first = release()
    async with await Store.open(tmp_path / "state") as store:
        image, _ = await Catalogue(store, TRUST, images).import_image(first)
        stale = Catalogue(store, TRUST, images)  # not loaded: it does not know the image
        other = SignedImage(
            sign1(dataclasses.replace(image.manifest, sequence=8).encode(), KEY),
            SignedImage.decode(first).image,
        ).encode()
        with pytest.raises(ProtocolError) as refused:
            await stale.import_image(other)
        assert refused.value.reason is Reason.REPLAYED
        assert image.path.read_bytes() == SignedImage.decode(first).image
        reloaded = Catalogue(store, TRUST, images)
        await reloaded.load()
        assert (await reloaded.blocks(reloaded.images[image.sha256])) is not None
