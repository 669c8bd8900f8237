"""The Receiver (CH side) on its own: verification before storage, every refusal with its typed
reason, the acknowledgement policy, and snapshot/restore. Manifests are really signed."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import pytest
from simlink import EXPIRES, VERIFY_AT, Release, make_release, signing_key

from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release import cose, otaimg, trust, zigbee_ota
from protocol.release.manifest import DeviceType, Manifest
from protocol.wan.receiver import (
    DiscardImage,
    Receiver,
    ReceiverAction,
    Reply,
    StoreBlock,
    TransferPhase,
    VerifyImage,
)
from protocol.wan.sack import SACK_SPAN, Bitmap, check_sack, sack_indexes
from protocol.wire import cbor
from protocol.wire.messages import (
    Block,
    Cancel,
    ImageHeld,
    Limits,
    Offer,
    Poll,
    TransferAcked,
    TransferRejected,
)

BLOCK = 64
WALL = VERIFY_AT  # the CH's wall clock when each Offer arrives
LIMITS = Limits(max_block=BLOCK, window=4, buffer=4 * BLOCK)


@pytest.fixture(scope="module")
def release() -> Release:
    return make_release(10 * BLOCK + 20, BLOCK, seed=1)  # 11 blocks, the last of 20 bytes


@pytest.fixture(scope="module")
def other() -> Release:
    return make_release(10 * BLOCK + 20, BLOCK, seed=2)


def receiver(release: Release, **kw: object) -> Receiver:
    kw.setdefault("ack_every", 2)
    return Receiver(LIMITS, release.verify, **kw)  # type: ignore[arg-type]


def offer(release: Release) -> Offer:
    return Offer(image=release.manifest.sha256, manifest=release.signed)


def block(release: Release, index: int, *, ack_now: bool = False) -> Block:
    return Block(
        image=release.manifest.sha256, index=index, data=release.block(index), ack_now=ack_now
    )


def stored(actions: list[ReceiverAction]) -> list[int]:
    return [a.index for a in actions if isinstance(a, StoreBlock)]


def acks(actions: list[ReceiverAction]) -> list[TransferAcked]:
    return [
        a.message for a in actions if isinstance(a, Reply) and isinstance(a.message, TransferAcked)
    ]


def ack(release: Release, base: int, bitmap: bytes = b"", credit: int = 4) -> Reply:
    return Reply(
        TransferAcked(image=release.manifest.sha256, base=base, bitmap=bitmap, credit=credit)
    )


def started(release: Release, **kw: object) -> Receiver:
    rx = receiver(release, **kw)
    assert rx.offer_received(offer(release), WALL, 0.0) == [ack(release, 0)]
    return rx


# --------------------------------------------------------------------------- offers


def test_verified_offer_creates_the_transfer(release: Release) -> None:
    rx = started(release)
    assert rx.images() == [release.manifest.sha256]
    assert rx.phase(release.manifest.sha256) is TransferPhase.RECEIVING
    assert rx.manifest(release.manifest.sha256) == release.manifest


def rejection(actions: list[ReceiverAction]) -> Reason:
    (reply,) = [a for a in actions if isinstance(a, Reply)]
    assert isinstance(reply.message, TransferRejected)
    return Reason(reply.message.reason)


def test_offer_with_a_broken_signature_is_refused_and_no_block_is_then_stored(
    release: Release,
) -> None:
    rx = receiver(release)
    forged = release.signed[:-1] + bytes([release.signed[-1] ^ 1])
    actions = rx.offer_received(Offer(image=release.manifest.sha256, manifest=forged), WALL, 0.0)
    assert rejection(actions) is Reason.BAD_SIGNATURE
    assert rx.images() == []
    for index in range(release.manifest.block_count):
        assert stored(rx.message_received(block(release, index), 0.1)) == []
    assert rx.rejected[Reason.BAD_SIGNATURE] == 1
    assert rx.rejected[Reason.NO_TRANSFER] == release.manifest.block_count
    assert rx.blocks_stored == 0


def test_offer_failing_policy_is_refused_with_its_reason(release: Release) -> None:
    unknown = Receiver(LIMITS, lambda s, at: trust.verify_manifest(s, trust.TrustStore(), now=at))
    assert rejection(unknown.offer_received(offer(release), WALL, 0.0)) is Reason.UNKNOWN_KEY_ID
    expired = Receiver(LIMITS, lambda s, at: trust.verify_manifest(s, release.trust, now=EXPIRES))
    assert rejection(expired.offer_received(offer(release), WALL, 0.0)) is Reason.EXPIRED
    assert unknown.images() == expired.images() == []


def test_offer_naming_another_image_is_mix_and_match(release: Release, other: Release) -> None:
    rx = receiver(release)
    actions = rx.offer_received(
        Offer(image=other.manifest.sha256, manifest=release.signed), WALL, 0
    )
    assert rejection(actions) is Reason.WRONG_IMAGE
    assert rx.images() == []


def test_offer_with_blocks_over_max_block_is_refused(release: Release) -> None:
    rx = Receiver(Limits(max_block=BLOCK - 1, window=4, buffer=1024), release.verify)
    assert rejection(rx.offer_received(offer(release), WALL, 0.0)) is Reason.LIMITS_EXCEEDED
    assert rx.images() == []


def test_transfers_beyond_the_limit_are_refused(release: Release, other: Release) -> None:
    rx = receiver(release, max_transfers=1)
    rx.offer_received(offer(release), WALL, 0.0)
    both = Receiver(
        LIMITS,
        lambda s, at: other.verify(s, at) if s == other.signed else release.verify(s, at),
        max_transfers=1,
    )
    both.offer_received(offer(release), WALL, 0.0)
    assert rejection(both.offer_received(offer(other), WALL, 0.0)) is Reason.STORAGE_FULL
    assert both.images() == [release.manifest.sha256]


def test_repeated_offer_is_answered_with_the_current_state(release: Release) -> None:
    rx = started(release)
    rx.message_received(block(release, 0), 0.1)
    rx.message_received(block(release, 2), 0.1)
    assert rx.offer_received(offer(release), WALL, 0.2) == [ack(release, 1, b"\x01")]


# --------------------------------------------------------------------------- block checks


def two_images(release: Release, other: Release) -> Receiver:
    by_bytes = {release.signed: release, other.signed: other}
    rx = Receiver(LIMITS, lambda s, at: by_bytes[s].verify(s, at), ack_every=2)
    rx.offer_received(offer(release), WALL, 0.0)
    rx.offer_received(offer(other), WALL, 0.0)
    return rx


def tampered(release: Release, index: int, data: bytes) -> Block:
    return Block(image=release.manifest.sha256, index=index, data=data)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("index past the end", Reason.BLOCK_OUT_OF_RANGE),
        ("index far past the end", Reason.BLOCK_OUT_OF_RANGE),
        ("oversized block", Reason.BLOCK_SIZE),
        ("truncated block", Reason.BLOCK_SIZE),
        ("empty block", Reason.BLOCK_SIZE),
        ("extra bytes after the image", Reason.TOO_MANY_BYTES),
        ("flipped bit", Reason.BLOCK_HASH),
        ("another image's block at the right index", Reason.WRONG_IMAGE),
        ("another image's block at another index", Reason.BLOCK_HASH),
    ],
)
def test_bad_block_is_dropped_with_its_typed_reason(
    release: Release, other: Release, name: str, reason: Reason
) -> None:
    last = release.manifest.block_count - 1
    good = release.block(3)
    attack = {
        "index past the end": tampered(release, last + 1, release.block(last)),
        "index far past the end": tampered(release, 0xFFFF_FFFF, good),
        "oversized block": tampered(release, 3, good + b"\x00"),
        "truncated block": tampered(release, 3, good[:-1]),
        "empty block": tampered(release, 3, b""),
        "extra bytes after the image": tampered(release, last, release.block(last) + b"\x00"),
        "flipped bit": tampered(release, 3, good[:10] + bytes([good[10] ^ 4]) + good[11:]),
        "another image's block at the right index": tampered(release, 3, other.block(3)),
        "another image's block at another index": tampered(release, 3, other.block(4)),
    }[name]
    rx = two_images(release, other)
    actions = rx.message_received(attack, 0.1)
    assert stored(actions) == []
    assert rx.rejected == {reason: 1}
    assert rx.blocks_stored == 0
    assert not rx.has_block(release.manifest.sha256, attack.index)
    if reason is not Reason.BLOCK_OUT_OF_RANGE:
        assert acks(actions)  # the sender learns at once that the block is still missing
    # the genuine block is still taken afterwards
    if attack.index <= last:
        assert stored(rx.message_received(block(release, attack.index), 0.2)) == [attack.index]


def test_block_of_an_image_never_offered_creates_no_state(release: Release) -> None:
    rx = receiver(release, ack_delay=0.05)
    first = rx.message_received(block(release, 0), 0.0)
    assert rejection(first) is Reason.NO_TRANSFER
    assert rx.message_received(block(release, 1), 0.01) == []  # at most one answer per delay
    assert rejection(rx.message_received(block(release, 2), 0.06)) is Reason.NO_TRANSFER
    assert rx.images() == []
    assert rx.rejected == {Reason.NO_TRANSFER: 3}
    assert rx.next_deadline() is None


def test_stored_bytes_never_exceed_the_image(release: Release) -> None:
    rx = started(release)
    total = 0
    for _ in range(3):
        for index in range(release.manifest.block_count):
            for action in rx.message_received(block(release, index), 0.1):
                if isinstance(action, StoreBlock):
                    assert hashlib.sha256(action.data).digest() == (
                        release.manifest.block_hash(action.index)
                    )
                    assert action.offset == action.index * BLOCK
                    total += len(action.data)
    assert total == release.manifest.size == rx.bytes_stored
    assert rx.duplicates == 2 * release.manifest.block_count


def test_overrunning_the_window_is_counted_but_valid_blocks_are_kept(release: Release) -> None:
    rx = started(release, ack_every=100, ack_delay=10.0)
    for index in range(6):  # window 4, no acknowledgement in between
        assert stored(rx.message_received(block(release, index), 0.1)) == [index]
    assert rx.rejected == {Reason.LIMITS_EXCEEDED: 2}


def test_overrunning_the_buffer_is_counted(release: Release) -> None:
    rx = Receiver(
        Limits(max_block=BLOCK, window=16, buffer=2 * BLOCK),
        release.verify,
        ack_every=100,
        ack_delay=10.0,
    )
    rx.offer_received(offer(release), WALL, 0.0)
    for index in range(3):
        rx.message_received(block(release, index), 0.1)
    assert rx.rejected == {Reason.LIMITS_EXCEEDED: 1}


# --------------------------------------------------------------------------- ack policy


def test_in_order_blocks_are_acknowledged_every_ack_every_or_after_the_delay(
    release: Release,
) -> None:
    rx = started(release, ack_every=2, ack_delay=0.05)
    assert rx.message_received(block(release, 0), 1.0) == [
        StoreBlock(release.manifest.sha256, 0, 0, release.block(0))
    ]
    assert rx.next_deadline() == pytest.approx(1.05)
    assert acks(rx.message_received(block(release, 1), 1.01)) == [ack(release, 2).message]
    assert rx.next_deadline() is None
    rx.message_received(block(release, 2), 2.0)
    assert rx.handle_timer(2.049) == []
    assert rx.handle_timer(2.05) == [ack(release, 3)]
    assert rx.acks_sent == 3  # with the answer to the Offer


def test_gaps_duplicates_corruption_and_ack_now_are_acknowledged_at_once(
    release: Release,
) -> None:
    rx = started(release, ack_every=100, ack_delay=1.0)
    assert acks(rx.message_received(block(release, 0), 0.1)) == []  # in order: delayed
    assert acks(rx.message_received(block(release, 2), 0.1)) == [ack(release, 1, b"\x01").message]
    assert acks(rx.message_received(block(release, 4), 0.1)) == [ack(release, 1, b"\x05").message]
    # filling the base while a hole remains above
    assert acks(rx.message_received(block(release, 1), 0.1)) == [ack(release, 3, b"\x01").message]
    assert acks(rx.message_received(block(release, 1), 0.1)) == [ack(release, 3, b"\x01").message]
    bad = tampered(release, 3, release.block(3)[::-1])
    assert acks(rx.message_received(bad, 0.1)) == [ack(release, 3, b"\x01").message]
    assert acks(rx.message_received(block(release, 3), 0.1)) == [ack(release, 5).message]
    assert acks(rx.message_received(block(release, 5, ack_now=True), 0.1)) == [
        ack(release, 6).message
    ]


def test_sack_encoding_matches_the_spec() -> None:
    held = Bitmap(20)
    for index in (0, 1, 2, 4, 7, 9, 19):
        held.add(index)
    base, bitmap = held.sack()
    # blocks < 3 held; bit i is block 3 + 1 + i: 4 -> bit 0, 7 -> bit 3, 9 -> bit 5, 19 -> bit 15
    assert (base, bitmap) == (3, bytes([0b0010_1001, 0b1000_0000]))
    assert sorted(sack_indexes(base, bitmap)) == [4, 7, 9, 19]
    check_sack(base, bitmap, 20)
    with pytest.raises(ProtocolError):
        check_sack(base, bitmap, 19)
    full = Bitmap(9)
    for index in range(9):
        full.add(index)
    assert full.sack() == (9, b"")
    assert full.highest() == 8
    assert Bitmap(9).highest() == -1


def test_sack_never_names_more_than_its_span() -> None:
    held = Bitmap(SACK_SPAN + 100)
    held.add(1)
    held.add(SACK_SPAN + 50)  # beyond what one SACK can name
    base, bitmap = held.sack()
    assert base == 0
    assert sorted(sack_indexes(base, bitmap)) == [1]
    assert len(bitmap) == 1


def test_bitmap_persisted_form_is_checked() -> None:
    with pytest.raises(ProtocolError):
        Bitmap.from_bytes(b"\x00", 9)  # too short
    with pytest.raises(ProtocolError):
        Bitmap.from_bytes(b"\x00\x02", 9)  # a bit past the last block
    assert Bitmap.from_bytes(b"\xff\x01", 9).full()


# --------------------------------------------------------------------------- completion


def complete(rx: Receiver, release: Release, now: float) -> list[ReceiverAction]:
    actions: list[ReceiverAction] = []
    for index in range(release.manifest.block_count):
        actions = rx.message_received(block(release, index), now)
    return actions


def test_last_block_asks_for_a_rehash_then_image_held(release: Release) -> None:
    rx = started(release)
    image = release.manifest.sha256
    last = complete(rx, release, 0.1)
    assert last[-2:] == [
        ack(release, release.manifest.block_count),
        VerifyImage(image, release.manifest.size),
    ]
    assert rx.phase(image) is TransferPhase.VERIFYING
    assert rx.message_received(block(release, 0), 0.2) == [ack(release, 11)]  # still hashing
    assert rx.image_hashed(image, image, 0.3) == [Reply(ImageHeld(image=image, sha256=image))]
    assert rx.phase(image) is TransferPhase.HELD
    assert rx.message_received(block(release, 4), 0.4) == [
        Reply(ImageHeld(image=image, sha256=image))
    ]
    assert rx.offer_received(offer(release), WALL, 0.5) == [
        Reply(ImageHeld(image=image, sha256=image))
    ]
    assert rx.image_hashed(image, image, 0.6) == []  # stale


def test_stored_image_with_the_wrong_digest_is_discarded(release: Release) -> None:
    rx = started(release)
    image = release.manifest.sha256
    complete(rx, release, 0.1)
    actions = rx.image_hashed(image, b"\x00" * 32, 0.2)
    assert rejection(actions) is Reason.IMAGE_HASH
    assert actions[-1] == DiscardImage(image)
    assert rx.images() == []


def test_cancel_discards(release: Release) -> None:
    rx = started(release)
    rx.message_received(block(release, 0), 0.1)
    image = release.manifest.sha256
    assert rx.message_received(Cancel(image=image, reason=Reason.CANCELLED), 0.2) == [
        DiscardImage(image)
    ]
    assert rx.images() == []
    assert rx.message_received(Cancel(image=image, reason=1), 0.3) == [DiscardImage(image)]


def test_poll_reports_every_transfer(release: Release, other: Release) -> None:
    rx = two_images(release, other)
    rx.message_received(block(release, 0), 0.1)
    complete(rx, other, 0.1)
    rx.image_hashed(other.manifest.sha256, other.manifest.sha256, 0.2)
    assert rx.message_received(Poll(nonce=7), 0.3) == [
        ack(release, 1),
        Reply(ImageHeld(image=other.manifest.sha256, sha256=other.manifest.sha256)),
    ]


def test_messages_a_ch_does_not_take_are_counted(release: Release) -> None:
    rx = started(release)
    assert rx.message_received(ack(release, 0).message, 0.1) == []
    assert rx.rejected == {Reason.UNKNOWN_TYPE: 1}


# --------------------------------------------------------------------------- persistence


def test_restart_resumes_from_the_snapshot(release: Release) -> None:
    rx = started(release)
    for index in (0, 1, 2, 5):
        rx.message_received(block(release, index), 0.1)
    again = Receiver.restore(rx.snapshot(), LIMITS, release.verify, ack_every=2)
    image = release.manifest.sha256
    assert again.handle_timer(0.0) == []
    assert again.phase(image) is TransferPhase.RECEIVING
    assert [i for i in range(11) if again.has_block(image, i)] == [0, 1, 2, 5]
    assert again.offer_received(offer(release), WALL, 1.0) == [ack(release, 3, b"\x02")]
    assert stored(again.message_received(block(release, 3), 1.1)) == [3]
    assert stored(again.message_received(block(release, 0), 1.1)) == []


def test_restored_complete_image_is_rehashed_and_held_one_stays_held(
    release: Release, other: Release
) -> None:
    rx = two_images(release, other)
    complete(rx, release, 0.1)  # VERIFYING, never hashed
    complete(rx, other, 0.1)
    rx.image_hashed(other.manifest.sha256, other.manifest.sha256, 0.2)
    by_bytes = {release.signed: release, other.signed: other}
    again = Receiver.restore(rx.snapshot(), LIMITS, lambda s, at: by_bytes[s].verify(s, at))
    assert again.next_deadline() == 0.0
    assert again.handle_timer(5.0) == [VerifyImage(release.manifest.sha256, release.manifest.size)]
    assert again.next_deadline() is None
    assert again.phase(other.manifest.sha256) is TransferPhase.HELD


def test_restore_drops_transfers_whose_manifest_no_longer_verifies(release: Release) -> None:
    rx = started(release)
    rx.message_received(block(release, 0), 0.1)
    revoked = trust.TrustStore([signing_key().public_key()], revoked=release.trust.kids)

    def verify(signed: bytes, at: UnixTime) -> Manifest:
        return trust.verify_manifest(signed, revoked, now=at)

    again = Receiver.restore(rx.snapshot(), LIMITS, verify)
    assert again.images() == []
    assert again.handle_timer(0.0) == [DiscardImage(release.manifest.sha256)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.MALFORMED),
        (b"\xff", Reason.MALFORMED),
        (cbor.dumps([1, 2]), Reason.MALFORMED),
        (cbor.dumps({"v": 2, "transfers": []}), Reason.UNSUPPORTED_VERSION),
        (cbor.dumps({"v": 1, "transfers": [{"i": b"x"}]}), Reason.MALFORMED),
        (
            cbor.dumps(
                {"v": 1, "transfers": [{"i": b"x" * 32, "m": b"", "h": b"", "p": "0", "d": b""}]}
            ),
            Reason.MALFORMED,
        ),
    ],
)
def test_malformed_snapshot_is_refused(release: Release, data: bytes, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as info:
        Receiver.restore(data, LIMITS, release.verify)
    assert info.value.reason is reason


def test_snapshot_entry_that_does_not_fit_its_manifest_is_discarded(release: Release) -> None:
    image = release.manifest.sha256
    entry = {"i": image, "m": release.signed, "h": b"\x00", "p": 0, "d": b""}  # bitmap too short
    data = cbor.dumps({"v": 1, "transfers": [entry]})
    again = Receiver.restore(data, LIMITS, release.verify)
    assert again.images() == []
    assert again.handle_timer(0.0) == [DiscardImage(image)]


# --------------------------------------------------------------------------- time of trust


def resigned(release: Release, **changes: object) -> Release:
    """The same image under another signed manifest (e.g. a new expiry, another block size)."""
    manifest = dataclasses.replace(release.manifest, **changes)
    if "block_size" in changes:
        manifest = Manifest.for_image(
            release.image,
            vendor=manifest.vendor,
            image_type=manifest.image_type,
            device_type=manifest.device_type,
            hw_min=manifest.hw_min,
            hw_max=manifest.hw_max,
            fw_version=manifest.fw_version,
            sequence=manifest.sequence,
            block_size=manifest.block_size,
            created=manifest.created,
            expires=manifest.expires,
        )
    signed = cose.sign1(manifest.encode(), signing_key())
    return Release(release.image, manifest, signed, release.trust)


def by_signed(*releases: Release) -> Callable[[bytes, UnixTime], Manifest]:
    known = {r.signed: r for r in releases}
    return lambda signed, at: known[signed].verify(signed, at)


def test_an_offer_needs_the_wall_clock(release: Release) -> None:
    with pytest.raises(ValueError, match="offer_received"):
        receiver(release).message_received(offer(release), 0.0)


def test_a_reoffer_is_verified_at_the_first_offers_instant_not_the_current_one(
    release: Release,
) -> None:
    rx = started(release)  # first Offer at WALL, long before EXPIRES
    rx.message_received(block(release, 0), 0.1)
    late = UnixTime(EXPIRES + 3600)  # the manifest has expired since
    assert rx.offer_received(offer(release), late, 5.0) == [ack(release, 1)]
    again = Receiver.restore(rx.snapshot(), LIMITS, release.verify, ack_every=2)
    assert again.handle_timer(6.0) == []  # restored at the same instant: still valid
    assert again.has_block(release.manifest.sha256, 0)
    assert again.offer_received(offer(release), late, 6.0) == [ack(release, 1)]


def test_an_offer_after_the_transfer_was_forgotten_is_checked_afresh(release: Release) -> None:
    rx = started(release)
    image = release.manifest.sha256
    rx.message_received(Cancel(image=image, reason=Reason.CANCELLED), 0.1)
    late = UnixTime(EXPIRES)
    assert rejection(rx.offer_received(offer(release), late, 0.2)) is Reason.EXPIRED
    assert rx.images() == []


def test_the_update_start_instant_is_what_the_verifier_is_given(release: Release) -> None:
    seen: list[UnixTime] = []

    def verify(signed: bytes, at: UnixTime) -> Manifest:
        seen.append(at)
        return release.verify(signed, at)

    rx = Receiver(LIMITS, verify)
    rx.offer_received(offer(release), UnixTime(WALL + 0.75), 0.0)
    rx.offer_received(offer(release), UnixTime(WALL + 500), 1.0)
    Receiver.restore(rx.snapshot(), LIMITS, verify)
    assert seen == [WALL, WALL, WALL]  # whole seconds, kept across re-Offers and restarts


def test_a_snapshot_entry_without_its_instant_is_discarded(release: Release) -> None:
    image = release.manifest.sha256
    entry = {"i": image, "m": release.signed, "h": b"\x00\x00", "p": 0, "d": b""}
    again = Receiver.restore(cbor.dumps({"v": 1, "transfers": [entry]}), LIMITS, release.verify)
    assert again.images() == []
    assert again.handle_timer(0.0) == [DiscardImage(image)]


# --------------------------------------------------------------------------- re-signed manifests


def test_a_resigned_manifest_with_the_same_blocks_keeps_them_and_is_adopted(
    release: Release,
) -> None:
    newer = resigned(release, expires=EXPIRES + 86_400)
    rx = Receiver(LIMITS, by_signed(release, newer), ack_every=2)
    rx.offer_received(offer(release), WALL, 0.0)
    rx.message_received(block(release, 0), 0.1)
    rx.message_received(block(release, 1), 0.1)
    assert rx.offer_received(offer(newer), WALL, 0.2) == [ack(release, 2)]
    assert rx.manifest(release.manifest.sha256) == newer.manifest
    snapshot = cbor.loads(rx.snapshot(), max_size=1 << 20, max_depth=4)
    assert snapshot["transfers"][0]["m"] == newer.signed  # persisted as the transfer's manifest


def test_a_resigned_manifest_with_another_block_layout_starts_over(release: Release) -> None:
    regrouped = resigned(release, block_size=BLOCK // 2)
    rx = Receiver(Limits(BLOCK, 8, 8 * BLOCK), by_signed(release, regrouped), ack_every=2)
    image = release.manifest.sha256
    rx.offer_received(offer(release), WALL, 0.0)
    rx.message_received(block(release, 0), 0.1)
    actions = rx.offer_received(offer(regrouped), WALL, 0.2)
    assert actions == [
        DiscardImage(image),
        Reply(TransferAcked(image=image, base=0, bitmap=b"", credit=8)),
    ]
    assert rx.blocks_held(image) == 0
    assert rx.manifest(image) == regrouped.manifest


def test_a_resigned_manifest_that_does_not_verify_discards_the_transfer(
    release: Release,
) -> None:
    bad = resigned(release, expires=EXPIRES + 1)
    forged = Offer(image=release.manifest.sha256, manifest=bad.signed[:-1] + b"\x00")
    rx = started(release)
    actions = rx.offer_received(forged, WALL, 0.1)
    assert actions[0] == DiscardImage(release.manifest.sha256)
    assert rejection(actions[1:]) is Reason.BAD_SIGNATURE
    assert rx.images() == []


# --------------------------------------------------------------------------- whole-image checks


def test_a_failed_whole_image_check_rejects_and_discards_instead_of_image_held(
    release: Release,
) -> None:
    rx = started(release)
    image = release.manifest.sha256
    complete(rx, release, 0.1)
    assert rx.phase(image) is TransferPhase.VERIFYING
    error = ProtocolError(Reason.HEADER_MISMATCH, "file version 0x1 != 0x2")
    actions = rx.image_refused(image, error, 0.2)
    assert actions == [
        Reply(TransferRejected(image=image, reason=Reason.HEADER_MISMATCH, detail=error.detail)),
        DiscardImage(image),
    ]
    assert rx.images() == []
    assert rx.rejected[Reason.HEADER_MISMATCH] == 1
    assert rx.image_refused(image, error, 0.3) == []  # stale: nothing left to refuse


def test_check_image_runs_checks_14_to_17_on_an_assembled_image() -> None:
    ota = zigbee_ota.wrap(
        b"firmware" * 40, manufacturer_code=0x1234, image_type=1, file_version=7, hw_min=1, hw_max=9
    )

    def manifest_for(data: bytes, **changes: object) -> Manifest:
        fields: dict[str, object] = {
            "vendor": 0x1234, "image_type": 1, "device_type": DeviceType.ESME, "hw_min": 1,
            "hw_max": 9, "fw_version": 7, "sequence": 1, "block_size": 64, "created": 1,
            "expires": 2,
        }  # fmt: skip
        fields.update(changes)
        return Manifest.for_image(data, **fields)  # type: ignore[arg-type]

    assert otaimg.check_image(manifest_for(ota), ota).header.file_version == 7
    cases = [
        (manifest_for(ota), ota[:-1] + b"\x00", Reason.IMAGE_HASH),
        (manifest_for(b"\x00" * len(ota)), b"\x00" * len(ota), Reason.MALFORMED),
        (manifest_for(ota, fw_version=8), ota, Reason.HEADER_MISMATCH),
        (manifest_for(ota, hw_min=2), ota, Reason.HEADER_MISMATCH),  # ranges must be equal
    ]
    for manifest, data, reason in cases:
        with pytest.raises(ProtocolError) as info:
            otaimg.check_image(manifest, data)
        assert info.value.reason is reason
