"""The scheduler's shared limits, with scripted transfers on a real event loop (no MQTT)."""

from __future__ import annotations

import asyncio

import pytest

from otad.scheduler import Scheduler, TokenBucket


class Scripted:
    """A transfer whose sender always wants ``window`` blocks in flight; acks are scripted."""

    def __init__(self, name: str, window: int, bucket: TokenBucket | None = None) -> None:
        self.name = name
        self.window = window
        self.flight = 0
        self.sent = 0
        self.runnable = True
        self.waiting = False
        self.inflight_seen = 0
        self.bucket = bucket
        self.log: list[tuple[str, int]] = []

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        room = self.window - self.flight
        n = max(0, min(room, budget))
        self.flight += n
        self.sent += n
        if n:
            self.log.append((self.name, n))
        return n, (room - n if n >= budget else 0)

    def in_flight(self) -> int:
        return self.flight

    def ack(self, n: int) -> None:
        self.flight -= n


async def test_global_budget_is_never_exceeded_and_freed_budget_is_shared_in_turn() -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(loop, global_inflight=10)
    transfers = [Scripted(f"t{i}", window=8) for i in range(4)]
    for t in transfers:
        scheduler.pump(t, loop.time())
        assert scheduler.inflight <= 10
    assert [t.flight for t in transfers] == [8, 2, 0, 0]
    assert scheduler.inflight == 10
    assert scheduler.waiting == 3  # t1 (still wants 6), t2, t3
    # t0 is acknowledged: the freed budget goes to the ones waiting, in order, before t0
    transfers[0].ack(4)
    scheduler.account(transfers[0])
    scheduler.pump(transfers[0], loop.time())
    assert scheduler.inflight == 10
    assert [t.flight for t in transfers] == [4, 6, 0, 0]
    transfers[1].ack(6)
    scheduler.account(transfers[1])
    scheduler.pump(transfers[1], loop.time())
    assert [t.flight for t in transfers] == [4, 0, 6, 0]
    assert scheduler.inflight == 10


async def test_a_stopped_transfer_gives_its_budget_back() -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(loop, global_inflight=8)
    a, b = Scripted("a", 8), Scripted("b", 8)
    scheduler.pump(a, loop.time())
    scheduler.pump(b, loop.time())
    assert (a.flight, b.flight, scheduler.inflight) == (8, 0, 8)
    a.runnable = False
    scheduler.release(a)  # suspended (its CH went offline)
    assert scheduler.inflight == 0
    scheduler.serve(loop.time())
    assert b.flight == 8


async def test_segment_rate_cap_paces_blocks_and_wakes_waiters() -> None:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(loop, global_inflight=10_000, segment_rate=200.0, segment_burst=10)
    bucket = scheduler.bucket_for("cell-0")
    assert bucket is not None
    assert scheduler.bucket_for("cell-0") is bucket
    t = Scripted("t", window=1000, bucket=bucket)
    start = loop.time()
    scheduler.pump(t, start)
    assert t.sent == 10  # the burst
    # keep acknowledging everything: only the rate limits it now
    while loop.time() - start < 0.5:
        t.ack(t.flight)
        scheduler.account(t)
        await asyncio.sleep(0.01)
    elapsed = loop.time() - start
    assert t.sent <= 10 + 200 * elapsed + 3
    assert t.sent >= 200 * 0.5 * 0.6  # and it does keep going


def test_token_bucket_refills_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=5.0, now=0.0)
    assert bucket.available(0.0) == 5
    bucket.spend(5)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.02) == 2
    assert bucket.available(10.0) == 5
    bucket.spend(7)
    assert bucket.available(10.0) == 0
    assert bucket.time_for(1) == pytest.approx(0.03)
