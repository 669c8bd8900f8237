"""Distribution: one :class:`~protocol.sender.Sender` per (CH, image), driven by MQTT and timers.

Theory of operation
-------------------

A :class:`Transfer` wraps one sender with what the shell needs around it: the CH's ``down``
topic, the image's :class:`~otad.catalogue.BlockSource` (pre-encoded, shared ``Block`` bytes),
its segment's token bucket, one lazily re-armed ``loop.call_at`` timer, and counters carried over
from earlier sender lives (otad restarts, CH reconnects).

The hot path, for each ``TransferAcked`` on ``ota/v1/ch/{guid}/up``::

    decode -> sender.message_received -> drain sender events -> scheduler.pump
           -> publish the cached Block bytes -> re-arm the timer only if the deadline moved earlier

It creates no task, writes no log line and touches no database: progress is marked dirty and
:meth:`Distribution.flush_progress` hands the latest bitmap of each dirty transfer to the store's
batched bookkeeping every ``store.flush_interval``.

Decisions that cannot be re-derived from the CHs are committed durably before they take effect:
a transfer row (``Store.start_transfer``, synchronous=FULL) exists before its first ``Offer`` is
published; its final state is committed when it ends. On restart, every active transfer gets a
new sender seeded with the persisted acknowledged bitmap, in OFFERING: the CH's answer to the
``Offer`` says what it holds, and replaces the seed, so at most the blocks in flight when otad
died are sent twice.

A CH's presence drives its transfers: its last will suspends them (no budget is spent on a CH
that cannot hear), and an announcement (a reconnect) re-synchronises them: a fresh sender,
seeded with what was acknowledged so far, offers again and the CH's answer says where to resume.
The same re-synchronisation follows a reconnect of otad's own MQTT session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from otad.catalogue import BlockSource, Catalogue, Image
from otad.config import TransferConfig
from otad.events import EventPublisher
from otad.mqtt import MqttClient, NotConnected
from otad.registry import Hub, Registry, RejectLog
from otad.scheduler import Scheduler, TokenBucket
from otad.store import Store, StoreError, TransferRow, TransferState
from protocol import topics
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    Cancel,
    ImageHeld,
    Message,
    TransferAcked,
    TransferRejected,
    decode,
)
from protocol.sender import (
    ProgressMade,
    SendBlock,
    Sender,
    SenderState,
    SendOffer,
    TransferCompleted,
    TransferFailed,
)
from protocol.trust import Target, check_target

log = logging.getLogger("otad.distribution")

#: Largest message accepted on an ``up`` topic (the largest CH -> otad message type).
MAX_UP_BYTES = max(TransferAcked.MAX_BYTES, ImageHeld.MAX_BYTES, TransferRejected.MAX_BYTES)
#: How long a final-state write waits for its event to be committed first (a stuck outbox must
#: not keep a transfer's end unrecorded for ever).
FINAL_EVENT_WAIT = 10.0
_UP_PREFIX = f"{topics.ROOT}/ch/"
_UP_GUID_START = len(_UP_PREFIX)
_UP_GUID_END = _UP_GUID_START + 16


@dataclass(slots=True)
class _Carry:
    """Counters of earlier sender lives of one transfer."""

    blocks_sent: int = 0
    bytes_sent: int = 0
    retransmissions: int = 0


class Transfer:
    """One (CH, image) transfer and its sender (see the module docstring)."""

    __slots__ = (
        "attempt",
        "bucket",
        "carry",
        "dirty",
        "down",
        "finished_at",
        "guid",
        "held_sha256",
        "image",
        "inflight_seen",
        "last_progress_at",
        "last_progress_blocks",
        "publish",
        "qos_blocks",
        "reason",
        "runnable",
        "sender",
        "source",
        "started_at",
        "state",
        "timer",
        "timer_at",
        "waiting",
    )

    def __init__(
        self,
        guid: str,
        image: Image,
        source: BlockSource,
        sender: Sender,
        *,
        publish: Callable[[str, bytes, int, bool], None],
        qos_blocks: int,
        bucket: TokenBucket | None,
        attempt: int,
        started_at: float,
        carry: _Carry,
    ) -> None:
        """Wrap ``sender``; the transfer starts not runnable (the caller decides)."""
        self.guid = guid
        self.image = image
        self.source = source
        self.sender = sender
        self.publish = publish
        self.qos_blocks = qos_blocks
        self.bucket = bucket
        self.down = topics.down(guid)
        self.runnable = False
        self.waiting = False
        self.inflight_seen = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.state = TransferState.ACTIVE
        self.held_sha256: bytes | None = None
        self.reason: str | None = None
        self.attempt = attempt
        self.started_at = started_at
        self.finished_at: float | None = None
        self.carry = carry
        self.dirty = False
        self.last_progress_at = 0.0
        self.last_progress_blocks = sender.blocks_acked

    # ------------------------------------------------------------------ Schedulable

    def in_flight(self) -> int:
        """Blocks the sender has in flight."""
        return self.sender.in_flight

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        """Publish what the sender wants to send within ``budget`` blocks; return (blocks
        published, blocks still sendable)."""
        actions = self.sender.next_actions(now, budget)
        if not actions:
            return 0, (self.sender.sendable() if budget <= 0 else 0)
        blocks = 0
        publish, down, source, qos = self.publish, self.down, self.source, self.qos_blocks
        try:
            for action in actions:
                if type(action) is SendBlock:
                    publish(down, source.get(action.index, action.ack_now), qos, False)
                    blocks += 1
                elif type(action) is SendOffer:
                    publish(down, self.image.offer, 1, False)
                else:  # SendCancel
                    reason = getattr(action, "reason", Reason.CANCELLED)
                    publish(
                        down, Cancel(image=self.image.sha256, reason=int(reason)).encode(), 1, False
                    )
        except NotConnected:
            pass  # the sender's timers repair it; the daemon re-synchronises on reconnect
        more = self.sender.sendable() if blocks >= budget else 0
        return blocks, more

    # ------------------------------------------------------------------ figures

    @property
    def blocks_sent(self) -> int:
        """Block messages published for this transfer, all lives."""
        return self.carry.blocks_sent + self.sender.blocks_sent

    @property
    def bytes_sent(self) -> int:
        """Block payload bytes published for this transfer, all lives."""
        return self.carry.bytes_sent + self.sender.bytes_sent

    @property
    def retransmissions(self) -> int:
        """Blocks published again within a sender life, all lives."""
        return self.carry.retransmissions + self.sender.retransmissions

    def to_json(self) -> dict[str, Any]:
        """JSON-ready row (``transfers``)."""
        held = self.held_sha256
        return {
            "guid": self.guid,
            "image": self.image.hex,
            "state": self.state.value,
            "phase": self.sender.state.value,
            "blocks_acked": self.sender.blocks_acked,
            "blocks_total": self.sender.blocks_total,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "retransmissions": self.retransmissions,
            "held_sha256": None if held is None else held.hex(),
            "matches": None if held is None else held == self.image.sha256,
            "reason": self.reason,
            "attempt": self.attempt,
            "in_flight": self.sender.in_flight,
            "debug": {
                "sendable": self.sender.sendable(),
                "waiting": self.waiting,
                "runnable": self.runnable,
                "timer_at": None if self.timer is None else round(self.timer_at, 3),
                "rto": round(self.sender.rto, 4),
            },
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class DistributionError(Exception):
    """A distribute request was refused as a whole (typed reason)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        """``reason`` is the typed cause."""
        super().__init__(f"{reason.name}: {detail}")
        self.reason = reason
        self.detail = detail


