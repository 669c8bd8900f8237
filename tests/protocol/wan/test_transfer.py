"""End-to-end WAN transfers: a real Sender and Receiver over a seeded, impaired virtual-time link.

Every message is encoded, carried as bytes and strictly decoded; manifests are signed with COSE
and verified through a trust store before any block is accepted. Figures are printed (run with
``-s`` to see them) and asserted.
"""

from __future__ import annotations

import statistics

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from simlink import DOWN, UP, Path, Release, TransferRun, make_release, signing_key

from protocol.errors import Reason
from protocol.release import trust
from protocol.wan.receiver import Receiver, TransferPhase
from protocol.wan.sender import SenderState, TransferCompleted, TransferFailed
from protocol.wire.messages import Block, Cancel, ImageHeld, Limits, Poll, decode

IMAGE_SIZE = 256 * 1024
BLOCKS = 256
RTT = 0.1  # two 50 ms one-way paths


@pytest.fixture(scope="module")
def release() -> Release:
    return make_release(IMAGE_SIZE, 1024)


def impaired(loss: float) -> Path:
    return Path(latency=0.05, jitter=0.01, loss=loss, duplicate=0.02, reorder=0.02)


def assert_delivered(run: TransferRun) -> None:
    """The transfer completed and the CH holds exactly the image, and nothing else went wrong."""
    image = run.release.manifest.sha256
    assert run.sender.state is SenderState.COMPLETE
    assert run.events[-1] == TransferCompleted(image, image)
    assert run.hub.assembled(image) == run.release.image
    assert run.hub.receiver.phase(image) is TransferPhase.HELD
    assert run.hub.corrupt_writes == 0
    assert run.sender.blocks_acked == run.sender.blocks_total
    assert run.sender_errors == 0
    assert run.hub.decode_errors == 0


# --------------------------------------------------------------------------- 1. loss


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.20])
def test_image_crosses_intact_under_loss_duplication_and_reordering(
    release: Release, loss: float
) -> None:
    for seed in (1, 2, 3):
        run = TransferRun(release, seed=seed, down=impaired(loss), up=impaired(loss)).run()
        assert_delivered(run)
        assert run.hub.rewrites == 0  # no block was ever stored twice
        assert not run.hub.receiver.rejected  # no bad block, no window overrun
        down, up = run.link.stats[DOWN], run.link.stats[UP]
        assert down.duplicated > 0
        assert up.duplicated > 0
        if loss:
            assert down.lost > 0
            assert up.lost > 0  # acknowledgements were lost too
            assert run.sender.retransmissions >= down.lost - run.sender.blocks_total // 10
        print(
            f"loss {loss:.0%} seed {seed}: {run.sends_per_block:.3f} sends/block, "
            f"{run.now:.2f} s, {run.hub.receiver.acks_sent} acks, "
            f"{run.sender.rto_expiries} RTOs, {run.sender.spurious_repairs} spurious repairs"
        )


# --------------------------------------------------------------------------- 2. efficiency


def streaming_time(run: TransferRun) -> float:
    """From the first block sent to completion (leaves out the one Offer round trip)."""
    return run.now - run.sends[0].at


def test_sends_per_block_at_five_percent_loss(release: Release) -> None:
    seeds = range(10)
    lossless = [TransferRun(release, seed=s, down=impaired(0), up=impaired(0)).run() for s in seeds]
    lossy = [
        TransferRun(release, seed=s, down=impaired(0.05), up=impaired(0.05)).run() for s in seeds
    ]
    for run in lossy:
        assert_delivered(run)
    ratios = [run.sends_per_block for run in lossy]
    goodput = statistics.mean(streaming_time(r) for r in lossless) / statistics.mean(
        streaming_time(r) for r in lossy
    )
    print(
        f"5% loss each way: sends/block mean {statistics.mean(ratios):.3f} "
        f"max {max(ratios):.3f}; goodput {goodput:.0%} of lossless"
    )
    assert max(ratios) <= 1.1
    assert statistics.mean(ratios) <= 1.07
    assert goodput >= 0.85


