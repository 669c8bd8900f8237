"""The daemon's state: one SQLite database in WAL mode, one writer, batched bookkeeping.

Theory of operation
-------------------

``<state_dir>/otad.db`` is opened through aiosqlite, which runs one thread per connection with a
FIFO of calls. The store owns exactly **one** connection and **one** writer task: every job,
write *or* read, is queued to that task and runs alone, so no coroutine can observe (or
interleave statements into) another one's open transaction (D03). A second otad on the same state
directory is refused by an exclusive ``flock`` on ``<state_dir>/otad.lock``.

Writes come in three kinds:

* **durable** (``durable=True``: :meth:`Store.add_image`, :meth:`Store.start_transfer`,
  :meth:`Store.finish_transfer`, :meth:`Store.append_event`, :meth:`Store.meta_set`,
  :meth:`Store.next_counter`) - facts the CHs cannot give back to us after a power cut. The
  awaiting caller resumes only after ``COMMIT`` returned with ``PRAGMA synchronous=FULL``, i.e.
  after the WAL was fsynced.
* **committed** (``durable=False``: hub announcements, online flags, pruning) - the caller awaits
  the ``COMMIT``, made with ``synchronous=NORMAL``: it survives a crash of otad, and may be lost
  on a power cut, after which the CHs re-announce themselves.
* **batched** (:meth:`Store.record_progress`, :meth:`Store.mark_published`) - acknowledgement
  bookkeeping. Calls only update an in-memory map (latest value per transfer wins); the writer
  commits the map in ONE transaction every ``flush_interval`` seconds, or as soon as
  ``flush_batch`` updates accumulated. A kill loses at most the unflushed window, which the CH's
  next acknowledgement re-derives (D02). Reads overlay the unflushed values, so callers always
  read their own writes.

Why toggle ``synchronous`` on the one connection instead of a second, FULL connection: in WAL
mode ``synchronous`` only decides whether ``COMMIT`` fsyncs the WAL, and it is read at commit
time, so ``PRAGMA synchronous=FULL; BEGIN IMMEDIATE; ...; COMMIT; PRAGMA synchronous=NORMAL``
makes exactly that commit durable. The fsync covers the whole WAL file, so every earlier NORMAL
commit becomes durable with it: durability follows commit order (a durable decision is never on
disk without the bookkeeping that preceded it). A second connection would be a second writer,
contending for the WAL write lock (``SQLITE_BUSY``) and breaking that order.

Durable and committed writes that are queued together are *group-committed*: one ``BEGIN
IMMEDIATE`` ... ``COMMIT`` (FULL if any member is durable) with one ``SAVEPOINT`` per job, so a
failing job is rolled back alone and the others still commit; thousands of hubs starting
transfers cost a handful of fsyncs, not thousands. Each logical change is atomic: on any SQLite
error its statements are rolled back and the caller gets a :class:`StoreError`. A caller cancelled
before its job ran is skipped; once a job runs, it completes.

Every open asserts ``journal_mode`` is ``wal`` and sets ``synchronous``, ``busy_timeout`` and
``foreign_keys`` (they are per connection), then applies the missing migrations of
:mod:`otad.migrations` in one transaction; a database from a newer otad is refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import aiosqlite

from otad.migrations import MIGRATIONS, SCHEMA_VERSION
from protocol.release.manifest import Manifest
from protocol.wire.messages import HubAnnounced, Limits

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "ConflictError",
    "EventRow",
    "FinalState",
    "HanDeviceRow",
    "HubRow",
    "ImageRow",
    "NewEvent",
    "NotFoundError",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreStats",
    "TransferRow",
    "TransferState",
    "Tx",
]

log = logging.getLogger(__name__)

DB_NAME: Final = "otad.db"
LOCK_NAME: Final = "otad.lock"
_MAX_GROUP: Final = 256  # jobs per group commit
_RETRY_AFTER_FAILED_FLUSH: Final = 1.0  # seconds
_MAX_SQL_INT: Final = (1 << 63) - 1
_IN_CHUNK: Final = 500  # parameters per "IN (...)" list (SQLite allows 32,766)
_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """A store operation failed; whatever it was changing was rolled back."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer otad (higher ``PRAGMA user_version``)."""


class StoreLockedError(StoreError):
    """Another process holds the state directory."""


class NotFoundError(StoreError):
    """The row an update refers to does not exist."""


class ConflictError(StoreError):
    """The change contradicts a row that already exists."""


# --------------------------------------------------------------------------- rows


class TransferState(enum.StrEnum):
    """State of one (CH, image) transfer. Every state but ``ACTIVE`` is final."""

    ACTIVE = "active"  # blocks are being sent
    HELD = "held"  # the CH verified and holds the whole image
    REJECTED = "rejected"  # the CH refused the offer or aborted
    CANCELLED = "cancelled"  # otad abandoned it
    FAILED = "failed"  # gave up (e.g. no progress after many RTOs)
    TIMED_OUT = "timed_out"  # a phase deadline passed (not a failure of the CH)


@dataclass(frozen=True, slots=True)
class HubRow:
    """A Communications Hub as it last announced itself."""

    guid: str
    fw_version: int
    hw_version: int
    supplier: str
    segment: str
    limits: Limits
    online: bool
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class HanDeviceRow:
    """One device on a CH's home area network, as the CH last reported it."""

    guid: str
    device_id: str
    device_type: str
    join_mode: str
    fw_version: int
    hw_version: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class ImageRow:
    """An imported firmware image: the fields of its manifest, the signed manifest, its file."""

    sha256: bytes
    vendor: int
    image_type: int
    device_type: str
    hw_min: int
    hw_max: int
    fw_version: int
    sequence: int
    size: int
    block_size: int
    block_count: int
    created: int
    expires: int
    signed_manifest: bytes
    path: str
    imported_at: float


