"""The sending half of a WAN transfer: otad pushing one image to one Communications Hub.

Theory of operation
-------------------

One :class:`Sender` exists per (CH, image). It is sans-IO and pull-style (like aioquic's
``QuicConnection``): the shell feeds it what arrived (:meth:`Sender.message_received`) and what
time it is, asks it what to send (:meth:`Sender.next_actions`), arms one timer at
:meth:`Sender.next_deadline` and calls :meth:`Sender.handle_timer` when it fires. Outcomes are
drained with :meth:`Sender.events`. The sender never holds image bytes -- a :class:`SendBlock`
names an index and the shell reads that block from its content-addressed image store -- so its
memory is two bitmaps of ``ceil(blocks / 8)`` bytes (acknowledged, ever sent) plus one small
record per block in flight, and thousands run side by side.

States. SPEC §7.10 draws the sender's states and lists every edge; :data:`TRANSITIONS` is that
table and :meth:`Sender._enter` refuses any other edge (``tests/protocol/test_spec.py`` compares
the two). The diagram also says which failures send ``Cancel``; §7.11 lists the reasons.

Flow control. At most ``min(window, limits.window, credit)`` blocks are outstanding (sent and not
yet acknowledged -- a block declared lost still counts until it is acknowledged, because the
receiver may still be holding a copy), and their lengths sum to at most ``limits.buffer``.
``window`` is otad's own cap (its per-CH congestion window), ``credit`` comes with every SACK.
With zero credit and nothing in flight, one probe block goes out per RTO. New blocks are never
sent past ``lowest unacknowledged + SACK_SPAN`` (the receiver could not report them).

Loss detection ("repair a hole as soon as it is seen"). Every send (first or repeat) gets a send
sequence number. On each SACK the newest delivered send is remembered (``rack``, after RACK,
RFC 8985). An outstanding block is declared lost when

* ``dupthresh`` (3) sends made after its own have been delivered (RFC 6675's DupThresh, counted
  in sends rather than bytes) -- as long as the path has not shown reordering; or
* it was sent no later than that newest delivered send, and ``rack.rtt`` plus a reordering window
  (``min_rtt / 4``) have passed since its send. This catches the last blocks of a burst, which no
  later send can expose; a reorder timer fires for them when no further SACK comes. A block sent
  in the same instant but after the newest delivered one, and not itself carrying ``ack_now``,
  also allows for ``max_ack_delay``: if its burst's ``ack_now`` block was the one lost, the CH
  acknowledges it only after its ack delay.

Lost blocks are re-sent first, lowest index first. The receiver acknowledges at once whenever it
sees a gap, so a single loss in a stream is repaired about one round trip after the lost copy
would have arrived (1.25 RTT at worst in the tests).

A block index is sent again under the same name, so the acknowledgement of a repair is ambiguous
(either copy may have arrived). The sender credits the repair itself only when it was made because
``dupthresh`` later sends got through (the first copy is then surely gone); a repair made on a
timer is credited as its first send, so a delayed-not-lost window (a CH reboot behind a queueing
broker, a 10x RTT jump) can never make everything sent before the repair look lost. A repair
acknowledged sooner than ``min_rtt`` after it was sent was spurious (its first copy got there):
the path reorders, the ``dupthresh`` rule is switched off and the reordering window widens
(RFC 8985 6.2).

Retransmission timeout (RFC 6298, :mod:`protocol.wan.rtt`). One timer runs while anything is
outstanding, restarted whenever a SACK acknowledges new blocks. RTT samples come only from blocks
sent once (Karn), the oldest such block of each SACK (so the sample includes the receiver's ack
delay). The answer to an Offer seeds the estimate, but the RTO does not drop below its initial
value until the first block's round trip has been measured: the Offer went out before this
transfer's blocks -- and, in a start-up rush, everyone else's -- loaded the path, so an RTO
derived from it alone fired spuriously on the first window (1-2.5% of all blocks re-sent at
10,000 CHs). On expiry the RTO doubles (up to ``max_rto``) and one block is re-sent, the most
recently sent outstanding one (as a tail-loss probe, with ``ack_now``: its SACK exposes every
loss before it): a stall or a sudden 10x RTT costs one block per backed-off RTO, never the
window. The probe is not budgeted: it goes out even while the daemon's scheduler holds repairs
back for lack of budget, so an expiry always means the CH left a probe unanswered for a whole
RTO, and a transfer that waits its turn for budget is never mistaken for one whose CH is gone.
Progress (new blocks acknowledged) drops the backoff, as in QUIC, so a lossy tail whose
acknowledgements are all for repairs does not grow the RTO without bound. ``max_timeouts``
expiries in a row with no progress (momentum) end the transfer TIMED_OUT.

Resume. The receiver is the source of truth: its answer to an Offer replaces whatever this
sender believed (``acked``, the daemon's persisted bitmap, only seeds progress until then).
During STREAMING SACKs are merged (union), so reordered old SACKs do no harm; if the CH forgot
blocks it had acknowledged (restart from an old snapshot), the SACK that answers a VERIFYING
probe shows it, and the missing blocks are sent again. A CH with no state at all answers a block
with ``TransferRejected(NO_TRANSFER)`` and the sender offers again.

Untrusted input. :meth:`Sender.message_received` raises :class:`ProtocolError` for a message it
cannot apply (another image, a SACK past the end of the image, a message type a CH does not send)
and leaves its state unchanged. Late messages after COMPLETE or FAILED are ignored.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocol.clock import Monotonic, later
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import Manifest
from protocol.transitions import checked
from protocol.wan.rtt import RttEstimator
from protocol.wan.sack import SACK_SPAN, Bitmap, check_sack
from protocol.wire.messages import ImageHeld, Limits, Message, TransferAcked, TransferRejected

DUPTHRESH = 3
#: Asks made with a Poll before falling back to the full Offer (a CH reconnecting after a broker
#: restart may take seconds to subscribe again: it should not cost it the whole manifest).
POLL_ASKS = 3
MAX_REORDER_WINDOW_SCALE = 16  # the reordering window grows to at most 16 x min_rtt / 4
MIN_REORDER_WINDOW = 0.001


class SenderState(Enum):
    """Where a transfer stands, from otad's side."""

    OFFERING = "offering"  # Offer sent (and repeated on RTO), waiting for the CH's answer
    STREAMING = "streaming"  # sending blocks and repairs
    VERIFYING = "verifying"  # every block acknowledged; waiting for ImageHeld
    COMPLETE = "complete"  # the CH holds the image and its digest matches
    FAILED = "failed"  # given up; see the TransferFailed event


