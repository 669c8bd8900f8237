"""Who may send how many blocks, now: the global in-flight budget and per-segment rate caps.

Theory of operation
-------------------

Each (CH, image) transfer has its own :class:`~protocol.sender.Sender`, which already keeps the
CH's window, credit and buffer. Above the senders, the scheduler shares two resources:

* a **global in-flight budget**: blocks sent and not yet acknowledged, summed over every
  transfer, never above ``global_inflight`` (it bounds the broker's queues and otad's socket
  buffers whatever the fleet size). The sum is kept incrementally: after every call into a
  sender the shell calls :meth:`Scheduler.account`, which adds the change of that sender's
  ``in_flight``;
* a **per-segment rate cap**: a token bucket per network segment (the shared cell a CH declared
  in its announcement), ``segment_rate`` blocks per second with a burst of a tenth of a second
  (at least one window). Retransmissions spend tokens too: they use the same air.

:meth:`Scheduler.pump` asks one sender for at most ``min(free budget, segment tokens)`` blocks.
When a limit of the scheduler (not the sender's own window) stopped it, the transfer waits in a
FIFO: the global queue is served as acknowledgements free budget, a segment's queue when its
bucket has refilled (one ``loop.call_at`` per segment, never per block). While anything waits
for the global budget, a transfer whose acknowledgement just freed budget goes to the back of
the queue instead of spending it at once, so the budget is shared fairly.

Nothing here allocates per block: no tasks, no futures, no timers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Protocol


class Schedulable(Protocol):
    """What the scheduler needs from a transfer (see :class:`otad.distribution.Transfer`)."""

    runnable: bool
    waiting: bool
    inflight_seen: int
    bucket: TokenBucket | None

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        """Ask the sender for at most ``budget`` blocks and publish them; return (blocks
        published, blocks still sendable if budget allowed)."""
        ...

    def in_flight(self) -> int:
        """The sender's blocks in flight."""
        ...


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``."""

    __slots__ = ("_wake_at", "burst", "rate", "stamp", "tokens", "waiters")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        """Start full."""
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.waiters: collections.deque[Schedulable] = collections.deque()
        self._wake_at: float | None = None

    def available(self, now: float) -> int:
        """Whole tokens available at ``now`` (refilling first)."""
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


class Scheduler:
    """The global in-flight budget and the segments' token buckets (see the module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        global_inflight: int,
        segment_rate: float = 0.0,
        segment_burst: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``segment_rate`` 0 means no rate cap; ``segment_burst`` defaults to a tenth of a
        second of ``segment_rate`` (at least 8 blocks)."""
        if global_inflight < 1:
            raise ValueError("global_inflight must be >= 1")
        self._loop = loop
        self._clock = clock or loop.time
        self.limit = global_inflight
        self.inflight = 0
        self.segment_rate = segment_rate
        self.segment_burst = (
            segment_burst if segment_burst is not None else max(8.0, segment_rate / 10.0)
        )
        self._buckets: dict[str, TokenBucket] = {}
        self._waiters: collections.deque[Schedulable] = collections.deque()
        self.paused = False
        self.blocks_published = 0

    # ------------------------------------------------------------------ segments

    def bucket_for(self, segment: str) -> TokenBucket | None:
        """The token bucket of ``segment`` (None when no rate cap is configured)."""
        if self.segment_rate <= 0:
            return None
        bucket = self._buckets.get(segment)
        if bucket is None:
            bucket = TokenBucket(self.segment_rate, self.segment_burst, self._clock())
            self._buckets[segment] = bucket
        return bucket

    # ------------------------------------------------------------------ accounting

    def account(self, t: Schedulable) -> None:
        """Fold the change of ``t``'s sender's in-flight count into the global sum."""
        now_inflight = t.in_flight()
        delta = now_inflight - t.inflight_seen
        if delta:
            self.inflight += delta
            t.inflight_seen = now_inflight

    def release(self, t: Schedulable) -> None:
        """``t`` stopped (finished, suspended, replaced): its blocks no longer count."""
        self.inflight -= t.inflight_seen
        t.inflight_seen = 0

    # ------------------------------------------------------------------ sending

    def pump(self, t: Schedulable, now: float) -> None:
        """Let ``t`` send what its sender and the shared limits allow now."""
        if self.paused or not t.runnable:
            return
        if self._waiters:
            # Others wait for budget: queue behind them (or keep the place already held),
            # then serve the queue in order.
            if not t.waiting:
                t.waiting = True
                self._waiters.append(t)
            self.serve(now)
            return
        self._pump_one(t, now)

    def _pump_one(self, t: Schedulable, now: float) -> bool:
        """Pump ``t``; return False if the global budget is exhausted."""
        free = self.limit - self.inflight
        budget = free if free > 0 else 0
        bucket = t.bucket
        limited_by_bucket = False
        if bucket is not None:
            tokens = bucket.available(now)
            if tokens < budget:
                budget = tokens
                limited_by_bucket = True
        sent, more = t.send_now(now, budget)
        self.blocks_published += sent
        if bucket is not None and sent:
            bucket.spend(sent)
        self.account(t)
        if more > 0 and sent >= budget:
            if limited_by_bucket and bucket is not None:
                self._wait_for_bucket(t, bucket, now)
            elif not t.waiting:
                t.waiting = True
                self._waiters.append(t)
            return False
        return True

    def serve(self, now: float) -> None:
        """Serve the global queue while budget is free (call after acks freed some)."""
        if self.paused:
            return
        waiters = self._waiters
        while waiters and self.inflight < self.limit:
            t = waiters.popleft()
            t.waiting = False
            # a transfer that still wants more is re-queued at the back by _pump_one
            if t.runnable and not self._pump_one(t, now) and self.inflight >= self.limit:
                break

    def _wait_for_bucket(self, t: Schedulable, bucket: TokenBucket, now: float) -> None:
        if not t.waiting:
            t.waiting = True
            bucket.waiters.append(t)
        self._rearm(bucket, now)

    def _bucket_refilled(self, bucket: TokenBucket) -> None:
        bucket._wake_at = None
        now = self._clock()
        waiters = bucket.waiters
        while waiters:
            if self.paused:
                return
            if bucket.available(now) < 1:
                self._rearm(bucket, now)
                return
            if self.inflight >= self.limit:
                # global budget is the binding limit now: move them to the global queue
                while waiters:
                    t = waiters.popleft()
                    self._waiters.append(t)
                return
            t = waiters.popleft()
            t.waiting = False
            if t.runnable:
                self._pump_one(t, now)

    def _rearm(self, bucket: TokenBucket, now: float) -> None:
        if bucket._wake_at is None:
            # wait for a batch of tokens, not one: fewer wake-ups at high rates
            need = max(1.0, min(bucket.burst, bucket.rate * 0.01))
            at = now + bucket.time_for(need)
            bucket._wake_at = at
            self._loop.call_at(at, self._bucket_refilled, bucket)

    def resume_all(self, now: float) -> None:
        """After a pause: serve the global queue and wake every segment's waiters."""
        self.paused = False
        self.serve(now)
        for bucket in self._buckets.values():
            if bucket.waiters and bucket._wake_at is None:
                self._rearm(bucket, now)

    @property
    def queued(self) -> bool:
        """Whether any transfer waits for the global budget (cheap: the hot path asks)."""
        return bool(self._waiters)

    @property
    def waiting(self) -> int:
        """Transfers waiting for budget or tokens."""
        return len(self._waiters) + sum(len(b.waiters) for b in self._buckets.values())