@dataclass(frozen=True, slots=True)
class TransferRow:
    """Distribution of one image to one CH. ``acked_bitmap`` is opaque to the store."""

    guid: str
    image: bytes
    state: TransferState
    blocks_total: int
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int
    acked_bitmap: bytes
    reason: str | None
    held_sha256: bytes | None
    attempts: int
    started_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class FinalState:
    """A transfer's end, with its last progress: one row of :meth:`Store.finish_transfers`."""

    guid: str
    image: bytes
    state: TransferState
    reason: str | None
    held_sha256: bytes | None
    finished_at: float
    acked_bitmap: bytes
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event for :meth:`Store.append_events`."""

    kind: str
    key: str
    payload: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class EventRow:
    """One monitoring event of the outbox; ``seq`` is the monotonic event sequence."""

    seq: int
    kind: str
    key: str
    payload: dict[str, Any]
    created_at: float
    published: bool


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of the writer, for metrics, health checks and tests."""

    commits: int  # write transactions committed (group commits + batch flushes)
    durable_commits: int  # of which committed with synchronous=FULL
    writes: int  # durable/committed jobs that committed
    flushes: int  # batch flush transactions committed
    rows_flushed: int  # transfer rows written by batch flushes
    updates: int  # record_progress / mark_published calls
    flush_errors: int  # batch flushes that failed (and will be retried)
    pending: int  # transfers with unflushed progress right now


@dataclass(slots=True)
class _Progress:
    acked_bitmap: bytes
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int
    now: float


@dataclass(slots=True, eq=False)
class _Job:
    kind: Literal["write", "read", "flush"]
    fn: Callable[[Tx], Awaitable[Any]] | None
    future: asyncio.Future[Any]
    durable: bool
    name: str


# --------------------------------------------------------------------------- transaction handle


