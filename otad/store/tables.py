"""The store's tables: hubs and their HAN devices, images, transfers, the event outbox, meta values.

:class:`Store` is the :class:`~otad.store.engine.Engine` (one writer, group commit, the batch)
plus one method per question or change, each one atomic job. Which writes are durable, committed
or batched is said per method and explained in :mod:`otad.store.engine`. The batch this module
feeds the engine holds the latest acknowledgement state per transfer
(:meth:`Store.record_progress`) and the highest event seq published (:meth:`Store.mark_published`);
reads overlay it, so callers always read their own writes.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiosqlite

from otad.store.engine import ConflictError, Engine, NotFoundError, Tx
from otad.store.rows import (
    CampaignRow,
    CommandRow,
    CredentialsRow,
    DeviceKeyRow,
    DeviceRow,
    EventRow,
    FinalState,
    HanDeviceRow,
    HubRow,
    ImageRow,
    NewEvent,
    TransferRow,
    TransferState,
)
from protocol.release.manifest import Manifest
from protocol.wire.messages import HubAnnounced, Limits, minor_version

_MAX_SQL_INT: Final = (1 << 63) - 1
_FORGOTTEN: Final = "forgotten_hub:"  # meta key prefix: + GUID -> when (unix s) it was forgotten
_FORGOTTEN_END: Final = "forgotten_hub;"  # ";" follows ":": every such key sorts below it
_CREDENTIALS_UPSERT: Final = (
    "INSERT OR REPLACE INTO credentials (device_id, guid, device_type, state, counter,"
    " current_kid, attempts, deadline, reason, new_kid, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_IN_CHUNK: Final = 500  # parameters per "IN (...)" list (SQLite allows 32,766)


@dataclass(slots=True)
class _Progress:
    acked_bitmap: bytes
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int
    now: float


@dataclass(slots=True)
class _Batch:
    """What one batch flush writes: progress per transfer, the highest published seq."""

    progress: dict[tuple[str, bytes], _Progress]
    published: int | None


class Store(Engine):
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
        self._pending: dict[tuple[str, bytes], _Progress] = {}
        self._pending_mark: int | None = None
        super().__init__(db, path, lock_fd, flush_interval=flush_interval, flush_batch=flush_batch)

    # ----------------------------------------------------------------------- hubs

    async def upsert_hub(
        self, hub: HubAnnounced, now: float, *, online: bool = True, returned: bool = False
    ) -> None:
        """Record a CH's announcement: its row and, replacing the old list, its HAN devices;
        ``returned``: a forgotten CH announced itself live again (it is no longer forgotten)."""
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
            minor_version(hub),
        )
        devices = [
            (hub.guid, d.device_id, d.device_type, d.join_mode, d.fw_version, d.hw_version, now)
            for d in hub.han
        ]

        async def upsert_hub(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO hubs (guid, fw_version, hw_version, supplier, segment, max_block,"
                " window_blocks, buffer_bytes, online, first_seen, last_seen, protocol_minor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (guid) DO UPDATE SET fw_version = excluded.fw_version,"
                " hw_version = excluded.hw_version, supplier = excluded.supplier,"
                " segment = excluded.segment, max_block = excluded.max_block,"
                " window_blocks = excluded.window_blocks, buffer_bytes = excluded.buffer_bytes,"
                " online = excluded.online, last_seen = excluded.last_seen,"
                " protocol_minor = excluded.protocol_minor",
                values,
            )
            await tx.execute("DELETE FROM han_devices WHERE guid = ?", (hub.guid,))
            if returned:
                await tx.execute("DELETE FROM meta WHERE key = ?", (_FORGOTTEN + hub.guid,))
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

    async def forget_hub(self, guid: str, now: float) -> tuple[int, int]:
        """Remove a CH (durable): its row, HAN devices, transfer rows and device records, and
        remember it forgotten (a retained copy of its announcement no longer brings it back);
        return (transfer rows, device records) removed. The caller has checked that nothing of
        it is in progress. What must never go back is kept: activation and credentials command
        counters, credential replacements and adopted device keys stay with their devices."""

        async def forget_hub(tx: Tx) -> tuple[int, int]:
            transfers = await tx.execute("DELETE FROM transfers WHERE guid = ?", (guid,))
            devices = await tx.execute("DELETE FROM devices WHERE guid = ?", (guid,))
            await tx.execute("DELETE FROM hubs WHERE guid = ?", (guid,))  # HAN devices cascade
            await tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_FORGOTTEN + guid, repr(now)),
            )
            return transfers, devices

        return await self.write(forget_hub, durable=True)

    async def forgotten_hubs(self) -> set[str]:
        """The GUIDs of the CHs forgotten and not heard live since."""

        async def forgotten_hubs(tx: Tx) -> set[str]:
            rows = await tx.fetchall(
                "SELECT key FROM meta WHERE key >= ? AND key < ?",
                (_FORGOTTEN, _FORGOTTEN_END),
            )
            return {str(r[0])[len(_FORGOTTEN) :] for r in rows}

        return await self.read(forgotten_hubs)

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
            created=min(manifest.created, _MAX_SQL_INT),
            expires=min(manifest.expires, _MAX_SQL_INT),
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

    async def events(
        self,
        *,
        after: int = 0,
        limit: int = 1000,
        kinds: Sequence[str] | None = None,
        campaign: str | None = None,
    ) -> list[EventRow]:
        """Events with ``seq > after`` in order, published or not (replay, ``otactl tail``);
        only those of ``kinds`` and of ``campaign`` (its ``campaign`` field) if given."""
        where = ["seq > ?"]
        params: list[Any] = [after]
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            params.extend(kinds)
        if campaign is not None:
            where.append("json_extract(payload, '$.campaign') = ?")
            params.append(campaign)
        params.append(limit)
        sql = f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"  # noqa: S608

        async def events(tx: Tx) -> list[EventRow]:
            rows = await tx.fetchall(sql, params)
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

    async def prune_events(self, published_before: float, *, limit: int | None = None) -> int:
        """Delete published events created before ``published_before`` (the oldest first, at
        most ``limit`` of them); return how many. The newest event is always kept, so the
        highest seq stays readable after a restart and seqs stay monotonic (they come from
        AUTOINCREMENT's high-water mark, which pruning never lowers). An event is pruned only
        once its ``published`` mark is committed."""
        sql = (
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE published = 1"
            " AND created_at < ? AND seq < (SELECT MAX(seq) FROM events) ORDER BY seq"
        )
        params: tuple[float, ...] | tuple[float, int] = (published_before,)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            sql += " LIMIT ?"
            params = (published_before, limit)

        async def prune_events(tx: Tx) -> int:
            return await tx.execute(sql + ")", params)

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

    # ----------------------------------------------------------------------- devices

    async def save_devices(self, rows: Sequence[DeviceRow], *, durable: bool = True) -> None:
        """Insert or replace device rows, in one change. State changes are durable; HAN progress
        (``durable=False``) is committed, and a crash may lose it (the CH reports it again)."""
        values = [dataclasses.astuple(row) for row in rows]

        async def save_devices(tx: Tx) -> None:
            await tx.executemany(_DEVICE_UPSERT, values)

        await self.write(save_devices, durable=durable)

    async def devices(self) -> list[DeviceRow]:
        """Every device row."""

        async def devices(tx: Tx) -> list[DeviceRow]:
            rows = await tx.fetchall(
                "SELECT device_id, image, guid, device_type, join_mode, state, bytes_held, size,"
                " proof, reason, counter, execute_at, deadline, read_attempts, updated_at"
                " FROM devices"
            )
            return [DeviceRow(*row) for row in rows]

        return await self.read(devices)

    async def issue_command(
        self,
        device_id: str,
        image: bytes,
        guid: str,
        *,
        execute_at: int | None,
        cancel: bool,
        floor: int,
        sign: Callable[[int], bytes],
        device_after: Callable[[int], DeviceRow],
        now: float,
    ) -> CommandRow:
        """Take the device's next activation counter, sign the command with it, store both and
        the device's row ``device_after(counter)``, in one durable change; return the command.

        The counter is above every counter ever issued to the device and at least ``floor``
        (otad passes the wall clock in milliseconds, so a store restored from a backup still
        issues fresh counters). ``sign(counter)`` returns the COSE_Sign1 to publish. Nothing is
        published here: the caller publishes after this returns, i.e. after the fsync."""

        async def issue_command(tx: Tx) -> CommandRow:
            counter = await _next_device_counter(tx, device_id, floor)
            command = CommandRow(
                device_id, counter, image, guid, execute_at, cancel, sign(counter), now, None
            )
            await tx.execute(
                "INSERT INTO activation_commands (device_id, counter, image, guid, execute_at,"
                " cancel, signed, issued_at, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (device_id, counter, image, guid, execute_at, int(cancel), command.signed, now,
                 None),
            )  # fmt: skip
            await tx.execute(_DEVICE_UPSERT, dataclasses.astuple(device_after(counter)))
            return command

        return await self.write(issue_command, durable=True)

    async def answer_command(self, device_id: str, counter: int, now: float) -> None:
        """Mark a command answered (its outcome, or its cancellation, arrived)."""

        async def answer_command(tx: Tx) -> None:
            await tx.execute(
                "UPDATE activation_commands SET answered_at = ?"
                " WHERE device_id = ? AND counter = ? AND answered_at IS NULL",
                (now, device_id, counter),
            )

        await self.write(answer_command, durable=False)

    async def unanswered_commands(self) -> list[CommandRow]:
        """Every command whose outcome has not arrived, oldest first per device."""

        async def unanswered_commands(tx: Tx) -> list[CommandRow]:
            rows = await tx.fetchall(
                "SELECT device_id, counter, image, guid, execute_at, cancel, signed, issued_at,"
                " answered_at FROM activation_commands WHERE answered_at IS NULL"
                " ORDER BY device_id, counter"
            )
            return [
                CommandRow(r[0], r[1], bytes(r[2]), r[3], r[4], bool(r[5]), bytes(r[6]), r[7],
                           r[8])
                for r in rows
            ]  # fmt: skip

        return await self.read(unanswered_commands)

    # ----------------------------------------------------------------------- credentials

    async def issue_credentials(
        self,
        device_id: str,
        *,
        floor: int,
        sign: Callable[[int], bytes],
        row_after: Callable[[int], CredentialsRow],
    ) -> tuple[int, bytes]:
        """Take the device's next counter (the one sequence activation commands draw from too:
        SPEC §8.11), sign the credentials command with it and store the replacement's row
        ``row_after(counter)``, in one durable change; return (counter, signed). Published by
        the caller after this returns, i.e. after the fsync."""

        async def issue_credentials(tx: Tx) -> tuple[int, bytes]:
            counter = await _next_device_counter(tx, device_id, floor)
            signed = sign(counter)
            await tx.execute(_CREDENTIALS_UPSERT, dataclasses.astuple(row_after(counter)))
            return counter, signed

        return await self.write(issue_credentials, durable=True)

    async def save_credentials(self, row: CredentialsRow) -> None:
        """Insert or replace a replacement's row, durably."""

        async def save_credentials(tx: Tx) -> None:
            await tx.execute(_CREDENTIALS_UPSERT, dataclasses.astuple(row))

        await self.write(save_credentials, durable=True)

    async def adopt_device_key(self, key: DeviceKeyRow, row: CredentialsRow) -> None:
        """Trust ``key`` for its device from now on and record the replacement done: one
        durable change (never a key adopted with its replacement still pending, or the
        reverse)."""

        async def adopt_device_key(tx: Tx) -> None:
            await tx.execute(
                "INSERT OR REPLACE INTO device_keys (device_id, spki, replaced_spki, counter,"
                " adopted_at) VALUES (?, ?, ?, ?, ?)",
                dataclasses.astuple(key),
            )
            await tx.execute(_CREDENTIALS_UPSERT, dataclasses.astuple(row))

        await self.write(adopt_device_key, durable=True)

    async def save_campaign(self, row: CampaignRow) -> None:
        """Insert or replace a campaign's snapshot, durably."""

        async def save_campaign(tx: Tx) -> None:
            await tx.execute(
                "INSERT OR REPLACE INTO campaigns (id, state, parent, created_at, updated_at,"
                " snapshot) VALUES (?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(row),
            )

        await self.write(save_campaign, durable=True)

    async def campaigns(self) -> list[CampaignRow]:
        """Every campaign, oldest first."""

        async def campaigns(tx: Tx) -> list[CampaignRow]:
            rows = await tx.fetchall(
                "SELECT id, state, parent, created_at, updated_at, snapshot FROM campaigns"
                " ORDER BY created_at, id"
            )
            return [CampaignRow(*row) for row in rows]

        return await self.read(campaigns)

    async def credentials(self) -> list[CredentialsRow]:
        """Every device's replacement row."""

        async def credentials(tx: Tx) -> list[CredentialsRow]:
            rows = await tx.fetchall(
                "SELECT device_id, guid, device_type, state, counter, current_kid, attempts,"
                " deadline, reason, new_kid, updated_at FROM credentials"
            )
            return [
                CredentialsRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6], r[7], r[8],
                               None if r[9] is None else bytes(r[9]), r[10])
                for r in rows
            ]  # fmt: skip

        return await self.read(credentials)

    async def device_keys(self) -> list[DeviceKeyRow]:
        """Every device key adopted from a confirmation."""

        async def device_keys(tx: Tx) -> list[DeviceKeyRow]:
            rows = await tx.fetchall(
                "SELECT device_id, spki, replaced_spki, counter, adopted_at FROM device_keys"
            )
            return [DeviceKeyRow(r[0], bytes(r[1]), bytes(r[2]), r[3], r[4]) for r in rows]

        return await self.read(device_keys)

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

    # ----------------------------------------------------------------------- the batch

    def _batch_pending(self) -> bool:
        return bool(self._pending) or self._pending_mark is not None

    def _batch_rows(self) -> int:
        return len(self._pending)

    def _batch_take(self) -> _Batch | None:
        rows, mark = self._pending, self._pending_mark
        self._pending, self._pending_mark = {}, None
        if not rows and mark is None:
            return None
        return _Batch(rows, mark)

    async def _batch_write(self, db: aiosqlite.Connection, batch: _Batch) -> int:
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
            for (guid, image), p in batch.progress.items()
        ]
        if params:
            await db.executemany(
                "UPDATE transfers SET acked_bitmap = ?, blocks_acked = ?, blocks_sent = ?,"
                " bytes_sent = ?, updated_at = ? WHERE guid = ? AND image = ? AND state = ?",
                params,
            )
        if batch.published is not None:
            await db.execute(
                "UPDATE events SET published = 1 WHERE published = 0 AND seq <= ?",
                (batch.published,),
            )
        return len(params)

    def _batch_restore(self, batch: _Batch) -> None:
        for key, progress in batch.progress.items():  # values that arrived meanwhile are newer
            self._pending.setdefault(key, progress)
        mark = batch.published
        if mark is not None and (self._pending_mark is None or mark > self._pending_mark):
            self._pending_mark = mark


_DEVICE_UPSERT: Final = (
    "INSERT OR REPLACE INTO devices (device_id, image, guid, device_type, join_mode, state,"
    " bytes_held, size, proof, reason, counter, execute_at, deadline, read_attempts, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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
        protocol_minor=row["protocol_minor"],
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


async def _next_device_counter(tx: Tx, device_id: str, floor: int) -> int:
    """The device's next command counter: above every activation or credentials command ever
    issued to it (one originator counter per device, SPEC §8.11) and at least ``floor``."""
    row = await tx.fetchone(
        "SELECT MAX(c) FROM (SELECT MAX(counter) AS c FROM activation_commands"
        " WHERE device_id = ? UNION ALL SELECT counter FROM credentials WHERE device_id = ?)",
        (device_id, device_id),
    )
    highest = 0 if row is None or row[0] is None else int(row[0])
    counter = max(highest + 1, floor)
    if counter > _MAX_SQL_INT:
        raise ConflictError(f"activation counter of {device_id} exhausted")
    return counter