def target_error(hub: Hub, image: Image) -> ProtocolError | None:
    """Why ``image`` cannot be sent to ``hub`` (device type, hardware range, declared
    limits), or None."""
    manifest = image.manifest
    announcement = hub.announcement
    try:
        if manifest.device_type.value == "CH":
            check_target(manifest, Target(manifest.device_type, announcement.hw_version, 0, None))
        elif not hub.matches(manifest):
            types = {d.device_type for d in announcement.han}
            if manifest.device_type.value not in types:
                raise ProtocolError(
                    Reason.WRONG_DEVICE_TYPE,
                    f"no {manifest.device_type.value} on the HAN of {hub.guid}",
                )
            raise ProtocolError(
                Reason.HARDWARE_OUT_OF_RANGE,
                f"no {manifest.device_type.value} of hardware "
                f"0x{manifest.hw_min:04x}..0x{manifest.hw_max:04x} on the HAN of {hub.guid}",
            )
    except ProtocolError as exc:
        if exc.reason in (Reason.ROLLBACK, Reason.REPLAYED):
            return None  # otad does not know the installed sequence; the CH decides
        return exc
    limits = announcement.limits
    largest = min(manifest.block_size, manifest.size)
    if largest > limits.max_block:
        return ProtocolError(
            Reason.LIMITS_EXCEEDED,
            f"block size {manifest.block_size} > max_block {limits.max_block} of {hub.guid}",
        )
    if largest > limits.buffer:
        return ProtocolError(
            Reason.LIMITS_EXCEEDED,
            f"block size {manifest.block_size} > buffer {limits.buffer} of {hub.guid}",
        )
    return None


