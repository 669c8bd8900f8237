"""What a virtual Communications Hub keeps on disk, so a restarted hub resumes.

One small directory per hub under the run's state directory::

    <state_dir>/hubs/<GUID>/receiver.snap      the protocol Receiver's snapshot (opaque bytes)
    <state_dir>/hubs/<GUID>/<image hex>.img    the image's blocks, written where they belong

Storage choice: blocks go straight to a **sparse file per image** (``pwrite`` at
``index * block_size``; the file is sized to the image when it is opened), never to RAM. A hub
therefore costs only its MQTT connection and the receiver's bookkeeping in memory, whatever the
image size: 1,000 hubs x 1 MiB images is 1 GiB of page cache the kernel may drop, not 1 GiB of
Python heap. While an image is being received its file stays open (one file descriptor per active
transfer, on top of the one per connection; the runner raises ``RLIMIT_NOFILE``).

Writes are batched: :meth:`HubStore.write_block` only queues a verified block, and
:meth:`HubStore.flush_blocks` writes what is queued, each run of adjacent blocks with one
``pwritev`` (a block of a fresh sparse file cost about 2 us written alone, 1.1 us in runs of
four, measured). The hub flushes before it publishes anything that reports blocks held (an
acknowledgement), and the store flushes by itself before a snapshot is saved and before an
image's file is closed or read back: a block is on disk before anyone is told about it, and a
crash loses only blocks nobody was told about (the sender sends them again).

Snapshots: ``receiver.snap`` is a log of records, each ``HSN1``, the length (4 bytes, big
endian), the SHA-256 of the snapshot and the snapshot; the last record that is whole and hashes
right is the snapshot (:meth:`HubStore.load_snapshot`). A save appends a record after the last
good one, so a hub killed at any instant leaves either the old or the new snapshot, never half of
one (a torn record fails its hash and is written over by the next save). Appending creates no
file and renames none: each save used to create a temporary file and rename it over the old one,
and at 1,000 hubs creating those inodes was about 4% of the hub process (ext4 scans the inodes
it freed recently). When the log would pass four times the new record (and 64 KiB) it is
rewritten with that record alone, atomically (a temporary file, then ``os.replace``).

Crash safety: block data is written *before* the snapshot that records it, so a snapshot
never claims a block the image file lacks. The snapshot may lag the data; the hub recovers the
difference from the image file at restart (:meth:`HubStore.read_blocks`, each block re-checked
against its signed hash). ``fsync`` is optional (``durable=True``): the load test simulates
process crashes, not power cuts, and an fsync per hub per save would make thousands of hubs
disk-bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

SNAPSHOT_NAME = "receiver.snap"
_RECORD = struct.Struct(">4sI32s")  # magic, length, SHA-256 of the snapshot
_MAGIC = b"HSN1"
#: The snapshot log is rewritten with its newest record alone when it would pass this many bytes
#: and four times that record.
COMPACT_AFTER_BYTES = 64 * 1024
log = logging.getLogger("loadtest.hubstate")
#: Blocks queued at most before they are written without waiting for a flush (bounds the memory
#: a hub holds however rarely it acknowledges); below Linux's IOV_MAX (1,024 buffers per call).
MAX_QUEUED_BLOCKS = 64


class HubStore:
    """The on-disk state of one hub: its receiver snapshot and the images it is receiving."""

    __slots__ = ("_durable", "_fds", "_log_end", "_made", "_queued", "_queued_count", "dir")

    def __init__(self, state_dir: Path | str, guid: str, *, durable: bool = False) -> None:
        self.dir = Path(state_dir) / "hubs" / guid
        self._durable = durable
        self._fds: dict[bytes, int] = {}
        self._queued: dict[bytes, list[tuple[int, bytes]]] = {}  # image -> [(offset, data)]
        self._queued_count = 0
        self._log_end: int | None = None  # where the next snapshot record goes (None: not read)
        self._made = False

    def _ensure_dir(self) -> None:
        if not self._made:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._made = True

    # ------------------------------------------------------------------ receiver snapshot

    def load_snapshot(self) -> bytes | None:
        """The last snapshot saved (the log's last good record), or ``None`` for a hub that
        never saved one."""
        try:
            raw = (self.dir / SNAPSHOT_NAME).read_bytes()
        except FileNotFoundError:
            self._log_end = 0
            return None
        latest: bytes | None = None
        pos = 0
        while pos + _RECORD.size <= len(raw):
            magic, length, digest = _RECORD.unpack_from(raw, pos)
            start = pos + _RECORD.size
            end = start + length
            if magic != _MAGIC or end > len(raw):
                break
            data = raw[start:end]
            if hashlib.sha256(data).digest() != digest:
                break
            latest, pos = data, end
        if latest is None and raw:
            log.warning("%s: no whole snapshot in %d bytes; starting afresh", self.dir, len(raw))
        self._log_end = pos
        return latest

    def save_snapshot(self, data: bytes) -> None:
        """Make ``data`` the snapshot, atomically (module docstring), after writing every queued
        block (a snapshot never claims a block the image file lacks)."""
        self.flush_blocks()
        self._ensure_dir()
        if self._log_end is None:
            self.load_snapshot()
        assert self._log_end is not None
        record = _RECORD.pack(_MAGIC, len(data), hashlib.sha256(data).digest()) + data
        final = self.dir / SNAPSHOT_NAME
        end = self._log_end + len(record)
        if self._log_end and end > max(COMPACT_AFTER_BYTES, 4 * len(record)):
            tmp = self.dir / (SNAPSHOT_NAME + ".tmp")
            self._write_file(tmp, record, os.O_TRUNC)
            os.replace(tmp, final)
            self._log_end = len(record)
            self._sync_dir()
            return
        self._write_file(final, record, 0, at=self._log_end)
        created = self._log_end == 0
        self._log_end = end
        if created:
            self._sync_dir()

    def _write_file(self, path: Path, data: bytes, flags: int, at: int = 0) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_dir(self) -> None:
        if self._durable:
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # ------------------------------------------------------------------ image blocks

    def image_path(self, image: bytes) -> Path:
        """Where the blocks of image ``image`` (its SHA-256) are stored."""
        return self.dir / f"{image.hex()}.img"

    def write_block(self, image: bytes, size: int, offset: int, data: bytes) -> None:
        """Queue ``data`` for ``offset`` of image ``image`` (``size`` bytes in all); it is on
        disk after the next :meth:`flush_blocks` (or snapshot save, or close of the image)."""
        queued = self._queued.get(image)
        if queued is None:
            if image not in self._fds:
                self._open_image(image, size)
            queued = self._queued[image] = []
        queued.append((offset, data))
        self._queued_count += 1
        if self._queued_count >= MAX_QUEUED_BLOCKS:
            self.flush_blocks()

    def _open_image(self, image: bytes, size: int) -> None:
        self._ensure_dir()
        fd = os.open(self.image_path(image), os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        self._fds[image] = fd

    def flush_blocks(self) -> None:
        """Write every queued block: each run of adjacent blocks with one ``pwritev``."""
        if not self._queued:
            return
        queued, self._queued = self._queued, {}
        self._queued_count = 0
        for image, blocks in queued.items():
            fd = self._fds[image]
            if len(blocks) > 1:
                blocks.sort()
            start, end = -1, -1
            run: list[bytes] = []
            for offset, data in blocks:
                if offset != end:
                    if run:
                        _pwrite_all(fd, run, start, end - start)
                    start, end, run = offset, offset, []
                run.append(data)
                end += len(data)
            _pwrite_all(fd, run, start, end - start)

    def read_blocks(
        self, image: bytes, block_size: int, size: int, indices: Iterable[int]
    ) -> Iterator[tuple[int, bytes]]:
        """The stored bytes of blocks ``indices`` of ``image`` that are not holes (all zeros).

        Nothing if the image file does not exist. What comes back is unverified: the caller
        checks each block against its signed hash.
        """
        try:
            fd = os.open(self.image_path(image), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            for index in indices:
                offset = index * block_size
                length = min(block_size, size - offset)
                if length <= 0:
                    continue
                data = os.pread(fd, length, offset)
                if len(data) == length and data.count(0) != length:
                    yield index, data
        finally:
            os.close(fd)

    def close_image(self, image: bytes) -> None:
        """Write the image's queued blocks and close its file (it stays on disk)."""
        if image in self._queued:
            self.flush_blocks()
        fd = self._fds.pop(image, None)
        if fd is not None:
            os.close(fd)

    def discard_image(self, image: bytes) -> None:
        """Close and delete what is stored (or queued) of image ``image``."""
        self._queued_count -= len(self._queued.pop(image, ()))
        self.close_image(image)
        self.image_path(image).unlink(missing_ok=True)

    def has_image_file(self, image: bytes) -> bool:
        """Whether a file for ``image`` exists."""
        return self.image_path(image).exists()

    def close(self) -> None:
        """Write every queued block and close every open image file."""
        self.flush_blocks()
        for image in list(self._fds):
            self.close_image(image)

    def remove_all(self) -> None:
        """Delete this hub's whole directory (a factory reset)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._made = False
        self._log_end = 0


def _pwrite_all(fd: int, buffers: list[bytes], offset: int, total: int) -> None:
    """Write ``buffers`` (``total`` bytes) one after the other from ``offset`` (a short write
    is continued)."""
    written = os.pwritev(fd, buffers, offset)
    if written == total:
        return
    rest = b"".join(buffers)[written:]
    offset += written
    while rest:
        n = os.pwrite(fd, rest, offset)
        rest, offset = rest[n:], offset + n
