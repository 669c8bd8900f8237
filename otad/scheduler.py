"""Who may send what, now: admission of handshakes, the global in-flight budget, segment rate caps.

Theory of operation
-------------------

Each (CH, image) transfer has its own :class:`~protocol.wan.sender.Sender`, which keeps the CH's
window, credit and buffer. Above the senders the scheduler shares three resources among every
transfer, and it is the one owner of that bookkeeping (the shell only reports what happened):

* **handshakes**: a transfer that starts (a new distribution, a resume after otad restarted, a
  re-synchronisation after a reconnect) first asks its CH what it holds, with an ``Offer`` (the
  whole signed manifest) or a ``Poll``. At most ``max_handshakes`` asks, and ``handshake_bytes``
  bytes of them, are unanswered at once; further transfers wait in FIFO order for *admission*.
  So a start-up rush or a reconnect storm reaches the broker as a paced stream of asks, never as
  10,000 manifests in one loop turn, and the first round trips stay short enough for the initial
  retransmission timeout;
* a **global in-flight budget**: blocks sent and not yet acknowledged, summed over every
  transfer, at most ``global_inflight`` (it bounds the broker's queues and otad's socket buffers
  whatever the fleet size);
* a **per-segment rate cap**: a token bucket per network segment (the shared cell a CH declared
  in its announcement), ``segment_rate`` blocks per second with a burst of a tenth of a second
  (at least 8 blocks). Retransmissions spend tokens too: they use the same air.

**Accounting.** What a transfer holds of each resource is its *charge*: ``budget_charge()``
blocks and ``handshake_charge()`` bytes (:class:`Schedulable`). The scheduler re-reads both after
every call it makes into a transfer and whenever the shell reports that the transfer's sender
changed (:meth:`Scheduler.changed`: after an acknowledgement, a timer), and keeps the sums. That
is what makes the budget safe when it binds: budget freed by an acknowledgement is counted
*before* anything decides who may spend it. (The first scheduler folded a transfer's change into
the sum only when that transfer itself was next allowed to send; once every transfer waited in
the queue, no acknowledgement was ever counted, the sum stayed at the limit with nothing on the
wire, and the distribution stopped for good with no timer armed.)

**Give-back.** A CH that stops acknowledging must not hold budget for ever. After
``GIVEBACK_TIMEOUTS`` retransmission timeouts in a row without progress, a transfer's block
charge drops to the one probe it still sends per backed-off timeout (its other blocks are
presumed lost, as TCP presumes after a timeout), and an ask's handshake charge drops to zero
after its first timeout. Three timeouts and not one, for blocks: a timeout caused by queueing
(every CH slow at once) must not free budget and so deepen the very queue that caused it; with
the budget bounding the queue, three backed-off timeouts (at least 0.2 + 0.4 + 0.8 s) outlast it.

**Adapting.** ``global_inflight`` and ``max_handshakes`` are caps; the limits in force move
below them with what the fleet shows, as TCP's congestion window does, so a queue that forms
anywhere on the path (the broker, a CH's processor) is not made deeper. The budget in force
(:attr:`Scheduler.budget`) is cut by a quarter, at most once a second, when repairs turn out to
have been *spurious* (acknowledged sooner than a round trip after it went out: the block was
only late, the queue deeper than the RTO allowed for) for more than :data:`SPURIOUS_CUT_SHARE`
of the blocks acknowledged since the last look, and grows back by a sixteenth of itself per
budget's worth of acknowledged blocks. A share, not one repair: across thousands of transfers
one of them always has a late block within a second (jitter, a busy CH), and cutting on each one
held the 5,000-CH load test's budget at a twelfth of its cap. Real loss does not cut it: a lost
block's repair is never spurious. The ask window (:attr:`Scheduler.ask_window`) starts at 32,
grows by one per answered ask (doubling per round trip) and halves, at most once a second, when
an ask goes unanswered for a whole RTO. Both have a floor (:data:`MIN_BUDGET`,
:data:`MIN_ASK_WINDOW`).

**Turns.** A transfer that wants blocks sends at once only when nobody is waiting for budget.
Otherwise it queues behind the others (FIFO) and the queue is served, head first, whenever the
sum of charges drops below the limit: an acknowledged transfer goes to the back of the queue
instead of spending the budget it just freed, so CHs take turns and the longest wait is about
``queued transfers x window / (budget / round trip)``. Budget is handed out in grants of at
least :data:`MIN_GRANT` blocks (the head of the queue waits until that much is free): crumbs of
one or two blocks would make each CH wait for its ack delay and acknowledge twice as often. A
transfer whose segment has no tokens waits on that segment's bucket instead, and is served when
it refills (the bucket's wake-up is
:meth:`Scheduler.next_deadline`). Unbudgeted sends -- an ``Offer``, a ``Poll``, a ``Cancel``, a
timeout probe -- never wait: a place in a queue only holds back new blocks.

States of one transfer's :class:`Slot` (the edges are :data:`TRANSITIONS`; :meth:`Slot.enter`
refuses any other)::

    STOPPED --start()--> PENDING --admitted--> RUNNING <------granted------ QUEUED
       ^                                          |  ---wants more, budget short--->  ^
       |                                          |                                   |
       +---stop() from any state                  +--wants more, no tokens--> THROTTLED
                                                          (tokens, budget short: to QUEUED)

The scheduler is sans-IO: every call takes the (monotonic) time, nothing here reads a clock or
arms a timer; the shell arms one timer at :meth:`Scheduler.next_deadline` and calls
:meth:`Scheduler.handle_timer`. Nothing here allocates per block.
"""

