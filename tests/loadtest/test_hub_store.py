"""The virtual CH's on-disk store: queued block writes, and when they reach the disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.hubstate import COMPACT_AFTER_BYTES, MAX_QUEUED_BLOCKS, SNAPSHOT_NAME, HubStore

IMAGE = bytes(range(32))
BLOCK = 16


def block(index: int) -> bytes:
    return bytes([index % 251 + 1]) * BLOCK


def on_disk(store: HubStore) -> bytes:
    return store.image_path(IMAGE).read_bytes()


def test_a_queued_block_reaches_the_disk_at_the_flush_in_its_place(tmp_path: Path) -> None:
    store = HubStore(tmp_path, "00000000000000AA")
    size = 10 * BLOCK
    for index in (3, 1, 2, 7, 0, 9):  # out of order, with gaps: three runs
        store.write_block(IMAGE, size, index * BLOCK, block(index))
    assert on_disk(store) == bytes(size)  # sized, nothing written yet
    store.flush_blocks()
    expected = bytearray(size)
    for index in (0, 1, 2, 3, 7, 9):
        expected[index * BLOCK : (index + 1) * BLOCK] = block(index)
    assert on_disk(store) == expected
    assert dict(store.read_blocks(IMAGE, BLOCK, size, range(10))) == {
        i: block(i) for i in (0, 1, 2, 3, 7, 9)
    }
    store.close()


def test_a_snapshot_and_a_close_write_the_queued_blocks_first(tmp_path: Path) -> None:
    store = HubStore(tmp_path, "00000000000000AB")
    store.write_block(IMAGE, 4 * BLOCK, 0, block(0))
    store.save_snapshot(b"state")
    assert on_disk(store)[:BLOCK] == block(0)
    assert HubStore(tmp_path, "00000000000000AB").load_snapshot() == b"state"
    store.write_block(IMAGE, 4 * BLOCK, BLOCK, block(1))
    store.close_image(IMAGE)  # what the hub does before it re-reads a complete image
    assert on_disk(store)[BLOCK : 2 * BLOCK] == block(1)
    store.write_block(IMAGE, 4 * BLOCK, 2 * BLOCK, block(2))
    store.close()  # a clean stop
    assert on_disk(store)[2 * BLOCK : 3 * BLOCK] == block(2)


def test_a_discarded_image_drops_its_queued_blocks(tmp_path: Path) -> None:
    store = HubStore(tmp_path, "00000000000000AC")
    store.write_block(IMAGE, 4 * BLOCK, 0, block(0))
    store.discard_image(IMAGE)
    store.flush_blocks()
    assert not store.has_image_file(IMAGE)


def test_more_blocks_than_the_queue_holds_are_written_without_a_flush(tmp_path: Path) -> None:
    store = HubStore(tmp_path, "00000000000000AD")
    count = MAX_QUEUED_BLOCKS + 5
    size = count * BLOCK
    for index in range(count):
        store.write_block(IMAGE, size, index * BLOCK, block(index))
    data = on_disk(store)
    written = [i for i in range(count) if data[i * BLOCK : (i + 1) * BLOCK] == block(i)]
    assert written == list(range(MAX_QUEUED_BLOCKS))  # the rest waits for the next flush
    store.flush_blocks()
    assert on_disk(store) == b"".join(block(i) for i in range(count))
    store.close()


def test_the_last_whole_snapshot_is_loaded_and_a_torn_one_is_written_over(
    tmp_path: Path,
) -> None:
    guid = "00000000000000AE"
    store = HubStore(tmp_path, guid)
    assert store.load_snapshot() is None
    for n in range(5):
        store.save_snapshot(b"snapshot %d" % n)
    assert HubStore(tmp_path, guid).load_snapshot() == b"snapshot 4"
    path = store.dir / SNAPSHOT_NAME
    whole = path.read_bytes()
    store.save_snapshot(b"snapshot 5, torn by a crash")
    torn = path.read_bytes()[: len(whole) + 20]  # the process died in the middle of the write
    path.write_bytes(torn)
    restarted = HubStore(tmp_path, guid)
    assert restarted.load_snapshot() == b"snapshot 4"  # the old one, never half of the new one
    restarted.save_snapshot(b"snapshot 6")
    assert path.stat().st_size == len(whole) + 40 + len(b"snapshot 6")  # over the torn record
    assert HubStore(tmp_path, guid).load_snapshot() == b"snapshot 6"


def test_a_snapshot_file_without_a_whole_record_is_no_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = HubStore(tmp_path, "00000000000000AF")
    store.dir.mkdir(parents=True)
    (store.dir / SNAPSHOT_NAME).write_bytes(b"\xa2 not a snapshot log")
    assert store.load_snapshot() is None
    assert "no whole snapshot" in caplog.text
    store.save_snapshot(b"fresh")
    assert HubStore(tmp_path, "00000000000000AF").load_snapshot() == b"fresh"


def test_the_log_is_rewritten_with_the_newest_record_past_its_limit(tmp_path: Path) -> None:
    store = HubStore(tmp_path, "00000000000000B0")
    path = store.dir / SNAPSHOT_NAME
    snapshot = bytes(1000)
    sizes = []
    for n in range(2 * COMPACT_AFTER_BYTES // len(snapshot)):
        store.save_snapshot(snapshot[:-1] + bytes([n % 256]))
        sizes.append(path.stat().st_size)
    record = 40 + len(snapshot)
    assert max(sizes) <= COMPACT_AFTER_BYTES  # never past the limit
    assert sizes.count(record) >= 2  # rewritten with one record, more than once
    assert HubStore(tmp_path, "00000000000000B0").load_snapshot() == snapshot[:-1] + bytes(
        [(len(sizes) - 1) % 256]
    )
    assert not (store.dir / (SNAPSHOT_NAME + ".tmp")).exists()