#: The sender's edges (SPEC §7.10 draws and lists them); :meth:`Sender._enter` takes no other.
TRANSITIONS: Final[dict[SenderState, frozenset[SenderState]]] = {
    SenderState.OFFERING: frozenset(
        {SenderState.STREAMING, SenderState.COMPLETE, SenderState.FAILED}
    ),
    SenderState.STREAMING: frozenset(
        {SenderState.VERIFYING, SenderState.OFFERING, SenderState.COMPLETE, SenderState.FAILED}
    ),
    SenderState.VERIFYING: frozenset(
        {SenderState.STREAMING, SenderState.OFFERING, SenderState.COMPLETE, SenderState.FAILED}
    ),
    SenderState.COMPLETE: frozenset(),
    SenderState.FAILED: frozenset(),
}


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendOffer:
    """Publish ``Offer(image, signed manifest)`` to the CH."""

    image: bytes


# SendBlock (one per block sent) and ProgressMade (one per acknowledgement) are the per-block
# and per-ack allocations of a transfer: plain slotted dataclasses, because a frozen one's
# __init__ sets each field through object.__setattr__ (3x the cost). Each is a fresh value handed
# to the shell; nothing keeps or hashes them.
@dataclass(slots=True)
class SendBlock:
    """Publish ``Block(image, index, data, ack_now)``; the shell reads ``data`` from its store."""

    image: bytes
    index: int
    ack_now: bool = False  # set Block.ack_now: the sender is about to stall
    retransmission: bool = False  # this index was sent before in this session


@dataclass(frozen=True, slots=True)
class SendPoll:
    """Publish ``Poll(nonce)``: ask a CH that already holds this image's manifest for its state,
    without sending the manifest again (§7.8). The first :data:`POLL_ASKS` asks of a sender
    created with ``holds_manifest``; every later ask is a full :class:`SendOffer`."""

    image: bytes


@dataclass(frozen=True, slots=True)
class SendCancel:
    """Publish ``Cancel(image, reason)``: the CH should discard what it holds of the image."""

    image: bytes
    reason: Reason


