"""The event publisher's outbox: superseded progress reports are not committed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from mqttio import MqttClient
from otad.events import PRUNE_BATCH, EventPublisher
from otad.store import Store


class Offline:
    """Stands in for an MQTT client that is not connected (nothing gets published)."""

    connected = False
    inflight = 0


async def test_a_queued_progress_report_is_dropped_when_a_newer_event_about_it_comes(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    try:
        events = EventPublisher(store, cast(MqttClient, Offline()))
        subject = "0123456789ABCDEF:ab:1"
        p1 = events.emit("transfer.progress", "p:1", subject=subject, replaceable=True, n=1)
        p2 = events.emit("transfer.progress", "p:2", subject=subject, replaceable=True, n=2)
        other = events.emit("transfer.progress", "q:1", subject="other", replaceable=True, n=1)
        assert p1.cancelled()  # superseded by p2 before it was committed
        held = events.emit("transfer.held", "h:1", subject=subject, n=3)
        assert p2.cancelled()  # and p2 by the held event
        assert events.superseded == 2
        await events.flush()
        rows = await store.events()
        assert [r.key for r in rows] == ["q:1", "h:1"]
        assert [r.seq for r in rows] == [1, 2]  # no gap where the dropped ones were
        assert other.result() == 1
        assert held.result() == 2
        # an event already committed is never dropped: a later report is simply the next one
        events.emit("transfer.progress", "q:2", subject="other", replaceable=True, n=2)
        await events.flush()
        assert [r.key for r in await store.events()] == ["q:1", "h:1", "q:2"]
    finally:
        await store.close()


async def test_events_without_a_subject_are_all_committed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        events = EventPublisher(store, cast(MqttClient, Offline()))
        futures: list[Any] = [events.emit("hub.online", f"o:{i}", guid="X") for i in range(3)]
        await events.flush()
        assert [f.result() for f in futures] == [1, 2, 3]
        assert events.backlog == 0
    finally:
        await store.close()


async def test_published_events_past_their_retention_are_pruned_on_a_schedule(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    now = [1_000_000.0]
    try:
        events = EventPublisher(store, cast(MqttClient, Offline()), clock=lambda: now[0])
        for i in range(2 * PRUNE_BATCH + 5):  # more than one store job's worth
            events.emit("hub.online", f"old:{i}", guid="X")
        await events.flush()
        now[0] += 3 * 86_400
        events.emit("hub.online", "recent", guid="X")
        await events.flush()
        store.mark_published(events.last_seq)
        await store.flush()
        pruner = asyncio.create_task(events.run_pruning(2 * 86_400.0, interval=0.01))
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)
                if len(await store.events(limit=10)) == 1:
                    break
        finally:
            pruner.cancel()
        assert [e.key for e in await store.events()] == ["recent"]
        assert await events.prune(0.0) == 0  # the newest event is never pruned
    finally:
        await store.close()
