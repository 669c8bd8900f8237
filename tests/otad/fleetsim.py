"""A seeded, virtual-time fleet: thousands of real Senders and Receivers under one real Scheduler.

What otad's scheduler shares is the broker, so the model has one: :class:`Broker` is a single
FIFO server (Mosquitto is single-threaded) that spends ``1 / rate`` seconds of its time on every
message in either direction. Queueing there is what makes round trips grow when too much is in
flight, exactly the effect the global budget exists to bound. Each CH adds a one-way latency and
a loss rate, and can be made to go silent (it stops answering: a hung CH whose connection stays
up).

Every transfer is a real :class:`protocol.wan.sender.Sender` talking, as bytes through
:func:`protocol.wire.messages.decode`, to a real :class:`protocol.wan.receiver.Receiver` holding a
really signed manifest (``simlink``). :class:`SimTransfer` implements the scheduler's
:class:`~otad.scheduler.Schedulable` with the same charge policy as otad's
:class:`~otad.distribution.Transfer` (:func:`otad.scheduler.budget_charge`,
:func:`otad.scheduler.handshake_charge`). The fleet checks, after every step, that the
scheduler's sums equal the transfers' charges and that no timer is due again right after it ran.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from simlink import Hub, Release

from otad.config import TransferConfig
from otad.scheduler import Scheduler, SlotState, budget_charge, handshake_charge
from protocol.wan.sender import (
    ProgressMade,
    SendBlock,
    SendCancel,
    Sender,
    SenderState,
    SendOffer,
    SendPoll,
    TransferCompleted,
    TransferFailed,
)
from protocol.wire.messages import Block, Cancel, Limits, Message, Offer, Poll, decode

POLL_BYTES = 16
LIMITS = Limits(max_block=1024, window=8, buffer=64 * 1024)


@dataclass
class Broker:
    """One FIFO server: ``rate`` messages per second, whichever way they go."""

    rate: float = 20_000.0
    free_at: float = 0.0
    messages: int = 0

    def admit(self, now: float) -> float:
        """When a message handed over at ``now`` has been forwarded."""
        self.free_at = max(now, self.free_at) + 1.0 / self.rate
        self.messages += 1
        return self.free_at


@dataclass
class SimHub:
    """One CH: a Receiver with an in-memory store, a latency, a loss rate."""

    hub: Hub
    latency: float
    loss: float
    silent: bool = False


class SimTransfer:
    """One (CH, image) transfer: a real Sender, scheduled by the real Scheduler."""

    def __init__(self, fleet: Fleet, index: int, sender: Sender, hub: SimHub) -> None:
        self.fleet = fleet
        self.index = index
        self.sender = sender
        self.hub = hub
        self.slot = fleet.scheduler.attach(self, f"cell-{index % fleet.segments}")
        self.timer_at: float | None = None
        self.done_at: float | None = None
        self.failed: str | None = None
        self.started_at = 0.0
        self.offers = 0
        self.polls = 0
        self.offer_sent_at: list[float] = []

    # Schedulable
    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        blocks = 0
        release = self.fleet.release
        for action in self.sender.next_actions(now, budget):
            if isinstance(action, SendBlock):
                message: Message = Block(
                    release.manifest.sha256, action.index, release.block(action.index)
                )
                blocks += 1
                self.fleet.note_block(self, now)
            elif isinstance(action, SendOffer):
                message = Offer(release.manifest.sha256, release.signed)
                self.offers += 1
                self.offer_sent_at.append(now)
            elif isinstance(action, SendPoll):
                message = Poll(nonce=self.index)
                self.polls += 1
            else:
                assert isinstance(action, SendCancel)
                message = Cancel(release.manifest.sha256, int(action.reason))
            self.fleet.down(self, message.encode(), now)
        self.fleet.arm(self, now)
        return blocks, self.sender.sendable()

    def budget_charge(self) -> int:
        return budget_charge(self.sender)

    def handshake_charge(self) -> int:
        return handshake_charge(self.sender, len(self.fleet.offer_bytes), POLL_BYTES)

    def answered(self) -> bool:
        return self.sender.answered

    def spurious_repairs(self) -> int:
        return self.sender.spurious_repairs


@dataclass
class Fleet:
    """N CHs receiving one image under one scheduler, on virtual time."""

    release: Release
    count: int
    budget: int
    seed: int = 1
    window: int = 8
    latency: float = 0.02
    loss: float = 0.0
    broker_rate: float = 20_000.0
    max_handshakes: int = 256
    handshake_bytes: int = 8 * 1024 * 1024
    segment_rate: float = 0.0
    segments: int = 4
    min_rto: float = TransferConfig().rto_min  # otad's default
    limits: Limits = LIMITS
    transfers: list[SimTransfer] = field(default_factory=list)
    now: float = 0.0
    spins: int = 0
    peak_inflight: int = 0
    peak_handshakes: int = 0
    per_segment_blocks: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.broker = Broker(self.broker_rate)
        self.scheduler = Scheduler(
            global_inflight=self.budget,
            max_handshakes=self.max_handshakes,
            handshake_bytes=self.handshake_bytes,
            segment_rate=self.segment_rate,
        )
        self.scheduler.resume(0.0)
        self.offer_bytes = Offer(self.release.manifest.sha256, self.release.signed).encode()
        self._events: list[tuple[float, int, str, object, object]] = []
        self._order = itertools.count()
        self._sched_at: float | None = None
        for i in range(self.count):
            hub = SimHub(Hub(self.limits, self.release.verify), self.latency, self.loss)
            self.transfers.append(SimTransfer(self, i, self._sender(), hub))

    def _sender(self, *, acked: bytes | None = None, known: bool = False) -> Sender:
        return Sender(
            self.release.manifest,
            self.limits,
            now=self.now,
            window=self.window,
            acked=acked,
            initial_rto=1.0,
            min_rto=self.min_rto,
            max_rto=60.0,
            max_timeouts=8,
            holds_manifest=known,
        )

    # ------------------------------------------------------------------ the wire

    def _push(self, at: float, kind: str, a: object, b: object = None) -> None:
        heapq.heappush(self._events, (at, next(self._order), kind, a, b))

    def down(self, t: SimTransfer, data: bytes, now: float) -> None:
        if self.rng.random() < t.hub.loss:
            return
        self._push(self.broker.admit(now) + t.hub.latency, "hub", t, data)

    def note_block(self, t: SimTransfer, now: float) -> None:
        """Count a block sent by ``t``'s segment in the tenth of a second ``now`` falls in."""
        key = (t.index % self.segments, int(now * 10))
        self.per_segment_blocks[key] = self.per_segment_blocks.get(key, 0) + 1

    def _up(self, t: SimTransfer, message: Message, now: float) -> None:
        if self.rng.random() < t.hub.loss:
            return
        self._push(self.broker.admit(now + t.hub.latency), "otad", t, message.encode())

    # ------------------------------------------------------------------ timers

    def arm(self, t: SimTransfer, now: float) -> None:
        deadline = t.sender.next_deadline()
        if deadline is None or t.done_at is not None:
            t.timer_at = None
            return
        t.timer_at = max(deadline, now)
        self._push(t.timer_at, "timer", t)

    def _arm_scheduler(self) -> None:
        at = self.scheduler.next_deadline()
        if at is not None and at != self._sched_at:
            self._sched_at = at
            self._push(at, "sched", None)

    def _arm_hub(self, t: SimTransfer) -> None:
        deadline = t.hub.hub.receiver.next_deadline()
        if deadline is not None:
            self._push(max(deadline, self.now), "hubtimer", t)

    # ------------------------------------------------------------------ the shell

    def start(self, transfers: list[SimTransfer] | None = None) -> None:
        for t in self.transfers if transfers is None else transfers:
            t.started_at = self.now
            self.scheduler.start(t.slot, self.now)
        self._check()
        self._arm_scheduler()

    def resync(self, t: SimTransfer) -> None:
        """The CH reconnected: a fresh sender (Poll first if the CH answered before)."""
        self.scheduler.stop(t.slot, self.now)
        known = t.sender.answered
        t.sender = self._sender(acked=t.sender.acked_bitmap(), known=known)
        self.scheduler.start(t.slot, self.now)
        self._check()

    def _after(self, t: SimTransfer) -> None:
        now = self.now
        for event in t.sender.events():
            if isinstance(event, TransferCompleted):
                t.done_at = now
            elif isinstance(event, TransferFailed):
                t.failed = event.reason.name
            else:
                assert isinstance(event, ProgressMade)
        if t.done_at is not None or t.failed is not None:
            self.scheduler.stop(t.slot, now)
            if t.sender.state is SenderState.FAILED:
                t.send_now(now, 0)  # the Cancel
        else:
            self.scheduler.changed(t.slot, now)
            if t.slot.state in (SlotState.RUNNING, SlotState.QUEUED, SlotState.THROTTLED):
                self.arm(t, now)
        self._arm_scheduler()
        self._check()

    def _check(self) -> None:
        scheduler = self.scheduler
        charged = sum(t.slot.charged for t in self.transfers)
        assert charged == scheduler.inflight
        assert all(
            t.slot.charged == t.budget_charge() or t.slot.state is SlotState.STOPPED
            for t in self.transfers
        )
        self.peak_inflight = max(self.peak_inflight, scheduler.inflight)
        self.peak_handshakes = max(self.peak_handshakes, scheduler.handshakes)

    def step(self) -> bool:
        if not self._events:
            return False
        at, _, kind, a, b = heapq.heappop(self._events)
        self.now = at
        if kind == "sched":
            if at != self._sched_at:
                return True
            self._sched_at = None
            self.scheduler.handle_timer(at)
            self._arm_scheduler()
            self._check()
            return True
        assert isinstance(a, SimTransfer)
        t = a
        if kind == "hub":
            assert isinstance(b, bytes)
            if t.hub.silent:
                return True
            actions = t.hub.hub.receive(decode(b), at)
            for message in t.hub.hub.apply(actions, at):
                self._up(t, message, at)
            self._arm_hub(t)
        elif kind == "hubtimer":
            receiver = t.hub.hub.receiver
            deadline = receiver.next_deadline()
            if deadline is not None and deadline <= at and not t.hub.silent:
                for message in t.hub.hub.apply(receiver.handle_timer(at), at):
                    self._up(t, message, at)
                self._arm_hub(t)
        elif kind == "otad":
            assert isinstance(b, bytes)
            if t.done_at is not None or t.failed is not None:
                return True
            t.sender.message_received(decode(b), at)
            self._after(t)
        elif kind == "timer":
            if t.timer_at != at or t.done_at is not None or t.failed is not None:
                return True
            if t.slot.state not in (SlotState.RUNNING, SlotState.QUEUED, SlotState.THROTTLED):
                return True
            t.timer_at = None
            deadline = t.sender.next_deadline()
            if deadline is None:
                return True
            if deadline > at:
                self.arm(t, at)
                return True
            t.sender.handle_timer(at)
            self._after(t)
            again = t.sender.next_deadline()
            if again is not None and again <= at and t.done_at is None and t.failed is None:
                self.spins += 1
        return True

    def run(self, until: float = 3600.0) -> Fleet:
        while self.now < until and self.step():
            if all(t.done_at is not None or t.failed is not None for t in self.transfers):
                break
        return self

    def run_until(self, at: float) -> None:
        while self._events and self._events[0][0] <= at:
            self.step()
        self.now = at

    # ------------------------------------------------------------------ results

    @property
    def completed(self) -> int:
        return sum(1 for t in self.transfers if t.done_at is not None)

    @property
    def blocks_sent(self) -> int:
        return sum(t.sender.blocks_sent for t in self.transfers)