SenderAction = SendOffer | SendPoll | SendBlock | SendCancel


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class TransferCompleted:
    """The CH reported holding the whole image with the manifest's digest."""

    image: bytes
    sha256: bytes


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """The transfer ended without the CH holding the image."""

    image: bytes
    reason: Reason
    detail: str = ""


@dataclass(slots=True)  # not frozen: see SendBlock
class ProgressMade:
    """The CH acknowledged new blocks (or reported its state): ``acked`` of ``total`` held.

    Emitted only when the count changes, so duplicate blocks never produce duplicate progress;
    the daemon rate-limits what it publishes."""

    image: bytes
    acked: int
    total: int


SenderEvent = TransferCompleted | TransferFailed | ProgressMade


class _Flight:
    """One outstanding block: its latest send, and its first one in this flight."""

    __slots__ = (
        "ack_now",
        "first_sent_at",
        "first_seq",
        "lost",
        "lost_by_count",
        "retransmitted",
        "sent_at",
        "seq",
        "trust_latest",
    )

    def __init__(self, seq: int, sent_at: Monotonic, retransmitted: bool, ack_now: bool) -> None:
        self.seq = self.first_seq = seq
        self.sent_at = self.first_sent_at = sent_at
        self.retransmitted = retransmitted
        self.lost = False  # declared lost, queued for repair
        self.lost_by_count = False  # ...because dupthresh later sends were delivered
        self.trust_latest = False  # the latest send is a repair made on that evidence
        self.ack_now = ack_now  # the latest send asked for an immediate acknowledgement


_TERMINAL = (SenderState.COMPLETE, SenderState.FAILED)


