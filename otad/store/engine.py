"""The store's transaction engine: one SQLite database in WAL mode, one writer, batched bookkeeping.

The tables themselves (hubs, images, transfers, the event outbox, meta values) and their SQL are
:mod:`otad.store.tables`; their rows are :mod:`otad.store.rows`; the schema is
:mod:`otad.store.migrations`. This module knows nothing of what the tables hold.

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
  ``flush_batch`` updates accumulated (the engine decides when and commits, the tables what: the
  ``_batch_*`` hooks of :class:`Engine`). A kill loses at most the unflushed window, which the
  CH's next acknowledgement re-derives (D02). Reads overlay the unflushed values, so callers
  always read their own writes.

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
:mod:`otad.store.migrations` in one transaction; a database from a newer otad is refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar, cast

import aiosqlite

from otad.retrying import RetriedWrite
from otad.store.migrations import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("otad.store")

DB_NAME: Final = "otad.db"
LOCK_NAME: Final = "otad.lock"
_MAX_GROUP: Final = 256  # jobs per group commit
_RETRY_AFTER_FAILED_FLUSH: Final = 1.0  # seconds
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


# --------------------------------------------------------------------------- the engine


class Engine:
    """The single writer of one SQLite database: jobs, group commit, the batch (see the module
    docstring). :class:`otad.store.Store` adds the tables.

    Use :meth:`open` (or ``async with await Store.open(...)``).
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
        self._updates_since_flush = 0
        self._deadline: float | None = None
        self._closing = False
        self._closed = False
        self._failed: str | None = None
        self._inflight: list[_Job] = []
        self._flush_failing = False
        self._flush_log = RetriedWrite(log, "batch flush")
        self._storage_failures: dict[str, str] = {}  # "writes"/"flushes" -> the last error
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
    ) -> Self:
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

    async def __aenter__(self) -> Self:
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
    def degraded(self) -> list[str]:
        """Why the store is degraded now, one line per kind of write that is failing on a
        storage error (a full disk, an I/O error, a read-only or damaged file); empty when the
        last write of each kind committed. Cleared by the next successful commit of that kind
        (the callers retry: :mod:`otad.distribution`, :mod:`otad.outbox`, the batch itself)."""
        return [f"store {kind} failing: {error}" for kind, error in self._storage_failures.items()]

    def _storage_result(self, kind: str, exc: BaseException | None) -> None:
        """Note whether a write of ``kind`` committed (``exc`` None) or failed on storage."""
        if exc is None:
            if self._storage_failures.pop(kind, None) is not None:
                log.warning("store %s commit again: no longer degraded", kind)
            return
        if not _is_storage_error(exc):
            return
        if kind not in self._storage_failures:
            log.error("store %s failing on storage, degraded until they commit: %s", kind, exc)
        self._storage_failures[kind] = str(exc)

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the writer's counters."""
        return StoreStats(pending=self._batch_rows(), **self._counts)

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

    def _flush_due(self) -> bool:
        if not self._batch_pending():
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
                        self._flush_log.failed(exc)
                    else:
                        self._flush_log.succeeded()
                if self._jobs:
                    await self._run_next()
                    continue
                if self._closing:
                    break
                self._wake.clear()
                timeout = None
                if self._deadline is not None and self._batch_pending():
                    timeout = max(0.0, self._deadline - self._loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            if self._batch_pending():
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
            self._storage_result("writes", exc)
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
                    self._storage_result("writes", exc)
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
            self._storage_result("writes", exc)
            self._abort_group(done, [j for j in group if not j.future.done()], error)
            await self._rollback_quietly()
            return
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.execute("PRAGMA synchronous=NORMAL")
        self._storage_result("writes", None)
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
        batch = self._batch_take()
        self._updates_since_flush = 0
        self._deadline = None
        if batch is None:
            return
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            rows = await self._batch_write(db, batch)
            await db.execute("COMMIT")
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            await self._rollback_quietly()
            self._batch_restore(batch)
            retry = max(self._flush_interval, _RETRY_AFTER_FAILED_FLUSH)
            self._deadline = self._loop.time() + retry
            self._counts["flush_errors"] += 1
            self._flush_failing = True
            self._storage_result("flushes", exc)
            raise StoreError(f"batch flush: {exc}") from exc
        self._flush_failing = False
        self._storage_result("flushes", None)
        self._counts["commits"] += 1
        self._counts["flushes"] += 1
        self._counts["rows_flushed"] += rows

    # ----------------------------------------------------------------------- the batch (tables)

    def _batch_pending(self) -> bool:
        """Whether batched updates wait to be flushed (the tables say)."""
        return False

    def _batch_rows(self) -> int:
        """Rows of batched updates waiting now (for :attr:`stats`)."""
        return 0

    def _batch_take(self) -> Any:
        """Take every batched update, leaving none; None when there is none."""
        return None

    async def _batch_write(self, db: aiosqlite.Connection, batch: Any) -> int:
        """Write a taken batch inside the flush's transaction; return the rows it updated."""
        return 0

    def _batch_restore(self, batch: Any) -> None:
        """Give back a taken batch whose transaction failed (updates made since are newer)."""


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


#: SQLite result codes (primary, the low byte) that say the storage failed, not the change:
#: the same change will commit once the storage is back. SQLITE_IOERR, SQLITE_CORRUPT,
#: SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_NOTADB, SQLITE_READONLY.
_STORAGE_CODES: Final = frozenset({10, 11, 14, 13, 26, 8})


def _is_storage_error(exc: BaseException | None) -> bool:
    while exc is not None and not isinstance(exc, sqlite3.Error):
        exc = exc.__cause__
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _STORAGE_CODES


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
