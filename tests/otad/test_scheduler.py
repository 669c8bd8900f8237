"""The scheduler: admission, the global budget and segment caps, on virtual time.

Two kinds of test. Scripted transfers check the rules one step at a time. The fleet simulator
(``fleetsim``: real Senders, real Receivers, one FIFO broker) checks what they add up to, well
past every limit: a budget far below CHs x window, CHs that stop answering, segment caps, storms
of asks.
"""

from __future__ import annotations

import math

import pytest
from fleetsim import Fleet
from simlink import make_release

from otad.scheduler import (
    TRANSITIONS,
    IllegalTransitionError,
    Scheduler,
    Slot,
    SlotState,
    TokenBucket,
)


class Scripted:
    """A transfer whose sender always wants ``window`` blocks in flight; acks are scripted."""

    def __init__(self, scheduler: Scheduler, name: str, window: int, segment: str = "") -> None:
        self.name = name
        self.window = window
        self.flight = 0
        self.sent = 0
        self.asking = 0  # bytes of an unanswered ask
        self.log: list[tuple[str, int]] = []
        self.slot: Slot = scheduler.attach(self, segment)

    def send_now(self, now: float, budget: int) -> tuple[int, int]:
        room = self.window - self.flight
        n = max(0, min(room, budget))
        self.flight += n
        self.sent += n
        if n:
            self.log.append((self.name, n))
        return n, room - n

    def budget_charge(self) -> int:
        return self.flight

    def handshake_charge(self) -> int:
        return self.asking

    def answered(self) -> bool:
        return True

    def spurious_repairs(self) -> int:
        return self.spurious

    spurious = 0  # repairs acknowledged sooner than a round trip (scripted)

    def ack(self, n: int) -> None:
        self.flight -= n


def running(scheduler: Scheduler) -> Scheduler:
    scheduler.resume(0.0)
    return scheduler


# ----------------------------------------------------------------------------- the rules


def test_global_budget_is_never_exceeded_and_freed_budget_is_shared_in_turn() -> None:
    scheduler = running(Scheduler(global_inflight=10))
    transfers = [Scripted(scheduler, f"t{i}", window=8) for i in range(4)]
    for t in transfers:
        scheduler.start(t.slot, 0.0)
        assert scheduler.inflight <= 10
    assert [t.flight for t in transfers] == [8, 2, 0, 0]
    assert scheduler.inflight == 10
    assert scheduler.count(SlotState.QUEUED) == 3  # t1 (still wants 6), t2, t3
    # t0 is acknowledged: the freed budget goes to the ones waiting, in order, before t0
    transfers[0].ack(4)
    scheduler.changed(transfers[0].slot, 0.1)
    assert scheduler.inflight == 10
    assert [t.flight for t in transfers] == [4, 6, 0, 0]
    transfers[1].ack(6)
    scheduler.changed(transfers[1].slot, 0.2)
    assert [t.flight for t in transfers] == [4, 0, 6, 0]
    assert scheduler.inflight == 10


def test_an_acknowledgement_is_counted_even_when_every_transfer_waits() -> None:
    """The deadlock of the first scheduler: every transfer queued, acks arriving for all of
    them. Each ack must free budget at once and the queue must move."""
    scheduler = running(Scheduler(global_inflight=16))
    transfers = [Scripted(scheduler, f"t{i}", window=8) for i in range(6)]
    for t in transfers:
        scheduler.start(t.slot, 0.0)
    assert scheduler.inflight == 16
    for round_ in range(1, 40):
        for t in transfers:
            if t.flight:
                t.ack(t.flight)
                scheduler.changed(t.slot, round_)
        assert scheduler.inflight == sum(t.flight for t in transfers) <= 16
    assert all(t.sent >= 8 * 6 for t in transfers)  # everyone kept getting turns


