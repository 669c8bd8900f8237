"""Distribution: one :class:`~protocol.wan.sender.Sender` per (CH, image), driven by MQTT and
timers.

Theory of operation
-------------------

A :class:`Transfer` wraps one sender with what the shell needs around it: the CH's ``down``
topic, the image's :class:`~otad.catalogue.BlockSource` (pre-encoded, shared ``Block`` bytes),
its :class:`~otad.scheduler.Slot` with the scheduler, one lazily re-armed timer
(:class:`~otad.timers.TimerSlot`), and the totals of its earlier senders (otad restarts, CH
reconnects: :class:`EarlierSenderTotals`).

The hot path, for each ``TransferAcked`` on ``ota/v1/ch/{guid}/up``::

    decode -> sender.message_received -> drain sender events -> scheduler.changed
           -> (in turn) publish the cached Block bytes -> re-arm the timer if it moved earlier

It creates no task, writes no log line and touches no database: progress is marked dirty and
:meth:`Distribution.flush_progress` hands the latest bitmap of each dirty transfer to the store's
batched bookkeeping every :data:`PROGRESS_HANDOFF_S`, which the store commits within
``store.flush_interval_ms``. Who may send, and how much, is the
scheduler's business alone (:mod:`otad.scheduler`: admission of asks, the global budget, the
segments' rate caps); this module reports to it and never second-guesses it.

Decisions that cannot be re-derived from the CHs are committed durably before they take effect:
transfer rows (``Store.start_transfers``, synchronous=FULL, one job for a whole distribution)
exist before the first ``Offer`` is published; final states are committed, in batches, after
their events (:meth:`Distribution.run_final_writer`). On restart, every active transfer gets a
new sender seeded with the persisted acknowledged bitmap, in OFFERING: the CH's answer says what
it holds and replaces the seed, so at most the blocks in flight when otad died are sent twice.
A CH known to hold the image's manifest (it acknowledged blocks of it) is asked with a ``Poll``,
a few bytes, instead of the whole manifest again (SPEC §7.8).

A CH's presence drives its transfers: its last will suspends them (no budget is spent on a CH
that cannot hear), and an announcement after that (a reconnect) re-synchronises them: a fresh
sender asks again and the CH's answer says where to resume. The same follows a reconnect of
otad's own MQTT session. Re-synchronisations after a storm (a broker restart: every CH and otad
itself reconnect at once) go through the scheduler's admission in a random order, so asks reach
the broker paced and jittered, never all in one loop turn.

Stalls. A transfer that makes no progress (no new block acknowledged, no answer) for
``transfer.stall_after_s`` while it is scheduled gets one ``transfer.stalled`` event per episode;
a whole distribution (every active transfer of one image) that makes none gets
``distribution.stalled`` (and ``distribution.resumed`` when it moves again). WARNINGs about them
are rate-limited. The checks run once a second (:meth:`Distribution.check_stalls`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict, cast

from mqttio import MqttClient, NotConnected
from otad import events as monitoring
from otad.catalogue import BlockSource, Catalogue, Image
from otad.config import TransferConfig
from otad.events import iso_time
from otad.histogram import Histogram
from otad.outbox import EventPublisher
from otad.registry import Hub, Registry
from otad.rejects import RejectLog
from otad.retrying import RetriedWrite
from otad.scheduler import Scheduler, SlotState, budget_charge, handshake_charge
from otad.store import FinalState, Store, StoreError, TransferRow, TransferState
from otad.targeting import matches, refusal
from otad.timers import TimerHost, TimerSlot, TimerStats
from protocol.clock import Monotonic
from protocol.errors import ProtocolError, Reason
from protocol.wan.sender import (
    ProgressMade,
    SendBlock,
    Sender,
    SenderState,
    SendOffer,
    SendPoll,
    TransferCompleted,
    TransferFailed,
)
from protocol.wire import topics
from protocol.wire.messages import (
    Cancel,
    DeviceReported,
    DeviceTransferReported,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    TransferAcked,
    TransferRejected,
    decode,
    peek_type,
)

log = logging.getLogger("otad.distribution")

#: How often each progressing transfer's acknowledged bitmap is handed to the store's batch
#: (which commits it within ``store.flush_interval_ms``). The CH's answer to the Offer after a
#: restart is authoritative, so staleness here costs no resent blocks; it only bounds what
#: ``otactl transfers`` shows for a CH that is offline. (At 10,000 CHs every hand-off is 10,000
#: row updates on the store's one writer, which the events wait behind: 0.5 s was 20,000 updates
#: a second.)
PROGRESS_HANDOFF_S: Final = 2.0
#: Largest message accepted on an ``up`` topic (the largest CH -> otad message type).
MAX_UP_BYTES = max(TransferAcked.MAX_BYTES, ImageHeld.MAX_BYTES, TransferRejected.MAX_BYTES)
#: A CH's reports about its HAN devices (protocol 1.1, SPEC §8.10): not transfers of ours, handed
#: to :attr:`Distribution.device_reports` (otad.devices).
_DEVICE_REPORTS: Final = (DeviceTransferReported, DeviceReported)
#: How long a final-state write waits for its event to be committed first (a stuck outbox must
#: not keep a transfer's end unrecorded for ever).
FINAL_EVENT_WAIT: Final = 10.0
#: Final states committed per store job, and the pause before retrying a failed batch.
FINAL_BATCH: Final = 5000
FINAL_RETRY_S: Final = 1.0
#: Transfers started per event-loop turn by one distribute request.
START_CHUNK: Final = 200
#: Handshake charge of a Poll (its encoded size, about 12 bytes, rounded up).
POLL_BYTES: Final = 16
#: How often stalls are looked for, and how often a WARNING about stalled transfers may repeat.
STALL_CHECK_S: Final = 1.0
STALL_LOG_INTERVAL_S: Final = 60.0
#: How long a distribution with nothing left in progress stays in the status snapshot.
DISTRIBUTION_LINGER_S: Final = 300.0
_UP_PREFIX = f"{topics.ROOT}/ch/"
_UP_GUID_START = len(_UP_PREFIX)
_UP_GUID_END = _UP_GUID_START + 16
_SENDING: Final = frozenset({SlotState.RUNNING, SlotState.QUEUED, SlotState.THROTTLED})
_SCHEDULED: Final = _SENDING | {SlotState.PENDING}
_POLL_NONCES = itertools.count(1)


#: Upper bounds (seconds) of the Prometheus histograms' buckets (:mod:`otad.metrics`): a
#: transfer's duration (minutes to a day over a CH's WAN link) and an acknowledgement's round
#: trip (a cellular or mesh WAN: tens of milliseconds to about a minute).
DURATION_BUCKETS: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                           7200.0, 21600.0, 86400.0)  # fmt: skip
ROUND_TRIP_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class SentTotals:
    """Everything published for every transfer since this process started (Prometheus
    counters): added once per :meth:`Transfer.send_now` call, not once per block."""

    bytes_sent: int = 0  # block payload bytes, repeats included
    retransmissions: int = 0  # blocks published again within a sender's life


@dataclass(slots=True)
class EarlierSenderTotals:
    """What a transfer's earlier senders sent: each otad restart and each re-synchronisation
    (a reconnect) starts a new sender, whose own counters start at zero."""

    blocks_sent: int = 0
    bytes_sent: int = 0
    retransmissions: int = 0


class DistributionStatus(TypedDict):
    """One image's distribution in the status snapshot (:meth:`ImageTally.to_json`)."""

    transfers: dict[str, int]  # by TransferState value, every state, as recorded
    recording: int  # ended, final state not yet durable (counted active in ``transfers``)
    blocks_per_transfer: int
    blocks_acked: int  # over the active transfers
    blocks_total: int  # over the active transfers
    idle_s: float | None  # since any transfer of it progressed; None with none active
    stalled: bool  # the distribution as a whole (distribution.stalled)
    stalled_transfers: int