def test_clean_link_sends_every_block_exactly_once(release: Release) -> None:
    run = TransferRun(release, seed=1).run()
    assert_delivered(run)
    assert run.sends_per_block == 1.0
    assert run.sender.bytes_sent == IMAGE_SIZE
    # one SACK per half window, plus the answer to the Offer
    assert run.hub.receiver.acks_sent <= BLOCKS // 8 + 2
    # window 16 per round trip: 16 round trips, plus Offer and ImageHeld round trips
    assert run.now <= (BLOCKS / 16 + 3) * RTT


# --------------------------------------------------------------------------- 3. repair speed


def drop_first_copy(run: TransferRun, index: int) -> dict[str, float]:
    """Lose the first transmission of block ``index``; record when it was sent."""
    seen: dict[str, float] = {}

    def tamper(data: bytes, now: float) -> bytes | None:
        message = decode(data)
        if isinstance(message, Block) and message.index == index and "sent" not in seen:
            seen["sent"] = now
            return None
        return data

    run.link.tamper[DOWN] = tamper
    return seen


def test_single_lost_block_is_repaired_within_two_round_trips(release: Release) -> None:
    # every position in a 16-block window, and the tail of the image
    positions = [*range(96, 112), BLOCKS - 3, BLOCKS - 2, BLOCKS - 1]
    delays = {}
    for index in positions:
        run = TransferRun(release, seed=1)
        seen = drop_first_copy(run, index)
        run.run()
        assert_delivered(run)
        assert run.send_count[index] == 2
        assert all(n == 1 for i, n in run.send_count.items() if i != index)
        would_have_arrived = seen["sent"] + run.down.latency
        repaired = min(a.at for a in run.arrivals if a.index == index)
        delays[index] = (repaired - would_have_arrived) / RTT
    print("repair delay in RTTs by position:", {i: round(d, 2) for i, d in delays.items()})
    assert max(delays.values()) <= 2.0
    assert statistics.median(delays.values()) <= 1.05


# --------------------------------------------------------------------------- 4. resume


def restart_hub_at(
    run: TransferRun, fraction: float, downtime: float, queues: bool
) -> dict[str, int]:
    state: dict[str, int] = {}
    image = run.release.manifest.sha256

    def hook(run: TransferRun) -> None:
        held = run.hub.receiver.blocks_held(image)
        if "before" not in state and held >= fraction * BLOCKS:
            state["before"] = held
            run.restart_hub(downtime, broker_queues=queues)
            state["restored"] = run.hub.receiver.blocks_held(image)
            state["stored"] = len(run.hub.store[image])

    run.on_step.append(hook)
    return state


@pytest.mark.parametrize(
    ("window", "queues"),
    [(8, False), (16, True)],
    ids=["window8-in-flight-lost", "window16-broker-queues"],
)
def test_receiver_restart_at_75_percent_resumes(
    release: Release, window: int, queues: bool
) -> None:
    run = TransferRun(
        release,
        seed=4,
        limits=Limits(max_block=1024, window=window, buffer=64 * 1024),
        down=Path(jitter=0.01),
        up=Path(jitter=0.01),
    )
    state = restart_hub_at(run, 0.75, downtime=1.0, queues=queues)
    run.run()
    assert_delivered(run)
    assert run.hub.restarts == 1
    # the restored receiver knew what it had acknowledged, and the stored blocks were kept
    assert state["restored"] >= state["before"] - window
    assert state["stored"] == state["before"]
    ratio = run.sender.bytes_sent / IMAGE_SIZE
    print(
        f"CH restart at 75% ({'broker queues' if queues else 'in-flight lost'}, W={window}): "
        f"{ratio:.4f} x image sent, {run.sender.rto_expiries} RTOs"
    )
    assert ratio <= 1.05


def test_otad_restart_at_50_percent_resumes_from_the_ch_state(release: Release) -> None:
    """kill -9 otad at 50%, back 2 s later with a journal flushed every 32 blocks: the CH's
    answer to the new Offer says what it holds, so little more than the image is sent."""
    run = TransferRun(release, seed=5, down=impaired(0.01), up=impaired(0.01))
    journal: dict[str, bytes] = {}

    def hook(run: TransferRun) -> None:
        acked = run.sender.blocks_acked
        if not run.retired and acked % 32 == 0:
            journal["acked"] = run.sender.acked_bitmap()  # otad journals in batches
        if not run.retired and acked >= BLOCKS // 2:
            run.restart_daemon(2.0, journal["acked"])

    run.on_step.append(hook)
    run.run()
    assert_delivered(run)
    assert len(run.retired) == 1
    assert run.sender.offers_sent == 1
    # the new incarnation started from the journal, then took the CH's word for it
    assert run.sender.blocks_sent < BLOCKS // 2
    ratio = run.bytes_sent / IMAGE_SIZE
    print(f"otad restart at 50%: {ratio:.4f} x image sent in total")
    assert ratio <= 1.05