def test_the_budget_is_cut_by_a_share_of_spurious_repairs_not_by_one() -> None:
    # thousands of transfers: one late block somewhere every second is jitter, not a queue
    scheduler = running(Scheduler(global_inflight=4096))
    transfers = [Scripted(scheduler, f"t{i}", window=8) for i in range(500)]
    for t in transfers:
        scheduler.start(t.slot, 0.0)
    now = 0.0
    for second in range(1, 11):  # 10 s: every transfer acked 10 times a second, 1 spurious
        for _ in range(10):
            now += 0.1
            for t in transfers:
                t.ack(t.flight)
                scheduler.changed(t.slot, now)
        transfers[second].spurious += 1
        scheduler.changed(transfers[second].slot, now)
    assert scheduler.budget_cuts == 0
    assert scheduler.budget == 4096
    # a queue: repairs of one block in fifty turn out spurious -- the budget comes down
    for _ in range(3):
        now += 1.1
        for t in transfers:
            t.ack(t.flight)
            scheduler.changed(t.slot, now)
        for t in transfers[:100]:
            t.spurious += 1
            scheduler.changed(t.slot, now)
    assert scheduler.budget_cuts >= 2
    assert scheduler.budget < 4096 * 0.75


def test_a_stopped_transfer_gives_its_budget_back() -> None:
    scheduler = running(Scheduler(global_inflight=8))
    a, b = Scripted(scheduler, "a", 8), Scripted(scheduler, "b", 8)
    scheduler.start(a.slot, 0.0)
    scheduler.start(b.slot, 0.0)
    assert (a.flight, b.flight, scheduler.inflight) == (8, 0, 8)
    scheduler.stop(a.slot, 0.1)  # suspended (its CH went offline)
    assert scheduler.inflight == 0 + b.flight
    assert b.flight == 8


def test_asks_wait_for_admission_and_are_admitted_as_answers_come() -> None:
    scheduler = running(Scheduler(global_inflight=1000, max_handshakes=2))
    transfers = [Scripted(scheduler, f"t{i}", window=0) for i in range(5)]

    asked: set[str] = set()

    def ask(t: Scripted, now: float, budget: int) -> tuple[int, int]:
        if t.name not in asked:  # the Offer goes out once, when admitted
            asked.add(t.name)
            t.asking = 100
        return 0, 0

    for t in transfers:
        t.send_now = lambda now, budget, t=t: ask(t, now, budget)  # type: ignore[method-assign]
        scheduler.start(t.slot, 0.0)
    assert [t.slot.state for t in transfers] == [SlotState.RUNNING] * 2 + [SlotState.PENDING] * 3
    assert scheduler.handshakes == 2
    transfers[0].asking = 0  # answered
    scheduler.changed(transfers[0].slot, 0.1)
    assert transfers[2].slot.state is SlotState.RUNNING
    assert scheduler.handshakes == 2
    assert scheduler.max_wait == pytest.approx(0.1)


def test_handshake_bytes_bound_admission_but_never_block_a_single_ask() -> None:
    scheduler = running(Scheduler(global_inflight=1000, handshake_bytes=150))
    transfers = [Scripted(scheduler, f"t{i}", window=0) for i in range(3)]
    for t in transfers:
        t.send_now = lambda now, budget, t=t: (setattr(t, "asking", 400), (0, 0))[1]  # type: ignore[method-assign]
        scheduler.start(t.slot, 0.0)
    # one ask larger than the byte limit still goes out alone; the others wait
    assert [t.slot.state for t in transfers] == [
        SlotState.RUNNING,
        SlotState.PENDING,
        SlotState.PENDING,
    ]


def test_segment_rate_cap_paces_blocks_and_wakes_waiters() -> None:
    scheduler = running(Scheduler(global_inflight=10_000, segment_rate=200.0, segment_burst=10))
    bucket = scheduler.bucket_for("cell-0")
    assert bucket is not None
    assert scheduler.bucket_for("cell-0") is bucket
    t = Scripted(scheduler, "t", window=1000, segment="cell-0")
    scheduler.start(t.slot, 0.0)
    assert t.sent == 10  # the burst
    assert t.slot.state is SlotState.THROTTLED
    # keep acknowledging everything; run the scheduler's timer when it is due: only the rate
    # limits the transfer now
    now = 0.0
    while now < 0.5:
        now = round(now + 0.01, 6)
        deadline = scheduler.next_deadline()
        if deadline is not None and deadline <= now:
            scheduler.handle_timer(now)
        t.ack(t.flight)
        scheduler.changed(t.slot, now)
        assert scheduler.next_deadline() is not None or t.slot.state is SlotState.RUNNING
    assert t.sent <= 10 + 200 * now + 3
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