@dataclass(slots=True)
class ImageTally:
    """Live figures of one image's distribution (kept incrementally: the status snapshot and the
    stall check never walk the transfers to compute them)."""

    image: str
    blocks_per_transfer: int
    states: dict[str, int] = field(default_factory=dict)  # transfers by TransferState value
    blocks_acked: int = 0  # over the active transfers
    blocks_total: int = 0  # over the active transfers
    progress_at: float = 0.0  # monotonic time any transfer of it last progressed
    stalled_transfers: int = 0
    stalled_since: float | None = None  # the distribution as a whole is stalled since
    recording: dict[str, int] = field(default_factory=dict)  # of states: ended, not recorded

    def to_json(self, now: float) -> DistributionStatus:
        """The status snapshot's entry for this image (every state counted, zeros included, as
        the database has them: ended transfers not yet recorded are counted active and in
        ``recording``)."""
        active = self.states.get(TransferState.ACTIVE.value, 0)
        recording = sum(self.recording.values())
        transfers = {
            s.value: self.states.get(s.value, 0) - self.recording.get(s.value, 0)
            for s in TransferState
        }
        transfers[TransferState.ACTIVE.value] += recording
        return {
            "transfers": transfers,
            "recording": recording,
            "blocks_per_transfer": self.blocks_per_transfer,
            "blocks_acked": self.blocks_acked,
            "blocks_total": self.blocks_total,
            "idle_s": round(now - self.progress_at, 1) if active else None,
            "stalled": self.stalled_since is not None,
            "stalled_transfers": self.stalled_transfers,
        }

    def bump(self, state: TransferState, delta: int) -> None:
        """Add ``delta`` transfers in ``state``."""
        self.states[state.value] = self.states.get(state.value, 0) + delta


class Transfer:
    """One (CH, image) transfer and its sender (see the module docstring)."""

    __slots__ = (
        "acked_seen",
        "attempt",
        "dirty",
        "down",
        "earlier",
        "finished_at",
        "guid",
        "heard_at",
        "held_sha256",
        "image",
        "known",
        "last_progress_at",
        "last_progress_blocks",
        "progress_at",
        "publish",
        "publish_block",
        "qos_blocks",
        "reasked",
        "reason",
        "rtt_seen",
        "sender",
        "slot",
        "source",
        "stalled",
        "started_at",
        "state",
        "tally",
        "timer",
        "totals",
    )

    def __init__(
        self,
        guid: str,
        image: Image,
        source: BlockSource,
        sender: Sender,
        *,
        publish: Callable[[str, bytes, int, bool], None],
        publish_qos0: Callable[[str], Callable[[bytes], None]] | None = None,
        qos_blocks: int,
        attempt: int,
        started_at: float,
        earlier: EarlierSenderTotals,
        known: bool,
        tally: ImageTally,
        totals: SentTotals,
        now: float,
    ) -> None:
        """Wrap ``sender``; the caller attaches :attr:`slot` and :attr:`timer`; ``totals``
        (shared by every transfer) adds up what all of them sent. ``publish_qos0`` makes a
        publisher bound to a topic (:meth:`mqttio.MqttClient.qos0_publisher`) for the blocks
        at QoS 0."""
        self.guid = guid
        self.image = image
        self.source = source
        self.sender = sender
        self.publish = publish
        self.qos_blocks = qos_blocks
        self.down = topics.down(guid)
        # blocks (QoS 0 by default) through the client's publisher bound to this CH's topic
        self.publish_block: Callable[[bytes], None] = (
            publish_qos0(self.down)
            if publish_qos0 is not None and not qos_blocks
            else functools.partial(_publish_to, publish, self.down, qos_blocks)
        )
        self.state = TransferState.ACTIVE
        self.held_sha256: bytes | None = None
        self.reason: str | None = None
        self.attempt = attempt
        self.started_at = started_at
        self.finished_at: float | None = None
        self.earlier = earlier
        self.known = known  # the CH holds this image's manifest (it answered an ask before)
        self.tally = tally
        self.dirty = False
        self.last_progress_at = 0.0  # of the last transfer.progress event
        self.last_progress_blocks = sender.blocks_acked
        self.acked_seen = sender.blocks_acked  # what the tally counts for this transfer
        self.progress_at = now  # monotonic time of the last progress (for stalls)
        self.heard_at = float("-inf")  # monotonic time of the last report from the CH
        self.reasked = False  # asked again because the CH re-announced while an ask was out
        self.stalled = False
        self.totals = totals
        self.rtt_seen = 0  # the current sender's round-trip samples already observed
        # attached by Distribution._add
        self.slot: Any = None
        self.timer: TimerSlot

    # ------------------------------------------------------------------ Schedulable

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        """Publish every unbudgeted action that is due (Offer, Poll, Cancel, probe) and at most
        ``budget`` new blocks; return (blocks published, blocks still sendable)."""
        sender = self.sender
        if not budget and not sender.unbudgeted_due:
            return 0, sender.sendable()  # the common case when the budget binds: a turn taken
        bytes_before, repeats_before = sender.bytes_sent, sender.retransmissions
        actions = sender.next_actions(Monotonic(now), budget)
        blocks = 0
        if actions:
            totals = self.totals
            totals.bytes_sent += sender.bytes_sent - bytes_before
            totals.retransmissions += sender.retransmissions - repeats_before
            publish, down, source = self.publish, self.down, self.source
            publish_block = self.publish_block
            try:
                for action in actions:
                    kind = type(action)
                    if kind is SendBlock:
                        assert isinstance(action, SendBlock)
                        publish_block(source.get(action.index, action.ack_now))
                        blocks += 1
                    elif kind is SendOffer:
                        publish(down, self.image.offer, Offer.QOS, False)
                    elif kind is SendPoll:
                        publish(down, Poll(nonce=next(_POLL_NONCES)).encode(), Poll.QOS, False)
                    else:  # SendCancel
                        reason = getattr(action, "reason", Reason.CANCELLED)
                        cancel = Cancel(image=self.image.sha256, reason=int(reason))
                        publish(down, cancel.encode(), Cancel.QOS, False)
            except NotConnected:
                pass  # the sender's timers repair it; the daemon re-synchronises on reconnect
            self.timer.arm(sender.next_deadline())
        return blocks, sender.sendable()

    def budget_charge(self) -> int:
        """Blocks held of the global budget (:func:`otad.scheduler.budget_charge`)."""
        return budget_charge(self.sender)

    def handshake_charge(self) -> int:
        """Bytes of the unanswered ask (:func:`otad.scheduler.handshake_charge`)."""
        return handshake_charge(self.sender, len(self.image.offer), POLL_BYTES)

    def answered(self) -> bool:
        """The CH answered the current sender's ask."""
        return self.sender.answered

    def spurious_repairs(self) -> int:
        """Spurious repairs of the current sender."""
        return self.sender.spurious_repairs

    # ------------------------------------------------------------------ figures

    @property
    def blocks_sent(self) -> int:
        """Block messages published for this transfer, all lives."""
        return self.earlier.blocks_sent + self.sender.blocks_sent

    @property
    def bytes_sent(self) -> int:
        """Block payload bytes published for this transfer, all lives."""
        return self.earlier.bytes_sent + self.sender.bytes_sent

    @property
    def retransmissions(self) -> int:
        """Blocks published again within a sender life, all lives."""
        return self.earlier.retransmissions + self.sender.retransmissions

    def final_state(self) -> FinalState:
        """The row :meth:`Store.finish_transfers` records for this ended transfer."""
        sender = self.sender
        assert self.finished_at is not None
        return FinalState(
            guid=self.guid,
            image=self.image.sha256,
            state=self.state,
            reason=self.reason,
            held_sha256=self.held_sha256,
            finished_at=self.finished_at,
            acked_bitmap=sender.acked_bitmap(),
            blocks_acked=sender.blocks_acked,
            blocks_sent=self.blocks_sent,
            bytes_sent=self.bytes_sent,
        )

    def to_json(self, *, recorded: bool = True) -> dict[str, Any]:
        """JSON-ready row (``transfers``) with the live figures (:func:`listing_row`).

        A transfer that ended but whose final state is not yet durable (``recorded`` False) is
        shown as the database has it, active, in phase ``recording`` (its ``reason`` is set
        when it failed): nothing is reported ahead of what a restart would find."""
        sender = self.sender
        return listing_row(
            guid=self.guid,
            image=self.image.sha256,
            state=self.state if recorded else TransferState.ACTIVE,
            phase=sender.state.value if recorded else "recording",
            blocks_acked=sender.blocks_acked,
            blocks_total=sender.blocks_total,
            blocks_sent=self.blocks_sent,
            bytes_sent=self.bytes_sent,
            retransmissions=self.retransmissions,
            held_sha256=self.held_sha256,
            reason=self.reason,
            attempt=self.attempt,
            started_at=self.started_at,
            finished_at=self.finished_at if recorded else None,
            in_flight=sender.in_flight,
            stalled=self.stalled,
            debug={
                "scheduler": self.slot.state.value if self.slot is not None else None,
                "sendable": sender.sendable(),
                "timer_at": self.timer.armed_at,
                "rto": round(sender.rto, 4),
            },
        )


