"""The event publisher's outbox: superseded progress reports are not committed; pruning."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

from shellkit import MemoryMqttClient, eventually

from mqttio import MqttClient
from otad.events import HubOnline, TransferHeld, TransferProgress
from otad.outbox import CONFIRM_AFTER, PRUNE_BATCH, EventPublisher
from otad.store import Store

IMAGE = "ab" * 32


class Offline:
    """Stands in for an MQTT client that is not connected (nothing gets published)."""

    connected = False
    inflight = 0


def progress(guid: str, acked: int) -> TransferProgress:
    return TransferProgress(
        time=1.0, guid=guid, image=IMAGE, attempt=1, blocks_acked=acked, blocks_total=9,
        bytes_sent=acked * 1024,
    )  # fmt: skip


def online(guid: str, when: float) -> HubOnline:
    return HubOnline(time=when, guid=guid, segment="c", supplier="s", fw_version=1, hw_version=1)


async def test_a_queued_progress_report_is_dropped_when_a_newer_event_about_it_comes(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    try:
        events = EventPublisher(store, cast(MqttClient, Offline()))
        guid, other_guid = "0123456789ABCDEF", "00000000000000FF"
        p1 = events.emit(progress(guid, 1))
        p2 = events.emit(progress(guid, 2))
        q1 = progress(other_guid, 1)
        other = events.emit(q1)
        assert p1.cancelled()  # superseded by p2 before it was committed
        h1 = TransferHeld(
            time=2.0, guid=guid, image=IMAGE, attempt=1, sha256=IMAGE, matches=True,
            blocks_total=9, bytes_sent=9216, retransmissions=0,
        )  # fmt: skip
        held = events.emit(h1)
        assert p2.cancelled()  # and p2 by the held event
        assert events.superseded == 2
        await events.flush()
        rows = await store.events()
        assert [r.key for r in rows] == [q1.key(), h1.key()]
        assert [r.seq for r in rows] == [1, 2]  # no gap where the dropped ones were
        assert other.result() == 1
        assert held.result() == 2
        # an event already committed is never dropped: a later report is simply the next one
        q2 = progress(other_guid, 2)
        events.emit(q2)
        await events.flush()
        assert [r.key for r in await store.events()] == [q1.key(), h1.key(), q2.key()]
    finally:
        await store.close()


async def test_events_without_a_subject_are_all_committed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        events = EventPublisher(store, cast(MqttClient, Offline()))
        futures: list[Any] = [events.emit(online("0000000000000001", i)) for i in range(3)]
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
            events.emit(online("0000000000000001", now[0] + i / 1000))
        await events.flush()
        now[0] += 3 * 86_400
        recent = online("0000000000000001", now[0])
        events.emit(recent)
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
        assert [e.key for e in await store.events()] == [recent.key()]
        assert await events.prune(0.0) == 0  # the newest event is never pruned
    finally:
        await store.close()


async def test_an_event_is_committed_then_published_then_confirmed_and_again_after_a_loss(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    client = MemoryMqttClient()
    monotonic = [0.0]
    events = EventPublisher(store, client, monotonic=lambda: monotonic[0])
    client.set_connection_handler(events.connection_changed)
    await client.connect()
    committed_when_published: list[bool] = []
    publish = client.publish

    def spy(topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        committed_when_published.append(first.done() and not first.cancelled())
        publish(topic, payload, qos, retain)

    client.publish = spy  # type: ignore[method-assign]
    runner = asyncio.create_task(events.run())
    try:
        event = online("0123456789ABCDEF", 5.0)
        first = events.emit(event)
        seq = await first
        await eventually(lambda: len(client.published) == 1)
        (message,) = client.published
        assert committed_when_published == [True]  # 1. committed, 2. published
        assert (message.topic, message.qos, message.retain) == (
            "ota/v1/events/hub.online/0123456789ABCDEF", 1, False,
        )  # fmt: skip
        assert json.loads(message.payload)["seq"] == seq
        assert [e.seq for e in await store.unpublished_events()] == [seq]  # 3. not yet confirmed
        monotonic[0] += CONFIRM_AFTER + 0.1
        events.connection_changed(True)  # wakes the task: the confirmation is due
        for _ in range(500):
            if await _unpublished(store) == []:
                break
            await asyncio.sleep(0.01)
        assert await _unpublished(store) == []  # 4. marked published
        # published on a connection that is lost before its confirmation: published again
        second = events.emit(online("0123456789ABCDEF", 6.0))
        seq2 = await second
        await eventually(lambda: len(client.published) == 2)
        client.lose_connection()
        await eventually(lambda: len(client.published) == 3)  # once the connection is back
        assert client.published[1].payload == client.published[2].payload
        assert json.loads(client.published[2].payload)["seq"] == seq2
    finally:
        runner.cancel()
        await client.disconnect()
        await store.close()


async def _unpublished(store: Store) -> list[int]:
    await store.flush()
    return [e.seq for e in await store.unpublished_events()]
