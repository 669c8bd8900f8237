"""Image catalogue: verified releases, stored content-addressed, and their pre-encoded blocks.

``import_image`` takes the bytes of an ``.otaimg`` and, in a worker thread (ECDSA and SHA-256
over a whole image must not run on the event loop), checks everything
:func:`protocol.release.otaimg.verify` checks: container, signature against the trust store,
manifest, expiry, image digest, per-block hashes, ZigBee OTA header. A refused image raises
:class:`~protocol.errors.ProtocolError` with the typed reason, and nothing is written. An accepted
one is written to ``<state_dir>/images/<sha256 hex>`` (temporary file, fsync, rename) and then
recorded in the store durably, so the catalogue never names a file that is not on disk.

Blocks are content-addressed: ``Block(image, index, data)`` is the same message for every CH, so
:class:`BlockSource` encodes each block of an image once and hands the same ``bytes`` to every
publish (a bounded cache; an image whose encoded blocks exceed the budget is re-encoded on a miss,
oldest entries evicted first).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from otad.files import FileError, read_bounded, write_atomic
from otad.store import ConflictError, ImageRow, Store
from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import Manifest
from protocol.release.otaimg import SignedImage, verify
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, TrustStore
from protocol.wire.messages import Block, Offer

log = logging.getLogger("otad.catalogue")

#: Default byte budget of one image's cache of encoded blocks.
DEFAULT_BLOCK_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Image:
    """An imported, verified release."""

    sha256: bytes
    manifest: Manifest
    signed_manifest: bytes
    path: Path
    imported_at: float
    offer: bytes  # the encoded Offer message (identical for every CH)

    @property
    def hex(self) -> str:
        """The digest in hex (the image's name for operators)."""
        return self.sha256.hex()

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (``image.list``)."""
        m = self.manifest
        return {
            "sha256": self.hex,
            "device_type": m.device_type.value,
            "vendor": m.vendor,
            "image_type": m.image_type,
            "fw_version": m.fw_version,
            "hw_min": m.hw_min,
            "hw_max": m.hw_max,
            "sequence": m.sequence,
            "size": m.size,
            "block_size": m.block_size,
            "blocks": m.block_count,
            "created": m.created,
            "expires": m.expires,
            "imported_at": self.imported_at,
        }


class BlockSource:
    """The blocks of one image as encoded ``Block`` messages, each encoded at most once while
    it stays in the (bounded) cache."""

    __slots__ = ("_budget", "_cache", "_cached_bytes", "_data", "_image", "block_size", "count")

    def __init__(self, image: Image, data: bytes, *, budget: int = DEFAULT_BLOCK_CACHE_BYTES):
        """``data`` is the whole image (already checked against its digest)."""
        self._image = image.sha256
        self._data = memoryview(data)
        self.block_size = image.manifest.block_size
        self.count = image.manifest.block_count
        self._cache: dict[int, bytes] = {}
        self._cached_bytes = 0
        self._budget = budget

    def get(self, index: int, ack_now: bool = False) -> bytes:
        """The encoded ``Block`` message of block ``index`` (with its ``ack_now`` flag)."""
        key = (index << 1) | ack_now
        encoded = self._cache.get(key)
        if encoded is not None:
            return encoded
        start = index * self.block_size
        encoded = Block(
            image=self._image,
            index=index,
            data=bytes(self._data[start : start + self.block_size]),
            ack_now=ack_now,
        ).encode()
        while self._cache and self._cached_bytes + len(encoded) > self._budget:
            oldest = next(iter(self._cache))
            self._cached_bytes -= len(self._cache.pop(oldest))
        self._cache[key] = encoded
        self._cached_bytes += len(encoded)
        return encoded

    @property
    def cached_bytes(self) -> int:
        """Bytes of encoded blocks held now."""
        return self._cached_bytes


def _verify_release(data: bytes, trust: TrustStore, now: UnixTime) -> tuple[Manifest, SignedImage]:
    """Decode and fully verify an ``.otaimg`` (worker thread)."""
    signed = SignedImage.decode(data)
    manifest, _ota = verify(signed, trust, now=now)
    return manifest, signed


def _store_image_file(path: Path, data: bytes) -> bool:
    """Write an accepted image durably (worker thread), creating the images directory; return
    whether a file was there already."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    existed = path.exists()
    write_atomic(path, data, mode=0o600)
    return existed


def _read_checked(path: Path, sha256: bytes, size: int) -> bytes:
    """Read a stored image and check its digest (worker thread); ``ProtocolError`` if it is
    unreadable or damaged."""
    try:
        data = read_bounded(path, size, what="its manifest's size")
    except FileError as exc:
        raise ProtocolError(Reason.IMAGE_HASH, f"stored image {exc}") from None
    if len(data) != size or hashlib.sha256(data).digest() != sha256:
        raise ProtocolError(Reason.IMAGE_HASH, f"stored image {path} is damaged")
    return data


def _manifest_of(row: ImageRow, trust: TrustStore) -> Manifest:
    """Re-check a stored signed manifest's signature (keys may have been revoked since)."""
    payload = trust.verify(row.signed_manifest, max_size=MAX_SIGNED_MANIFEST_BYTES)
    manifest = Manifest.from_cbor(payload)
    if manifest.sha256 != row.sha256:
        raise ProtocolError(Reason.WRONG_IMAGE, "stored manifest names another image")
    return manifest


class Catalogue:
    """Every imported image, by digest, and the block sources of images being distributed."""

    def __init__(
        self,
        store: Store,
        trust: TrustStore,
        images_dir: Path,
        *,
        block_cache_bytes: int = DEFAULT_BLOCK_CACHE_BYTES,
    ) -> None:
        """Images are stored under ``images_dir``."""
        self._store = store
        self._trust = trust
        self._dir = images_dir
        self._cache_budget = block_cache_bytes
        self.images: dict[bytes, Image] = {}
        self._sources: dict[bytes, BlockSource] = {}
        self._loading: dict[bytes, asyncio.Future[BlockSource]] = {}
        self._import_lock = asyncio.Lock()

    async def load(self) -> None:
        """Load the images the store lists; one whose signature no longer verifies (revoked or
        removed key) is left out, with a warning."""
        for row in await self._store.images():
            try:
                manifest = _manifest_of(row, self._trust)
            except ProtocolError as exc:
                log.warning("image %s no longer verifies (%s): not served", row.sha256.hex(), exc)
                continue
            self._add(manifest, row.signed_manifest, Path(row.path), row.imported_at)

    @property
    def trust(self) -> TrustStore:
        """The trust store imports are verified against."""
        return self._trust

    def replace_trust(self, trust: TrustStore) -> list[str]:
        """Verify every later import against ``trust`` (a SIGHUP reload); return one line per
        imported image that no longer verifies under it. Such an image stays served until
        otad restarts (transfers in progress are not cut off); a restart leaves it out, as
        :meth:`load` does."""
        self._trust = trust
        lost = []
        for image in self.images.values():
            try:
                trust.verify(image.signed_manifest, max_size=MAX_SIGNED_MANIFEST_BYTES)
            except ProtocolError as exc:
                lost.append(f"{image.sha256.hex()} ({exc})")
        return lost

    def _add(self, manifest: Manifest, signed: bytes, path: Path, imported_at: float) -> Image:
        image = Image(
            sha256=manifest.sha256,
            manifest=manifest,
            signed_manifest=signed,
            path=path,
            imported_at=imported_at,
            offer=Offer(image=manifest.sha256, manifest=signed).encode(),
        )
        self.images[image.sha256] = image
        return image

    async def import_image(self, data: bytes) -> tuple[Image, bool]:
        """Verify and store an ``.otaimg``; return (image, newly imported).

        Raises :class:`ProtocolError` with the reason a bad image is refused (nothing stored).
        """
        now = time.time()
        manifest, signed = await asyncio.to_thread(
            _verify_release, data, self._trust, UnixTime(int(now))
        )
        async with self._import_lock:
            known = self.images.get(manifest.sha256)
            if known is not None:
                if known.signed_manifest != signed.signed_manifest:
                    raise ProtocolError(
                        Reason.REPLAYED,
                        f"image {manifest.sha256.hex()} is already imported with another manifest",
                    )
                return known, False
            path = self._dir / manifest.sha256.hex()
            existed = await asyncio.to_thread(_store_image_file, path, signed.image)
            try:
                row = await self._store.add_image(manifest, signed.signed_manifest, path, now)
            except BaseException as exc:
                # a failed import leaves nothing behind; a file that was there already may be
                # another row's (the same digest imported with another manifest): it stays
                if not existed:
                    await asyncio.shield(asyncio.to_thread(path.unlink, missing_ok=True))
                if isinstance(exc, ConflictError):
                    raise ProtocolError(Reason.REPLAYED, str(exc)) from None
                raise
            image = self._add(manifest, signed.signed_manifest, path, row.imported_at)
        log.info(
            "imported image %s (%s fw 0x%08x, %d bytes, %d blocks)",
            image.hex,
            manifest.device_type.value,
            manifest.fw_version,
            manifest.size,
            manifest.block_count,
        )
        return image, True

    def resolve(self, ref: str) -> Image:
        """The image named by its digest or a unique hex prefix (at least 4 digits).

        Raises ``ProtocolError(UNKNOWN_IMAGE)`` for none or several matches.
        """
        text = ref.strip().lower()
        if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
            raise ProtocolError(
                Reason.UNKNOWN_IMAGE, f"{ref[:80]!r} is not a digest or a hex prefix (>= 4)"
            )
        if len(text) == 64:
            image = self.images.get(bytes.fromhex(text))
            if image is None:
                raise ProtocolError(Reason.UNKNOWN_IMAGE, f"no image {text}")
            return image
        found = [img for sha, img in self.images.items() if sha.hex().startswith(text)]
        if not found:
            raise ProtocolError(Reason.UNKNOWN_IMAGE, f"no image starts with {text}")
        if len(found) > 1:
            raise ProtocolError(
                Reason.UNKNOWN_IMAGE, f"{text} is ambiguous ({len(found)} images match)"
            )
        return found[0]

    async def blocks(self, image: Image) -> BlockSource:
        """The block source of ``image``, loading (and re-checking) its file on first use."""
        source = self._sources.get(image.sha256)
        if source is not None:
            return source
        loading = self._loading.get(image.sha256)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self._loading[image.sha256] = loading
            try:
                data = await asyncio.to_thread(
                    _read_checked, image.path, image.sha256, image.manifest.size
                )
                source = BlockSource(image, data, budget=self._cache_budget)
                self._sources[image.sha256] = source
                loading.set_result(source)
            except BaseException as exc:
                loading.set_exception(exc)
                loading.exception()  # retrieved: the awaiters below re-raise it
                raise
            finally:
                self._loading.pop(image.sha256, None)
            return source
        return await loading

    def unload(self, sha256: bytes) -> None:
        """Drop the image bytes and encoded blocks (no transfer of it is active)."""
        self._sources.pop(sha256, None)