from __future__ import annotations

import collections
import enum
import heapq
from collections.abc import Iterator
from typing import Final, Protocol, TypedDict

#: Retransmission timeouts in a row, without progress, after which a transfer's blocks stop
#: counting against the global budget (see "Give-back").
GIVEBACK_TIMEOUTS: Final = 3
#: Default limits of the handshake admission (see "handshakes").
DEFAULT_MAX_HANDSHAKES: Final = 1024
#: Shortest wait for a bucket to refill (seconds).
MIN_WAKE_S: Final = 0.001
#: Adaptive limits (see "Adapting"): floors, the ask window's start, the cut and growth rates.
MIN_BUDGET: Final = 64
MIN_ASK_WINDOW: Final = 16
START_ASK_WINDOW: Final = 32
BUDGET_CUT: Final = 0.75
BUDGET_GROWTH: Final = 1 / 16
CUT_INTERVAL_S: Final = 1.0
#: Spurious repairs, as a share of the blocks acknowledged meanwhile, that show a queue.
SPURIOUS_CUT_SHARE: Final = 0.01
#: Fewest blocks granted at once (see "Turns"): a CH acknowledges every few blocks or after its
#: ack delay, so budget handed out a block or two at a time made every CH wait for that delay
#: and acknowledge twice as often (measured: 0.42 acknowledgements per block instead of 0.26).
MIN_GRANT: Final = 4
DEFAULT_HANDSHAKE_BYTES: Final = 16 * 1024 * 1024


class SenderView(Protocol):
    """What the charge policy reads of a :class:`~protocol.wan.sender.Sender`."""

    @property
    def in_flight(self) -> int: ...

    @property
    def awaiting_answer(self) -> bool: ...

    @property
    def asks_with_poll(self) -> bool: ...

    @property
    def timeouts_without_progress(self) -> int: ...


def budget_charge(sender: SenderView) -> int:
    """Blocks a sender holds of the global budget: those in flight, or just its one probe once
    ``GIVEBACK_TIMEOUTS`` timeouts passed without progress (see "Give-back")."""
    flight = sender.in_flight
    if flight and sender.timeouts_without_progress >= GIVEBACK_TIMEOUTS:
        return 1
    return flight


def handshake_charge(sender: SenderView, offer_bytes: int, poll_bytes: int) -> int:
    """Bytes of a sender's unanswered ask (``offer_bytes`` for an Offer, ``poll_bytes`` for a
    Poll), until the CH answers or the ask's first timeout; else 0."""
    if not sender.awaiting_answer or sender.timeouts_without_progress:
        return 0
    return poll_bytes if sender.asks_with_poll else offer_bytes