def test_ch_that_lost_its_state_is_offered_again(release: Release) -> None:
    run = TransferRun(release, seed=6)
    image = release.manifest.sha256
    done: list[bool] = []

    def hook(run: TransferRun) -> None:
        if not done and run.hub.receiver.blocks_held(image) >= BLOCKS // 3:
            done.append(True)
            run.hub.persisted = Receiver(run.limits, release.verify).snapshot()  # flash wiped
            run.hub.store.clear()
            run.restart_hub(0.5)

    run.on_step.append(hook)
    run.run()
    assert_delivered(run)
    assert run.sender.offers_sent == 2
    assert run.hub.receiver.rejected[Reason.NO_TRANSFER] >= 1


def test_ch_that_forgot_acknowledged_blocks_gets_them_again(release: Release) -> None:
    """A CH that broke the persist-before-acknowledge rule: restored from an old snapshot, it
    lacks blocks the sender saw acknowledged. The VERIFYING probe exposes the gap."""
    run = TransferRun(release, seed=7)
    image = release.manifest.sha256
    old: dict[str, bytes] = {}

    def hook(run: TransferRun) -> None:
        held = run.hub.receiver.blocks_held(image)
        if "snap" not in old and held >= 100:
            old["snap"] = run.hub.receiver.snapshot()
        if "snap" in old and "done" not in old and held >= 200:
            old["done"] = b""
            run.hub.persisted = old["snap"]
            run.hub.store[image] = {i: b for i, b in run.hub.store[image].items() if i < 100}
            run.restart_hub(0.0)

    run.on_step.append(hook)
    run.run()
    assert_delivered(run)
    assert run.hub.restarts == 1
    assert run.sender.retransmissions >= 90


def test_a_lost_image_held_is_asked_for_again_and_the_ch_keeps_its_image(
    release: Release,
) -> None:
    run = TransferRun(release, seed=3)
    dropped: list[float] = []

    def lose_first_image_held(data: bytes, now: float) -> bytes | None:
        if isinstance(decode(data), ImageHeld) and not dropped:
            dropped.append(now)
            return None
        return data

    down: list[object] = []

    def record(data: bytes, now: float) -> bytes:
        down.append(decode(data))
        return data

    run.link.tamper[UP] = lose_first_image_held
    run.link.tamper[DOWN] = record
    run.run()
    assert dropped  # the CH's first report was lost ...
    assert run.sender.state is SenderState.COMPLETE  # ... and the transfer still ended held
    assert isinstance(run.events[-1], TransferCompleted)
    sha = release.manifest.sha256
    assert run.hub.receiver.phase(sha) is TransferPhase.HELD
    assert run.hub.assembled(sha) == release.image
    polls = [m for m in down if isinstance(m, Poll)]
    assert len(polls) == 1  # one VERIFYING probe, a Poll: the CH answered it with ImageHeld
    assert not [m for m in down if isinstance(m, Cancel)]
    assert run.now - dropped[0] <= 2 * run.sender.rto + 2 * RTT


# --------------------------------------------------------------------------- 5. integrity


def test_flipped_bit_refetches_exactly_that_block(release: Release) -> None:
    run = TransferRun(release, seed=8)
    target = 77
    flipped: list[float] = []

    def tamper(data: bytes, now: float) -> bytes | None:
        message = decode(data)
        if isinstance(message, Block) and message.index == target and not flipped:
            flipped.append(now)
            at = data.find(message.data) + 100
            return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
        return data

    run.link.tamper[DOWN] = tamper
    run.run()
    assert flipped
    assert_delivered(run)
    assert run.hub.receiver.rejected == {Reason.BLOCK_HASH: 1}
    assert run.send_count[target] == 2
    assert all(n == 1 for i, n in run.send_count.items() if i != target)
    assert run.hub.corrupt_writes == 0
    assert run.hub.rewrites == 0


# --------------------------------------------------------------------------- 6. limits


