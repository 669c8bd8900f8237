"""The Sender state machine on its own: hand-made messages, virtual time, exact expectations."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType, Manifest
from protocol.wan.sack import Bitmap
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
from protocol.wire.messages import (
    Block,
    ImageHeld,
    Limits,
    TransferAcked,
    TransferRejected,
)

BLOCK = 64
COUNT = 40
LIMITS = Limits(max_block=BLOCK, window=16, buffer=64 * BLOCK)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    image = random.Random(0).randbytes(BLOCK * (COUNT - 1) + 10)  # short last block
    return Manifest.for_image(
        image,
        vendor=1,
        image_type=1,
        device_type=DeviceType.CH,
        hw_min=0,
        hw_max=9,
        fw_version=1,
        sequence=1,
        block_size=BLOCK,
        created=1,
        expires=2,
    )


def state(sender: Sender) -> SenderState:
    """The state, read through a call (so a type checker does not narrow it between steps)."""
    return sender.state


def sack(manifest: Manifest, held: set[int] | range, credit: int = 16) -> TransferAcked:
    bitmap = Bitmap(manifest.block_count)
    for index in held:
        bitmap.add(index)
    base, bits = bitmap.sack()
    return TransferAcked(image=manifest.sha256, base=base, bitmap=bits, credit=credit)


def blocks(actions: Sequence[object]) -> list[int]:
    return [a.index for a in actions if isinstance(a, SendBlock)]


def streaming(manifest: Manifest, **kw: object) -> Sender:
    """A sender whose Offer was answered at t=0.1 by an empty CH (RTT sample 0.1)."""
    sender = Sender(manifest, kw.pop("limits", LIMITS), now=0.0, **kw)  # type: ignore[arg-type]
    assert sender.next_actions(0.0, 100) == [SendOffer(manifest.sha256)]
    sender.message_received(sack(manifest, set()), 0.1)
    assert state(sender) is SenderState.STREAMING
    return sender


# --------------------------------------------------------------------------- offering


def test_offer_is_due_at_once_then_repeated_with_backoff_until_timed_out(
    manifest: Manifest,
) -> None:
    sender = Sender(manifest, LIMITS, now=5.0, max_timeouts=3)
    assert state(sender) is SenderState.OFFERING
    assert sender.next_deadline() == 5.0
    assert sender.next_actions(5.0, 100) == [SendOffer(manifest.sha256)]
    assert sender.next_actions(5.0, 100) == []
    now, deadlines = 5.0, []
    for _ in range(3):
        deadline = sender.next_deadline()
        assert deadline is not None
        sender.handle_timer(deadline - 0.001)  # not yet
        assert sender.next_actions(deadline - 0.001, 100) == []
        deadlines.append(deadline - now)
        now = deadline
        sender.handle_timer(now)
        assert sender.next_actions(now, 100) == [SendOffer(manifest.sha256)]
    assert deadlines == pytest.approx([1.0, 2.0, 4.0])  # initial RTO, doubled each time
    sender.handle_timer(now + 8.0)
    assert state(sender) is SenderState.FAILED
    # no Cancel: a timed-out CH keeps what it holds, for a later distribution (SPEC §7.7)
    assert sender.next_actions(now + 8.0, 100) == []
    assert sender.next_deadline() is None
    (failed,) = sender.events()
    assert isinstance(failed, TransferFailed)
    assert failed.reason is Reason.TIMED_OUT
    assert sender.offers_sent == 4


def test_answer_to_the_offer_starts_streaming_and_samples_the_rtt(manifest: Manifest) -> None:
    sender = streaming(manifest)
    assert sender.srtt == pytest.approx(0.1)
    assert sender.events() == [ProgressMade(manifest.sha256, 0, COUNT)]
    actions = sender.next_actions(0.1, 100)
    assert blocks(actions) == list(range(16))
    assert [a.ack_now for a in actions if isinstance(a, SendBlock)] == [False] * 15 + [True]
    assert sender.in_flight == 16
    assert sender.in_flight_bytes == 16 * BLOCK
    assert sender.next_actions(0.1, 100) == []  # window full


def test_image_already_held_completes_without_a_block(manifest: Manifest) -> None:
    sender = Sender(manifest, LIMITS, now=0.0)
    sender.next_actions(0.0, 1)
    sender.message_received(ImageHeld(image=manifest.sha256, sha256=manifest.sha256), 0.1)
    assert state(sender) is SenderState.COMPLETE
    assert sender.blocks_sent == 0
    assert sender.events()[-1] == TransferCompleted(manifest.sha256, manifest.sha256)
    assert sender.next_deadline() is None


# --------------------------------------------------------------------------- limits


def test_budget_is_respected_and_ack_now_only_marks_a_stall(manifest: Manifest) -> None:
    sender = streaming(manifest)
    first = sender.next_actions(0.1, 5)
    assert blocks(first) == [0, 1, 2, 3, 4]
    assert not any(a.ack_now for a in first if isinstance(a, SendBlock))  # more can follow
    assert sender.sendable() == 11
    assert blocks(sender.next_actions(0.1, 0)) == []
    rest = sender.next_actions(0.1, 100)
    assert blocks(rest) == list(range(5, 16))
    assert sender.sendable() == 0


def test_credit_from_the_ch_caps_the_window(manifest: Manifest) -> None:
    sender = Sender(manifest, LIMITS, now=0.0)
    sender.next_actions(0.0, 1)
    sender.message_received(sack(manifest, set(), credit=3), 0.1)
    assert blocks(sender.next_actions(0.1, 100)) == [0, 1, 2]
    assert sender.window == 3
    sender.message_received(sack(manifest, {0}, credit=3), 0.2)
    assert blocks(sender.next_actions(0.2, 100)) == [3]
    assert sender.in_flight == 3


def test_own_window_caps_below_the_ch_window(manifest: Manifest) -> None:
    sender = streaming(manifest, window=2)
    assert blocks(sender.next_actions(0.1, 100)) == [0, 1]
    sender.set_window(4)
    assert blocks(sender.next_actions(0.1, 100)) == [2, 3]
    sender.set_window(1000)
    assert sender.window == LIMITS.window


def test_buffer_bytes_cap_what_is_outstanding(manifest: Manifest) -> None:
    limits = Limits(max_block=BLOCK, window=16, buffer=2 * BLOCK + 10)
    sender = streaming(manifest, limits=limits)
    assert blocks(sender.next_actions(0.1, 100)) == [0, 1]
    held = set(range(COUNT - 3))
    sender.message_received(sack(manifest, held), 0.2)
    # the last block is 10 bytes: two full blocks and it fit exactly
    assert sorted(blocks(sender.next_actions(0.2, 100))) == [COUNT - 3, COUNT - 2, COUNT - 1]
    assert sender.in_flight_bytes == 2 * BLOCK + 10


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_block=BLOCK - 1, window=16, buffer=1 << 20),
        Limits(max_block=BLOCK, window=0, buffer=1 << 20),
        Limits(max_block=BLOCK, window=16, buffer=BLOCK - 1),
    ],
    ids=["max_block", "window", "buffer"],
)
def test_limits_it_cannot_meet_fail_the_transfer_at_once(
    manifest: Manifest, limits: Limits
) -> None:
    sender = Sender(manifest, limits, now=0.0)
    assert state(sender) is SenderState.FAILED
    (failed,) = sender.events()
    assert isinstance(failed, TransferFailed)
    assert failed.reason is Reason.LIMITS_EXCEEDED
    assert sender.next_actions(0.0, 100) == []  # no Offer, no Cancel: nothing was started


# --------------------------------------------------------------------------- repair


def test_hole_with_three_later_blocks_held_is_repaired_at_once(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    sender.message_received(sack(manifest, set(range(16)) - {5}), 0.2)
    actions = sender.next_actions(0.2, 100)
    assert blocks(actions)[0] == 5
    repair = actions[0]
    assert isinstance(repair, SendBlock)
    assert repair.retransmission
    assert sender.retransmissions == 1
    assert sender.in_flight == 16  # the repair still counts once


def test_reordering_is_given_time_before_a_repair(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    sender.message_received(sack(manifest, {0, 1, 2, 3, 4, 6, 7}), 0.2)  # 5 missing
    assert 5 not in blocks(sender.next_actions(0.2, 100))  # only two later blocks seen
    deadline = sender.next_deadline()
    assert deadline is not None
    assert 0.2 < deadline < 0.3  # the reordering window, well before the RTO
    sender.message_received(sack(manifest, set(range(8))), deadline - 0.001)  # 5 arrived late
    sender.handle_timer(deadline)
    assert sender.retransmissions == 0


def test_last_block_of_a_burst_is_repaired_by_the_reorder_timer(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)  # 0..15, ack_now on 15
    sender.message_received(sack(manifest, set(range(15))), 0.25)  # 15 lost, delayed SACK
    assert 15 not in blocks(sender.next_actions(0.25, 100))
    deadline = sender.next_deadline()
    assert deadline is not None
    assert deadline < 0.3
    sender.handle_timer(deadline)
    assert blocks(sender.next_actions(deadline, 100))[0] == 15


def test_rto_resends_one_block_backs_off_and_is_reset_by_progress(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    rto = sender.rto
    deadline = sender.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(0.1 + rto)
    sender.handle_timer(deadline)
    actions = sender.next_actions(deadline, 100)
    assert blocks(actions) == [15]  # the newest outstanding: a tail-loss probe
    assert sender.rto == pytest.approx(2 * rto)
    assert sender.rto_expiries == 1
    srtt = sender.srtt
    sender.message_received(sack(manifest, {15}), deadline + 0.1)  # only the repair: Karn
    assert sender.srtt == srtt
    assert sender.rto == pytest.approx(rto)  # progress drops the backoff
    assert sender.events()[-1] == ProgressMade(manifest.sha256, 1, COUNT)


def test_momentum_counts_only_timeouts_without_progress(manifest: Manifest) -> None:
    sender = streaming(manifest, max_timeouts=2)
    sender.next_actions(0.1, 100)
    now = 0.1
    for step in range(6):
        deadline = sender.next_deadline()
        assert deadline is not None
        now = deadline
        sender.handle_timer(now)
        sender.next_actions(now, 100)
        if step % 2 == 1:
            sender.message_received(sack(manifest, set(range(step + 1))), now + 0.01)
    assert state(sender) is SenderState.STREAMING
    for _ in range(3):
        deadline = sender.next_deadline()
        assert deadline is not None
        sender.handle_timer(deadline)
        sender.next_actions(deadline, 100)
    assert state(sender) is SenderState.FAILED


def test_repairs_starved_of_budget_still_probe_and_an_answering_ch_never_times_out(
    manifest: Manifest,
) -> None:
    """The scheduler may hold repairs back for as long as the budget binds. On each RTO the
    sender still sends one probe, unbudgeted; the CH's answer to it is progress, so no timeout
    accumulates however long the budget is withheld, while a CH that does not answer the
    probes times out exactly as if the budget were free."""
    sender = streaming(manifest, max_timeouts=2)
    sender.next_actions(0.1, 16)
    held = set(range(16)) - {3, 7}
    sender.message_received(sack(manifest, held), 0.2)
    now = 0.2
    for k in range(6):
        deadline = sender.next_deadline()
        assert deadline is not None
        now = deadline
        sender.handle_timer(now)
        probe = blocks(sender.next_actions(now, 0))  # the scheduler gives no budget
        assert len(probe) == 1, k
        held.add(probe[0])
        sender.message_received(sack(manifest, held), now + 0.05)
        assert state(sender) is SenderState.STREAMING, k
        assert sender.timeouts_without_progress == 0
        sender.next_actions(now + 0.05, 1)  # one new block: something is in flight again
    assert sender.rto_expiries == 6
    # now the CH goes silent: the unanswered probes count, budget or no budget
    while state(sender) is SenderState.STREAMING:
        deadline = sender.next_deadline()
        assert deadline is not None
        sender.handle_timer(deadline)
        sender.next_actions(deadline, 0)
    assert state(sender) is SenderState.FAILED
    assert sender.timeouts_without_progress == 3


def test_spurious_repair_is_detected(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    sender.message_received(sack(manifest, set(range(16)) - {5}), 0.2)
    assert blocks(sender.next_actions(0.2, 100))[0] == 5
    sender.message_received(sack(manifest, set(range(16))), 0.21)  # the first copy got there
    assert sender.spurious_repairs == 1


def test_zero_credit_pauses_then_probes(manifest: Manifest) -> None:
    sender = Sender(manifest, LIMITS, now=0.0)
    sender.next_actions(0.0, 1)
    sender.message_received(sack(manifest, set(), credit=0), 0.1)
    assert sender.next_actions(0.1, 100) == []
    deadline = sender.next_deadline()
    assert deadline is not None
    sender.handle_timer(deadline)
    probe = sender.next_actions(deadline, 100)
    assert [(a.index, a.ack_now) for a in probe if isinstance(a, SendBlock)] == [(0, True)]
    sender.message_received(sack(manifest, {0}, credit=4), deadline + 0.1)
    assert blocks(sender.next_actions(deadline + 0.1, 100)) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- completion


def finish_blocks(sender: Sender, manifest: Manifest, now: float) -> float:
    while state(sender) is SenderState.STREAMING:
        sender.next_actions(now, 100)
        now += 0.1
        sender.message_received(sack(manifest, range(min(COUNT, int(now * 100)))), now)
    return now


def test_verifying_probes_until_image_held(manifest: Manifest) -> None:
    sender = streaming(manifest)
    now = finish_blocks(sender, manifest, 0.1)
    assert state(sender) is SenderState.VERIFYING
    assert sender.next_actions(now, 100) == []
    deadline = sender.next_deadline()
    assert deadline is not None
    sender.handle_timer(deadline)
    probe = sender.next_actions(deadline, 0)  # a probe is not budgeted
    assert probe == [SendPoll(manifest.sha256)]  # answered with ImageHeld by a CH that holds it
    assert sender.sendable() == 0  # and it is no block
    sender.message_received(ImageHeld(image=manifest.sha256, sha256=manifest.sha256), deadline)
    assert state(sender) is SenderState.COMPLETE
    assert sender.events()[-1] == TransferCompleted(manifest.sha256, manifest.sha256)


def test_ch_that_lost_blocks_is_caught_by_the_verifying_probe(manifest: Manifest) -> None:
    sender = streaming(manifest)
    now = finish_blocks(sender, manifest, 0.1)
    forgot = sack(manifest, set(range(COUNT)) - {3, 30})
    sender.message_received(forgot, now)  # a stale SACK before any probe: ignored
    assert state(sender) is SenderState.VERIFYING
    deadline = sender.next_deadline()
    assert deadline is not None
    sender.handle_timer(deadline)
    sender.next_actions(deadline, 100)
    sender.message_received(forgot, deadline + 0.1)  # the answer to the probe
    assert state(sender) is SenderState.STREAMING
    assert sender.blocks_acked == COUNT - 2
    assert blocks(sender.next_actions(deadline + 0.1, 100)) == [3, 30]


def test_wrong_digest_in_image_held_fails_and_cancels(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.message_received(ImageHeld(image=manifest.sha256, sha256=b"\x00" * 32), 0.2)
    assert state(sender) is SenderState.FAILED
    assert sender.next_actions(0.2, 10) == [SendCancel(manifest.sha256, Reason.IMAGE_HASH)]
    assert isinstance(sender.events()[-1], TransferFailed)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (Reason.ROLLBACK, Reason.ROLLBACK),
        (Reason.STORAGE_FULL, Reason.STORAGE_FULL),
        (9999, Reason.INTERNAL),
    ],
)
def test_rejection_fails_with_the_ch_reason(manifest: Manifest, code: int, reason: Reason) -> None:
    sender = Sender(manifest, LIMITS, now=0.0)
    sender.next_actions(0.0, 1)
    rejected = TransferRejected(image=manifest.sha256, reason=code, detail="no")
    sender.message_received(rejected, 0.1)
    assert state(sender) is SenderState.FAILED
    (failed,) = sender.events()
    assert isinstance(failed, TransferFailed)
    assert failed.reason is reason
    assert sender.next_actions(0.1, 10) == []  # the CH refused: nothing to cancel


def test_no_transfer_from_the_ch_means_offer_again(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    lost = TransferRejected(image=manifest.sha256, reason=Reason.NO_TRANSFER, detail="")
    sender.message_received(lost, 0.2)
    assert state(sender) is SenderState.OFFERING
    assert sender.next_deadline() == 0.2
    assert sender.next_actions(0.2, 100) == [SendOffer(manifest.sha256)]
    sender.message_received(lost, 0.21)  # another block's late answer: ignored now
    assert state(sender) is SenderState.OFFERING
    sender.message_received(sack(manifest, set()), 0.3)
    assert state(sender) is SenderState.STREAMING


def test_cancel_sends_cancel_once(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.cancel(0.2)
    assert sender.next_actions(0.2, 10) == [SendCancel(manifest.sha256, Reason.CANCELLED)]
    sender.cancel(0.3)
    assert sender.next_actions(0.3, 10) == []


# --------------------------------------------------------------------------- resume and input


def test_resume_from_a_journal_then_take_the_ch_word(manifest: Manifest) -> None:
    journal = Bitmap(COUNT)
    for index in range(20):
        journal.add(index)
    sender = Sender(manifest, LIMITS, now=0.0, acked=journal.to_bytes())
    assert sender.blocks_acked == 20
    sender.next_actions(0.0, 1)
    sender.message_received(sack(manifest, set(range(24))), 0.1)
    assert sender.blocks_acked == 24
    assert blocks(sender.next_actions(0.1, 100)) == list(range(24, 40))
    assert Bitmap.from_bytes(sender.acked_bitmap(), COUNT).count == 24


@pytest.mark.parametrize("bad", [b"", b"\xff" * 4, b"\xff" * 6], ids=repr)
def test_journal_that_does_not_fit_is_refused(manifest: Manifest, bad: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        Sender(manifest, LIMITS, now=0.0, acked=bad)
    assert info.value.reason is Reason.MALFORMED


def test_duplicate_sacks_give_no_duplicate_progress(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.events()
    sender.next_actions(0.1, 100)
    for _ in range(3):
        sender.message_received(sack(manifest, set(range(8))), 0.2)
    assert sender.events() == [ProgressMade(manifest.sha256, 8, COUNT)]


def test_unusable_messages_raise_and_change_nothing(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.next_actions(0.1, 100)
    before = (sender.state, sender.acked_bitmap(), sender.in_flight, sender.next_deadline())
    other = b"\x01" * 32
    cases = [
        (TransferAcked(image=other, base=3, bitmap=b"", credit=1), Reason.WRONG_IMAGE),
        (
            TransferAcked(image=manifest.sha256, base=COUNT + 1, bitmap=b"", credit=1),
            Reason.MALFORMED,
        ),
        (
            TransferAcked(image=manifest.sha256, base=30, bitmap=b"\x00\x02", credit=1),
            Reason.MALFORMED,
        ),  # names block 40 of 40
        (ImageHeld(image=other, sha256=other), Reason.WRONG_IMAGE),
        (Block(image=manifest.sha256, index=0, data=b""), Reason.UNKNOWN_TYPE),
    ]
    for message, reason in cases:
        with pytest.raises(ProtocolError) as info:
            sender.message_received(message, 0.2)
        assert info.value.reason is reason
    assert (sender.state, sender.acked_bitmap(), sender.in_flight, sender.next_deadline()) == (
        before
    )
    # the highest valid bit is accepted
    sender.message_received(
        TransferAcked(image=manifest.sha256, base=30, bitmap=b"\x00\x01", credit=16), 0.2
    )
    assert sender.blocks_acked == 31


def test_messages_after_the_end_are_ignored(manifest: Manifest) -> None:
    sender = streaming(manifest)
    sender.cancel(0.2)
    sender.message_received(sack(manifest, set(range(10))), 0.3)
    sender.message_received(ImageHeld(image=manifest.sha256, sha256=manifest.sha256), 0.3)
    assert state(sender) is SenderState.FAILED
    assert sender.blocks_acked == 0


@pytest.mark.parametrize("seed", range(20))
def test_nothing_unbudgeted_due_means_a_zero_budget_sends_nothing(
    manifest: Manifest, seed: int
) -> None:
    """``unbudgeted_due`` False is a promise the shell relies on to skip ``next_actions(now, 0)``:
    checked on random walks through every state (losses, timeouts, rejections, a cancel)."""
    rng = random.Random(seed)
    sender = Sender(manifest, LIMITS, now=0.0, max_timeouts=30)
    held: set[int] = set()
    now = 0.0
    for _ in range(300):
        now += rng.choice((0.001, 0.05, 0.3, 2.0))
        if not sender.unbudgeted_due:
            assert sender.next_actions(now, 0) == []
        roll = rng.random()
        if roll < 0.4:
            sent = blocks(sender.next_actions(now, rng.choice((0, 1, 4, 16))))
            held |= {i for i in sent if rng.random() < 0.8}
        elif roll < 0.75:
            sender.message_received(sack(manifest, held, credit=rng.choice((0, 4, 16))), now)
        elif roll < 0.9:
            sender.handle_timer(now)
        elif roll < 0.95:
            sender.message_received(
                TransferRejected(image=manifest.sha256, reason=int(Reason.NO_TRANSFER), detail=""),
                now,
            )
            held.clear()
        elif roll < 0.96:
            sender.cancel(now)
        if state(sender) in (SenderState.COMPLETE, SenderState.FAILED) and not (
            sender.unbudgeted_due
        ):
            assert sender.next_actions(now, 0) == []
            break
