"""The single-writer SQLite store: real database files in tmp_path, real processes killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import otad.store.engine as store_module
from otad.store import (
    DB_NAME,
    ConflictError,
    NotFoundError,
    SchemaTooNewError,
    Store,
    StoreError,
    StoreLockedError,
    TransferState,
    Tx,
)
from otad.store.migrations import MIGRATIONS, SCHEMA_VERSION
from protocol.release.manifest import DeviceType, Manifest
from protocol.wire.messages import HanDevice, HubAnnounced, Limits

REPO = Path(__file__).resolve().parents[2]
GUIDS = [f"{0x0011223344550000 + i:016X}" for i in range(200)]


def make_manifest(seed: int = 1, size: int = 3000, block_size: int = 1024) -> Manifest:
    image = bytes((seed + i) % 251 for i in range(size))
    return Manifest.for_image(
        image,
        vendor=0x1234,
        image_type=7,
        device_type=DeviceType.CH,
        hw_min=1,
        hw_max=3,
        fw_version=0x0102_0000 + seed,
        sequence=seed,
        block_size=block_size,
        created=1_700_000_000,
        expires=1_900_000_000,
    )


def announce(guid: str, *devices: HanDevice, fw: int = 1) -> HubAnnounced:
    return HubAnnounced(
        guid=guid,
        fw_version=fw,
        hw_version=2,
        supplier="SUPP1",
        segment="cell-7",
        limits=Limits(512, 16, 32768),
        han=devices,
    )


def device(device_id: str, device_type: str = "B1", join_mode: str = "CAD") -> HanDevice:
    return HanDevice(device_id, device_type, join_mode, fw_version=5, hw_version=1)


def raw(state_dir: Path) -> sqlite3.Connection:
    """An independent connection: it sees only what the store committed."""
    return sqlite3.connect(state_dir / DB_NAME)


def popcount(data: bytes) -> int:
    return sum(bin(b).count("1") for b in data)


def bitmap(n: int) -> bytes:
    """n low bits set, LSB first."""
    value = (1 << n) - 1
    return value.to_bytes((n + 7) // 8, "little")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def store(state_dir: Path) -> AsyncIterator[Store]:
    opened = await Store.open(state_dir)
    try:
        yield opened
    finally:
        await opened.close()


async def with_transfers(store: Store, count: int, manifest: Manifest | None = None) -> bytes:
    manifest = manifest or make_manifest()
    await store.add_image(manifest, b"cose:" + manifest.sha256, "/images/a.bin", 10.0)
    await asyncio.gather(*(store.upsert_hub(announce(g), 10.0) for g in GUIDS[:count]))
    await asyncio.gather(
        *(store.start_transfer(g, manifest.sha256, 64, 11.0) for g in GUIDS[:count])
    )
    return manifest.sha256


def note(
    store: Store,
    guid: str,
    image: bytes,
    bits: bytes,
    acked: int,
    sent: int,
    sent_bytes: int,
    now: float,
) -> None:
    """record_progress, positionally."""
    store.record_progress(
        guid,
        image,
        acked_bitmap=bits,
        blocks_acked=acked,
        blocks_sent=sent,
        bytes_sent=sent_bytes,
        now=now,
    )


async def flushed(store: Store, count: int, *, within: float) -> None:
    """Wait until the store has committed ``count`` batch flushes in total."""
    for _ in range(int(within / 0.005)):
        if store.stats.flushes >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} flushes expected within {within}s, got {store.stats.flushes}")


# --------------------------------------------------------------------------- open, schema


async def test_open_migrates_empty_database_and_sets_pragmas(state_dir: Path) -> None:
    statements: list[str] = []
    store = await Store.open(state_dir, trace=statements.append)
    await store.close()
    for pragma in ("busy_timeout", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        assert any(pragma in s for s in statements), pragma
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"hubs", "han_devices", "images", "transfers", "events", "meta"} <= tables
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"transfers_state", "events_unpublished"} <= indexes
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    mode = (await asyncio.to_thread(state_dir.stat)).st_mode
    assert oct(mode & 0o777) == oct(0o700)


async def test_reopen_keeps_data_and_does_not_migrate_again(state_dir: Path) -> None:
    manifest = make_manifest()
    async with await Store.open(state_dir) as store:
        await store.upsert_hub(announce(GUIDS[0], device("AAAA000000000001")), 5.0)
        image = await store.add_image(manifest, b"signed", "/img", 6.0)
        await store.start_transfer(GUIDS[0], manifest.sha256, manifest.block_count, 7.0)
        seq = await store.append_event("transfer.started", "k1", {"guid": GUIDS[0]}, 7.0)
        await store.meta_set("campaign", "c-1")
    statements: list[str] = []
    async with await Store.open(state_dir, trace=statements.append) as store:
        assert not any("CREATE TABLE" in s for s in statements)
        hub = await store.hub(GUIDS[0])
        assert hub is not None
        assert hub.limits == Limits(512, 16, 32768)
        assert hub.online
        assert [d.device_id for d in await store.han_devices(GUIDS[0])] == ["AAAA000000000001"]
        assert await store.image(manifest.sha256) == image
        assert image.sequence == 1
        assert image.block_count == manifest.block_count
        transfer = await store.transfer(GUIDS[0], manifest.sha256)
        assert transfer is not None
        assert transfer.state is TransferState.ACTIVE
        assert [e.seq for e in await store.unpublished_events()] == [seq]
        assert await store.meta_get("campaign") == "c-1"


async def test_newer_schema_is_refused_and_left_untouched(state_dir: Path) -> None:
    async with await Store.open(state_dir):
        pass
    with contextlib.closing(raw(state_dir)) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        db.commit()
    for _ in range(2):  # and the refusal released the state-directory lock
        with pytest.raises(SchemaTooNewError, match=r"newer than this otad supports"):
            await Store.open(state_dir)
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


async def test_failed_migration_changes_nothing(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Store.open(state_dir):
        pass
    broken = (*MIGRATIONS, "CREATE TABLE not_yet_a_table (id TEXT);\nTHIS IS NOT SQL;")
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(broken))
    failing = rf"migrating schema {len(MIGRATIONS)} -> {len(MIGRATIONS) + 1} failed"
    with pytest.raises(StoreError, match=failing):
        await Store.open(state_dir)
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert "not_yet_a_table" not in names


async def test_second_store_on_same_directory_is_refused(store: Store, state_dir: Path) -> None:
    with pytest.raises(StoreLockedError, match="in use by another otad"):
        await Store.open(state_dir)


# --------------------------------------------------------------------------- atomicity, order


async def test_concurrent_calls_stay_atomic_and_ordered(store: Store, state_dir: Path) -> None:
    image = await with_transfers(store, 100)

    async def one(i: int) -> int:
        n = i + 1
        store.record_progress(
            GUIDS[i],
            image,
            acked_bitmap=bitmap(n),
            blocks_acked=n,
            blocks_sent=2 * n,
            bytes_sent=2048 * n,
            now=100.0 + n,
        )
        return await store.append_event("transfer.progress", f"p-{i}", {"i": i}, 100.0 + n)

    commits_before = store.stats.commits
    seqs = await asyncio.gather(*(one(i) for i in range(100)))
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 100
    assert store.stats.commits - commits_before < 100  # durable appends were group-committed
    await store.flush()
    with contextlib.closing(raw(state_dir)) as db:
        events = db.execute("SELECT seq, key, payload FROM events ORDER BY seq").fetchall()
        assert [(s, k) for s, k, _ in events] == [(s, f"p-{i}") for i, s in enumerate(seqs)]
        rows = db.execute(
            "SELECT guid, acked_bitmap, blocks_acked, blocks_sent, bytes_sent, updated_at"
            " FROM transfers ORDER BY guid"
        ).fetchall()
    assert len(rows) == 100
    for i, (guid, bits, acked, sent, sent_bytes, updated) in enumerate(rows):
        assert guid == GUIDS[i]
        assert (popcount(bits), acked, sent, sent_bytes, updated) == (
            i + 1,
            i + 1,
            2 * (i + 1),
            2048 * (i + 1),
            101.0 + i,
        )


async def test_failing_job_in_a_group_rolls_back_alone(store: Store, state_dir: Path) -> None:
    image = await with_transfers(store, 0)
    await asyncio.gather(*(store.upsert_hub(announce(g), 1.0) for g in GUIDS[:20]))
    calls = [store.start_transfer(g, image, 8, 2.0) for g in GUIDS[:20]]
    calls.insert(10, store.start_transfer("FFFFFFFFFFFFFFFF", image, 8, 2.0))  # unknown hub
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], StoreError)
    assert "FOREIGN KEY" in str(failures[0])
    assert results.index(failures[0]) == 10
    with contextlib.closing(raw(state_dir)) as db:
        guids = [r[0] for r in db.execute("SELECT guid FROM transfers ORDER BY guid")]
    assert guids == GUIDS[:20]


async def test_failed_change_leaves_nothing_half_written(store: Store, state_dir: Path) -> None:
    twice = device("AAAA000000000001")
    with pytest.raises(StoreError, match="UNIQUE"):
        await store.upsert_hub(announce(GUIDS[0], twice, twice), 1.0)
    assert await store.hub(GUIDS[0]) is None
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("SELECT count(*) FROM hubs").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM han_devices").fetchone()[0] == 0

    async def two_statements_then_bug(tx: Tx) -> None:
        await tx.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
        raise RuntimeError("bug after the first statement")

    with pytest.raises(RuntimeError, match="bug"):
        await store.write(two_statements_then_bug)
    assert await store.meta_get("a") is None
    # the store is still usable
    await store.upsert_hub(announce(GUIDS[0], device("AAAA000000000001")), 2.0)
    assert len(await store.han_devices(GUIDS[0])) == 1


async def test_read_job_cannot_write(store: Store) -> None:
    async def sneaky(tx: Tx) -> None:
        await tx.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")

    with pytest.raises(StoreError, match="read-only"):
        await store.read(sneaky)
    assert await store.meta_get("x") is None


# --------------------------------------------------------------------------- batching


async def test_batch_flush_coalesces_into_one_transaction_within_interval(
    state_dir: Path,
) -> None:
    statements: list[str] = []
    async with await Store.open(
        state_dir, flush_interval=0.25, flush_batch=100_000, trace=statements.append
    ) as store:
        image = await with_transfers(store, 10)
        before = store.stats
        statements.clear()
        started = time.monotonic()
        for n in range(1, 101):  # 1,000 updates over 10 transfers
            for guid in GUIDS[:10]:
                store.record_progress(
                    guid,
                    image,
                    acked_bitmap=bitmap(n),
                    blocks_acked=n,
                    blocks_sent=n,
                    bytes_sent=1024 * n,
                    now=float(n),
                )
        # not committed yet: an independent connection sees the old values, the store overlays
        with contextlib.closing(raw(state_dir)) as db:
            assert db.execute("SELECT max(blocks_acked) FROM transfers").fetchone()[0] == 0
        row = await store.transfer(GUIDS[3], image)
        assert row is not None
        assert row.blocks_acked == 100
        await flushed(store, before.flushes + 1, within=2.0)
        elapsed = time.monotonic() - started
        after = store.stats
    assert 0.2 <= elapsed < 1.0
    assert after.flushes - before.flushes == 1
    assert after.rows_flushed - before.rows_flushed == 10
    assert after.updates - before.updates == 1000
    assert [s for s in statements if s == "COMMIT"] == ["COMMIT"]  # one transaction
    assert not any("synchronous=FULL" in s for s in statements)  # bookkeeping is NORMAL
    with contextlib.closing(raw(state_dir)) as db:
        rows = db.execute("SELECT blocks_acked, bytes_sent FROM transfers").fetchall()
    assert rows == [(100, 102400)] * 10


async def test_batch_flushes_after_n_updates_without_waiting(state_dir: Path) -> None:
    async with await Store.open(state_dir, flush_interval=30.0, flush_batch=50) as store:
        image = await with_transfers(store, 5)
        for n in range(1, 11):
            for guid in GUIDS[:5]:
                note(store, guid, image, b"", n, n, n, 1.0)
        await flushed(store, 1, within=2.0)
        with contextlib.closing(raw(state_dir)) as db:
            assert db.execute("SELECT min(blocks_acked) FROM transfers").fetchone()[0] == 10


async def test_durable_writes_commit_with_full_sync(state_dir: Path) -> None:
    statements: list[str] = []
    async with await Store.open(state_dir, trace=statements.append) as store:
        statements.clear()
        await store.append_event("k", "key", {}, 1.0)
        durable = list(statements)
        statements.clear()
        await store.set_hub_online(GUIDS[0], True, 1.0)
        committed = list(statements)
    assert durable[0] == "PRAGMA synchronous=FULL"
    assert durable[1] == "BEGIN IMMEDIATE"
    assert durable[-2:] == ["COMMIT", "PRAGMA synchronous=NORMAL"]
    assert committed[0] == "BEGIN IMMEDIATE"
    assert committed[-1] == "COMMIT"
    assert not any("synchronous" in s for s in committed)


async def test_close_flushes_and_closed_store_refuses(state_dir: Path) -> None:
    store = await Store.open(state_dir, flush_interval=60.0)
    image = await with_transfers(store, 1)
    note(store, GUIDS[0], image, b"\x07", 3, 4, 9, 2.0)
    seq = await store.append_event("k", "e1", {"x": 1}, 2.0)
    store.mark_published(seq)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.hubs()
    with pytest.raises(StoreError, match="closed"):
        note(store, GUIDS[0], image, b"", 0, 0, 0, 3.0)
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("SELECT blocks_acked, acked_bitmap FROM transfers").fetchone() == (
            3,
            b"\x07",
        )
        assert db.execute("SELECT published FROM events").fetchone() == (1,)


async def test_failed_flush_keeps_progress_and_retries(store: Store, state_dir: Path) -> None:
    image = await with_transfers(store, 20)

    async def cap_database_size(tx: Tx) -> None:  # SQLITE_FULL on any growth, like a full disk
        pages = (await tx.fetchall("PRAGMA page_count"))[0][0]
        await tx.fetchall(f"PRAGMA max_page_count={pages}")

    await store.write(cap_database_size, durable=False)
    for guid in GUIDS[:20]:
        note(store, guid, image, os.urandom(2000), 7, 7, 7, 3.0)
    with pytest.raises(StoreError, match="full"):
        await store.flush()
    assert not store.healthy
    assert store.stats.flush_errors >= 1
    manifest = make_manifest(seed=2)
    with pytest.raises(StoreError, match="full"):
        await store.add_image(manifest, os.urandom(200_000), "/img2", 4.0)
    assert await store.image(manifest.sha256) is None
    row = await store.transfer(GUIDS[5], image)
    assert row is not None
    assert row.blocks_acked == 7

    async def uncap(tx: Tx) -> None:
        await tx.fetchall("PRAGMA max_page_count=1073741823")

    await store.write(uncap, durable=False)
    await store.flush()
    assert store.healthy
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("SELECT count(*) FROM transfers WHERE blocks_acked = 7").fetchone() == (
            20,
        )
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------- transfers


async def test_transfer_lifecycle(store: Store) -> None:
    image = await with_transfers(store, 1)
    guid = GUIDS[0]
    again = await store.start_transfer(guid, image, 64, 12.0)  # idempotent while active
    assert again.attempts == 1
    assert again.started_at == 11.0
    note(store, guid, image, b"\xff", 8, 9, 9216, 13.0)
    held = await store.finish_transfer(
        guid, image, TransferState.HELD, held_sha256=image, reason=None, now=14.0
    )
    # the final state carries the progress that had not been flushed yet
    assert (held.state, held.blocks_acked, held.acked_bitmap, held.finished_at) == (
        TransferState.HELD,
        8,
        b"\xff",
        14.0,
    )
    store.record_progress(  # late acknowledgement after the end: ignored
        guid, image, acked_bitmap=b"", blocks_acked=1, blocks_sent=1, bytes_sent=1, now=15.0
    )
    await store.flush()
    assert await store.transfers(TransferState.HELD) == [held]
    assert await store.transfers(TransferState.ACTIVE) == []
    retry = await store.start_transfer(guid, image, 64, 20.0)
    assert (retry.state, retry.attempts, retry.blocks_acked, retry.held_sha256) == (
        TransferState.ACTIVE,
        2,
        0,
        None,
    )
    with pytest.raises(NotFoundError):
        await store.finish_transfer(GUIDS[1], image, TransferState.FAILED, now=21.0)
    with pytest.raises(ValueError, match="final state"):
        await store.finish_transfer(guid, image, TransferState.ACTIVE, now=21.0)


async def test_images_are_idempotent_and_conflicts_refused(store: Store) -> None:
    manifest = make_manifest(seed=3)
    first = await store.add_image(manifest, b"signed-1", "/a", 1.0)
    assert await store.add_image(manifest, b"signed-1", "/b", 2.0) == first
    with pytest.raises(ConflictError):
        await store.add_image(manifest, b"signed-2", "/a", 3.0)
    big = Manifest.for_image(
        b"x" * 100,
        vendor=1,
        image_type=1,
        device_type=DeviceType.B1,
        hw_min=0,
        hw_max=0,
        fw_version=1,
        sequence=(1 << 64) - 1,  # u64 beyond SQLite's signed INTEGER
        block_size=64,
        created=1,
        expires=2,
    )
    row = await store.add_image(big, b"s", "/big", 1.0)
    assert row.sequence == (1 << 64) - 1
    assert [i.sha256 for i in await store.images()] == [big.sha256, manifest.sha256]


# --------------------------------------------------------------------------- events, meta


async def test_event_seq_is_monotonic_and_idempotent_by_key(state_dir: Path) -> None:
    async with await Store.open(state_dir) as store:
        a = await store.append_event("k", "a", {"n": 1}, 1.0)
        b = await store.append_event("k", "b", {"n": 2}, 1.0)
        assert await store.append_event("k", "a", {"n": "other"}, 2.0) == a < b
        assert [e.payload for e in await store.events()] == [{"n": 1}, {"n": 2}]
        store.mark_published(a)  # batched, but visible at once
        assert [e.key for e in await store.unpublished_events()] == ["b"]
        await store.flush()
        assert await store.prune_events(published_before=5.0) == 1  # only published "a"
        with pytest.raises(ValueError, match="JSON"):
            await store.append_event("k", "nan", {"x": float("nan")}, 1.0)
    async with await Store.open(state_dir) as store:
        c = await store.append_event("k", "c", {}, 3.0)
        assert c > b  # never reused, even after pruning
        assert [e.seq for e in await store.unpublished_events(after=0)] == [b, c]
        assert [e.seq for e in await store.unpublished_events(after=b)] == [c]


async def test_counters_never_repeat_across_reopen(state_dir: Path) -> None:
    async with await Store.open(state_dir) as store:
        assert await asyncio.gather(*(store.next_counter("activation") for _ in range(5))) == [
            1,
            2,
            3,
            4,
            5,
        ]
        assert await store.next_counter("other") == 1
    async with await Store.open(state_dir) as store:
        assert await store.next_counter("activation") == 6


# --------------------------------------------------------------------------- crash safety

CHILD = r"""
import asyncio, os, signal, sys, threading
from otad.store import Store, TransferState
from protocol.release.manifest import DeviceType, Manifest
from protocol.wire.messages import HubAnnounced, Limits

