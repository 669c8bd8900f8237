"""A full disk mid-run: final states are never reported ahead of what is durable (the disk is
filled for real, through SQLite's own limit: ``diskfill``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from diskfill import fill_the_disk, free_the_disk
from shellkit import Shell, eventually, guids, shell
from test_store import GUIDS, note, with_transfers

from otad.retrying import RetriedWrite
from otad.store import Store, StoreError, TransferState, Tx

FLEET = 100  # the probe's figure: 99 of 100 final states were lost


def status_of(s: Shell) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(s.status.body("online"))
    return body


async def ended_on_a_full_disk(s: Shell, fleet: list[str]) -> None:
    """Distribute to ``fleet``, let every CH hold the image, commit the events, fill the disk."""
    for guid in fleet:
        s.add_ch(guid)
        s.announce(guid)
    await s.registry.flushed()
    await s.distribute()
    s.run_until(lambda: s.distribution.counts()["held"] == len(fleet))
    await s.events.flush()  # the transfer.held events are in the outbox before the disk fills
    await s.store.flush()
    assert await fill_the_disk(s.store) >= 0
    assert not await s.distribution.wait_final_writes()  # the store refused them


async def test_final_states_on_a_full_disk_are_shown_active_retried_and_all_recorded(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        fleet = guids(FLEET)
        await ended_on_a_full_disk(s, fleet)
        # Nothing ahead of the database: it says active, so do otactl transfers and the status.
        rows = await s.store.transfers()
        assert {r.state for r in rows} == {TransferState.ACTIVE}
        listing = await s.daemon.commands.transfers({})
        assert {(r["state"], r["phase"], r["finished_at"]) for r in listing} == {
            ("active", "recording", None)
        }
        status = status_of(s)
        assert status["transfers"]["held"] == 0
        assert status["transfers"]["active"] == FLEET
        (distribution,) = status["distributions"].values()
        assert distribution["transfers"]["active"] == distribution["recording"] == FLEET
        store_line, finals_line = status["degraded"]
        assert store_line.startswith("store writes failing")
        assert store_line.endswith("database or disk is full")
        assert finals_line.startswith(f"{FLEET} ended transfer(s) not yet recorded")
        assert s.store.degraded == [store_line]
        assert s.daemon.degraded == status["degraded"]

        # The final writer keeps trying; once space returns every state is recorded.
        writer = asyncio.create_task(s.distribution.run_final_writer())
        writer_failed_again = s.store.stats.commits
        await asyncio.sleep(1.5)  # at least one more try, on a disk still full
        assert s.store.stats.commits == writer_failed_again
        assert status_of(s)["degraded"]
        await free_the_disk(s.store)
        try:
            await eventually(lambda: not s.distribution.degraded, wait_s=10.0)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        rows = await s.store.transfers()
        assert [r.state for r in rows] == [TransferState.HELD] * FLEET
        assert all(r.held_sha256 == s.image and r.finished_at is not None for r in rows)
        status = status_of(s)
        assert status["degraded"] == []
        assert status["transfers"]["held"] == FLEET
        assert {r["state"] for r in await s.daemon.commands.transfers({})} == {"held"}


async def test_a_stop_on_a_full_disk_says_so_and_a_restart_records_every_state(
    tmp_path: Path,
) -> None:
    fleet = guids(FLEET)
    async with shell(tmp_path) as first:
        await ended_on_a_full_disk(first, fleet)
        assert not await first.daemon.shutdown()  # Daemon.run turns this into EXIT_STORE_FAILED
        first.kill()  # already stopped: no second shutdown
        await free_the_disk(first.store)  # the operator frees space; systemd restarts otad
    async with shell(tmp_path, release=first.release, clock=first.clock) as again:
        rows = await again.store.transfers()
        assert {r.state for r in rows} == {TransferState.ACTIVE}  # what was durable
        again.chs = first.chs
        for guid in fleet:
            again.announce(guid)
        again.run_until(lambda: again.distribution.counts()["held"] == FLEET)
        await again.settle()
        rows = await again.store.transfers()
        assert [r.state for r in rows] == [TransferState.HELD] * FLEET
        assert again.store.degraded == []


async def test_the_store_says_which_writes_fail_on_storage_and_clears_when_they_commit(
    tmp_path: Path,
) -> None:
    async with await Store.open(tmp_path / "state", flush_interval=0.01) as store:
        image = await with_transfers(store, 20)
        assert store.degraded == []

        async def broken_change(tx: Tx) -> None:
            await tx.execute("UPDATE no_such_table SET x = 1")

        with pytest.raises(StoreError, match="no such table"):  # the change's fault, not storage
            await store.write(broken_change)
        assert store.degraded == []
        await fill_the_disk(store)
        assert store.degraded == ["store writes failing: database or disk is full"]
        for guid in GUIDS[:20]:
            note(store, guid, image, os.urandom(2000), 7, 7, 7, 3.0)
        with pytest.raises(StoreError, match="full"):
            await store.flush()
        assert store.degraded == [
            "store writes failing: database or disk is full",
            "store flushes failing: database or disk is full",
        ]
        await free_the_disk(store)
        await store.flush()
        assert store.degraded == ["store writes failing: database or disk is full"]
        await store.meta_set("space", "back")
        assert store.degraded == []
        row = await store.transfer(GUIDS[5], image)
        assert row is not None
        assert row.blocks_acked == 7


def test_a_write_retried_every_second_logs_once_a_minute_and_once_when_it_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    retried = RetriedWrite(logging.getLogger("otad.test"), "recording", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="otad.test"):
        for _ in range(150):  # two and a half minutes of a full disk, one try a second
            retried.failed(StoreError("database or disk is full"))
            assert retried.failing
            now[0] += 1.0
        retried.succeeded()
        retried.succeeded()  # nothing more to say
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", "recording failed (will retry): database or disk is full"),
        ("ERROR", "recording still failing, 61 tries over 60 s (will retry): database or disk"
                  " is full"),
        ("ERROR", "recording still failing, 121 tries over 120 s (will retry): database or disk"
                  " is full"),
        ("WARNING", "recording succeeded again after 150 failed tries over 150 s"),
    ]  # fmt: skip
    assert not retried.failing
