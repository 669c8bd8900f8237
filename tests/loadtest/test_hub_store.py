"""The virtual CH's on-disk store: queued block writes, and when they reach the disk."""

from __future__ import annotations

from pathlib import Path

from loadtest.hubstate import MAX_QUEUED_BLOCKS, SNAPSHOT_NAME, HubStore

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
    assert (store.dir / SNAPSHOT_NAME).read_bytes() == b"state"
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