def _publish_to(
    publish: Callable[[str, bytes, int, bool], None], topic: str, qos: int, payload: bytes
) -> None:
    publish(topic, payload, qos, False)


def listing_row(
    *,
    guid: str,
    image: bytes,
    state: TransferState,
    phase: str,
    blocks_acked: int,
    blocks_total: int,
    blocks_sent: int,
    bytes_sent: int,
    retransmissions: int | None,
    held_sha256: bytes | None,
    reason: str | None,
    attempt: int,
    started_at: float,
    finished_at: float | None,
    in_flight: int = 0,
    stalled: bool = False,
    debug: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of ``otactl transfers``, the same shape for a live transfer and a stored one.
    ``phase`` is the sender's state for a live transfer, the recorded state again for a stored
    one; ``retransmissions`` is None and ``debug`` (the scheduler's and the sender's view) is
    None for a stored one (neither is recorded); ``matches`` says whether what the CH holds is
    the image."""
    return {
        "guid": guid,
        "image": image.hex(),
        "state": state.value,
        "phase": phase,
        "blocks_acked": blocks_acked,
        "blocks_total": blocks_total,
        "blocks_sent": blocks_sent,
        "bytes_sent": bytes_sent,
        "retransmissions": retransmissions,
        "held_sha256": None if held_sha256 is None else held_sha256.hex(),
        "matches": None if held_sha256 is None else held_sha256 == image,
        "reason": reason,
        "attempt": attempt,
        "started_at": started_at,
        "finished_at": finished_at,
        "in_flight": in_flight,
        "stalled": stalled,
        "debug": debug,
    }


class Distribution:
    """Every transfer, the routing of CH reports to them, their timers, and their outcomes."""

    def __init__(
        self,
        *,
        timers: TimerHost,
        client: MqttClient,
        store: Store,
        catalogue: Catalogue,
        registry: Registry,
        events: EventPublisher,
        config: TransferConfig,
        progress_interval: float = 5.0,
        rejects: RejectLog | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Wire the distribution to its collaborators (nothing is sent until :meth:`start`).

        ``timers`` is the monotonic clock every sender and the scheduler run on, and their
        timers (the event loop; virtual time in tests). ``wall_clock`` (unix seconds) stamps
        what is recorded: start and end times, progress, event times. ``rng`` orders
        re-synchronisations (tests seed it)."""
        self._timers = timers
        self._clock = cast(Callable[[], Monotonic], timers.time)  # the event loop's clock
        self._wall_clock = wall_clock
        self._client = client
        self._store = store
        self._catalogue = catalogue
        self._registry = registry
        self._events = events
        self._config = config
        self._progress_interval = progress_interval
        self._stall_after = config.stall_after_s
        self.rejects = rejects or RejectLog(log)
        self._rng = rng or random.Random()
        self.device_reports: Callable[[str, Message], None] | None = None
        """Where a CH's reports about its HAN devices go (``otad.devices``; None: refused)."""
        self.transfer_ended: Callable[[str, bytes, TransferState, str | None], None] | None = None
        """Told ``(guid, image, final state, reason)`` when a transfer ends."""
        self.scheduler = Scheduler(
            global_inflight=config.global_inflight,
            max_handshakes=config.max_handshakes,
            handshake_bytes=config.handshake_kib * 1024,
            segment_rate=config.segment_rate,
        )
        self.timer_stats = TimerStats()
        self._scheduler_timer = TimerSlot(timers, self._on_scheduler_timer, self.timer_stats)
        self.transfers: dict[tuple[str, bytes], Transfer] = {}
        self._active: dict[str, dict[bytes, Transfer]] = {}
        self._image_users: dict[bytes, int] = {}
        self._tallies: dict[bytes, ImageTally] = {}
        self._counts: dict[TransferState, int] = dict.fromkeys(TransferState, 0)
        #: of which ended, not yet recorded (still active in the database)
        self._unrecorded: dict[TransferState, int] = dict.fromkeys(TransferState, 0)
        self._dirty: list[Transfer] = []
        self._ended: dict[tuple[str, bytes], TransferState] = {}  # ended and recorded
        self._finals: list[tuple[Transfer, asyncio.Future[int]]] = []
        self._finishing: dict[tuple[str, bytes], Transfer] = {}  # ended, not yet recorded
        self._finals_wake = asyncio.Event()
        self._finals_failing_since: float | None = None  # wall clock of the first failed write
        self._finals_log = RetriedWrite(log, "recording ended transfers' final states")
        self._stopping = False
        self.campaign_of: Callable[[str, str], str] = lambda guid, image: ""
        """The campaign a (CH, image hex) transfer belongs to, for its events (otad.campaigns)."""
        self._fresh = False
        self._stall_log_at = float("-inf")
        self._stalls_unlogged: list[Transfer] = []
        self.up_messages = 0
        self.sent = SentTotals()
        """Bytes and repeats published for every transfer since start (blocks:
        ``scheduler.blocks_published``)."""
        self.durations: dict[TransferState, Histogram] = {
            state: Histogram(DURATION_BUCKETS)
            for state in TransferState
            if state is not TransferState.ACTIVE
        }
        """Wall-clock seconds from a transfer's start to its end, by how it ended."""
        self.round_trips = Histogram(ROUND_TRIP_BUCKETS)
        """Acknowledgement round trips the senders measured (blocks sent once, Karn)."""
        self._flapping: set[str] = set()  # CHs flapping now (hub_flapping)
        self.flapping_dropped = 0
        """Reports from flapping CHs dropped (their transfers are suspended)."""
        self.stalls = 0
        """``transfer.stalled`` episodes seen by this process."""

    # ------------------------------------------------------------------ lifecycle

    async def resume(self) -> int:
        """Rebuild every active transfer from the store (before connecting); return how many."""
        rows = await self._store.transfers()
        for row in rows:
            if row.state is not TransferState.ACTIVE:
                self._ended[(row.guid, row.image)] = row.state
                self._counts[row.state] += 1
                image = self._catalogue.images.get(row.image)
                if image is not None:
                    self._tally(image).bump(row.state, 1)
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
                    row.guid,
                    row.image,
                    TransferState.FAILED,
                    reason=reason.name,
                    now=self._wall_clock(),
                )
                self._ended[(row.guid, row.image)] = TransferState.FAILED
                self._counts[TransferState.FAILED] += 1
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
                    now=self._wall_clock(),
                )
                self._ended[(row.guid, row.image)] = TransferState.FAILED
                self._counts[TransferState.FAILED] += 1
                self._tally(image).bump(TransferState.FAILED, 1)
                continue
            self._started_event(hub.guid, image, row.attempts)
            count += 1
        if count:
            log.info("resumed %d active transfer(s) from the store", count)
        return count

    def start(self) -> None:
        """Start sending (after the MQTT session is up and subscribed): every active transfer
        of an online CH queues for admission, in a random order."""
        now = self._clock()
        self._fresh = True  # the adapter's first "connected" report needs no re-sync
        self.scheduler.resume(now)
        self._start_all(now)

    def cancel(self, image: bytes, guids: Iterable[str], reason: Reason) -> int:
        """Stop the active transfers of ``image`` to ``guids`` (a campaign aborted, or a phase
        deadline passed): each CH is sent a Cancel with ``reason`` and the transfer ends
        failed with it. Returns how many were active."""
        now = self._clock()
        stopped = 0
        for guid in guids:
            t = self.transfers.get((guid, image))
            if t is None or t.state is not TransferState.ACTIVE:
                continue
            t.sender.cancel(now, reason)
            self._after(t, now)
            stopped += 1
        return stopped

    def halt(self) -> None:
        """Stop sending: no more publishes, timers cancelled, the latest progress handed to the
        store's batch. (Final-state writes still queued go on: :meth:`wait_final_writes`.)"""
        self._stopping = True
        self.scheduler.pause()
        self._scheduler_timer.cancel()
        for t in self.transfers.values():
            t.timer.cancel()
        self.flush_progress()

    async def wait_final_writes(self) -> bool:
        """Commit every final state still queued (each after its event's commit, so the event
        publisher must still be committing); False if the store refused them (they stay
        active in the database: the next run asks the CHs again and records them)."""
        while self._finals:
            if not await self._write_finals():
                return False
        return True

    @property
    def degraded(self) -> list[str]:
        """Why the distribution is degraded now: final states that ended and could not be
        recorded yet (the writer retries every :data:`FINAL_RETRY_S`); empty otherwise."""
        if self._finals_failing_since is None or not self._finals:
            return []
        return [
            f"{len(self._finals)} ended transfer(s) not yet recorded (store failing since"
            f" {iso_time(self._finals_failing_since)}); shown active until they are"
        ]

    def connection_changed(self, up: bool) -> None:
        """The MQTT session went down (pause) or came back (re-synchronise every active
        transfer through admission, in a random order)."""
        fresh, self._fresh = self._fresh, False
        if not up:
            self.scheduler.pause()
            return
        if self._stopping:
            return
        now = self._clock()
        if not fresh:
            order = list(self._live())
            self._rng.shuffle(order)
            for t in order:
                self._resync(t, now, start=False)
        self.scheduler.resume(now)
        self._start_all(now)

    def _live(self) -> Iterable[Transfer]:
        """Active transfers of online CHs."""
        for t in self.transfers.values():
            if t.state is TransferState.ACTIVE:
                hub = self._registry.get(t.guid)
                if hub is not None and hub.online and not hub.flapping:
                    yield t

    def _start_all(self, now: Monotonic) -> None:
        order = [t for t in self._live() if t.slot.state is SlotState.STOPPED]
        self._rng.shuffle(order)
        for t in order:
            t.progress_at = now
            self.scheduler.start(t.slot, now)
        for t in self.transfers.values():
            if t.slot.state in _SENDING:
                t.timer.arm(t.sender.next_deadline())
        self._arm_scheduler()

    # ------------------------------------------------------------------ hub presence

    def hub_changed(self, hub: Hub, was_online: bool, announced: bool, changed: bool) -> None:
        """Registry callback: suspend a CH's transfers when it goes offline, re-synchronise
        them when it (re)announces itself.

        A live re-announcement that changes nothing (``changed`` false, CH online) means the CH
        reconnected without its will being seen (a broker restart: otad may have asked it before
        it was subscribed again), or that it announces whenever it is polled. So a transfer
        whose ask is unanswered is asked again once per ask (a CH announcing on every Poll then
        costs one extra Poll, never a loop); one that is talking to us is left alone; one whose
        CH has been silent for a round trip is re-synchronised."""
        active = self._active.get(hub.guid)
        if not active:
            return
        now = self._clock()
        for t in list(active.values()):
            if not announced or hub.guid in self._flapping:
                self._suspend(t, now)
                continue
            if was_online and not changed:
                if t.slot.state is SlotState.PENDING:
                    continue  # it asks as soon as it is admitted
                if t.sender.awaiting_answer:
                    if t.reasked:
                        continue
                    t.reasked = True
                elif now - t.heard_at < max(1.0, t.sender.rto):
                    continue
            if not was_online:
                t.progress_at = now  # time offline is not a stall
            self._resync(t, now)
        self._arm_scheduler()

    def hub_flapping(self, hub: Hub) -> None:
        """Registry callback: ``hub`` started flapping (``hub.flapping``), or is steady again.

        A flapping CH may be two devices with one GUID (a clone): their acknowledgements would
        interleave in one sender, each acknowledging blocks the other never got, and a
        ``ImageHeld`` would not say which of them holds the image. So its transfers are
        suspended and its reports on ``up`` are dropped (counted in :attr:`flapping_dropped`)
        until it is steady; then the registry reports it (re)arrived if it is online, and a
        fresh sender asks it what it holds (:meth:`hub_changed`)."""
        if not hub.flapping:
            self._flapping.discard(hub.guid)
            return
        self._flapping.add(hub.guid)
        now = self._clock()
        for t in self._active.get(hub.guid, {}).values():
            self._suspend(t, now)
        self._arm_scheduler()

    def _suspend(self, t: Transfer, now: Monotonic) -> None:
        t.timer.cancel()
        self.scheduler.stop(t.slot, now)

    def _resync(self, t: Transfer, now: Monotonic, *, start: bool = True) -> None:
        """Replace the sender with a fresh one, seeded with what is acknowledged, in OFFERING,
        and queue it for admission (``start``)."""
        if t.state is not TransferState.ACTIVE:
            return
        self._suspend(t, now)
        old = t.sender
        t.known = t.known or old.answered
        t.earlier.blocks_sent += old.blocks_sent
        t.earlier.bytes_sent += old.bytes_sent
        t.earlier.retransmissions += old.retransmissions
        hub = self._registry.get(t.guid)
        limits = hub.announcement.limits if hub is not None else old.limits
        t.sender = self._new_sender(t.image, limits, now, old.acked_bitmap(), known=t.known)
        t.rtt_seen = 0
        if hub is not None:
            self.scheduler.set_segment(t.slot, hub.segment)
        if t.sender.state is SenderState.FAILED:  # the new limits cannot carry the image
            self._after(t, now)
            return
        if start and not self._stopping and hub is not None and hub.online and not hub.flapping:
            self.scheduler.start(t.slot, now)

    def _new_sender(
        self, image: Image, limits: Limits, now: Monotonic, acked: bytes | None, *, known: bool
    ) -> Sender:
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
            holds_manifest=known,
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
        if self._flapping and guid in self._flapping:
            self.flapping_dropped += 1  # a clone's report: see hub_flapping
            return
        msg = self._decode_up(guid, payload)
        if msg is None:
            return
        if type(msg) in _DEVICE_REPORTS and self.device_reports is not None:
            self.device_reports(guid, msg)
            return
        t = active.get(getattr(msg, "image", b""))
        if t is None:
            self._no_transfer(guid, msg)
            return
        now = self._clock()
        if type(msg) is ImageHeld:
            t.held_sha256 = msg.sha256
        try:
            t.sender.message_received(msg, now)
        except ProtocolError as exc:
            self._registry.refused(guid, "up", msg.TYPE, exc)
            return
        t.heard_at = now
        sender = t.sender
        if sender.rtt_samples != t.rtt_seen:
            t.rtt_seen = sender.rtt_samples
            self.round_trips.observe(sender.last_rtt)
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
            error = ProtocolError(Reason.UNKNOWN_HUB, "the CH never announced itself")
            self._registry.refused(guid, "up", peek_type(payload), error)
            return
        msg = self._decode_up(guid, payload)
        if msg is None:
            return
        if type(msg) in _DEVICE_REPORTS and self.device_reports is not None:
            self.device_reports(guid, msg)
            return
        self._no_transfer(guid, msg)

    def _decode_up(self, guid: str, payload: bytes) -> Message | None:
        """Decode an up message, or log its typed refusal and return None."""
        if len(payload) > MAX_UP_BYTES:
            error = ProtocolError(Reason.TOO_LARGE, f"up message of {len(payload)} B")
            self._registry.refused(guid, "up", 0, error)
            return None
        try:
            return decode(payload, max_size=MAX_UP_BYTES)
        except ProtocolError as exc:
            self._registry.refused(guid, "up", peek_type(payload), exc)
            return None

    def transfer_state(self, guid: str, image: bytes) -> TransferState | None:
        """Where the transfer of ``image`` to CH ``guid`` stands now (ended ones included,
        before their final state is written), or None if there never was one."""
        key = (guid, image)
        current = self.transfers.get(key) or self._finishing.get(key)
        return current.state if current is not None else self._ended.get(key)

    def _no_transfer(self, guid: str, msg: Message) -> None:
        if type(msg) not in (TransferAcked, ImageHeld, TransferRejected):
            error = ProtocolError(Reason.UNKNOWN_TYPE, f"{type(msg).__name__} is not a CH report")
            self._registry.refused(guid, "up", msg.TYPE, error)
            return
        image: bytes = getattr(msg, "image", b"")
        key = (guid, image)
        if key in self.transfers or key in self._ended or key in self._finishing:
            return  # a late report for a transfer that has ended (or a Poll's other answers)
        error = ProtocolError(Reason.NO_TRANSFER, f"no transfer of {image.hex()[:16]}")
        self._registry.refused(guid, "up", msg.TYPE, error)

    def _after(self, t: Transfer, now: float) -> None:
        """After the sender changed: outcomes, then the scheduler (sending), then the timer."""
        sender = t.sender
        events = sender.events()
        if events:
            for event in events:
                kind = type(event)
                if kind is ProgressMade:
                    assert isinstance(event, ProgressMade)
                    self._progressed(t, event, now)
                elif kind is TransferCompleted:
                    self._finish(t, TransferState.HELD, None)
                elif kind is TransferFailed:
                    assert isinstance(event, TransferFailed)
                    self._failed(t, event)
        if t.state is TransferState.ACTIVE:
            slot = t.slot
            self.scheduler.changed(slot, now)
            if slot.state in _SENDING and not self.scheduler.paused:
                t.timer.arm(sender.next_deadline())
        elif sender.state is SenderState.FAILED:
            t.send_now(now, 0)  # the last Cancel (unbudgeted)
        if self.scheduler.segment_rate:
            self._arm_scheduler()

    def _on_timer(self, t: Transfer) -> None:
        if t.state is not TransferState.ACTIVE or self.scheduler.paused:
            return
        if t.slot.state not in _SENDING:
            return  # not scheduled: re-armed when it runs again
        now = self._clock()
        sender = t.sender
        deadline = sender.next_deadline()
        if deadline is None:
            return
        if deadline > now:
            t.timer.arm(deadline)
            return
        sender.handle_timer(now)
        self._after(t, now)

    def _arm_scheduler(self) -> None:
        self._scheduler_timer.arm(self.scheduler.next_deadline())

    def _on_scheduler_timer(self) -> None:
        now = self._clock()
        deadline = self.scheduler.next_deadline()
        if deadline is None:
            return
        if deadline > now:
            self._scheduler_timer.arm(deadline)
            return
        self.scheduler.handle_timer(now)
        self._arm_scheduler()

    # ------------------------------------------------------------------ outcomes

    def _progressed(self, t: Transfer, event: ProgressMade, now: float) -> None:
        tally = t.tally
        tally.blocks_acked += event.acked - t.acked_seen
        t.acked_seen = event.acked
        t.progress_at = tally.progress_at = now
        t.reasked = False
        if t.stalled:
            t.stalled = False
            tally.stalled_transfers -= 1
        if not t.dirty:
            t.dirty = True
            self._dirty.append(t)
        self._progress_event(t, now)

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
            monitoring.TransferProgress(
                time=self._wall_clock(),
                guid=t.guid,
                image=t.image.hex,
                attempt=t.attempt,
                campaign=self.campaign_of(t.guid, t.image.hex),
                blocks_acked=acked,
                blocks_total=total,
                bytes_sent=t.bytes_sent,
            )
        )

    def _failed(self, t: Transfer, event: TransferFailed) -> None:
        reason = event.reason
        if reason is Reason.IMAGE_HASH and t.held_sha256 is not None:
            self._held_event(t)
        t.reason = reason.name
        self._finish(
            t, TransferState.for_reason(reason), reason.name, detail=event.detail, code=int(reason)
        )

    def _held_event(self, t: Transfer) -> asyncio.Future[int]:
        held = t.held_sha256 or b""
        return self._events.emit(
            monitoring.TransferHeld(
                time=self._wall_clock(),
                guid=t.guid,
                image=t.image.hex,
                attempt=t.attempt,
                campaign=self.campaign_of(t.guid, t.image.hex),
                sha256=held.hex(),
                matches=held == t.image.sha256,
                blocks_total=t.sender.blocks_total,
                bytes_sent=t.bytes_sent,
                retransmissions=t.retransmissions,
            )
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
        now = self._clock()
        t.state = state
        t.finished_at = self._wall_clock()
        self.durations[state].observe(max(0.0, t.finished_at - t.started_at))
        t.timer.cancel()
        self.scheduler.stop(t.slot, now)
        active = self._active.get(t.guid)
        if active is not None:
            active.pop(t.image.sha256, None)
            if not active:
                del self._active[t.guid]
        self._release_image(t.image.sha256)
        self._counts[TransferState.ACTIVE] -= 1
        self._counts[state] += 1
        self._unrecorded[state] += 1
        tally = t.tally
        tally.bump(TransferState.ACTIVE, -1)
        tally.bump(state, 1)
        tally.recording[state.value] = tally.recording.get(state.value, 0) + 1
        tally.blocks_acked -= t.acked_seen
        tally.blocks_total -= t.sender.blocks_total
        tally.progress_at = now
        if t.stalled:
            t.stalled = False
            tally.stalled_transfers -= 1
        if state is TransferState.HELD:
            if t.held_sha256 is None:
                t.held_sha256 = t.image.sha256
            event = self._held_event(t)
            log.info("%s holds image %s", t.guid, t.image.hex[:16])
        else:
            event = self._events.emit(
                monitoring.TransferFailed(
                    time=t.finished_at,
                    guid=t.guid,
                    image=t.image.hex,
                    attempt=t.attempt,
                    campaign=self.campaign_of(t.guid, t.image.hex),
                    reason=reason or "",
                    code=code,
                    detail=detail[:200],
                )
            )
            log.warning(
                "transfer of %s to %s ended %s: %s", t.image.hex[:16], t.guid, reason, detail
            )
        self._finishing[(t.guid, t.image.sha256)] = t
        self._finals.append((t, event))
        self._finals_wake.set()
        if self.transfer_ended is not None:
            self.transfer_ended(t.guid, t.image.sha256, state, reason)

    def _release_image(self, sha: bytes) -> None:
        users = self._image_users.get(sha, 0) - 1
        if users <= 0:
            self._image_users.pop(sha, None)
            self._catalogue.unload(sha)
        else:
            self._image_users[sha] = users

    # ------------------------------------------------------------------ final states

    async def run_final_writer(self) -> None:
        """Task: commit ended transfers' final states in batches, each batch after its events'
        commit (a crash in between leaves the transfers active, so the restarted daemon asks the
        CHs again and the events, same keys, are not duplicated; the other order could lose an
        event for good). A failed batch is kept and retried."""
        while True:
            await self._finals_wake.wait()
            self._finals_wake.clear()
            while self._finals:
                if not await self._write_finals():
                    await asyncio.sleep(FINAL_RETRY_S)

    async def _write_finals(self) -> bool:
        batch = self._finals[:FINAL_BATCH]
        waiting = [event for _, event in batch if not event.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=FINAL_EVENT_WAIT)
        try:
            await self._store.finish_transfers([t.final_state() for t, _ in batch])
        except StoreError as exc:
            if self._finals_failing_since is None:
                self._finals_failing_since = self._wall_clock()
            self._finals_log.failed(exc)
            return False
        del self._finals[: len(batch)]
        self._finals_log.succeeded()
        self._finals_failing_since = None
        now = self._clock()
        for t, _ in batch:
            self._unrecorded[t.state] -= 1
            t.tally.recording[t.state.value] -= 1
            # Recorded: forget the sender (its bitmaps), keep only the state; listings read the
            # stored row from now on. Memory stays proportional to the transfers in progress.
            key = (t.guid, t.image.sha256)
            if self._finishing.get(key) is t:
                del self._finishing[key]
            if self.transfers.get(key) is t:
                del self.transfers[key]
                self._ended[key] = t.state
            self.scheduler.detach(t.slot, now)
            t.timer.close()
        return True

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
                now=self._wall_clock(),
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

    async def run_progress_flusher(self, store_flush_interval: float) -> None:
        """Task: :meth:`flush_progress` every :data:`PROGRESS_HANDOFF_S` seconds (or every
        ``store_flush_interval``, if longer), until cancelled."""
        interval = max(store_flush_interval, PROGRESS_HANDOFF_S)
        while True:
            await asyncio.sleep(interval)
            self.flush_progress()

    # ------------------------------------------------------------------ stalls

    async def run_stall_watch(self, interval: float = STALL_CHECK_S) -> None:
        """Task: :meth:`check_stalls` every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.check_stalls(self._clock())

    def check_stalls(self, now: float) -> int:
        """Flag transfers and distributions that made no progress for ``stall_after_s``: one
        event per episode, rate-limited WARNINGs. Return how many transfers are stalled."""
        after = self._stall_after
        stalled = 0
        for t in self.transfers.values():
            if t.state is not TransferState.ACTIVE or t.slot.state not in _SCHEDULED:
                continue
            if t.stalled:
                stalled += 1
                continue
            idle = now - t.progress_at
            if idle < after:
                continue
            t.stalled = True
            t.tally.stalled_transfers += 1
            stalled += 1
            self.stalls += 1
            self._stalls_unlogged.append(t)
            self._events.emit(
                monitoring.TransferStalled(
                    time=self._wall_clock(),
                    guid=t.guid,
                    image=t.image.hex,
                    attempt=t.attempt,
                    campaign=self.campaign_of(t.guid, t.image.hex),
                    idle_s=round(idle, 1),
                    phase=t.sender.state.value,
                    scheduler=t.slot.state.value,
                    blocks_acked=t.sender.blocks_acked,
                    blocks_total=t.sender.blocks_total,
                )
            )
        if self._stalls_unlogged and now - self._stall_log_at >= STALL_LOG_INTERVAL_S:
            self._log_stalls(now)
        for sha, tally in self._tallies.items():
            self._check_distribution(sha, tally, now)
        return stalled

    def _log_stalls(self, now: float) -> None:
        batch, self._stalls_unlogged = self._stalls_unlogged, []
        self._stall_log_at = now
        first = ", ".join(
            f"{t.guid} ({t.image.hex[:12]}, {t.sender.state.value}, {t.slot.state.value})"
            for t in batch[:3]
        )
        more = f" and {len(batch) - 3} more" if len(batch) > 3 else ""
        log.warning(
            "%d transfer(s) made no progress for %.0f s: %s%s",
            len(batch),
            self._stall_after,
            first,
            more,
        )

    def _check_distribution(self, sha: bytes, tally: ImageTally, now: float) -> None:
        active = tally.states.get(TransferState.ACTIVE.value, 0)
        idle = now - tally.progress_at
        if tally.stalled_since is None:
            if not active or idle < self._stall_after:
                return
            tally.stalled_since = now
            waiting = self._waiting_breakdown(sha)
            self._events.emit(
                monitoring.DistributionStalled(
                    time=self._wall_clock(),
                    image=tally.image,
                    active=active,
                    idle_s=round(idle, 1),
                    blocks_acked=tally.blocks_acked,
                    blocks_total=tally.blocks_total,
                    **waiting,
                )
            )
            log.warning(
                "distribution of %s stalled: no progress for %.0f s, %d transfer(s) active (%s)",
                tally.image[:16],
                idle,
                active,
                ", ".join(f"{k} {v}" for k, v in waiting.items() if v) or "none scheduled",
            )
        elif active == 0 or idle < self._stall_after:
            stalled_s = now - tally.stalled_since
            tally.stalled_since = None
            self._events.emit(
                monitoring.DistributionResumed(
                    time=self._wall_clock(),
                    image=tally.image,
                    active=active,
                    stalled_s=round(stalled_s, 1),
                )
            )
            log.info("distribution of %s moves again after %.0f s", tally.image[:16], stalled_s)

    def _waiting_breakdown(self, sha: bytes) -> dict[str, int]:
        """Active transfers of one image by scheduler state (``offline`` for not scheduled)."""
        out = {"offline": 0, **{s.value: 0 for s in _SCHEDULED}}
        for t in self.transfers.values():
            if t.image.sha256 == sha and t.state is TransferState.ACTIVE:
                state = t.slot.state
                out["offline" if state is SlotState.STOPPED else state.value] += 1
        return out

    # ------------------------------------------------------------------ starting transfers

    def _tally(self, image: Image) -> ImageTally:
        tally = self._tallies.get(image.sha256)
        if tally is None:
            tally = self._tallies[image.sha256] = ImageTally(image.hex, image.manifest.block_count)
        return tally

    async def _add(self, hub: Hub, image: Image, row: TransferRow) -> Transfer:
        source = await self._catalogue.blocks(image)
        now = self._clock()
        known = row.blocks_acked > 0
        try:
            sender = self._new_sender(
                image, hub.announcement.limits, now, row.acked_bitmap, known=known
            )
        except ProtocolError as exc:
            log.warning("persisted bitmap of %s -> %s unusable (%s)", image.hex[:16], hub.guid, exc)
            sender = self._new_sender(image, hub.announcement.limits, now, None, known=False)
        key = (hub.guid, image.sha256)
        tally = self._tally(image)
        ended = self._ended.pop(key, None)
        if ended is not None:
            self._counts[ended] -= 1
            tally.bump(ended, -1)
        self._counts[TransferState.ACTIVE] += 1
        tally.bump(TransferState.ACTIVE, 1)
        tally.blocks_acked += sender.blocks_acked
        tally.blocks_total += sender.blocks_total
        if not tally.progress_at or tally.states.get(TransferState.ACTIVE.value) == 1:
            tally.progress_at = now
        t = Transfer(
            hub.guid,
            image,
            source,
            sender,
            publish=self._client.publish,
            publish_qos0=self._client.qos0_publisher,
            qos_blocks=self._config.qos_blocks,
            attempt=row.attempts,
            started_at=row.started_at,
            earlier=EarlierSenderTotals(row.blocks_sent, row.bytes_sent, 0),
            known=known,
            tally=tally,
            totals=self.sent,
            now=now,
        )
        t.slot = self.scheduler.attach(t, hub.segment)
        t.timer = TimerSlot(self._timers, functools.partial(self._on_timer, t), self.timer_stats)
        self.transfers[key] = t
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
        if self._wall_clock() >= manifest.expires:
            raise ProtocolError(Reason.EXPIRED, f"image {image.hex} expired at {manifest.expires}")
        refused: list[dict[str, str]] = []
        already: list[str] = []
        targets: list[Hub] = []
        if all_matching:
            candidates = [
                h for h in self._registry.hubs.values() if matches(h.announcement, manifest)
            ]
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
            error = refusal(hub.announcement, manifest)
            if error is not None and error.reason is not Reason.LIMITS_EXCEEDED:
                refused.append(_refusal(hub.guid, error))
                continue
            # limits that cannot carry the image: the transfer is created and fails
            # LIMITS_EXCEEDED at once (SPEC §7.4), recorded and reported like any other end
            key = (hub.guid, image.sha256)
            existing = self.transfers.get(key)
            state = existing.state if existing is not None else self._ended.get(key)
            if state in (TransferState.ACTIVE, TransferState.HELD):
                already.append(hub.guid)
                continue
            targets.append(hub)
        if not targets:
            return _distribute_result(image, [], already, refused)
        await self._catalogue.blocks(image)  # load (and check) the image before committing
        if any((h.guid, image.sha256) in self._finishing for h in targets):
            await self.wait_final_writes()  # a restart must not race its previous end's write
        await self._registry.flushed()  # a transfer row refers to its hub's row
        try:
            rows = await self._store.start_transfers(
                image.sha256, [h.guid for h in targets], manifest.block_count, self._wall_clock()
            )
        except StoreError as exc:
            refused.extend(
                _refusal(h.guid, ProtocolError(Reason.INTERNAL, str(exc))) for h in targets
            )
            return _distribute_result(image, [], already, refused)
        started: list[str] = []
        now = self._clock()
        for n, (hub, row) in enumerate(zip(targets, rows, strict=True)):
            if n and not n % START_CHUNK:
                await asyncio.sleep(0)  # a 10,000-CH distribution must not stall the loop
                now = self._clock()
            t = await self._add(hub, image, row)
            started.append(hub.guid)
            self._started_event(hub.guid, image, row.attempts)
            if t.sender.state is SenderState.FAILED:  # limits it cannot work with
                self._after(t, now)
            elif hub.online and not hub.flapping and not self._stopping:
                self.scheduler.start(t.slot, now)
        self._arm_scheduler()
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
            monitoring.TransferStarted(
                time=self._wall_clock(),
                guid=guid,
                image=image.hex,
                attempt=attempt,
                campaign=self.campaign_of(guid, image.hex),
                blocks_total=image.manifest.block_count,
            )
        )

    # ------------------------------------------------------------------ listing

    async def listing(self) -> list[dict[str, Any]]:
        """Every transfer (live figures for those in memory, stored ones otherwise)."""
        rows = await self._store.transfers()
        out: dict[tuple[str, bytes], dict[str, Any]] = {}
        for row in rows:
            out[(row.guid, row.image)] = listing_row(
                guid=row.guid,
                image=row.image,
                state=row.state,
                phase=row.state.value,
                blocks_acked=row.blocks_acked,
                blocks_total=row.blocks_total,
                blocks_sent=row.blocks_sent,
                bytes_sent=row.bytes_sent,
                retransmissions=None,
                held_sha256=row.held_sha256,
                reason=row.reason,
                attempt=row.attempts,
                started_at=row.started_at,
                finished_at=row.finished_at,
            )
        for key, t in self.transfers.items():
            out[key] = t.to_json(recorded=key not in self._finishing)
        return [out[k] for k in sorted(out)]

    def busy_on(self, guid: str) -> str | None:
        """Why CH ``guid`` cannot be forgotten now (``fleet.forget``): a transfer active, or
        ended with its final state not yet recorded; None if neither."""
        active = self._active.get(guid)
        if active:
            return f"transfer of {next(iter(active.values())).image.hex[:16]} is active"
        for key_guid, image in self._finishing:
            if key_guid == guid:
                return f"transfer of {image.hex()[:16]} ended, its final state not yet recorded"
        return None

    def forget_hub(self, guid: str) -> None:
        """Drop CH ``guid``'s ended transfers from the counts (their store rows were deleted
        with the hub: :meth:`otad.store.Store.forget_hub`)."""
        for key in [k for k in self._ended if k[0] == guid]:
            state = self._ended.pop(key)
            self._counts[state] -= 1
            tally = self._tallies.get(key[1])
            if tally is not None:
                tally.bump(state, -1)

    def progress_of(self, sha256: bytes) -> tuple[int, int, float] | None:
        """One image's live WAN progress: blocks acknowledged and blocks in all over its active
        transfers, and seconds since any of them last progressed; None if none is active."""
        tally = self._tallies.get(sha256)
        if tally is None or not tally.states.get(TransferState.ACTIVE.value, 0):
            return None
        return tally.blocks_acked, tally.blocks_total, self._clock() - tally.progress_at

    def counts(self, *, recorded: bool = False) -> dict[str, int]:
        """Transfers by state (those that ended before this run included); kept incrementally,
        zero counts included. ``recorded``: as the database has them (what the status shows),
        an ended transfer whose final state is not yet durable still counted active."""
        if not recorded:
            return {state.value: n for state, n in self._counts.items()}
        out = {state.value: n - self._unrecorded[state] for state, n in self._counts.items()}
        out[TransferState.ACTIVE.value] += sum(self._unrecorded.values())
        return out

    def distributions(self, now: float) -> dict[str, DistributionStatus]:
        """Per image with transfers active, stalled, or ended in the last
        ``DISTRIBUTION_LINGER_S`` (so a watcher sees how it ended): the status snapshot's
        figures."""
        return {
            tally.image: tally.to_json(now)
            for tally in self._tallies.values()
            if tally.states.get(TransferState.ACTIVE.value)
            or tally.stalled_since is not None
            or (tally.progress_at and now - tally.progress_at < DISTRIBUTION_LINGER_S)
        }

    @property
    def stalled_count(self) -> int:
        """Transfers flagged stalled now."""
        return sum(t.stalled_transfers for t in self._tallies.values())


def _refusal(guid: str, exc: ProtocolError) -> dict[str, str]:
    return {"guid": guid, "error": exc.reason.name, "detail": exc.detail}


def _distribute_result(
    image: Image, started: list[str], already: list[str], refused: list[dict[str, str]]
) -> dict[str, Any]:
    return {"image": image.hex, "started": started, "already": already, "refused": refused}
