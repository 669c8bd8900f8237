"""A full disk, for real, in SQLite's own terms.

``PRAGMA max_page_count`` pins the database at the pages it has and every free byte of them is
then taken, so the next change that needs a page fails with ``SQLITE_FULL`` ("database or disk
is full"), as on a full file system. The pin belongs to the store's connection: raising it again,
or a new connection (a restart), is space coming back. It needs no privileges; it refuses only
changes that need a new page (tests/integration/test_otad_disk_full.py fills a real tmpfs, where
every write is refused).
"""

from __future__ import annotations

from otad.store import Store, StoreError, Tx

SQLITE_MAX_PAGES = 1_073_741_823  # SQLite's default max_page_count


async def fill_the_disk(store: Store) -> int:
    """Pin the database at its current size, then take every free byte; return the filler rows."""

    async def pin(tx: Tx) -> None:
        row = await tx.fetchone("PRAGMA page_count")
        assert row is not None
        await tx.fetchall(f"PRAGMA max_page_count={int(row[0])}")

    await store.read(pin)
    filler = 0
    for size in (3000, 300, 30, 1):
        while True:
            try:
                await store.meta_set(f"filler.{filler}", "x" * size)
            except StoreError as exc:
                refused = str(exc)
                break
            filler += 1
        assert "database or disk is full" in refused
    return filler


async def free_the_disk(store: Store) -> None:
    """Lift the pin: the database may grow again."""

    async def unpin(tx: Tx) -> None:
        await tx.fetchall(f"PRAGMA max_page_count={SQLITE_MAX_PAGES}")

    await store.read(unpin)