def test_an_illegal_slot_transition_raises_at_once() -> None:
    scheduler = Scheduler(global_inflight=8)
    slot = Scripted(scheduler, "t", 8).slot
    for source, targets in TRANSITIONS.items():
        for target in SlotState:
            slot.state = source
            if target in targets:
                slot.enter(target, 0.0)
            else:
                with pytest.raises(IllegalTransitionError):
                    slot.enter(target, 0.0)


# ----------------------------------------------------------------------------- the fleet


@pytest.fixture(scope="module")
def release_16k():  # type: ignore[no-untyped-def]
    return make_release(size=16 * 1024, block_size=1024, seed=3)


@pytest.mark.slow
def test_2000_chs_under_a_budget_32_times_too_small_all_complete_taking_turns(
    release_16k,  # type: ignore[no-untyped-def]
) -> None:
    """2,000 CHs x window 8 = 16,000 blocks wanted at once, budget 512: every CH completes, the
    budget is never exceeded (beyond the one unbudgeted probe a timed-out transfer may send),
    and no CH waits longer than about one full round of turns."""
    fleet = Fleet(release_16k, count=2000, budget=512, loss=0.01, seed=7)
    fleet.start()
    fleet.run(until=600)
    duration = max(t.done_at or 0 for t in fleet.transfers)
    blocks_per_s = fleet.blocks_sent / duration
    # a full round of turns: every CH's window once, at the rate the budget lets through
    round_of_turns = fleet.count * fleet.window / blocks_per_s
    probes = sum(t.sender.rto_expiries for t in fleet.transfers)
    print(
        f"\n2000 CHs, budget 512: {duration:.1f} virtual s, {blocks_per_s:,.0f} blocks/s, "
        f"longest wait {fleet.scheduler.max_wait:.2f} s (a round of turns: "
        f"{round_of_turns:.2f} s), peak in flight {fleet.peak_inflight}, sends/block "
        f"{fleet.blocks_sent / (fleet.count * release_16k.manifest.block_count):.3f}, "
        f"RTO expiries {probes}"
    )
    assert fleet.completed == fleet.count
    assert fleet.spins == 0
    assert fleet.scheduler.inflight == 0
    assert fleet.scheduler.max_wait <= 1.5 * round_of_turns
    assert fleet.peak_inflight <= 512 + probes
    assert fleet.blocks_sent / (fleet.count * release_16k.manifest.block_count) < 1.05


def test_a_ch_that_stops_acknowledging_gives_its_budget_back(
    release_16k,  # type: ignore[no-untyped-def]
) -> None:
    """Budget 64 for 20 CHs of window 8. The moment the budget is all taken, every CH holding
    some of it hangs (connection up, no answers). After three timeouts each holds only its
    probe, so the others get the budget and finish long before the hung ones time out."""
    fleet = Fleet(release_16k, count=20, budget=64, seed=2)
    fleet.start()
    while fleet.scheduler.inflight < 64 and fleet.step():
        pass
    hung = [t for t in fleet.transfers if t.slot.charged]
    for t in hung:
        t.hub.silent = True
    live = [t for t in fleet.transfers if t not in hung]
    assert len(hung) >= 4
    assert live
    fleet.run(until=3600)
    assert all(t.done_at is not None for t in live)
    assert all(t.failed == "TIMED_OUT" for t in hung)
    last_live = max(t.done_at or 0 for t in live)
    # the live ones were done within seconds; the hung ones took minutes of backed-off RTOs
    assert last_live < 10.0
    assert all(t.sender.rto_expiries > 8 for t in hung)
    assert fleet.scheduler.inflight == 0


def test_give_back_happens_after_three_timeouts_not_one(
    release_16k,  # type: ignore[no-untyped-def]
) -> None:
    """A timeout or two may be queueing, not a dead CH: the charge stays what is in flight;
    from the third timeout in a row it is the one probe."""
    fleet = Fleet(release_16k, count=2, budget=64, seed=2)
    fleet.start()
    t = fleet.transfers[0]
    while t.slot.charged < 8 and fleet.step():
        pass
    t.hub.silent = True
    seen = set()
    while t.failed is None and fleet.step():
        timeouts = t.sender.timeouts_without_progress
        seen.add(timeouts)
        if timeouts < 3:
            assert t.slot.charged == t.sender.in_flight
        else:
            assert t.slot.charged == min(1, t.sender.in_flight)
    assert {0, 1, 2, 3} <= seen
    assert t.failed == "TIMED_OUT"