class Sender:
    """otad's state machine for sending one image to one CH (see the module docstring)."""

    __slots__ = (
        "_acked",
        "_answered",
        "_ask_poll",
        "_block_count",
        "_block_size",
        "_cancel_reason",
        "_credit",
        "_delivered",
        "_due_at",
        "_dupthresh",
        "_events",
        "_flight",
        "_flight_bytes",
        "_image",
        "_initial_rto",
        "_last_block_length",
        "_lowest_unacked",
        "_max_ack_delay",
        "_max_timeouts",
        "_next_new",
        "_offer_due",
        "_offer_retx",
        "_offer_sent_at",
        "_polls_left",
        "_probe_due",
        "_probe_index",
        "_probed",
        "_rack_rtt",
        "_rack_sent",
        "_rack_seq",
        "_reorder_deadline",
        "_reorder_window_scale",
        "_reordering_seen",
        "_repair",
        "_rto_floor",
        "_rtt",
        "_sent",
        "_seq",
        "_state",
        "_timeouts",
        "_timer_start",
        "_window_cap",
        "blocks_sent",
        "bytes_sent",
        "limits",
        "manifest",
        "offers_sent",
        "retransmissions",
        "rto_expiries",
        "spurious_repairs",
    )

    def __init__(
        self,
        manifest: Manifest,
        limits: Limits,
        *,
        now: Monotonic,
        window: int | None = None,
        acked: bytes | None = None,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        max_timeouts: int = 10,
        dupthresh: int = DUPTHRESH,
        max_ack_delay: float = 0.05,
        holds_manifest: bool = False,
    ) -> None:
        """Start a transfer in OFFERING at time ``now``.

        ``limits`` are the CH's declared limits (from its ``HubAnnounced``: untrusted, so limits
        it cannot work with end the transfer FAILED(LIMITS_EXCEEDED) at once, with no exception).
        ``window`` caps the blocks in flight below ``limits.window`` (otad's per-CH window).
        ``acked`` is a bitmap persisted from :meth:`acked_bitmap` (raises ``ProtocolError`` if it
        does not fit the manifest). ``initial_rto``/``min_rto``/``max_rto`` bound the adaptive
        retransmission timeout (seconds); ``max_timeouts`` is the momentum limit.
        ``max_ack_delay`` is the longest a CH holds back a SACK (its ``Receiver`` ack delay).
        ``holds_manifest`` says the CH answered an Offer of this image before (a resume or a
        re-synchronisation): the first :data:`POLL_ASKS` asks are then :class:`SendPoll`, not
        the whole manifest.
        """
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        if max_timeouts < 1 or dupthresh < 1:
            raise ValueError("max_timeouts and dupthresh must be >= 1")
        self.manifest = manifest
        self.limits = limits
        self._image = manifest.sha256
        self._block_count = manifest.block_count
        # every block is block_size long but the last (Manifest.block_length, per block sent
        # and acknowledged, is a method call and a range check each time)
        self._block_size = manifest.block_size
        self._last_block_length = manifest.block_length(self._block_count - 1)
        # otad's own cap on blocks in flight (its per-CH window), never above the CH's window
        self._window_cap = limits.window if window is None else min(window, limits.window)
        self._credit = self._window_cap
        self._dupthresh = dupthresh
        self._max_timeouts = max_timeouts
        self._max_ack_delay = max_ack_delay
        self._state = SenderState.OFFERING  # the initial state, not an edge
        self._acked = (
            Bitmap(self._block_count)
            if acked is None
            else Bitmap.from_bytes(acked, self._block_count)
        )
        self._sent = Bitmap(self._block_count)
        self._lowest_unacked = self._acked.first_missing()  # SPEC's "lowest unacknowledged"
        self._next_new = self._lowest_unacked
        self._flight: dict[int, _Flight] = {}
        self._flight_bytes = 0
        self._repair: set[int] = set()
        self._seq = 0
        self._rack_seq = -1
        self._delivered: list[int] = []  # send numbers delivered past the oldest outstanding
        self._rack_sent = Monotonic(float("-inf"))
        self._rack_rtt = 0.0
        self._reorder_window_scale = 1
        self._reordering_seen = False
        self._reorder_deadline: Monotonic | None = None
        self._rtt = RttEstimator(initial_rto=initial_rto, min_rto=min_rto, max_rto=max_rto)
        self._initial_rto = initial_rto
        self._rto_floor = initial_rto  # until the first block's round trip is measured
        self._timer_start: Monotonic | None = None
        self._timeouts = 0
        self._offer_due = True
        self._offer_sent_at: Monotonic | None = None
        self._offer_retx = False
        self._ask_poll = holds_manifest
        self._polls_left = POLL_ASKS
        self._answered = False
        self._probe_due = False
        self._probe_index: int | None = None  # the block a due STREAMING probe re-sends
        self._probed = False
        self._cancel_reason: Reason | None = None
        self._due_at = now
        self._events: list[SenderEvent] = []
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.retransmissions = 0
        self.offers_sent = 0
        self.rto_expiries = 0
        self.spurious_repairs = 0
        largest = manifest.block_length(0)
        if largest > limits.max_block:
            self._fail(Reason.LIMITS_EXCEEDED, f"block of {largest} B > CH max_block", now)
        elif limits.window < 1:
            self._fail(Reason.LIMITS_EXCEEDED, "CH window is 0", now)
        elif largest > limits.buffer:
            self._fail(Reason.LIMITS_EXCEEDED, f"block of {largest} B > CH buffer", now)

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> SenderState:
        """The current :class:`SenderState`."""
        return self._state

    @property
    def image(self) -> bytes:
        """The image digest (its identity on the wire)."""
        return self._image

    @property
    def blocks_total(self) -> int:
        """Blocks in the image."""
        return self._block_count

    @property
    def blocks_acked(self) -> int:
        """Blocks the CH has acknowledged (as far as this sender knows)."""
        return self._acked.count

    @property
    def in_flight(self) -> int:
        """Blocks sent and not yet acknowledged (counted against the window)."""
        return len(self._flight)

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of the blocks in flight (counted against ``limits.buffer``)."""
        return self._flight_bytes

    @property
    def window(self) -> int:
        """The window in force: ``min(window, limits.window, credit)``."""
        return min(self._window_cap, self._credit)

    @property
    def rto(self) -> float:
        """The current retransmission timeout, seconds."""
        return max(self._rtt.rto, self._rto_floor)

    @property
    def srtt(self) -> float | None:
        """Smoothed round-trip time, or None before the first sample."""
        return self._rtt.srtt

    @property
    def rtt_samples(self) -> int:
        """Round-trip measurements taken (Karn: blocks sent once, and the Offer's answer)."""
        return self._rtt.samples

    @property
    def last_rtt(self) -> float:
        """The newest round-trip measurement, seconds (0 before the first)."""
        return self._rtt.last_sample

    @property
    def awaiting_answer(self) -> bool:
        """An ask (Offer or Poll) is out and the CH has not answered it yet."""
        return self._state is SenderState.OFFERING and self._offer_sent_at is not None

    @property
    def asks_with_poll(self) -> bool:
        """The next (or outstanding) ask is a Poll rather than the whole manifest."""
        return self._ask_poll

    @property
    def answered(self) -> bool:
        """The CH answered an ask of this sender (so it knows the image's manifest)."""
        return self._answered

    @property
    def timeouts_without_progress(self) -> int:
        """Retransmission timeouts in a row with no progress (the momentum count, §7.7)."""
        return self._timeouts

    def acked_bitmap(self) -> bytes:
        """The acknowledged-blocks bitmap to persist (``ceil(blocks / 8)`` bytes, LSB first)."""
        return self._acked.to_bytes()

    def events(self) -> list[SenderEvent]:
        """Drain the outcomes that happened since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def set_window(self, window: int) -> None:
        """Change otad's own cap on blocks in flight (never above ``limits.window``)."""
        if window < 1:
            raise ValueError("window must be >= 1")
        self._window_cap = min(window, self.limits.window)

    @property
    def unbudgeted_due(self) -> bool:
        """Something that needs no budget may be due (a Cancel, an ask, a probe). When False,
        :meth:`next_actions` with a budget of 0 has nothing to send."""
        return self._cancel_reason is not None or self._offer_due or self._probe_due

    def sendable(self) -> int:
        """About how many blocks :meth:`next_actions` would send with an unlimited budget (for a
        scheduler sharing a global budget; :meth:`next_actions` is authoritative)."""
        if self._state is not SenderState.STREAMING:  # a VERIFYING probe is a Poll, no block
            return 0
        room = min(self._window_cap, self._credit) - len(self._flight)
        room = min(room, (self.limits.buffer - self._flight_bytes) // self._block_size)
        unsent = self._block_count - self._acked.count - len(self._flight)
        return len(self._repair) + int(self._probe_due) + max(0, min(room, unsent))

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> Monotonic | None:
        """When :meth:`handle_timer` must next be called (a time in the past means now), or None.

        After construction, and after every :meth:`message_received` and :meth:`handle_timer`,
        the shell calls :meth:`next_actions` and re-arms its timer here."""
        if self._cancel_reason is not None or self._offer_due or self._probe_due:
            return self._due_at
        if self._state in _TERMINAL:
            return None
        deadline = self._rto_deadline()
        if self._reorder_deadline is not None and (
            deadline is None or self._reorder_deadline < deadline
        ):
            return self._reorder_deadline
        return deadline

    def handle_timer(self, now: Monotonic) -> None:
        """Run whatever timers have expired at ``now`` (reorder timer, RTO)."""
        if self._state in _TERMINAL:
            return
        if self._reorder_deadline is not None and now >= self._reorder_deadline:
            self._detect_losses(now)
        deadline = self._rto_deadline()
        if deadline is not None and now >= deadline:
            self._on_rto(now)

    def _rto_deadline(self) -> Monotonic | None:
        if self._timer_start is None:
            return None
        return later(self._timer_start, max(self._rtt.rto, self._rto_floor))

    def _on_rto(self, now: Monotonic) -> None:
        self._timer_start = now
        self._timeouts += 1
        self.rto_expiries += 1
        if self._timeouts > self._max_timeouts:
            # No Cancel: the CH keeps what it holds (in VERIFYING, perhaps the verified image
            # whose ImageHeld was lost), and a later distribution resumes from it (SPEC §7.7).
            self._fail(Reason.TIMED_OUT, f"{self._max_timeouts} timeouts without progress", now)
            return
        self._rtt.on_timeout()
        if self._rto_floor:  # the floor backs off with the estimator
            self._rto_floor = min(2 * self._rto_floor, self._rtt.max_rto)
        if self._state is SenderState.OFFERING:
            self._offer_due = True
            if self._ask_poll:
                self._polls_left -= 1
                # still no answer after POLL_ASKS Polls: the CH may not know the image
                self._ask_poll = self._polls_left > 0
            self._due_at = now
        elif self._state is SenderState.VERIFYING:
            self._probe_due = True
            self._due_at = now
        elif self._flight:
            # a tail-loss probe, not budgeted: it goes out even while the scheduler holds the
            # repairs back, so an expiry always means a whole RTO with a probe unanswered
            self._probe_due = True
            self._probe_index = max(self._flight, key=lambda i: self._flight[i].seq)
            self._due_at = now
        elif min(self._window_cap, self._credit) == 0:
            self._probe_due = True  # zero credit: a persist probe
            self._due_at = now
        else:
            self._timer_start = None

    # ------------------------------------------------------------------ sending

    def next_actions(self, now: Monotonic, budget: int) -> list[SenderAction]:
        """What to publish now: an Offer, a Cancel, or blocks.

        At most ``budget`` blocks (the scheduler's share of the global in-flight budget), plus at
        most one probe block per RTO expiry, which is not budgeted: a transfer the scheduler
        starves still probes its CH, so its timeouts count only a CH that does not answer, and
        a starved transfer is never mistaken for a dead one. Repairs come first (lowest index
        first), then new blocks in index order while the window, credit and buffer allow; the
        last block before the sender stalls carries ``ack_now``.
        """
        out: list[SenderAction] = []
        if self._cancel_reason is not None:
            out.append(SendCancel(self._image, self._cancel_reason))
            self._cancel_reason = None
        state = self._state
        if state is SenderState.OFFERING:
            if self._offer_due:
                self._offer_due = False
                self._offer_retx = self._offer_sent_at is not None
                self._offer_sent_at = now
                self._timer_start = now
                self.offers_sent += 1
                out.append(SendPoll(self._image) if self._ask_poll else SendOffer(self._image))
            return out
        if state is SenderState.VERIFYING:
            if self._probe_due:  # a Poll: the CH answers with ImageHeld if it holds the image
                self._probe_due = False
                self._probed = True
                out.append(SendPoll(self._image))
            return out
        if state is not SenderState.STREAMING:
            return out
        if self._probe_due:
            self._probe_due = False
            index, self._probe_index = self._probe_index, None
            if index is None or index not in self._flight:
                index = self._lowest_unacked  # zero credit: the persist probe
            self._repair.discard(index)
            out.append(self._send(index, now, ack_now=True))
        sent = 0
        if self._repair and budget > 0:
            for index in sorted(self._repair):
                if sent >= budget:
                    break
                self._repair.discard(index)
                out.append(self._send(index, now))
                sent += 1
        while sent < budget:
            new = self._next_new_block()
            if new is None:
                break
            out.append(self._send(new, now))
            sent += 1
        if sent and self._next_new_block() is None:
            last = out[-1]
            assert isinstance(last, SendBlock)
            last.ack_now = True
            self._flight[last.index].ack_now = True
        return out

    def _next_new_block(self) -> int | None:
        """The next never-acknowledged block not in flight, if the window/credit/buffer allow."""
        if len(self._flight) >= min(self._window_cap, self._credit):
            return None
        i, n = self._next_new, self._block_count
        acked, flight = self._acked, self._flight
        while i < n and (i in acked or i in flight):
            i += 1
        self._next_new = i
        if i >= n or i > self._lowest_unacked + SACK_SPAN:
            return None
        if self._flight_bytes + self._block_length(i) > self.limits.buffer:
            return None
        return i

    def _block_length(self, index: int) -> int:
        """Byte length of block ``index`` (an index of this image)."""
        return self._last_block_length if index == self._block_count - 1 else self._block_size

    def _send(self, index: int, now: Monotonic, *, ack_now: bool = False) -> SendBlock:
        length = self._block_length(index)
        again = not self._sent.add(index)
        seq = self._seq
        self._seq += 1
        flight = self._flight.get(index)
        if flight is None:
            self._flight[index] = _Flight(seq, now, again, ack_now)
            self._flight_bytes += length
        else:
            flight.seq = seq
            flight.sent_at = now
            flight.retransmitted = True
            flight.ack_now = ack_now
            flight.trust_latest = flight.lost_by_count
            flight.lost = flight.lost_by_count = False
        if again:
            self.retransmissions += 1
        self.blocks_sent += 1
        self.bytes_sent += length
        if self._timer_start is None:
            self._timer_start = now
        return SendBlock(self._image, index, ack_now, again)

    # ------------------------------------------------------------------ receiving

    def message_received(self, msg: Message, now: Monotonic) -> None:
        """Apply a message from the CH: ``TransferAcked``, ``ImageHeld`` or ``TransferRejected``.

        Raises ``ProtocolError`` (state unchanged) for another image (``WRONG_IMAGE``), an
        impossible SACK (``MALFORMED``) or another message type (``UNKNOWN_TYPE``).
        """
        if not isinstance(msg, (TransferAcked, ImageHeld, TransferRejected)):
            raise ProtocolError(Reason.UNKNOWN_TYPE, f"a CH does not send {type(msg).__name__}")
        if msg.image != self._image:
            raise ProtocolError(Reason.WRONG_IMAGE, "message for another image")
        if isinstance(msg, TransferAcked):
            check_sack(msg.base, msg.bitmap, self._block_count)
        if self._state in _TERMINAL:
            return
        if isinstance(msg, TransferAcked):
            self._on_ack(msg, now)
        elif isinstance(msg, ImageHeld):
            self._on_held(msg, now)
        else:
            self._on_rejected(msg, now)

    def _on_ack(self, msg: TransferAcked, now: Monotonic) -> None:
        self._credit = msg.credit
        state = self._state
        if state is SenderState.OFFERING:
            if self._offer_sent_at is None:
                return  # an old SACK; the CH lost the transfer and has not seen the new Offer
            if not self._offer_retx:
                self._rtt.on_sample(now - self._offer_sent_at)
            self._timeouts = 0
            self._adopt_receiver_state(msg, now)
        elif state is SenderState.VERIFYING:
            if msg.base < self._block_count and self._probed:
                self._adopt_receiver_state(msg, now)  # the CH lost blocks it had acknowledged
        else:
            newly = self._acked.merge_sack(msg.base, msg.bitmap, self._lowest_unacked)
            if newly:
                self._lowest_unacked = self._acked.first_missing(self._lowest_unacked)
                self._account_delivered(newly, now)
                self._rtt.reset_backoff()
                if self._rto_floor:
                    self._rto_floor = self._initial_rto
                self._timeouts = 0
                self._events.append(ProgressMade(self._image, self._acked.count, self._block_count))
                if self._acked.full():
                    self._enter_verifying(now)
                    return
                self._timer_start = now if self._flight else None
            self._detect_losses(now)
        if (
            self._state is SenderState.STREAMING
            and not self._flight
            and min(self._window_cap, self._credit) == 0
            and self._timer_start is None
        ):
            self._timer_start = now  # persist timer: probe a CH that gave no credit

    def _account_delivered(self, newly: list[int], now: Monotonic) -> None:
        """Retire newly acknowledged blocks: RTT samples (Karn), spurious repairs, RACK state."""
        oldest: Monotonic | None = None
        newest: Monotonic | None = None
        min_rtt = self._rtt.min_rtt
        for index in newly:
            flight = self._flight.pop(index, None)
            if flight is None:
                continue
            self._flight_bytes -= self._block_length(index)
            self._repair.discard(index)
            if not flight.retransmitted:
                seq, sent_at = flight.seq, flight.sent_at
                oldest = sent_at if oldest is None else min(oldest, sent_at)
                newest = sent_at if newest is None else max(newest, sent_at)
            elif min_rtt is not None and now - flight.sent_at < min_rtt:
                # acknowledged sooner than any round trip after the repair: the first copy
                # got there, so the path reorders
                self.spurious_repairs += 1
                self._reordering_seen = True
                scale = self._reorder_window_scale + 1
                self._reorder_window_scale = min(scale, MAX_REORDER_WINDOW_SCALE)
                continue
            elif flight.trust_latest:
                # a repair made because dupthresh later sends got through: the first copy is
                # almost surely lost, so the repair is what arrived
                seq, sent_at = flight.seq, flight.sent_at
            else:
                # a repair made on a timer (RTO or reordering window): which copy arrived is
                # ambiguous, so credit the first one. Crediting the repair would declare every
                # block sent before it lost though they may only have been delayed (a CH reboot
                # with the broker queueing, a sudden RTT jump): a duplicate storm.
                seq, sent_at = flight.first_seq, flight.first_sent_at
            insort(self._delivered, seq)
            if seq > self._rack_seq:
                self._rack_seq = seq
                self._rack_sent = sent_at
                self._rack_rtt = now - sent_at
        if oldest is not None and newest is not None:
            self._rtt.on_sample(now - oldest)
            self._rtt.note_min(now - newest)
            self._rto_floor = 0.0  # a block's round trip is known: the RTO is the estimator's

    def _reorder_window(self) -> float:
        rtt = self._rtt
        if rtt.min_rtt is None or rtt.srtt is None:
            return rtt.rto / 4
        window = min(self._reorder_window_scale * rtt.min_rtt / 4, rtt.srtt)
        return max(window, MIN_REORDER_WINDOW)

    def _detect_losses(self, now: Monotonic) -> None:
        deadline: Monotonic | None = None
        rack_seq, rack_sent = self._rack_seq, self._rack_sent
        wait = self._rack_rtt + self._reorder_window()
        delivered = self._delivered
        count_rule = not self._reordering_seen
        oldest = self._seq
        for index, flight in self._flight.items():
            oldest = min(oldest, flight.seq)
            if flight.lost:
                continue
            delivered_after = len(delivered) - bisect_right(delivered, flight.seq)
            if count_rule and delivered_after >= self._dupthresh:
                flight.lost = flight.lost_by_count = True
            elif flight.sent_at <= rack_sent:
                due = later(flight.sent_at, wait)
                if flight.seq > rack_seq and not flight.ack_now:
                    # sent in the same instant but after the newest delivered block: if the
                    # ack_now block of its burst was lost, the CH holds its SACK back
                    due = later(due, self._max_ack_delay)
                if now >= due:
                    flight.lost = True
                elif deadline is None or due < deadline:
                    deadline = due
            if flight.lost:
                self._repair.add(index)
        self._reorder_deadline = deadline
        del delivered[: bisect_right(delivered, oldest)]  # keep only what can still count

    def _adopt_receiver_state(self, msg: TransferAcked, now: Monotonic) -> None:
        """Take the CH's SACK as the whole truth (answer to an Offer or a VERIFYING probe)."""
        self._acked.replace_with_sack(msg.base, msg.bitmap)
        self._flight.clear()
        self._flight_bytes = 0
        self._repair.clear()
        self._reorder_deadline = None
        self._probe_due = False
        self._lowest_unacked = self._acked.first_missing()
        self._next_new = self._lowest_unacked
        self._timer_start = None
        self._enter(SenderState.STREAMING)
        self._answered = True
        self._events.append(ProgressMade(self._image, self._acked.count, self._block_count))
        if self._acked.full():
            self._enter_verifying(now)

    def _enter(self, state: SenderState) -> None:
        """Change state along an edge of :data:`TRANSITIONS` (``IllegalTransitionError`` if not)."""
        self._state = checked(TRANSITIONS, "Sender", self._state, state)

    def _enter_verifying(self, now: Monotonic) -> None:
        self._enter(SenderState.VERIFYING)
        self._flight.clear()
        self._flight_bytes = 0
        self._repair.clear()
        self._reorder_deadline = None
        self._probe_due = False
        self._probed = False
        self._timer_start = now

    def _on_held(self, msg: ImageHeld, now: Monotonic) -> None:
        if msg.sha256 != self.manifest.sha256:
            self._fail(Reason.IMAGE_HASH, "the CH reported another digest", now, True)
            return
        if not self._acked.full():
            self._acked.replace_with_sack(self._block_count, b"")
            self._events.append(ProgressMade(self._image, self._block_count, self._block_count))
        self._stop()
        self._answered = True
        self._enter(SenderState.COMPLETE)
        self._events.append(TransferCompleted(self._image, msg.sha256))

    def _on_rejected(self, msg: TransferRejected, now: Monotonic) -> None:
        try:
            reason = Reason(msg.reason)
            detail = msg.detail
        except ValueError:
            reason, detail = Reason.INTERNAL, f"CH reason {msg.reason}: {msg.detail}"
        if reason is not Reason.NO_TRANSFER:
            self._fail(reason, detail, now)
            return
        if self._state is SenderState.OFFERING:
            return  # a late answer to a block sent before this offer
        self._timeouts += 1
        if self._timeouts > self._max_timeouts:
            self._fail(Reason.TIMED_OUT, "the CH keeps losing the transfer", now)
            return
        self._stop()
        self._enter(SenderState.OFFERING)
        self._offer_due = True
        self._ask_poll = False  # the CH lost the transfer: it needs the manifest
        self._offer_sent_at = None
        self._due_at = now

    # ------------------------------------------------------------------ ending

    def cancel(self, now: Monotonic, reason: Reason = Reason.CANCELLED) -> None:
        """Abandon the transfer (operator or campaign decision); a Cancel goes out next."""
        if self._state not in _TERMINAL:
            self._fail(reason, "cancelled by otad", now, True)

    def _stop(self) -> None:
        self._flight.clear()
        self._flight_bytes = 0
        self._repair.clear()
        self._reorder_deadline = None
        self._timer_start = None
        self._offer_due = False
        self._probe_due = False

    def _fail(self, reason: Reason, detail: str, now: Monotonic, cancel: bool = False) -> None:
        self._stop()
        self._enter(SenderState.FAILED)
        if cancel:
            self._cancel_reason = reason
            self._due_at = now
        self._events.append(TransferFailed(self._image, reason, detail))