class Schedulable(Protocol):
    """What the scheduler needs from a transfer (:class:`otad.distribution.Transfer`)."""

    slot: Slot

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        """Publish every unbudgeted action that is due and at most ``budget`` new blocks; return
        (blocks published, blocks it would still send now if the budget allowed)."""
        ...

    def budget_charge(self) -> int:
        """Blocks this transfer holds of the global budget."""
        ...

    def handshake_charge(self) -> int:
        """Bytes of an unanswered ask (Offer or Poll) this transfer holds, or 0."""
        ...

    def answered(self) -> bool:
        """The CH answered an ask of the current sender."""
        ...

    def spurious_repairs(self) -> int:
        """Repairs of the current sender that proved spurious (a count that only grows)."""
        ...


class SchedulerStatus(TypedDict):
    """The scheduler in the status snapshot (:meth:`Scheduler.snapshot`)."""

    budget: int  # global_inflight, the cap
    budget_now: int  # the budget in force (see "Adapting")
    budget_cuts: int
    blocks_in_flight: int
    ask_window: int  # asks allowed unanswered at once now
    ask_cuts: int
    handshakes: int  # transfers with an unanswered ask
    handshake_bytes: int
    pending: int  # slots by state
    running: int
    queued: int
    throttled: int
    longest_wait_s: float  # of the slots waiting now
    max_wait_s: float  # longest wait seen
    admitted: int
    turns: int
    paused: bool


class SlotState(enum.Enum):
    """Where one transfer stands with the scheduler."""

    STOPPED = "stopped"  # not scheduled: not started, suspended (CH offline) or ended
    PENDING = "pending"  # waiting for admission (a handshake place)
    RUNNING = "running"  # admitted; sends as it likes within the budget
    QUEUED = "queued"  # wants blocks; waiting in turn for the global budget
    THROTTLED = "throttled"  # wants blocks; waiting for its segment's tokens


TRANSITIONS: Final[dict[SlotState, frozenset[SlotState]]] = {
    SlotState.STOPPED: frozenset({SlotState.PENDING}),
    SlotState.PENDING: frozenset({SlotState.RUNNING, SlotState.STOPPED}),
    SlotState.RUNNING: frozenset({SlotState.QUEUED, SlotState.THROTTLED, SlotState.STOPPED}),
    SlotState.QUEUED: frozenset({SlotState.RUNNING, SlotState.THROTTLED, SlotState.STOPPED}),
    SlotState.THROTTLED: frozenset({SlotState.RUNNING, SlotState.QUEUED, SlotState.STOPPED}),
}
"""Allowed edges of the slot state machine (the diagram in the module docstring)."""

_SENDING: Final = frozenset({SlotState.RUNNING, SlotState.QUEUED, SlotState.THROTTLED})