class Tx:
    """The connection as one job sees it, valid only while that job runs.

    A write job (:meth:`Store.write`) runs inside the writer's transaction; a read job
    (:meth:`Store.read`) may only fetch. Parameters use ``?`` placeholders.
    """

    __slots__ = ("_after", "_db", "_live", "_writable")

    def __init__(self, db: aiosqlite.Connection, *, writable: bool) -> None:
        self._db = db
        self._writable = writable
        self._live = True
        self._after: list[Callable[[], None]] = []

    def _conn(self, write: bool) -> aiosqlite.Connection:
        if not self._live:
            raise StoreError("transaction handle used after its job ended")
        if write and not self._writable:
            raise StoreError("write statement in a read-only job")
        return self._db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        cursor = await self._conn(True).execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement once per parameter row; return the rows changed in total."""
        cursor = await self._conn(True).executemany(sql, rows)
        return cursor.rowcount

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a query (in a write job, also of ``INSERT ... RETURNING``)."""
        return list(await self._conn(False).execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """First row of a query, or None."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once this job's changes are committed."""
        self._conn(True)
        self._after.append(callback)


# --------------------------------------------------------------------------- the store


class Store:
    """Single-writer SQLite store of hubs, images, transfers, the event outbox and meta values.

    Use :meth:`open` (or ``async with await Store.open(...)``); all methods are coroutines except
    the batched :meth:`record_progress` and :meth:`mark_published`, which return at once.
    """

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        lock_fd: int,
        *,
        flush_interval: float,
        flush_batch: int,
    ) -> None:
        """Internal: use :meth:`open`."""
        self._db = db
        self._path = path
        self._lock_fd: int | None = lock_fd
        self._flush_interval = flush_interval
        self._flush_batch = flush_batch
        self._loop = asyncio.get_running_loop()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._pending: dict[tuple[str, bytes], _Progress] = {}
        self._pending_mark: int | None = None
        self._updates_since_flush = 0
        self._deadline: float | None = None
        self._closing = False
        self._closed = False
        self._failed: str | None = None
        self._inflight: list[_Job] = []
        self._flush_failing = False
        self._close_error: StoreError | None = None
        self._counts = dict.fromkeys(
            ("commits", "durable_commits", "writes", "flushes", "rows_flushed", "updates"), 0
        )
        self._counts["flush_errors"] = 0
        self._writer = asyncio.create_task(self._run(), name="otad.store.writer")

    # ----------------------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        state_dir: Path | str,
        *,
        flush_interval: float = 0.1,
        flush_batch: int = 1000,
        busy_timeout_ms: int = 5000,
        trace: Callable[[str], None] | None = None,
    ) -> Store:
        """Open (creating if needed) ``<state_dir>/otad.db`` and start the writer task.

        ``flush_interval`` (seconds) and ``flush_batch`` (updates) bound how long batched
        bookkeeping waits before it is committed. ``trace``, if given, is called from the
        database thread with every SQL statement executed (debugging, tests). Raises
        :class:`StoreLockedError` if another process holds the directory,
        :class:`SchemaTooNewError` for a database of a newer otad, :class:`StoreError` otherwise.
        """
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval!r}")
        if flush_batch < 1:
            raise ValueError(f"flush_batch must be >= 1, got {flush_batch!r}")
        directory = Path(state_dir)
        lock_fd = await asyncio.to_thread(_lock_state_dir, directory)
        path = directory / DB_NAME
        try:
            db = await _connect(path, busy_timeout_ms, trace)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(db, path, lock_fd, flush_interval=flush_interval, flush_batch=flush_batch)

    async def close(self) -> None:
        """Commit the pending batch, stop the writer, close the database, release the lock.

        Raises :class:`StoreError` if the final flush failed (the connection is closed anyway).
        """
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        try:
            await self._writer
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is cancelled: the writer was cancelled with it
        except Exception:  # noqa: S110 - the writer logged its crash and failed its jobs
            pass
        finally:
            self._closed = True
            try:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("PRAGMA optimize")
                await self._db.close()
            except (sqlite3.Error, ValueError) as exc:
                self._close_error = self._close_error or StoreError(f"closing {self._path}: {exc}")
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None
        if self._close_error is not None:
            raise self._close_error

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def healthy(self) -> bool:
        """True while the writer runs and the last batch flush (if any) succeeded."""
        return (
            not self._closing
            and self._failed is None
            and not self._writer.done()
            and not self._flush_failing
        )

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the writer's counters."""
        return StoreStats(pending=len(self._pending), **self._counts)

    async def flush(self) -> None:
        """Commit the pending batched bookkeeping now and wait for it (no-op when none)."""
        await self._submit("flush", None, durable=False, name="flush")

    async def check_integrity(self) -> None:
        """Run ``PRAGMA integrity_check``; raise :class:`StoreError` unless it says ``ok``."""

        async def integrity_check(tx: Tx) -> list[str]:
            return [str(r[0]) for r in await tx.fetchall("PRAGMA integrity_check")]

        result = await self.read(integrity_check)
        if result != ["ok"]:
            raise StoreError(f"{self._path}: integrity_check: {'; '.join(result[:5])}")

    # ----------------------------------------------------------------------- generic jobs

    async def write(
        self, fn: Callable[[Tx], Awaitable[_T]], *, durable: bool = True, name: str | None = None
    ) -> _T:
        """Run ``fn`` as one atomic change and return its result once it is committed.

        ``durable=True`` commits with ``synchronous=FULL`` before this returns. If ``fn`` or any
        statement fails, everything ``fn`` did is rolled back and the error propagates (SQLite
        errors as :class:`StoreError`). ``fn`` must touch the database only through ``tx``.
        """
        result = await self._submit("write", fn, durable=durable, name=name or _name(fn))
        return cast(_T, result)

    async def read(self, fn: Callable[[Tx], Awaitable[_T]], *, name: str | None = None) -> _T:
        """Run ``fn`` (queries only) in the writer's turn, so it never sees a half-done change."""
        result = await self._submit("read", fn, durable=False, name=name or _name(fn))
        return cast(_T, result)

    # ----------------------------------------------------------------------- hubs

    async def upsert_hub(self, hub: HubAnnounced, now: float, *, online: bool = True) -> None:
        """Record a CH's announcement: its row and, replacing the old list, its HAN devices."""
        values = (
            hub.guid,
            hub.fw_version,
            hub.hw_version,
            hub.supplier,
            hub.segment,
            hub.limits.max_block,
            hub.limits.window,
            hub.limits.buffer,
            int(online),
            now,
            now,
        )
        devices = [
            (hub.guid, d.device_id, d.device_type, d.join_mode, d.fw_version, d.hw_version, now)
            for d in hub.han
        ]

        async def upsert_hub(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO hubs (guid, fw_version, hw_version, supplier, segment, max_block,"
                " window_blocks, buffer_bytes, online, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (guid) DO UPDATE SET fw_version = excluded.fw_version,"
                " hw_version = excluded.hw_version, supplier = excluded.supplier,"
                " segment = excluded.segment, max_block = excluded.max_block,"
                " window_blocks = excluded.window_blocks, buffer_bytes = excluded.buffer_bytes,"
                " online = excluded.online, last_seen = excluded.last_seen",
                values,
            )
            await tx.execute("DELETE FROM han_devices WHERE guid = ?", (hub.guid,))
            if devices:
                await tx.executemany(
                    "INSERT INTO han_devices (guid, device_id, device_type, join_mode,"
                    " fw_version, hw_version, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    devices,
                )

        await self.write(upsert_hub, durable=False)

    async def set_hub_online(self, guid: str, online: bool, now: float) -> bool:
        """Mark a known CH online or offline; return False if the CH never announced itself."""

        async def set_hub_online(tx: Tx) -> bool:
            changed = await tx.execute(
                "UPDATE hubs SET online = ?, last_seen = ? WHERE guid = ?",
                (int(online), now, guid),
            )
            return changed > 0

        return await self.write(set_hub_online, durable=False)

    async def hub(self, guid: str) -> HubRow | None:
        """One CH, or None."""

        async def hub(tx: Tx) -> HubRow | None:
            row = await tx.fetchone("SELECT * FROM hubs WHERE guid = ?", (guid,))
            return None if row is None else _hub_row(row)

        return await self.read(hub)

    async def hubs(self, *, online: bool | None = None) -> list[HubRow]:
        """All CHs ordered by GUID, or only those online / offline."""

        async def hubs(tx: Tx) -> list[HubRow]:
            if online is None:
                rows = await tx.fetchall("SELECT * FROM hubs ORDER BY guid")
            else:
                rows = await tx.fetchall(
                    "SELECT * FROM hubs WHERE online = ? ORDER BY guid", (int(online),)
                )
            return [_hub_row(r) for r in rows]

        return await self.read(hubs)

    async def han_devices(self, guid: str | None = None) -> list[HanDeviceRow]:
        """HAN devices of one CH, or of every CH, ordered by (GUID, device id)."""

        async def han_devices(tx: Tx) -> list[HanDeviceRow]:
            if guid is None:
                rows = await tx.fetchall("SELECT * FROM han_devices ORDER BY guid, device_id")
            else:
                rows = await tx.fetchall(
                    "SELECT * FROM han_devices WHERE guid = ? ORDER BY device_id", (guid,)
                )
            return [_han_row(r) for r in rows]

        return await self.read(han_devices)

    # ----------------------------------------------------------------------- images

    async def add_image(
        self, manifest: Manifest, signed_manifest: bytes, path: Path | str, now: float
    ) -> ImageRow:
        """Record an imported image (durable). The caller has verified ``signed_manifest``.

        Importing the same digest with the same signed manifest again returns the existing row;
        with a different one raises :class:`ConflictError`.
        """
        for name in ("created", "expires"):
            if not 0 <= getattr(manifest, name) <= _MAX_SQL_INT:
                raise ValueError(f"manifest {name} {getattr(manifest, name)} out of range")
        row = ImageRow(
            sha256=bytes(manifest.sha256),
            vendor=manifest.vendor,
            image_type=manifest.image_type,
            device_type=manifest.device_type.value,
            hw_min=manifest.hw_min,
            hw_max=manifest.hw_max,
            fw_version=manifest.fw_version,
            sequence=manifest.sequence,
            size=manifest.size,
            block_size=manifest.block_size,
            block_count=manifest.block_count,
            created=manifest.created,
            expires=manifest.expires,
            signed_manifest=bytes(signed_manifest),
            path=str(path),
            imported_at=now,
        )

        async def add_image(tx: Tx) -> ImageRow:
            existing = await tx.fetchone("SELECT * FROM images WHERE sha256 = ?", (row.sha256,))
            if existing is not None:
                if bytes(existing["signed_manifest"]) == row.signed_manifest:
                    return _image_row(existing)
                raise ConflictError(
                    f"image {row.sha256.hex()} is already imported with another manifest"
                )
            await tx.execute(
                "INSERT INTO images (sha256, vendor, image_type, device_type, hw_min, hw_max,"
                " fw_version, sequence, size, block_size, block_count, created, expires,"
                " signed_manifest, path, imported_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.sha256,
                    row.vendor,
                    row.image_type,
                    row.device_type,
                    row.hw_min,
                    row.hw_max,
                    row.fw_version,
                    _seq_text(row.sequence),
                    row.size,
                    row.block_size,
                    row.block_count,
                    row.created,
                    row.expires,
                    row.signed_manifest,
                    row.path,
                    row.imported_at,
                ),
            )
            return row

        return await self.write(add_image, durable=True)

    async def image(self, sha256: bytes) -> ImageRow | None:
        """One image by digest, or None."""

        async def image(tx: Tx) -> ImageRow | None:
            row = await tx.fetchone("SELECT * FROM images WHERE sha256 = ?", (bytes(sha256),))
            return None if row is None else _image_row(row)

        return await self.read(image)

    async def images(self) -> list[ImageRow]:
        """All images, by device type then sequence."""

        async def images(tx: Tx) -> list[ImageRow]:
            rows = await tx.fetchall("SELECT * FROM images ORDER BY device_type, sequence")
            return [_image_row(r) for r in rows]

        return await self.read(images)

    # ----------------------------------------------------------------------- transfers

    async def start_transfer(
        self, guid: str, image: bytes, blocks_total: int, now: float
    ) -> TransferRow:
        """Record that otad starts sending ``image`` to ``guid`` (durable); return the row.

        Idempotent for an active transfer (returns it, progress kept: resume). A finished one is
        restarted: state ``active``, progress zeroed (the CH re-reports what it holds),
        ``attempts`` + 1. The CH and the image must exist (else :class:`StoreError`).
        """
        (row,) = await self.start_transfers(image, [guid], blocks_total, now)
        return row

    async def start_transfers(
        self, image: bytes, guids: Sequence[str], blocks_total: int, now: float
    ) -> list[TransferRow]:
        """:meth:`start_transfer` for many CHs at once, in one durable job: a few statements
        whatever the count (a distribution to 10,000 CHs is one commit, not 40,000 round trips
        to the writer thread). Returns the rows in the order of ``guids`` (duplicates removed).
        All or nothing: a failure raises :class:`StoreError` and starts none."""
        if blocks_total < 1:
            raise ValueError(f"blocks_total must be >= 1, got {blocks_total}")
        image = bytes(image)
        wanted = list(dict.fromkeys(guids))

        async def start_transfers(tx: Tx) -> list[TransferRow]:
            existing: dict[str, sqlite3.Row] = {}
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in await tx.fetchall(
                    f"SELECT * FROM transfers WHERE image = ? AND guid IN ({marks})",  # noqa: S608
                    (image, *chunk),
                ):
                    existing[row["guid"]] = row
            active = TransferState.ACTIVE.value
            new = [g for g in wanted if g not in existing]
            again = [g for g in wanted if g in existing and existing[g]["state"] != active]
            if new:
                await tx.executemany(
                    "INSERT INTO transfers (guid, image, state, blocks_total, started_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(g, image, active, blocks_total, now, now) for g in new],
                )
            if again:
                await tx.executemany(
                    "UPDATE transfers SET state = ?, blocks_total = ?, blocks_acked = 0,"
                    " blocks_sent = 0, bytes_sent = 0, acked_bitmap = x'', reason = NULL,"
                    " held_sha256 = NULL, finished_at = NULL, attempts = attempts + 1,"
                    " started_at = ?, updated_at = ? WHERE guid = ? AND image = ?",
                    [(active, blocks_total, now, now, g, image) for g in again],
                )

                def drop_stale() -> None:  # progress noted for the previous attempts
                    for g in again:
                        self._pending.pop((g, image), None)

                tx.after_commit(drop_stale)
            out: list[TransferRow] = []
            for g in wanted:
                had = existing.get(g)
                if had is not None and had["state"] == active:
                    out.append(self._overlay(_transfer_row(had)))
                    continue
                out.append(
                    TransferRow(
                        guid=g,
                        image=image,
                        state=TransferState.ACTIVE,
                        blocks_total=blocks_total,
                        blocks_acked=0,
                        blocks_sent=0,
                        bytes_sent=0,
                        acked_bitmap=b"",
                        reason=None,
                        held_sha256=None,
                        attempts=1 if had is None else int(had["attempts"]) + 1,
                        started_at=now,
                        updated_at=now,
                        finished_at=None,
                    )
                )
            return out

        return await self.write(start_transfers, durable=True)

    def record_progress(
        self,
        guid: str,
        image: bytes,
        *,
        acked_bitmap: bytes,
        blocks_acked: int,
        blocks_sent: int,
        bytes_sent: int,
        now: float,
    ) -> None:
        """Note an active transfer's latest acknowledgement state (batched, returns at once).

        Only the latest values per transfer are kept and committed with the next flush; they
        are ignored if the transfer is no longer active by then. Use :meth:`flush` to wait.
        """
        self._check_usable()
        self._pending[(guid, bytes(image))] = _Progress(
            bytes(acked_bitmap), blocks_acked, blocks_sent, bytes_sent, now
        )
        self._note_update()

    async def finish_transfer(
        self,
        guid: str,
        image: bytes,
        state: TransferState,
        *,
        reason: str | None = None,
        held_sha256: bytes | None = None,
        now: float,
    ) -> TransferRow:
        """Record a transfer's final state (durable), with its unflushed progress; return it.

        Raises :class:`NotFoundError` if the transfer was never started.
        """
        state = TransferState(state)
        if state is TransferState.ACTIVE:
            raise ValueError("finish_transfer needs a final state; use start_transfer to resume")
        key = (guid, bytes(image))
        held = None if held_sha256 is None else bytes(held_sha256)

        async def finish_transfer(tx: Tx) -> TransferRow:
            progress = self._pending.get(key)
            sql = (
                "UPDATE transfers SET state = ?, reason = ?, held_sha256 = ?, finished_at = ?,"
                " updated_at = ?"
            )
            params: list[Any] = [state.value, reason, held, now, now]
            if progress is not None:
                sql += ", acked_bitmap = ?, blocks_acked = ?, blocks_sent = ?, bytes_sent = ?"
                params += [
                    progress.acked_bitmap,
                    progress.blocks_acked,
                    progress.blocks_sent,
                    progress.bytes_sent,
                ]
            changed = await tx.execute(f"{sql} WHERE guid = ? AND image = ?", (*params, *key))
            if not changed:
                raise NotFoundError(f"no transfer of {key[1].hex()[:16]} to {guid}")

            def drop_flushed() -> None:
                if self._pending.get(key) is progress:
                    self._pending.pop(key, None)

            tx.after_commit(drop_flushed)
            row = await tx.fetchone("SELECT * FROM transfers WHERE guid = ? AND image = ?", key)
            assert row is not None
            return _transfer_row(row)

        return await self.write(finish_transfer, durable=True)

    async def finish_transfers(self, finals: Sequence[FinalState]) -> int:
        """Record many transfers' final states and last progress (durable, one job, a few
        statements); return how many rows were updated (a transfer never started is skipped).
        """
        params = [
            (
                TransferState(f.state).value,
                f.reason,
                None if f.held_sha256 is None else bytes(f.held_sha256),
                f.finished_at,
                f.finished_at,
                bytes(f.acked_bitmap),
                f.blocks_acked,
                f.blocks_sent,
                f.bytes_sent,
                f.guid,
                bytes(f.image),
            )
            for f in finals
        ]
        if any(p[0] == TransferState.ACTIVE.value for p in params):
            raise ValueError("finish_transfers needs final states")
        if not params:
            return 0

        async def finish_transfers(tx: Tx) -> int:
            changed = await tx.executemany(
                "UPDATE transfers SET state = ?, reason = ?, held_sha256 = ?, finished_at = ?,"
                " updated_at = ?, acked_bitmap = ?, blocks_acked = ?, blocks_sent = ?,"
                " bytes_sent = ? WHERE guid = ? AND image = ?",
                params,
            )
            keys = [(p[9], p[10]) for p in params]

            def drop_flushed() -> None:  # the final values supersede unflushed progress
                for key in keys:
                    self._pending.pop(key, None)

            tx.after_commit(drop_flushed)
            return changed

        return await self.write(finish_transfers, durable=True)

    async def transfer(self, guid: str, image: bytes) -> TransferRow | None:
        """One transfer (with unflushed progress applied), or None."""

        async def transfer(tx: Tx) -> TransferRow | None:
            row = await tx.fetchone(
                "SELECT * FROM transfers WHERE guid = ? AND image = ?", (guid, bytes(image))
            )
            return None if row is None else self._overlay(_transfer_row(row))

        return await self.read(transfer)

    async def transfers(
        self,
        state: TransferState | None = None,
        *,
        guid: str | None = None,
        image: bytes | None = None,
    ) -> list[TransferRow]:
        """Transfers filtered by state, CH and/or image (unflushed progress applied)."""
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(TransferState(state).value)
        if guid is not None:
            where.append("guid = ?")
            params.append(guid)
        if image is not None:
            where.append("image = ?")
            params.append(bytes(image))
        sql = "SELECT * FROM transfers"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY guid, image"

        async def transfers(tx: Tx) -> list[TransferRow]:
            return [self._overlay(_transfer_row(r)) for r in await tx.fetchall(sql, params)]

        return await self.read(transfers)

    # ----------------------------------------------------------------------- events

    async def append_event(self, kind: str, key: str, payload: dict[str, Any], now: float) -> int:
        """Append a monitoring event to the outbox (durable); return its sequence number.

        Idempotent by ``key``: appending an existing key changes nothing and returns the seq it
        already has. ``payload`` must be JSON-serialisable (no NaN): ``TypeError``/``ValueError``.
        """
        (seq,) = await self.append_events([NewEvent(kind, key, payload, now)])
        return seq

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        """:meth:`append_event` for many events in order, in one durable job; return their
        sequence numbers. A key already in the outbox (or earlier in ``events``) gets the seq it
        already has, so re-deriving a fact never creates a second event."""
        rows = [
            (
                e.kind,
                e.key,
                json.dumps(e.payload, sort_keys=True, separators=(",", ":"), allow_nan=False),
                e.created_at,
            )
            for e in events
        ]
        if not rows:
            return []

        async def append_events(tx: Tx) -> list[int]:
            keys = list(dict.fromkeys(r[1] for r in rows))
            known: dict[str, int] = {}
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = keys[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in await tx.fetchall(
                    f"SELECT seq, key FROM events WHERE key IN ({marks})",  # noqa: S608
                    chunk,
                ):
                    known[row[1]] = int(row[0])
            # Seqs are assigned here, by the single writer, from AUTOINCREMENT's high-water
            # mark (never reused, even after pruning): gap-free and monotonic. (An INSERT ... ON
            # CONFLICT DO NOTHING would consume a seq on a duplicate key, leaving a gap.)
            mark = await tx.fetchone("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
            top = 0 if mark is None else int(mark[0])
            inserts: list[tuple[int, str, str, str, float]] = []
            out: list[int] = []
            for kind, key, text, created in rows:
                seq = known.get(key)
                if seq is None:
                    top += 1
                    seq = known[key] = top
                    inserts.append((seq, kind, key, text, created))
                out.append(seq)
            if inserts:
                await tx.executemany(
                    "INSERT INTO events (seq, kind, key, payload, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    inserts,
                )
            return out

        return await self.write(append_events, durable=True)

    async def events(self, *, after: int = 0, limit: int = 1000) -> list[EventRow]:
        """Events with ``seq > after`` in order, published or not (replay, ``otactl tail``)."""

        async def events(tx: Tx) -> list[EventRow]:
            rows = await tx.fetchall(
                "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            )
            return [self._event_row(r) for r in rows]

        return await self.read(events)

    async def unpublished_events(self, limit: int = 1000, *, after: int = 0) -> list[EventRow]:
        """The oldest events not yet marked published (and with ``seq > after``), in order."""

        async def unpublished_events(tx: Tx) -> list[EventRow]:
            floor = max(after, self._pending_mark or 0)
            rows = await tx.fetchall(
                "SELECT * FROM events WHERE published = 0 AND seq > ? ORDER BY seq LIMIT ?",
                (floor, limit),
            )
            return [self._event_row(r) for r in rows]

        return await self.read(unpublished_events)

    def mark_published(self, upto_seq: int) -> None:
        """Note that every event with ``seq <= upto_seq`` was published (batched)."""
        self._check_usable()
        if self._pending_mark is None or upto_seq > self._pending_mark:
            self._pending_mark = upto_seq
        self._note_update()

    async def prune_events(self, published_before: float) -> int:
        """Delete published events created before ``published_before``; return how many."""

        async def prune_events(tx: Tx) -> int:
            return await tx.execute(
                "DELETE FROM events WHERE published = 1 AND created_at < ?", (published_before,)
            )

        return await self.write(prune_events, durable=False)

    # ----------------------------------------------------------------------- meta

    async def meta_get(self, key: str) -> str | None:
        """A meta value, or None."""

        async def meta_get(tx: Tx) -> str | None:
            row = await tx.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
            return None if row is None else str(row[0])

        return await self.read(meta_get)

    async def meta_set(self, key: str, value: str) -> None:
        """Set a meta value (durable)."""

        async def meta_set(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self.write(meta_set, durable=True)

    async def next_counter(self, name: str) -> int:
        """Increment and return the counter ``name`` (1 the first time), durably.

        For values that must never repeat across restarts, e.g. activation command counters.
        """

        async def next_counter(tx: Tx) -> int:
            rows = await tx.fetchall(
                "INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key)"
                " DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value",
                (f"counter:{name}",),
            )
            return int(rows[0][0])

        return await self.write(next_counter, durable=True)

    # ----------------------------------------------------------------------- internals

    def _overlay(self, row: TransferRow) -> TransferRow:
        progress = self._pending.get((row.guid, row.image))
        if progress is None or row.state is not TransferState.ACTIVE:
            return row
        return dataclasses.replace(
            row,
            acked_bitmap=progress.acked_bitmap,
            blocks_acked=progress.blocks_acked,
            blocks_sent=progress.blocks_sent,
            bytes_sent=progress.bytes_sent,
            updated_at=progress.now,
        )

    def _event_row(self, row: sqlite3.Row) -> EventRow:
        published = bool(row["published"]) or (
            self._pending_mark is not None and row["seq"] <= self._pending_mark
        )
        return EventRow(
            seq=row["seq"],
            kind=row["kind"],
            key=row["key"],
            payload=json.loads(row["payload"]),
            created_at=row["created_at"],
            published=published,
        )

    def _check_usable(self) -> None:
        if self._closing or self._closed:
            raise StoreError("store is closed")
        if self._failed is not None:
            raise StoreError(self._failed)

    def _submit(
        self,
        kind: Literal["write", "read", "flush"],
        fn: Callable[[Tx], Awaitable[Any]] | None,
        *,
        durable: bool,
        name: str,
    ) -> asyncio.Future[Any]:
        self._check_usable()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.append(_Job(kind, fn, future, durable, name))
        self._wake.set()
        return future

    def _note_update(self) -> None:
        self._counts["updates"] += 1
        self._updates_since_flush += 1
        if self._deadline is None:
            self._deadline = self._loop.time() + self._flush_interval
            self._wake.set()
        elif self._updates_since_flush == self._flush_batch:
            self._wake.set()

    def _has_pending(self) -> bool:
        return bool(self._pending) or self._pending_mark is not None

    def _flush_due(self) -> bool:
        if not self._has_pending():
            return False
        if self._updates_since_flush >= self._flush_batch:
            return True
        return self._deadline is not None and self._loop.time() >= self._deadline

    async def _run(self) -> None:
        try:
            while True:
                if self._flush_due():
                    try:
                        await self._flush()
                    except StoreError as exc:
                        log.error("batch flush failed, retrying: %s", exc)
                if self._jobs:
                    await self._run_next()
                    continue
                if self._closing:
                    break
                self._wake.clear()
                timeout = None
                if self._deadline is not None and self._has_pending():
                    timeout = max(0.0, self._deadline - self._loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            if self._has_pending():
                try:
                    await self._flush()
                except StoreError as exc:
                    self._close_error = StoreError(f"final flush lost batched progress: {exc}")
        except BaseException as exc:
            self._failed = f"store writer stopped: {exc!r}"
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("store writer crashed")
            self._fail_queued()
            raise

    def _fail_queued(self) -> None:
        for job in self._inflight:
            if not job.future.done():
                job.future.set_exception(StoreError(self._failed or "store closed"))
        self._inflight = []
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(StoreError(self._failed or "store closed"))

    async def _run_next(self) -> None:
        job = self._jobs[0]
        if job.kind == "write":
            group: list[_Job] = []
            while self._jobs and self._jobs[0].kind == "write" and len(group) < _MAX_GROUP:
                candidate = self._jobs.popleft()
                if not candidate.future.done():  # cancelled before it ran: skip
                    group.append(candidate)
            if group:
                self._inflight = group
                await self._commit_group(group)
                self._inflight = []
            return
        self._jobs.popleft()
        if job.future.done():
            return
        self._inflight = [job]
        if job.kind == "flush":
            try:
                await self._flush()
            except StoreError as exc:
                _set_exception(job.future, exc)
            else:
                _set_result(job.future, None)
            finally:
                self._inflight = []
            return
        assert job.fn is not None
        tx = Tx(self._db, writable=False)
        try:
            result = await job.fn(tx)
        except Exception as exc:
            _set_exception(job.future, _wrap(exc, job.name))
        else:
            _set_result(job.future, result)
        finally:
            tx._live = False
            self._inflight = []

    async def _commit_group(self, group: list[_Job]) -> None:
        db = self._db
        durable = any(job.durable for job in group)
        savepoints = len(group) > 1
        done: list[tuple[_Job, Any, list[Callable[[], None]]]] = []
        try:
            if durable:
                await db.execute("PRAGMA synchronous=FULL")
            await db.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, ValueError) as exc:
            await self._after_failed_begin(durable)
            for job in group:
                _set_exception(job.future, _wrap(exc, job.name))
            return
        try:
            for index, job in enumerate(group):
                assert job.fn is not None
                tx = Tx(db, writable=True)
                try:
                    if savepoints:
                        await db.execute("SAVEPOINT job")
                    result = await job.fn(tx)
                    if savepoints:
                        await db.execute("RELEASE job")
                except Exception as exc:
                    _set_exception(job.future, _wrap(exc, job.name))
                    if not savepoints or not db.in_transaction:
                        # The whole transaction is gone (a single job, or SQLite rolled it back
                        # itself on FULL/IOERR/NOMEM): the other jobs of the group lost their
                        # work through no fault of theirs, so they run again, first in line.
                        await self._rollback_quietly()
                        retry = [j for j, _, _ in done] + group[index + 1 :]
                        self._jobs.extendleft(reversed(retry))
                        return
                    await db.execute("ROLLBACK TO job")
                    await db.execute("RELEASE job")
                else:
                    done.append((job, result, tx._after))
                finally:
                    tx._live = False
            await db.execute("COMMIT")
        except (sqlite3.Error, ValueError) as exc:
            error = StoreError(f"commit failed: {exc}")
            self._abort_group(done, [j for j in group if not j.future.done()], error)
            await self._rollback_quietly()
            return
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.execute("PRAGMA synchronous=NORMAL")
        self._counts["commits"] += 1
        self._counts["durable_commits"] += int(durable)
        self._counts["writes"] += len(done)
        for job, result, callbacks in done:
            for callback in callbacks:
                callback()
            _set_result(job.future, result)

    @staticmethod
    def _abort_group(
        done: list[tuple[_Job, Any, list[Callable[[], None]]]],
        rest: list[_Job],
        error: StoreError,
    ) -> None:
        for job, _, _ in done:
            _set_exception(job.future, StoreError(f"{job.name}: rolled back: {error}"))
        done.clear()
        for job in rest:
            _set_exception(job.future, StoreError(f"{job.name}: rolled back: {error}"))

    async def _after_failed_begin(self, durable: bool) -> None:
        if durable:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._db.execute("PRAGMA synchronous=NORMAL")

    async def _rollback_quietly(self) -> None:
        try:
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
        except (sqlite3.Error, ValueError) as exc:
            log.error("rollback failed: %s", exc)

    async def _flush(self) -> None:
        rows, mark = self._pending, self._pending_mark
        self._pending, self._pending_mark = {}, None
        self._updates_since_flush = 0
        self._deadline = None
        if not rows and mark is None:
            return
        active = TransferState.ACTIVE.value
        params = [
            (
                p.acked_bitmap,
                p.blocks_acked,
                p.blocks_sent,
                p.bytes_sent,
                p.now,
                guid,
                image,
                active,
            )
            for (guid, image), p in rows.items()
        ]
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            if params:
                await db.executemany(
                    "UPDATE transfers SET acked_bitmap = ?, blocks_acked = ?, blocks_sent = ?,"
                    " bytes_sent = ?, updated_at = ? WHERE guid = ? AND image = ? AND state = ?",
                    params,
                )
            if mark is not None:
                await db.execute(
                    "UPDATE events SET published = 1 WHERE published = 0 AND seq <= ?", (mark,)
                )
            await db.execute("COMMIT")
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            await self._rollback_quietly()
            for key, progress in rows.items():  # values that arrived meanwhile are newer
                self._pending.setdefault(key, progress)
            if mark is not None and (self._pending_mark is None or mark > self._pending_mark):
                self._pending_mark = mark
            retry = max(self._flush_interval, _RETRY_AFTER_FAILED_FLUSH)
            self._deadline = self._loop.time() + retry
            self._counts["flush_errors"] += 1
            self._flush_failing = True
            raise StoreError(f"batch flush: {exc}") from exc
        self._flush_failing = False
        self._counts["commits"] += 1
        self._counts["flushes"] += 1
        self._counts["rows_flushed"] += len(params)


# --------------------------------------------------------------------------- helpers


def _lock_state_dir(directory: Path) -> int:
    """Create the state directory if needed and take its lock (runs in a thread)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"state directory {directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreLockedError(
                f"state directory {directory} is in use by another otad process"
            ) from exc
        raise StoreError(f"locking {directory / LOCK_NAME}: {exc}") from exc
    return fd


async def _connect(
    path: Path, busy_timeout_ms: int, trace: Callable[[str], None] | None
) -> aiosqlite.Connection:
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"opening {path}: {exc}") from exc
    try:
        db.row_factory = sqlite3.Row
        if trace is not None:
            await db.set_trace_callback(trace)
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        mode = await _scalar(db, "PRAGMA journal_mode=WAL")
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: journal_mode is {mode!r}, expected 'wal'")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        if await _scalar(db, "PRAGMA foreign_keys") != 1:
            raise StoreError(f"{path}: foreign keys cannot be enabled")
        await db.execute("PRAGMA journal_size_limit=67108864")
        await _migrate(db, path)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await db.close()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"opening {path}: {exc}") from exc
        raise
    return db


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    version = int(await _scalar(db, "PRAGMA user_version"))
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{path} has schema version {version}, newer than this otad supports"
            f" ({SCHEMA_VERSION}); refusing to open it (upgrade otad or restore a backup)"
        )
    if version == SCHEMA_VERSION:
        return
    script = "\n".join(MIGRATIONS[version:])
    await db.execute("PRAGMA synchronous=FULL")
    try:
        await db.executescript(
            f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;\n"
        )
    except sqlite3.Error as exc:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise StoreError(
            f"{path}: migrating schema {version} -> {SCHEMA_VERSION} failed, nothing changed: {exc}"
        ) from exc
    finally:
        await db.execute("PRAGMA synchronous=NORMAL")
    log.info("store %s migrated from schema %d to %d", path, version, SCHEMA_VERSION)


async def _scalar(db: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await db.execute_fetchall(sql))
    return rows[0][0] if rows else None


def _wrap(exc: BaseException, name: str) -> BaseException:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.Error | OverflowError):
        return StoreError(f"{name}: {exc}")
    if isinstance(exc, ValueError) and str(exc) in ("Connection closed", "no active connection"):
        return StoreError(f"{name}: database connection closed")
    return exc


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", "job"))


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _seq_text(sequence: int) -> str:
    return f"{sequence:020d}"


def _hub_row(row: sqlite3.Row) -> HubRow:
    return HubRow(
        guid=row["guid"],
        fw_version=row["fw_version"],
        hw_version=row["hw_version"],
        supplier=row["supplier"],
        segment=row["segment"],
        limits=Limits(row["max_block"], row["window_blocks"], row["buffer_bytes"]),
        online=bool(row["online"]),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
    )


def _han_row(row: sqlite3.Row) -> HanDeviceRow:
    return HanDeviceRow(
        guid=row["guid"],
        device_id=row["device_id"],
        device_type=row["device_type"],
        join_mode=row["join_mode"],
        fw_version=row["fw_version"],
        hw_version=row["hw_version"],
        updated_at=row["updated_at"],
    )


def _image_row(row: sqlite3.Row) -> ImageRow:
    return ImageRow(
        sha256=bytes(row["sha256"]),
        vendor=row["vendor"],
        image_type=row["image_type"],
        device_type=row["device_type"],
        hw_min=row["hw_min"],
        hw_max=row["hw_max"],
        fw_version=row["fw_version"],
        sequence=int(row["sequence"]),
        size=row["size"],
        block_size=row["block_size"],
        block_count=row["block_count"],
        created=row["created"],
        expires=row["expires"],
        signed_manifest=bytes(row["signed_manifest"]),
        path=row["path"],
        imported_at=row["imported_at"],
    )


def _transfer_row(row: sqlite3.Row) -> TransferRow:
    held = row["held_sha256"]
    return TransferRow(
        guid=row["guid"],
        image=bytes(row["image"]),
        state=TransferState(row["state"]),
        blocks_total=row["blocks_total"],
        blocks_acked=row["blocks_acked"],
        blocks_sent=row["blocks_sent"],
        bytes_sent=row["bytes_sent"],
        acked_bitmap=bytes(row["acked_bitmap"]),
        reason=row["reason"],
        held_sha256=None if held is None else bytes(held),
        attempts=row["attempts"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
    )