GUIDS = [f"{0x00AA000000000000 + i:016X}" for i in range(20)]
MODE, VALUE = sys.argv[2], float(sys.argv[3])
seen = {"rows": 0, "durable": 0, "full": False}

def trace(sql):  # runs in the database thread: SIGKILL lands exactly at this statement
    if sql.startswith("UPDATE transfers SET acked_bitmap"):  # one row of a batch flush
        seen["rows"] += 1
        if MODE == "flush-row" and seen["rows"] == VALUE:
            os.kill(os.getpid(), signal.SIGKILL)
    elif sql == "PRAGMA synchronous=FULL":
        seen["full"] = True
    elif sql == "PRAGMA synchronous=NORMAL":
        seen["full"] = False
    elif sql == "COMMIT" and seen["full"]:  # about to commit a durable write
        seen["durable"] += 1
        if MODE == "durable-commit" and seen["durable"] == VALUE:
            os.kill(os.getpid(), signal.SIGKILL)

def bitmap(n):
    return ((1 << n) - 1).to_bytes((n + 7) // 8, "little")

def say(*words):
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()

async def main(state_dir):
    store = await Store.open(state_dir, flush_interval=0.002, flush_batch=40, trace=trace)
    manifest = Manifest.for_image(b"\x5a" * 300, vendor=1, image_type=1,
        device_type=DeviceType.CH, hw_min=0, hw_max=9, fw_version=2, sequence=2,
        block_size=64, created=1, expires=2)
    sha = manifest.sha256
    await store.add_image(manifest, b"signed", "/img", 1.0)
    say("IMAGE", sha.hex())
    for g in GUIDS:
        await store.upsert_hub(HubAnnounced(g, 1, 1, "S", "seg", Limits(64, 8, 4096), ()), 1.0)
    await asyncio.gather(*(store.start_transfer(g, sha, 4096, 1.0) for g in GUIDS))
    say("STARTED")
    if MODE == "timer":
        threading.Timer(VALUE, os.kill, (os.getpid(), signal.SIGKILL)).start()
    n = 0
    while n < 2000:
        n += 1
        for g in GUIDS:
            store.record_progress(g, sha, acked_bitmap=bitmap(n), blocks_acked=n,
                                  blocks_sent=2 * n, bytes_sent=2048 * n, now=float(n))
        seq = await store.append_event("progress", f"p{n}", {"n": n}, float(n))
        say("EVENT", n, seq)
        store.mark_published(seq)
        if n % 10 == 0 and n // 10 < len(GUIDS):
            g = GUIDS[n // 10]
            await store.finish_transfer(g, sha, TransferState.HELD, held_sha256=sha,
                                        now=float(n))
            say("FINISHED", g, n)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize(
    ("mode", "value"),
    [
        ("flush-row", 47),  # third row of a batch flush, a few flushes in
        ("flush-row", 333),  # later, after transfers started finishing
        ("durable-commit", 12),  # just before COMMIT of a durable write
        ("timer", 0.3),  # anywhere
    ],
)
def test_kill_mid_batch_keeps_durable_rows_and_no_partial_rows(
    tmp_path: Path, mode: str, value: float
) -> None:
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(state_dir), mode, str(value)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    complete = child.stdout[: child.stdout.rfind("\n") + 1]  # a kill may cut the last line
    lines = [line.split() for line in complete.splitlines()]
    assert lines[0][0] == "IMAGE"
    assert lines[1] == ["STARTED"]
    events = {int(w[1]): int(w[2]) for w in lines if w[0] == "EVENT"}
    finished = {w[1]: int(w[2]) for w in lines if w[0] == "FINISHED"}
    assert len(events) >= 3, "the child was killed before it did anything"
    assert (state_dir / f"{DB_NAME}-wal").stat().st_size > 0  # no clean close happened

    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("SELECT count(*) FROM images").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM transfers").fetchone()[0] == 20
        # every durable write the child saw acknowledged is there, with its seq
        stored = dict(db.execute("SELECT seq, key FROM events").fetchall())
        for n, seq in events.items():
            assert stored[seq] == f"p{n}"
        assert len(stored) <= len(events) + 1  # at most the one being committed at the kill
        seqs = sorted(stored)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gaps, no half inserts
        published = [s for (s,) in db.execute("SELECT seq FROM events WHERE published = 1")]
        unpublished = [s for (s,) in db.execute("SELECT seq FROM events WHERE published = 0")]
        assert not published or not unpublished or max(published) < min(unpublished)
        rows = db.execute(
            "SELECT guid, state, acked_bitmap, blocks_acked, blocks_sent, bytes_sent, updated_at,"
            " held_sha256 FROM transfers"
        ).fetchall()
    active_values = set()
    for guid, state, bits, acked, sent, sent_bytes, updated, held in rows:
        # every row is one whole update: no field from another update
        assert popcount(bits) == acked
        assert sent == 2 * acked
        assert sent_bytes == 2048 * acked
        assert acked == 0 or updated == float(acked)
        if guid in finished:
            assert state == "held"
            assert held == bytes.fromhex(lines[0][1])
            assert acked == finished[guid]  # finish committed the progress it had then
        elif state == "held":  # committed, killed before it could say so: the next one due
            assert acked % 10 == 0
            assert acked // 10 == len(finished) + 1
        else:
            assert state == "active"
            active_values.add(acked)
    # a batch flush wrote every active transfer's latest round together, or nothing of it
    assert len(active_values) == 1
    assert 1 <= active_values.pop() <= max(events) + 1

    async def reopen() -> None:
        async with await Store.open(state_dir) as store:
            await store.check_integrity()
            assert len(await store.transfers()) == 20

    asyncio.run(reopen())


READ_ONLY_CHILD = r"""
import asyncio, concurrent.futures.thread, os, sys
from otad.store import Store, StoreError
if os.geteuid() == 0:  # root ignores file modes: drop to nobody, as systemd's DynamicUser would
    os.setgroups([]); os.setgid(65534); os.setuid(65534)

async def main(state_dir):
    try:
        store = await Store.open(state_dir)
    except StoreError as exc:
        print(type(exc).__name__, exc)
        return
    await store.close()
    print("OPENED")

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory another user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="otad-store-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in [path, *path.rglob("*")]:
            sub.chmod(0o777 if sub.is_dir() else 0o666)
        subprocess.run(["rm", "-rf", str(path)], check=True)


def open_as_unprivileged(state_dir: Path) -> str:
    child = subprocess.run(
        [sys.executable, "-c", READ_ONLY_CHILD, str(state_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    return child.stdout.strip()


def test_read_only_state_dir_raises_store_error_and_writes_nothing(world_dir: Path) -> None:
    # a fresh state directory inside a directory we may not write
    parent = world_dir / "ro"
    parent.mkdir(mode=0o555)
    parent.chmod(0o555)
    out = open_as_unprivileged(parent / "state")
    assert out.startswith("StoreError")
    assert "Permission denied" in out
    assert list(parent.iterdir()) == []

    # an existing database in a state directory that became read-only
    state_dir = world_dir / "state"

    async def populate() -> None:
        async with await Store.open(state_dir) as store:
            await store.upsert_hub(announce(GUIDS[0]), 1.0)
            await store.append_event("k", "a", {}, 1.0)

    asyncio.run(populate())
    before = sorted(p.name for p in state_dir.iterdir())
    state_dir.chmod(0o555)
    (state_dir / DB_NAME).chmod(0o444)
    (state_dir / "otad.lock").chmod(0o666)  # so the failure comes from SQLite itself
    out = open_as_unprivileged(state_dir)
    assert out.startswith("StoreError")
    assert str(state_dir / DB_NAME) in out
    assert sorted(p.name for p in state_dir.iterdir()) == before
    with contextlib.closing(raw(state_dir)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM hubs").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_pruning_keeps_unpublished_events_and_the_newest_seq(state_dir: Path) -> None:
    async with await Store.open(state_dir) as store:
        seqs = [await store.append_event("k", f"e{i}", {"i": i}, float(i)) for i in range(6)]
        store.mark_published(seqs[3])  # e0..e3 published; e4, e5 not
        assert await store.prune_events(published_before=100.0) == 0  # the mark is not committed
        await store.flush()
        assert await store.prune_events(published_before=2.0) == 2  # e0, e1: old enough
        assert await store.prune_events(published_before=100.0, limit=1) == 1  # e2, oldest first
        assert [e.key for e in await store.events()] == ["e3", "e4", "e5"]
        store.mark_published(seqs[5])
        await store.flush()
        assert await store.prune_events(published_before=100.0) == 2  # e3, e4; never e5
        assert [e.seq for e in await store.events()] == [seqs[5]]
        with pytest.raises(ValueError, match="limit"):
            await store.prune_events(1.0, limit=0)
    async with await Store.open(state_dir) as store:
        assert await store.append_event("k", "after", {}, 200.0) == seqs[5] + 1