class Distribution:
    """Every transfer, the routing of CH reports to them, and their timers."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        client: MqttClient,
        store: Store,
        catalogue: Catalogue,
        registry: Registry,
        events: EventPublisher,
        config: TransferConfig,
        progress_interval: float = 5.0,
        rejects: RejectLog | None = None,
        hubs_recorded: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Wire the distribution to its collaborators (nothing is sent until :meth:`start`).

        ``hubs_recorded()`` waits until every hub announcement seen so far is in the store (a
        transfer row refers to its hub's row)."""
        self._loop = loop
        self._client = client
        self._store = store
        self._catalogue = catalogue
        self._registry = registry
        self._events = events
        self._config = config
        self._progress_interval = progress_interval
        self.rejects = rejects or RejectLog(log)
        self._hubs_recorded = hubs_recorded
        self.scheduler = Scheduler(
            loop, global_inflight=config.global_inflight, segment_rate=config.segment_rate
        )
        self.transfers: dict[tuple[str, bytes], Transfer] = {}
        self._active: dict[str, dict[bytes, Transfer]] = {}
        self._image_users: dict[bytes, int] = {}
        self._dirty: list[Transfer] = []
        self._earlier: dict[tuple[str, bytes], TransferState] = {}  # ended before this run
        self._finishing: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._fresh = False
        self.scheduler.paused = True  # until start()
        self.up_messages = 0

    # ------------------------------------------------------------------ lifecycle

    async def resume(self) -> int:
        """Rebuild every active transfer from the store (before connecting); return how many."""
        rows = await self._store.transfers()
        for row in rows:
            if row.state is not TransferState.ACTIVE:
                self._earlier[(row.guid, row.image)] = row.state
        count = 0
        for row in rows:
            if row.state is not TransferState.ACTIVE:
                continue
            image = self._catalogue.images.get(row.image)
            hub = self._registry.get(row.guid)
            if image is None or hub is None:
                reason = Reason.UNKNOWN_IMAGE if image is None else Reason.UNKNOWN_HUB
                log.warning(
                    "transfer of %s to %s cannot resume: %s", row.image.hex(), row.guid, reason.name
                )
                await self._store.finish_transfer(
                    row.guid, row.image, TransferState.FAILED, reason=reason.name, now=time.time()
                )
                continue
            try:
                await self._add(hub, image, row)
            except ProtocolError as exc:  # the stored image file is missing or damaged
                log.error("transfer of %s to %s cannot resume: %s", image.hex, row.guid, exc)
                await self._store.finish_transfer(
                    row.guid,
                    row.image,
                    TransferState.FAILED,
                    reason=exc.reason.name,
                    now=time.time(),
                )
                continue
            self._started_event(hub.guid, image, row.attempts)
            count += 1
        if count:
            log.info("resumed %d active transfer(s) from the store", count)
        return count

    def start(self) -> None:
        """Start sending (after the MQTT session is up and subscribed)."""
        now = self._loop.time()
        self.scheduler.paused = False
        self._fresh = True  # the adapter's first "connected" report needs no re-sync
        for t in list(self.transfers.values()):
            if t.state is TransferState.ACTIVE:
                hub = self._registry.get(t.guid)
                t.runnable = hub is not None and hub.online
                if t.runnable:
                    self._after(t, now)

    def halt(self) -> None:
        """Stop sending: no more publishes, timers cancelled, the latest progress handed to the
        store's batch. (Final-state writes already started go on: :meth:`wait_final_writes`.)"""
        self._stopping = True
        self.scheduler.paused = True
        for t in self.transfers.values():
            t.runnable = False
            if t.timer is not None:
                t.timer.cancel()
                t.timer = None
        self.flush_progress()

    async def wait_final_writes(self) -> None:
        """Wait for the final states being committed (each waits for its event's commit, so
        the event publisher must still be committing)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    def connection_changed(self, up: bool) -> None:
        """The MQTT session went down (pause) or came back (re-offer every active transfer)."""
        fresh, self._fresh = self._fresh, False
        if not up:
            self.scheduler.paused = True
            return
        if self._stopping:
            return
        now = self._loop.time()
        self.scheduler.paused = False
        if fresh:
            self.scheduler.resume_all(now)
            return
        for t in list(self.transfers.values()):
            if t.state is TransferState.ACTIVE:
                hub = self._registry.get(t.guid)
                if hub is not None and hub.online:
                    self._resync(t, now)
        self.scheduler.resume_all(now)

    # ------------------------------------------------------------------ hub presence

    def hub_changed(self, hub: Hub, was_online: bool, announced: bool) -> None:
        """Registry callback: suspend a CH's transfers when it goes offline, re-synchronise
        them when it (re)announces itself."""
        active = self._active.get(hub.guid)
        if not active:
            return
        now = self._loop.time()
        for t in list(active.values()):
            if announced:
                self._resync(t, now)
            else:
                self._suspend(t)

    def _suspend(self, t: Transfer) -> None:
        t.runnable = False
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        self.scheduler.release(t)

    def _resync(self, t: Transfer, now: float) -> None:
        """Replace the sender with a fresh one, seeded with what is acknowledged, in OFFERING."""
        if t.state is not TransferState.ACTIVE:
            return
        self._suspend(t)
        old = t.sender
        t.carry.blocks_sent += old.blocks_sent
        t.carry.bytes_sent += old.bytes_sent
        t.carry.retransmissions += old.retransmissions
        hub = self._registry.get(t.guid)
        limits = hub.announcement.limits if hub is not None else old.limits
        t.sender = self._new_sender(t.image, limits, now, old.acked_bitmap())
        if hub is not None:
            t.bucket = self.scheduler.bucket_for(hub.segment)
        if self._stopping:
            return
        t.runnable = hub is not None and hub.online
        if t.runnable:
            self._after(t, now)

    def _new_sender(self, image: Image, limits: Any, now: float, acked: bytes | None) -> Sender:
        c = self._config
        return Sender(
            image.manifest,
            limits,
            now=now,
            window=c.window,
            acked=acked or None,
            initial_rto=max(c.rto_min, min(1.0, c.rto_max)),
            min_rto=c.rto_min,
            max_rto=c.rto_max,
            max_timeouts=c.max_rto_without_progress,
        )

    # ------------------------------------------------------------------ the hot path

    def up_received(self, topic: str, payload: bytes) -> None:
        """A message on ``ota/v1/ch/{guid}/up`` (the MQTT handler's routing already checked the
        prefix and suffix)."""
        self.up_messages += 1
        guid = topic[_UP_GUID_START:_UP_GUID_END]
        active = self._active.get(guid)
        if active is None:
            self._up_slow(topic, guid, payload)
            return
        msg = self._decode_up(guid, payload)
        if msg is None:
            return
        t = active.get(getattr(msg, "image", b""))
        if t is None:
            self._no_transfer(guid, msg)
            return
        now = self._loop.time()
        if type(msg) is ImageHeld:
            t.held_sha256 = msg.sha256
        try:
            t.sender.message_received(msg, now)
        except ProtocolError as exc:
            self.rejects.reject(f"report from {guid}", exc.reason, exc.detail)
            return
        self._after(t, now)

    def _up_slow(self, topic: str, guid: str, payload: bytes) -> None:
        """An up message from a CH with no active transfer: unknown hub, bad topic, late or
        stray report."""
        try:
            guid, _leaf = topics.parse_ch_topic(topic)
        except ProtocolError as exc:
            self.rejects.reject(f"message on {topic[:80]!r}", exc.reason, exc.detail)
            return
        if self._registry.get(guid) is None:
            self.rejects.reject(
                f"up message from {guid}", Reason.UNKNOWN_HUB, "the CH never announced itself"
            )
            return
        msg = self._decode_up(guid, payload)
        if msg is not None:
            self._no_transfer(guid, msg)

    def _decode_up(self, guid: str, payload: bytes) -> Message | None:
        """Decode an up message, or log its typed refusal and return None."""
        if len(payload) > MAX_UP_BYTES:
            self.rejects.reject(f"up message from {guid}", Reason.TOO_LARGE, f"{len(payload)} B")
            return None
        try:
            return decode(payload, max_size=MAX_UP_BYTES)
        except ProtocolError as exc:
            self.rejects.reject(f"up message from {guid}", exc.reason, exc.detail)
            return None

    def _no_transfer(self, guid: str, msg: object) -> None:
        if type(msg) not in (TransferAcked, ImageHeld, TransferRejected):
            self.rejects.reject(
                f"up message from {guid}",
                Reason.UNKNOWN_TYPE,
                f"{type(msg).__name__} is not a CH report",
            )
            return
        image: bytes = getattr(msg, "image", b"")
        if (guid, image) in self.transfers or (guid, image) in self._earlier:
            return  # a late report for a transfer that has ended: normal
        self.rejects.reject(
            f"report from {guid}", Reason.NO_TRANSFER, f"no transfer of {image.hex()[:16]}"
        )

    def _after(self, t: Transfer, now: float) -> None:
        """After the sender changed: outcomes, sending, timer."""
        sender = t.sender
        events = sender.events()
        if events:
            for event in events:
                kind = type(event)
                if kind is ProgressMade:
                    if not t.dirty:
                        t.dirty = True
                        self._dirty.append(t)
                    self._progress_event(t, now)
                elif kind is TransferCompleted:
                    self._finish(t, TransferState.HELD, None)
                elif kind is TransferFailed:
                    assert isinstance(event, TransferFailed)
                    self._failed(t, event)
        if t.state is TransferState.ACTIVE:
            self.scheduler.pump(t, now)
        else:
            # a last Cancel may still be due
            if sender.state is SenderState.FAILED:
                t.send_now(now, 0)
            self.scheduler.account(t)
            return
        scheduler = self.scheduler
        if scheduler.queued and scheduler.inflight < scheduler.limit:
            scheduler.serve(now)
        deadline = sender.next_deadline()
        if deadline is not None and (t.timer is None or deadline < t.timer_at):
            if t.timer is not None:
                t.timer.cancel()
            t.timer_at = deadline
            t.timer = self._loop.call_at(deadline, self._on_timer, t)

    def _on_timer(self, t: Transfer) -> None:
        t.timer = None
        if not t.runnable or t.state is not TransferState.ACTIVE:
            return
        if self.scheduler.paused:
            t.timer_at = self._loop.time() + 1.0
            t.timer = self._loop.call_at(t.timer_at, self._on_timer, t)
            return
        now = self._loop.time()
        deadline = t.sender.next_deadline()
        if deadline is not None and deadline <= now:
            t.sender.handle_timer(now)
        self._after(t, now)

    # ------------------------------------------------------------------ outcomes

    def _progress_event(self, t: Transfer, now: float) -> None:
        sender = t.sender
        acked, total = sender.blocks_acked, sender.blocks_total
        # Time-based only: every event is a durable outbox row, and a national fleet has
        # millions of transfers (a 10%-step rule made 11 rows per transfer). Completion is the
        # transfer.held event; fleet-wide counts are in the status snapshot and `otactl transfers`.
        if acked == t.last_progress_blocks or acked >= total:
            return
        if not t.last_progress_at:  # the first ack starts the clock: transfer.started was sent
            t.last_progress_at = now
            return
        if now - t.last_progress_at < self._progress_interval:
            return
        t.last_progress_at = now
        t.last_progress_blocks = acked
        self._events.emit(
            "transfer.progress",
            f"transfer.progress:{t.guid}:{t.image.hex}:{t.attempt}:{acked}",
            guid=t.guid,
            image=t.image.hex,
            blocks_acked=acked,
            blocks_total=total,
            bytes_sent=t.bytes_sent,
        )

    def _failed(self, t: Transfer, event: TransferFailed) -> None:
        reason = event.reason
        if reason is Reason.IMAGE_HASH and t.held_sha256 is not None:
            self._held_event(t)
        t.reason = reason.name
        self._finish(t, _final_state(reason), reason.name, detail=event.detail, code=int(reason))

    def _held_event(self, t: Transfer) -> asyncio.Future[int]:
        held = t.held_sha256 or b""
        return self._events.emit(
            "transfer.held",
            f"transfer.held:{t.guid}:{t.image.hex}:{t.attempt}",
            guid=t.guid,
            image=t.image.hex,
            sha256=held.hex(),
            matches=held == t.image.sha256,
            blocks_total=t.sender.blocks_total,
            bytes_sent=t.bytes_sent,
            retransmissions=t.retransmissions,
        )

    def _finish(
        self,
        t: Transfer,
        state: TransferState,
        reason: str | None,
        *,
        detail: str = "",
        code: int = 0,
    ) -> None:
        if t.state is not TransferState.ACTIVE:
            return
        t.state = state
        t.runnable = False
        t.finished_at = time.time()
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        self.scheduler.release(t)
        active = self._active.get(t.guid)
        if active is not None:
            active.pop(t.image.sha256, None)
            if not active:
                del self._active[t.guid]
        self._release_image(t.image.sha256)
        if state is TransferState.HELD:
            if t.held_sha256 is None:
                t.held_sha256 = t.image.sha256
            event = self._held_event(t)
            log.info("%s holds image %s", t.guid, t.image.hex[:16])
        else:
            event = self._events.emit(
                "transfer.failed",
                f"transfer.failed:{t.guid}:{t.image.hex}:{t.attempt}",
                guid=t.guid,
                image=t.image.hex,
                reason=reason,
                code=code,
                detail=detail[:200],
            )
            log.warning(
                "transfer of %s to %s ended %s: %s", t.image.hex[:16], t.guid, reason, detail
            )
        task = self._loop.create_task(self._write_final(t, event), name=f"otad.finish.{t.guid}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _write_final(self, t: Transfer, event: asyncio.Future[int]) -> None:
        """Commit the final state after its event: a crash in between leaves the transfer
        active, so the restarted daemon asks the CH again and the event (same key) is not
        duplicated; the other order could lose the event for good."""
        self._record(t)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(event), FINAL_EVENT_WAIT)
        try:
            await self._store.finish_transfer(
                t.guid,
                t.image.sha256,
                t.state,
                reason=t.reason,
                held_sha256=t.held_sha256,
                now=t.finished_at or time.time(),
            )
        except StoreError as exc:
            log.error("cannot record the end of %s -> %s: %s", t.image.hex[:16], t.guid, exc)
            return
        # Recorded: forget the sender (its bitmaps), keep only the state; listings read the
        # stored row from now on. Memory stays proportional to the transfers in progress.
        key = (t.guid, t.image.sha256)
        if self.transfers.get(key) is t:
            del self.transfers[key]
            self._earlier[key] = t.state

    def _release_image(self, sha: bytes) -> None:
        users = self._image_users.get(sha, 0) - 1
        if users <= 0:
            self._image_users.pop(sha, None)
            self._catalogue.unload(sha)
        else:
            self._image_users[sha] = users

    # ------------------------------------------------------------------ progress bookkeeping

    def _record(self, t: Transfer) -> None:
        sender = t.sender
        try:
            self._store.record_progress(
                t.guid,
                t.image.sha256,
                acked_bitmap=sender.acked_bitmap(),
                blocks_acked=sender.blocks_acked,
                blocks_sent=t.blocks_sent,
                bytes_sent=t.bytes_sent,
                now=time.time(),
            )
        except StoreError as exc:
            log.error("cannot record progress: %s", exc)

    def flush_progress(self) -> int:
        """Hand the latest state of every transfer that progressed to the store's batch."""
        dirty, self._dirty = self._dirty, []
        for t in dirty:
            t.dirty = False
            if t.state is TransferState.ACTIVE:
                self._record(t)
        return len(dirty)

    async def run_progress_flusher(self, interval: float) -> None:
        """Task: :meth:`flush_progress` every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.flush_progress()

    # ------------------------------------------------------------------ starting transfers

    async def _add(self, hub: Hub, image: Image, row: TransferRow) -> Transfer:
        source = await self._catalogue.blocks(image)
        now = self._loop.time()
        try:
            sender = self._new_sender(image, hub.announcement.limits, now, row.acked_bitmap)
        except ProtocolError as exc:
            log.warning("persisted bitmap of %s -> %s unusable (%s)", image.hex[:16], hub.guid, exc)
            sender = self._new_sender(image, hub.announcement.limits, now, None)
        t = Transfer(
            hub.guid,
            image,
            source,
            sender,
            publish=self._client.publish,
            qos_blocks=self._config.qos_blocks,
            bucket=self.scheduler.bucket_for(hub.segment),
            attempt=row.attempts,
            started_at=row.started_at,
            carry=_Carry(row.blocks_sent, row.bytes_sent, 0),
        )
        self.transfers[(hub.guid, image.sha256)] = t
        self._earlier.pop((hub.guid, image.sha256), None)
        self._active.setdefault(hub.guid, {})[image.sha256] = t
        self._image_users[image.sha256] = self._image_users.get(image.sha256, 0) + 1
        return t

    async def distribute(
        self, ref: str, guids: Iterable[str] = (), *, all_matching: bool = False
    ) -> dict[str, Any]:
        """Start sending an image to CHs; return what was started, what already ran or was
        done, and what was refused (per target, with the typed reason)."""
        image = self._catalogue.resolve(ref)
        manifest = image.manifest
        if time.time() >= manifest.expires:
            raise ProtocolError(Reason.EXPIRED, f"image {image.hex} expired at {manifest.expires}")
        refused: list[dict[str, str]] = []
        already: list[str] = []
        targets: list[Hub] = []
        if all_matching:
            candidates: list[Hub] = [h for h in self._registry.hubs.values() if h.matches(manifest)]
        else:
            candidates = []
            for guid in dict.fromkeys(guids):
                try:
                    topics.check_guid(guid)
                except ProtocolError as exc:
                    refused.append(_refusal(guid, exc))
                    continue
                hub = self._registry.get(guid)
                if hub is None:
                    refused.append(
                        _refusal(guid, ProtocolError(Reason.UNKNOWN_HUB, "never announced"))
                    )
                    continue
                candidates.append(hub)
        for hub in candidates:
            error = target_error(hub, image)
            if error is not None:
                refused.append(_refusal(hub.guid, error))
                continue
            key = (hub.guid, image.sha256)
            existing = self.transfers.get(key)
            state = existing.state if existing is not None else self._earlier.get(key)
            if state in (TransferState.ACTIVE, TransferState.HELD):
                already.append(hub.guid)
                continue
            targets.append(hub)
        if not targets:
            return _distribute_result(image, [], already, refused)
        await self._catalogue.blocks(image)  # load (and check) the image before committing
        if self._hubs_recorded is not None:
            await self._hubs_recorded()
        wall = time.time()
        results = await asyncio.gather(
            *(
                self._store.start_transfer(h.guid, image.sha256, manifest.block_count, wall)
                for h in targets
            ),
            return_exceptions=True,
        )
        started: list[str] = []
        now = self._loop.time()
        for hub, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, StoreError):
                    raise result
                refused.append(_refusal(hub.guid, ProtocolError(Reason.INTERNAL, str(result))))
                continue
            t = await self._add(hub, image, result)
            started.append(hub.guid)
            self._started_event(hub.guid, image, result.attempts)
            t.runnable = hub.online and not self.scheduler.paused and not self._stopping
            if t.runnable:
                self._after(t, now)
        log.info(
            "distribute %s: %d started, %d already, %d refused",
            image.hex[:16],
            len(started),
            len(already),
            len(refused),
        )
        return _distribute_result(image, started, already, refused)

    def _started_event(self, guid: str, image: Image, attempt: int) -> None:
        """``transfer.started``; emitted again on resume (same key: stored once), so a crash
        between the transfer's commit and its event's cannot lose the event."""
        self._events.emit(
            "transfer.started",
            f"transfer.started:{guid}:{image.hex}:{attempt}",
            guid=guid,
            image=image.hex,
            blocks_total=image.manifest.block_count,
            attempt=attempt,
        )

    # ------------------------------------------------------------------ listing

    async def listing(self) -> list[dict[str, Any]]:
        """Every transfer (live figures for those in memory, stored ones otherwise)."""
        rows = await self._store.transfers()
        out: dict[tuple[str, bytes], dict[str, Any]] = {}
        for row in rows:
            held = row.held_sha256
            out[(row.guid, row.image)] = {
                "guid": row.guid,
                "image": row.image.hex(),
                "state": row.state.value,
                "phase": row.state.value,
                "blocks_acked": row.blocks_acked,
                "blocks_total": row.blocks_total,
                "blocks_sent": row.blocks_sent,
                "bytes_sent": row.bytes_sent,
                "retransmissions": None,
                "held_sha256": None if held is None else held.hex(),
                "matches": None if held is None else held == row.image,
                "reason": row.reason,
                "attempt": row.attempts,
                "started_at": row.started_at,
                "finished_at": row.finished_at,
            }
        for key, t in self.transfers.items():
            out[key] = t.to_json()
        return [out[k] for k in sorted(out)]

    def counts(self) -> dict[str, int]:
        """Transfers by state (those that ended before this run included)."""
        counts: dict[str, int] = {}
        for key, state in self._earlier.items():
            if key not in self.transfers:
                counts[state.value] = counts.get(state.value, 0) + 1
        for t in self.transfers.values():
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        return counts


def _final_state(reason: Reason) -> TransferState:
    if reason is Reason.TIMED_OUT:
        return TransferState.TIMED_OUT
    if reason is Reason.CANCELLED:
        return TransferState.CANCELLED
    if reason in (Reason.IMAGE_HASH, Reason.LIMITS_EXCEEDED, Reason.INTERNAL):
        return TransferState.FAILED
    return TransferState.REJECTED


def _refusal(guid: str, exc: ProtocolError) -> dict[str, str]:
    return {"guid": guid, "error": exc.reason.name, "detail": exc.detail}


def _distribute_result(
    image: Image, started: list[str], already: list[str], refused: list[dict[str, str]]
) -> dict[str, Any]:
    return {"image": image.hex, "started": started, "already": already, "refused": refused}