def test_sender_window_of_two_is_never_exceeded(release: Release) -> None:
    run = TransferRun(release, seed=9, window=2, down=impaired(0.05), up=impaired(0.05)).run()
    assert_delivered(run)
    assert run.max_unacked == 2
    assert run.hub.receiver.rejected[Reason.LIMITS_EXCEEDED] == 0


def test_small_sender_window_does_not_wait_for_delayed_acks(release: Release) -> None:
    """Block.ack_now: with a sender window (2) far below the CH's ack threshold (8), every
    window still turns around in one round trip, not one round trip plus the ack delay."""
    run = TransferRun(release, seed=9, window=2, receiver_kw={"ack_delay": 0.2}).run()
    assert_delivered(run)
    assert run.now <= (BLOCKS / 2 + 3) * RTT * 1.02


def test_receiver_window_of_two_is_never_exceeded(release: Release) -> None:
    limits = Limits(max_block=1024, window=2, buffer=64 * 1024)
    run = TransferRun(release, seed=10, limits=limits, down=impaired(0.05), up=impaired(0.05))
    run.run()
    assert_delivered(run)
    assert run.max_unacked == 2
    assert run.hub.receiver.rejected[Reason.LIMITS_EXCEEDED] == 0


def test_buffer_byte_limit_is_respected() -> None:
    # 100 blocks and a short last one; the CH buffers 2.3 blocks' worth of bytes
    release = make_release(99 * 1024 + 300, 1024, seed=3)
    limits = Limits(max_block=1024, window=16, buffer=2 * 1024 + 300)
    run = TransferRun(release, seed=11, limits=limits, down=impaired(0.05), up=impaired(0.05))
    run.run()
    assert_delivered(run)
    assert run.max_unacked_bytes <= limits.buffer
    assert run.max_unacked == 3  # two full blocks and the short last one fit at the end
    assert run.hub.receiver.rejected[Reason.LIMITS_EXCEEDED] == 0


def test_ten_fold_rtt_jump_causes_no_duplicate_storm(release: Release) -> None:
    for seed in (0, 1, 2):
        run = TransferRun(release, seed=seed, down=Path(jitter=0.005), up=Path(jitter=0.005))

        def hook(run: TransferRun) -> None:
            if run.sender.blocks_acked >= 100 and run.link.paths[DOWN].latency < 0.5:
                run.link.paths[DOWN].latency = run.link.paths[UP].latency = 0.5

        run.on_step.append(hook)
        run.run()
        assert_delivered(run)
        print(f"10x RTT jump, seed {seed}: {run.sender.retransmissions} retransmissions")
        assert run.sender.retransmissions <= 16  # at most one window, once


# --------------------------------------------------------------------------- failures


def test_offer_signed_by_an_unknown_key_fails_with_no_block_sent() -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    ours = trust.TrustStore([signing_key().public_key()])
    release = make_release(8 * 1024, 1024, seed=4, key=stranger, store=ours)
    run = TransferRun(release, seed=12).run()
    assert run.sender.state is SenderState.FAILED
    failed = run.events[-1]
    assert isinstance(failed, TransferFailed)
    assert failed.reason is Reason.UNKNOWN_KEY_ID
    assert run.sender.blocks_sent == 0
    assert run.hub.receiver.images() == []


def test_dead_link_times_out_without_a_cancel(release: Release) -> None:
    run = TransferRun(
        release, seed=13, down=Path(loss=1.0), sender_kw={"max_timeouts": 4, "max_rto": 4.0}
    ).run(max_time=60)
    assert run.sender.state is SenderState.FAILED
    failed = run.events[-1]
    assert isinstance(failed, TransferFailed)
    assert failed.reason is Reason.TIMED_OUT
    assert run.sender.offers_sent == 5
    assert run.link.stats[DOWN].sent == 5  # five Offers; no Cancel: the CH keeps what it has


def test_cancel_discards_what_the_ch_holds(release: Release) -> None:
    run = TransferRun(release, seed=14)
    image = release.manifest.sha256

    def hook(run: TransferRun) -> None:
        if run.hub.receiver.blocks_held(image) >= 50:
            run.sender.cancel(run.now)

    run.on_step.append(hook)
    run.run()
    for _ in range(200):  # let the Cancel cross
        if not run.step():
            break
    assert run.sender.state is SenderState.FAILED
    assert run.hub.receiver.images() == []
    assert image not in run.hub.store
