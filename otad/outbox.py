"""The events outbox: every monitoring event committed durably, then published, then confirmed.

What an event is (its kinds, fields, key, topic) is :mod:`otad.events`; this module is how it
gets out. One task (:meth:`EventPublisher.run`) does, in order:

1. **commit**: the events emitted since its last turn go to the store's outbox table in one
   durable job (``synchronous=FULL``; at most :data:`_COMMIT_BATCH`), which assigns each its
   gap-free ``seq`` (an event whose key is already there gets the ``seq`` it has, and is not
   published again). Only then does an event's future resolve: whoever must not act before the
   event is safe (a transfer's final state, :mod:`otad.distribution`) waits for it;
2. **publish** at QoS 1 on the event's topic;
3. **confirm**: :data:`CONFIRM_AFTER` seconds after its publish on a connection that is still up
   it is marked published (batched). Whatever is not marked is published again after a
   reconnect or a restart, so a monitor may see an event twice, with the same ``seq``.

Published events older than ``events.retention_days`` are pruned hourly
(:meth:`EventPublisher.run_pruning`); the newest is always kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mqttio import MqttClient, NotConnected, wait_acknowledged
from otad.events import MonitorEvent, payload_topic
from otad.jsonwire import dumps
from otad.retrying import RetriedWrite
from otad.store import NewEvent, Store, StoreError, Tx

log = logging.getLogger("otad.events")

DEFAULT_TOPIC_PREFIX = "ota/v1/events"
#: How long after a QoS 1 publish an event is assumed acknowledged by the broker (the adapter
#: interface does not expose individual PUBACKs). Until then it stays unmarked in the outbox and
#: is re-published after a reconnect or restart.
CONFIRM_AFTER = 1.0
#: Event bodies encoded per event-loop turn, and events committed per store job (their JSON is
#: encoded on the loop: a batch of 10,000 would stall it for over 100 ms).
_ENCODE_CHUNK = 500
_COMMIT_BATCH = 1000
#: How often published events past their retention are pruned, and how many per store job (a
#: first pruning of a large outbox must not hold the single writer for long).
PRUNE_INTERVAL_S = 3600.0
PRUNE_BATCH = 10_000


@dataclass(slots=True)
class _Pending:
    kind: str
    key: str
    payload: dict[str, Any]
    now: float
    committed: asyncio.Future[int]
    topic: str
    subject: str | None = None
    dropped: bool = False


@dataclass(slots=True)
class _Sent:
    seq: int
    topic: str
    body: bytes
    at: float
    epoch: int


class EventPublisher:
    """Append events to the store's outbox, then publish them; one task (:meth:`run`) does both,
    in order. :meth:`emit` is synchronous and never blocks the caller."""

    def __init__(
        self,
        store: Store,
        client: MqttClient,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Events are published under ``topic_prefix`` (:func:`otad.events.event_topic`).
        ``clock`` (unix seconds) dates retention; ``monotonic`` times the confirmations."""
        self._store = store
        self._client = client
        self._prefix = topic_prefix.rstrip("/")
        self._clock = clock
        self._monotonic = monotonic
        self._queue: collections.deque[_Pending] = collections.deque()
        self._sent: collections.deque[_Sent] = collections.deque()
        self._wake = asyncio.Event()
        self._epoch = 0
        self._closing = False
        self.last_seq = 0
        """Highest ``seq`` committed by this process (or found in the outbox at start)."""
        self.published = 0
        """Publish calls made (re-publications included)."""
        self.superseded = 0
        """Supersedable events dropped before their commit because a newer one came."""
        self._replaceable: dict[str, _Pending] = {}
        self._commit_log = RetriedWrite(log, "committing events to the outbox")

    # ------------------------------------------------------------------ producers

    def emit(self, event: MonitorEvent) -> asyncio.Future[int]:
        """Queue ``event``. Committed, then published, by :meth:`run`, in the order of ``emit``
        calls. The returned future gets the event's ``seq`` once it is committed to the outbox
        (awaiting it is optional).

        A supersedable event (``event.SUPERSEDABLE``: a progress report) that is still waiting
        to be committed when a newer event about the same subject (``event.subject()``) is
        emitted is dropped, its future cancelled: under load the outbox commits the latest
        progress, not a backlog of superseded ones (at 10,000 CHs the progress reports alone
        were 2,000 durable rows a second, and the other events waited behind them)."""
        committed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        key = event.key()
        if self._closing:
            log.debug("event %s after shutdown began: dropped", key)
            committed.cancel()
            return committed
        subject = event.subject()
        pending = _Pending(
            event.KIND,
            key,
            event.payload(),
            event.time,
            committed,
            event.topic(self._prefix),
            subject,
        )
        if subject is not None:
            older = self._replaceable.pop(subject, None)
            if older is not None:
                older.dropped = True
                older.committed.cancel()
                self.superseded += 1
            if event.SUPERSEDABLE:
                self._replaceable[subject] = pending
        self._queue.append(pending)
        self._wake.set()
        return committed

    @property
    def backlog(self) -> int:
        """Events emitted and not yet committed to the outbox (0 when the outbox keeps up)."""
        return len(self._queue)

    @property
    def unconfirmed(self) -> int:
        """Committed events not yet confirmed published."""
        return len(self._sent)

    def connection_changed(self, up: bool) -> None:
        """Tell the publisher about the MQTT connection: after a loss, everything not yet
        confirmed is published again once the connection is back."""
        if not up:
            self._epoch += 1  # what went out on the lost connection is published again
        self._wake.set()

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        """Publish what the outbox holds from before (a restart), then serve :meth:`emit`
        until cancelled."""
        await self._load_unpublished()
        while True:
            await self._step()
            timeout = CONFIRM_AFTER if self._sent else None
            self._wake.clear()
            if self._queue:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def replay(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        kinds: Sequence[str] | None = None,
        campaign: str | None = None,
    ) -> list[dict[str, Any]]:
        """Committed events after ``after`` as they are published (body, ``seq`` and ``key``),
        only those of ``kinds`` and ``campaign`` if given (``otactl campaign events``)."""
        rows = await self._store.events(after=after, limit=limit, kinds=kinds, campaign=campaign)
        return [{**row.payload, "seq": row.seq, "key": row.key} for row in rows]

    async def flush(self) -> None:
        """Commit and publish everything queued now (shutdown; :meth:`run` is not running)."""
        with contextlib.suppress(StoreError, NotConnected):
            while self._queue:
                await self._commit_queue()
            self._publish_unsent()

    async def close(self, wait_s: float = 3.0) -> None:
        """Commit and publish everything queued, wait (up to ``wait_s``) for the broker's
        acknowledgements, and mark what was confirmed. Call after cancelling :meth:`run`."""
        self._closing = True
        with contextlib.suppress(StoreError, NotConnected):
            while self._queue:
                await self._commit_queue()
            self._publish_unsent()
        if self._sent and await wait_acknowledged(self._client, wait_s):
            self._store.mark_published(self._sent[-1].seq)
            self._sent.clear()

    async def prune(self, retention_s: float) -> int:
        """Delete the published events older than ``retention_s`` from the outbox (in store jobs
        of :data:`PRUNE_BATCH`; the newest event always stays); return how many."""
        before = self._clock() - retention_s
        pruned = 0
        while True:
            n = await self._store.prune_events(before, limit=PRUNE_BATCH)
            pruned += n
            if n < PRUNE_BATCH:
                return pruned

    async def run_pruning(self, retention_s: float, interval: float = PRUNE_INTERVAL_S) -> None:
        """Task: :meth:`prune` now and every ``interval`` seconds, until cancelled (a failed
        pruning is logged and tried again next time)."""
        while True:
            try:
                pruned = await self.prune(retention_s)
            except StoreError as exc:
                log.error("cannot prune the event outbox: %s", exc)
            else:
                if pruned:
                    log.info("pruned %d published event(s) from the outbox", pruned)
            await asyncio.sleep(interval)

    async def _load_unpublished(self) -> None:
        after = 0
        while True:
            rows = await self._store.unpublished_events(1000, after=after)
            if not rows:
                break
            for row in rows:
                body = dumps({**row.payload, "seq": row.seq, "key": row.key})
                topic = payload_topic(self._prefix, row.kind, row.payload)
                self._sent.append(_Sent(row.seq, topic, body, -1e9, -1))
                after = row.seq
        self.last_seq = max(after, await self._store.read(_max_seq))
        if self._sent:
            log.info("re-publishing %d unconfirmed event(s) from the outbox", len(self._sent))

    async def _step(self) -> None:
        try:
            await self._commit_queue()
        except StoreError as exc:
            self._commit_log.failed(exc)
            await asyncio.sleep(1.0)
            return
        self._commit_log.succeeded()
        self._publish_unsent()
        self._confirm()

    async def _commit_queue(self) -> None:
        """Commit the oldest queued events (at most :data:`_COMMIT_BATCH`, one durable job) and
        move them to the send list; superseded ones are skipped."""
        taken = 0
        batch: list[_Pending] = []
        for pending in itertools.islice(self._queue, _COMMIT_BATCH):
            taken += 1
            if pending.dropped:
                continue
            batch.append(pending)
            # being committed now: a newer report no longer drops it
            if pending.subject is not None and self._replaceable.get(pending.subject) is pending:
                del self._replaceable[pending.subject]
        if not batch:
            for _ in range(taken):
                self._queue.popleft()
            return
        try:
            seqs = await self._store.append_events(
                [NewEvent(p.kind, p.key, p.payload, p.now) for p in batch]
            )
        except (TypeError, ValueError) as exc:  # a payload that is not JSON: a bug, never input
            log.error("events refused by the store (%d dropped): %r", len(batch), exc)
            for pending in batch:
                pending.committed.cancel()
            for _ in range(taken):
                self._queue.popleft()
            return
        for _ in range(taken):  # the batch, and what was dropped among it
            self._queue.popleft()
        for n, (pending, seq) in enumerate(zip(batch, seqs, strict=True)):
            if n and not n % _ENCODE_CHUNK:
                await asyncio.sleep(0)  # thousands of events at once must not stall the loop
            if not pending.committed.done():
                pending.committed.set_result(seq)
            if seq <= self.last_seq:
                continue  # the key was already in the outbox: the event exists
            self.last_seq = seq
            body = dumps({**pending.payload, "seq": seq, "key": pending.key})
            self._sent.append(_Sent(seq, pending.topic, body, -1e9, -1))

    def _publish_unsent(self) -> None:
        client = self._client
        if not client.connected:
            return
        now = self._monotonic()
        for sent in self._sent:
            if sent.epoch == self._epoch:
                continue
            try:
                client.publish(sent.topic, sent.body, 1, False)
            except NotConnected:
                return
            sent.at = now
            sent.epoch = self._epoch
            self.published += 1

    def _confirm(self) -> None:
        """Mark published the oldest events that went out on this connection long enough ago."""
        cutoff = self._monotonic() - CONFIRM_AFTER
        upto = None
        sent = self._sent
        while sent and sent[0].epoch == self._epoch and sent[0].at <= cutoff:
            upto = sent.popleft().seq
        if upto is not None:
            self._store.mark_published(upto)


async def _max_seq(tx: Tx) -> int:
    row = await tx.fetchone("SELECT COALESCE(MAX(seq), 0) FROM events")
    return 0 if row is None else int(row[0])