class IllegalTransitionError(RuntimeError):
    """A state change that the transition table does not allow (a bug, never bad input)."""


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; and the slots waiting for it."""

    __slots__ = ("burst", "name", "rate", "stamp", "tokens", "waiters", "wake_at")

    def __init__(self, rate: float, burst: float, now: float | None = None, name: str = "") -> None:
        """Start full (``now`` None: the clock starts at the first :meth:`available`)."""
        self.name = name
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.waiters: collections.deque[tuple[Slot, int]] = collections.deque()
        self.wake_at: float | None = None

    def available(self, now: float) -> int:
        """Whole tokens available at ``now`` (refilling first)."""
        if self.stamp is None:
            self.stamp = now
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        return int(self.tokens) if self.tokens > 0 else 0

    def spend(self, n: int) -> None:
        """Take ``n`` tokens (may go below zero: an unbudgeted probe is paid back later)."""
        self.tokens -= n

    def time_for(self, tokens: float) -> float:
        """Seconds until ``tokens`` whole tokens are available."""
        missing = tokens - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate


class Slot:
    """One transfer's place with the scheduler: its state, its charges, its queue ticket."""

    __slots__ = (
        "bucket",
        "charged",
        "handshake",
        "since",
        "spurious",
        "state",
        "ticket",
        "transfer",
    )

    def __init__(self, transfer: Schedulable, bucket: TokenBucket | None) -> None:
        self.transfer: Schedulable | None = transfer  # None once detached
        self.bucket = bucket
        self.state = SlotState.STOPPED
        self.charged = 0  # blocks counted in Scheduler.inflight
        self.handshake = 0  # bytes counted in Scheduler.handshake_bytes_in_use
        self.ticket = 0  # bumped on every state change: stale queue entries are skipped
        self.since = 0.0  # when the slot entered its state
        self.spurious = 0  # spurious repairs of the transfer already counted

    def enter(self, state: SlotState, now: float) -> None:
        """Move to ``state``; raise :class:`IllegalTransitionError` for an edge not in the table."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(f"scheduler slot: {self.state.name} -> {state.name}")
        self.state = state
        self.ticket += 1
        self.since = now


class Scheduler:
    """Admission, the global in-flight budget and the segments' buckets (see the module doc)."""

    def __init__(
        self,
        *,
        global_inflight: int,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        handshake_bytes: int = DEFAULT_HANDSHAKE_BYTES,
        segment_rate: float = 0.0,
        segment_burst: float | None = None,
    ) -> None:
        """``segment_rate`` 0 means no rate cap; ``segment_burst`` defaults to a tenth of a
        second of ``segment_rate`` (at least 8 blocks)."""
        if global_inflight < 1 or max_handshakes < 1 or handshake_bytes < 1:
            raise ValueError("global_inflight, max_handshakes and handshake_bytes must be >= 1")
        self.limit = global_inflight
        self.max_handshakes = max_handshakes
        self.max_handshake_bytes = handshake_bytes
        self.segment_rate = segment_rate
        self.segment_burst = (
            segment_burst if segment_burst is not None else max(8.0, segment_rate / 10.0)
        )
        self.inflight = 0
        """Sum of every transfer's block charge."""
        self.budget = float(global_inflight)
        """The budget in force, at most ``limit`` (see "Adapting")."""
        self.ask_window = float(min(max_handshakes, START_ASK_WINDOW))
        """Asks allowed unanswered at once now, at most ``max_handshakes``."""
        self.budget_cuts = 0
        self.ask_cuts = 0
        self._budget_cut_at = float("-inf")
        self._acked_since_look = 0  # blocks acknowledged since the budget was last judged
        self._spurious_since_look = 0
        self._ask_cut_at = float("-inf")
        self.handshakes = 0
        """Transfers with an unanswered ask."""
        self.handshake_bytes_in_use = 0
        self.paused = True
        self.blocks_published = 0
        self.admitted = 0
        self.turns = 0
        """Times a queued transfer was served from the budget queue."""
        self.max_wait = 0.0
        """Longest time any transfer waited in one queue (admission, budget or tokens)."""
        self._buckets: dict[str, TokenBucket] = {}
        self._wakeups: list[tuple[float, int, TokenBucket]] = []  # heap, lazily invalidated
        self._wakeup_seq = 0
        self._admission: collections.deque[tuple[Slot, int]] = collections.deque()
        self._queue: collections.deque[tuple[Slot, int]] = collections.deque()
        self._counts: dict[SlotState, int] = dict.fromkeys(SlotState, 0)

    # ------------------------------------------------------------------ registration

    def attach(self, transfer: Schedulable, segment: str) -> Slot:
        """A new slot for ``transfer`` (STOPPED), billed to ``segment``'s bucket."""
        slot = Slot(transfer, self._bucket_for(segment))
        self._counts[SlotState.STOPPED] += 1
        return slot

    def detach(self, slot: Slot, now: float) -> None:
        """Forget ``slot`` for good (its transfer ended and was recorded). The slot lets go of
        its transfer, so the pair is freed at once rather than by the cyclic garbage collector
        (whose full passes over a fleet-sized heap stall the loop for tens of milliseconds)."""
        self.stop(slot, now)
        if slot.transfer is not None:
            slot.transfer = None
            self._counts[SlotState.STOPPED] -= 1

    def set_segment(self, slot: Slot, segment: str) -> None:
        """Bill ``slot`` to another segment (the CH re-announced itself in a new cell); only
        while it waits for nothing."""
        slot.bucket = self._bucket_for(segment)

    def _bucket_for(self, segment: str) -> TokenBucket | None:
        if self.segment_rate <= 0:
            return None
        bucket = self._buckets.get(segment)
        if bucket is None:
            bucket = TokenBucket(self.segment_rate, self.segment_burst, name=segment)
            self._buckets[segment] = bucket
        return bucket

    def bucket_for(self, segment: str) -> TokenBucket | None:
        """The token bucket of ``segment`` (None when no rate cap is configured)."""
        return self._bucket_for(segment)

    # ------------------------------------------------------------------ the shell's calls

    def start(self, slot: Slot, now: float) -> None:
        """``slot``'s transfer wants to run (its sender is new, in OFFERING): queue it for
        admission. No-op unless it is STOPPED."""
        if slot.state is not SlotState.STOPPED:
            return
        self._move(slot, SlotState.PENDING, now)
        self._admission.append((slot, slot.ticket))
        self._serve(now)

    def stop(self, slot: Slot, now: float) -> None:
        """``slot``'s transfer stops (CH offline, transfer ended or replaced): every charge it
        held is given back and whoever waits for it is served."""
        if slot.state is SlotState.STOPPED:
            return
        self._move(slot, SlotState.STOPPED, now)
        self.inflight -= slot.charged
        self.handshake_bytes_in_use -= slot.handshake
        self.handshakes -= slot.handshake > 0
        slot.charged = slot.handshake = 0
        self._serve(now)

    def changed(self, slot: Slot, now: float) -> None:
        """``slot``'s sender took input (an acknowledgement, a report, a timer): count what it
        freed, let it send (in turn), and serve whoever the freed budget is for."""
        state = slot.state
        if state is SlotState.STOPPED or state is SlotState.PENDING:
            return
        self._account(slot, now)
        if self.paused:
            return
        if state is SlotState.RUNNING:
            if self._queue:
                self._send_unbudgeted(slot, now)
            else:
                self._grant(slot, now)
        else:
            self._send_unbudgeted(slot, now)
        self._serve(now)

    def pause(self) -> None:
        """Stop sending (the MQTT session is down, or otad is stopping)."""
        self.paused = True

    def resume(self, now: float) -> None:
        """Send again: admit, serve the queue, wake the buckets."""
        self.paused = False
        self._serve(now)
        self.handle_timer(now)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (a segment's bucket refills), or None (also
        while paused: :meth:`resume` serves what came due)."""
        if self.paused:
            return None
        heap = self._wakeups
        while heap:
            at, _, bucket = heap[0]
            if bucket.wake_at == at and bucket.waiters:
                return at
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        """Serve every bucket whose wake-up time has come."""
        if self.paused:
            return
        heap = self._wakeups
        while heap and heap[0][0] <= now:
            at, _, bucket = heapq.heappop(heap)
            if bucket.wake_at != at:
                continue
            bucket.wake_at = None
            self._bucket_refilled(bucket, now)
        self._serve(now)

    # ------------------------------------------------------------------ figures

    @property
    def free(self) -> int:
        """Blocks of budget free now (negative while over the budget in force)."""
        return int(self.budget) - self.inflight

    def count(self, state: SlotState) -> int:
        """Transfers (attached slots) in ``state``."""
        return self._counts[state]

    def longest_wait(self, now: float) -> float:
        """How long the transfer at the head of the admission or budget queue has waited."""
        oldest = now
        for queue in (self._admission, self._queue):
            for slot, ticket in queue:
                if slot.ticket == ticket:
                    oldest = min(oldest, slot.since)
                    break
        return now - oldest

    def snapshot(self, now: float) -> SchedulerStatus:
        """Figures for the status topic (cheap: no walk over the transfers)."""
        return {
            "budget": self.limit,
            "budget_now": int(self.budget),
            "budget_cuts": self.budget_cuts,
            "blocks_in_flight": self.inflight,
            "ask_window": int(self.ask_window),
            "ask_cuts": self.ask_cuts,
            "handshakes": self.handshakes,
            "handshake_bytes": self.handshake_bytes_in_use,
            "pending": self._counts[SlotState.PENDING],
            "running": self._counts[SlotState.RUNNING],
            "queued": self._counts[SlotState.QUEUED],
            "throttled": self._counts[SlotState.THROTTLED],
            "longest_wait_s": round(self.longest_wait(now), 3),
            "max_wait_s": round(self.max_wait, 3),
            "admitted": self.admitted,
            "turns": self.turns,
            "paused": self.paused,
        }

    # ------------------------------------------------------------------ internals

    def _move(self, slot: Slot, state: SlotState, now: float) -> None:
        old = slot.state
        if old is SlotState.PENDING or old is SlotState.QUEUED or old is SlotState.THROTTLED:
            waited = now - slot.since
            if waited > self.max_wait:
                self.max_wait = waited
        slot.enter(state, now)
        self._counts[old] -= 1
        self._counts[state] += 1

    def _account(self, slot: Slot, now: float) -> None:
        t = slot.transfer
        assert t is not None
        charge = t.budget_charge()
        if charge != slot.charged:
            freed = slot.charged - charge
            self.inflight -= freed
            slot.charged = charge
            if freed > 0:
                self._acked_since_look += freed
                if self.budget < self.limit:  # acknowledged blocks: grow
                    self.budget = min(float(self.limit), self.budget + freed * BUDGET_GROWTH)
        handshake = t.handshake_charge()
        if handshake != slot.handshake:
            if handshake == 0:  # the ask ended: answered, or unanswered for an RTO
                if t.answered():
                    self.ask_window = min(float(self.max_handshakes), self.ask_window + 1)
                elif now - self._ask_cut_at >= CUT_INTERVAL_S:
                    self._ask_cut_at = now
                    self.ask_cuts += 1
                    self.ask_window = max(float(MIN_ASK_WINDOW), self.ask_window / 2)
            self.handshakes += (handshake > 0) - (slot.handshake > 0)
            self.handshake_bytes_in_use += handshake - slot.handshake
            slot.handshake = handshake
        spurious = t.spurious_repairs()
        if spurious != slot.spurious:
            if spurious > slot.spurious:
                self._spurious_since_look += spurious - slot.spurious
                if now - self._budget_cut_at >= CUT_INTERVAL_S:
                    self._judge_budget(now)
            slot.spurious = spurious

    def _judge_budget(self, now: float) -> None:
        """Cut the budget if the spurious repairs since the last look show a queue; start a
        new look either way."""
        if self._spurious_since_look > SPURIOUS_CUT_SHARE * self._acked_since_look:
            self._budget_cut_at = now
            self.budget_cuts += 1
            self.budget = max(float(min(MIN_BUDGET, self.limit)), self.budget * BUDGET_CUT)
            self._acked_since_look = self._spurious_since_look = 0
        elif now - self._budget_cut_at >= CUT_INTERVAL_S:
            self._budget_cut_at = now  # a look that found no queue: the next one in a second
            self._acked_since_look = self._spurious_since_look = 0

    def _send_unbudgeted(self, slot: Slot, now: float) -> None:
        """Publish what needs no budget; a RUNNING slot that still wants blocks joins the
        queue (others wait: it takes its turn behind them)."""
        t = slot.transfer
        assert t is not None
        sent, wanted = t.send_now(now, 0)
        self._account(slot, now)
        self.blocks_published += sent
        if sent and slot.bucket is not None:
            slot.bucket.spend(sent)
        if wanted > 0 and slot.state is SlotState.RUNNING:
            self._move(slot, SlotState.QUEUED, now)
            self._queue.append((slot, slot.ticket))

    def _grant(self, slot: Slot, now: float) -> None:
        """Let a RUNNING slot send within the free budget and its segment's tokens; queue it
        (budget) or throttle it (tokens) if it wanted more than it got."""
        free = int(self.budget) - self.inflight
        grant = free if free >= self._min_grant() else 0
        bucket = slot.bucket
        by_tokens = False
        if bucket is not None:
            tokens = bucket.available(now)
            if tokens < grant:
                grant = tokens
                by_tokens = True
        t = slot.transfer
        assert t is not None
        sent, wanted = t.send_now(now, grant)
        self._account(slot, now)
        self.blocks_published += sent
        if bucket is not None and sent:
            bucket.spend(sent)
        if wanted > 0 and sent >= grant:
            if by_tokens and bucket is not None:
                self._move(slot, SlotState.THROTTLED, now)
                bucket.waiters.append((slot, slot.ticket))
                self._arm(bucket, now)
            else:
                self._move(slot, SlotState.QUEUED, now)
                self._queue.append((slot, slot.ticket))

    def _min_grant(self) -> int:
        """The fewest blocks worth granting (see "Turns"): :data:`MIN_GRANT`, or 1 for a budget
        too small to hold four grants of it."""
        return MIN_GRANT if self.budget >= 4 * MIN_GRANT else 1

    def _serve(self, now: float) -> None:
        """Admit what the handshake limits allow, then serve the budget queue while budget is
        free."""
        if self.paused:
            return
        admission = self._admission
        while admission and (
            self.handshakes == 0
            or (
                self.handshakes < self.ask_window
                and self.handshake_bytes_in_use < self.max_handshake_bytes
            )
        ):
            slot = _pop(admission, SlotState.PENDING)
            if slot is None:
                break
            self._move(slot, SlotState.RUNNING, now)
            self.admitted += 1
            self._grant(slot, now)
        queue = self._queue
        min_grant = self._min_grant()
        while queue and int(self.budget) - self.inflight >= min_grant:
            slot = _pop(queue, SlotState.QUEUED)
            if slot is None:
                break
            self._move(slot, SlotState.RUNNING, now)
            self.turns += 1
            self._grant(slot, now)

    def _arm(self, bucket: TokenBucket, now: float) -> None:
        if bucket.wake_at is None:
            # wait for a batch of tokens, not one: fewer wake-ups at high rates
            need = max(1.0, min(bucket.burst, bucket.rate * 0.01))
            bucket.available(now)
            # never "now": a bucket a hair short of a token must not be served in a loop
            at = now + max(bucket.time_for(need), MIN_WAKE_S)
            bucket.wake_at = at
            self._wakeup_seq += 1
            heapq.heappush(self._wakeups, (at, self._wakeup_seq, bucket))

    def _bucket_refilled(self, bucket: TokenBucket, now: float) -> None:
        waiters = bucket.waiters
        while waiters:
            slot = _pop(waiters, SlotState.THROTTLED)
            if slot is None:
                break
            if bucket.available(now) < 1:
                waiters.appendleft((slot, slot.ticket))
                self._arm(bucket, now)
                return
            if self.inflight >= int(self.budget) or self._queue:
                # the global budget binds now: take a turn in the global queue
                self._move(slot, SlotState.QUEUED, now)
                self._queue.append((slot, slot.ticket))
                continue
            self._move(slot, SlotState.RUNNING, now)
            self._grant(slot, now)

    def slots_waiting(self) -> Iterator[Slot]:
        """Every slot in a queue (admission, budget, buckets), for tests and listings."""
        for queue in (self._admission, self._queue, *(b.waiters for b in self._buckets.values())):
            for slot, ticket in queue:
                if slot.ticket == ticket:
                    yield slot


def _pop(queue: collections.deque[tuple[Slot, int]], state: SlotState) -> Slot | None:
    """The first live entry of ``queue`` (an entry is live while its slot has not changed state
    since it was queued), or None."""
    while queue:
        slot, ticket = queue.popleft()
        if slot.ticket == ticket and slot.state is state:
            return slot
    return None