@pytest.mark.slow
def test_segment_caps_bind_under_a_binding_budget_and_every_ch_completes(
    release_16k,  # type: ignore[no-untyped-def]
) -> None:
    """400 CHs over 4 segments capped at 1,500 blocks/s each, under a budget of 128: the caps
    hold (per tenth of a second, within one burst), no wake-up is lost, everyone completes."""
    fleet = Fleet(release_16k, count=400, budget=128, segment_rate=1500.0, seed=5)
    fleet.start()
    fleet.run(until=600)
    assert fleet.completed == fleet.count
    assert fleet.spins == 0
    burst = fleet.scheduler.segment_burst
    assert max(fleet.per_segment_blocks.values()) <= 1500 * 0.1 + burst + 8
    duration = max(t.done_at or 0 for t in fleet.transfers)
    total = fleet.count * release_16k.manifest.block_count
    # four segments at 1,500/s each: the caps, not the budget, set the pace
    assert duration >= total / (4 * 1500) * 0.9


def test_a_start_up_rush_is_admitted_in_turn_and_asks_never_wait_behind_blocks(
    release_16k,  # type: ignore[no-untyped-def]
) -> None:
    """1,000 transfers start at once with at most 32 asks unanswered: never more than 32 Offers
    outstanding, every transfer admitted, every Offer answered (no Offer ever times out, so the
    first round trips stay below the initial RTO), and a CH that reconnects while hundreds of
    others wait for block budget gets its Poll out at once: asks never queue behind blocks."""
    fleet = Fleet(release_16k, count=1000, budget=256, max_handshakes=32, seed=11)
    fleet.start()
    while (fleet.scheduler.count(SlotState.PENDING) or fleet.scheduler.handshakes) and fleet.step():
        assert fleet.peak_handshakes <= 32
    assert fleet.scheduler.count(SlotState.QUEUED) > 200
    answered = next(t for t in fleet.transfers if t.sender.answered and t.done_at is None)
    polls = answered.polls
    fleet.resync(answered)  # it reconnected
    assert answered.polls == polls + 1  # out at once: no wait behind the budget queue
    fleet.run(until=600)
    assert fleet.completed == fleet.count
    assert fleet.peak_handshakes <= 32
    assert all(t.offers == 1 for t in fleet.transfers)  # not one Offer repeated by an RTO
    assert fleet.spins == 0


@pytest.mark.parametrize("budget", [1, 7, 63])
def test_tiny_budgets_still_complete(release_16k, budget: int) -> None:  # type: ignore[no-untyped-def]
    fleet = Fleet(release_16k, count=50, budget=budget, seed=budget)
    fleet.start()
    fleet.run(until=3600)
    assert fleet.completed == 50
    assert fleet.spins == 0
    assert math.isclose(fleet.scheduler.inflight, 0)


def test_a_bucket_a_hair_short_of_a_token_wakes_later_not_in_a_loop() -> None:
    """Late in a long uptime (loop time ~1e6 s) a float a hair below one token must not make
    the bucket's wake-up equal to "now" (that looped for ever inside one timer callback)."""
    scheduler = running(Scheduler(global_inflight=1000, segment_rate=100.0, segment_burst=8))
    now = 1_000_000.0
    t = Scripted(scheduler, "t", window=1000, segment="cell-0")
    scheduler.start(t.slot, now)
    assert t.slot.state is SlotState.THROTTLED
    bucket = scheduler.bucket_for("cell-0")
    assert bucket is not None
    for _ in range(100):
        deadline = scheduler.next_deadline()
        assert deadline is not None
        assert deadline > now
        now = deadline
        bucket.available(now)
        bucket.tokens = 1.0 - 1e-13  # the worst case of the refill arithmetic
        scheduler.handle_timer(now)
