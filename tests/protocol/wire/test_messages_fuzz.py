"""Hypothesis fuzzing of everything that reads untrusted bytes on the WAN path.

The contract under test: :func:`protocol.wire.messages.decode`, :func:`protocol.wire.cbor.loads` and
:meth:`protocol.wan.receiver.Receiver.restore` raise :class:`ProtocolError` and nothing else,
whatever they are given; the Receiver never raises and never stores an unverified byte; the Sender
raises only ``ProtocolError`` on a message it cannot apply and keeps its invariants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import VERIFY_AT, Release, make_release

from protocol.clock import UnixTime
from protocol.errors import ProtocolError
from protocol.wan.receiver import DiscardImage, Receiver, StoreBlock
from protocol.wan.sack import Bitmap, check_sack, sack_indexes
from protocol.wan.sender import Sender, SenderState
from protocol.wire import cbor, messages
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.limits import HASH_LEN, MAX_BLOCK_BYTES
from protocol.wire.messages import (
    ALT_HAN_BRIDGES,
    Block,
    Cancel,
    HanDevice,
    HubAnnounced,
    HubWentOffline,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    TransferAcked,
    TransferRejected,
)

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

digests = st.binary(min_size=HASH_LEN, max_size=HASH_LEN)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
text = st.text(max_size=40)
eui64s = st.text(alphabet="0123456789ABCDEF", min_size=16, max_size=16)
#: (device type, join mode) pairs a HanDevice may have (SPEC §3): never CH; bridges CAD/PPMID
VALID_HAN_KINDS = [
    (kind, mode)
    for kind in DeviceType
    if kind is not DeviceType.CH
    for mode in JoinMode
    if (mode is JoinMode.NATIVE) != (kind in ALT_HAN_BRIDGES)
]

limits = st.builds(Limits, st.integers(0, MAX_BLOCK_BYTES), u16, u32)
valid_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Offer, digests, st.binary(max_size=300)),
    st.builds(Block, digests, u32, st.binary(max_size=300), st.booleans()),
    st.builds(Cancel, digests, u16),
    st.builds(Poll, u64),
    st.builds(TransferAcked, digests, u32, st.binary(max_size=64), u16),
    st.builds(ImageHeld, digests, digests),
    st.builds(TransferRejected, digests, u16, text),
    st.builds(
        HubAnnounced,
        st.text(max_size=16),
        u32,
        u16,
        text,
        text,
        limits,
        st.lists(
            # a HAN device id is an EUI-64, its type and join mode one of SPEC §3's valid pairs
            st.sampled_from(VALID_HAN_KINDS).flatmap(
                lambda kind: st.builds(
                    HanDevice, eui64s, st.just(kind[0]), st.just(kind[1]), u32, u16
                )
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(HubWentOffline, st.text(max_size=16)),
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 40), children, max_size=6)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoded message with a few byte-level mutations."""
    data = bytearray(draw(valid_messages).encode())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def decodes_or_refuses(data: bytes) -> Message | None:
    try:
        message = messages.decode(data)
    except ProtocolError:
        return None
    assert isinstance(message, Message)
    assert messages.decode(message.encode()) == message  # what is accepted re-encodes
    return message


# --------------------------------------------------------------------------- decoders


@FUZZ
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(mutated())
def test_decode_mutated_messages_raises_only_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@SOME
@given(cbor_values, st.integers(0, 40))
def test_decode_arbitrary_cbor_structures(value: Any, type_code: int) -> None:
    if isinstance(value, dict):
        value = {**value, "t": type_code}
    decodes_or_refuses(bytes(cbor2.dumps(value)))


@FUZZ
@given(
    st.binary(max_size=300),
    st.integers(1, 400),
    st.integers(0, 10),
    st.frozensets(st.integers(0, 300), max_size=3),
)
def test_cbor_loads_raises_only_protocol_error(
    data: bytes, max_size: int, max_depth: int, tags: frozenset[int]
) -> None:
    with contextlib.suppress(ProtocolError):
        cbor.loads(data, max_size=max_size, max_depth=max_depth, allowed_tags=tags)


@SOME
@given(cbor_values)
def test_cbor_loads_of_encoded_values_raises_only_protocol_error(value: Any) -> None:
    with contextlib.suppress(ProtocolError):
        cbor.loads(bytes(cbor2.dumps(value)), max_size=4096)


@SOME
@given(valid_messages)
def test_valid_messages_round_trip(message: Message) -> None:
    if len(message.encode()) <= type(message).MAX_BYTES:
        assert messages.decode(message.encode()) == message


# --------------------------------------------------------------------------- state machines

_RELEASES: dict[int, Release] = {}


def small_release(seed: int) -> Release:
    if seed not in _RELEASES:
        _RELEASES[seed] = make_release(6 * 32 + 5, 32, seed=seed)  # 7 blocks, the last 5 bytes
    return _RELEASES[seed]


@st.composite
def down_messages(draw: st.DrawFn) -> Message:
    """Mostly plausible traffic for the release of seed 0, with hostile variations."""
    ours, theirs = small_release(0), small_release(1)
    release = draw(st.sampled_from([ours, ours, ours, theirs]))
    kind = draw(st.sampled_from(["block", "block", "block", "bad", "offer", "cancel", "poll"]))
    image = (
        draw(st.sampled_from([ours.manifest.sha256, theirs.manifest.sha256]))
        if draw(st.booleans())
        else release.manifest.sha256
    )
    if kind == "block":
        index = draw(st.integers(0, 7))
        ack_now = draw(st.booleans())
        return Block(image=image, index=index, data=release.block(index), ack_now=ack_now)
    if kind == "bad":
        return Block(image=image, index=draw(u32), data=draw(st.binary(max_size=40)))
    if kind == "offer":
        signed = draw(
            st.sampled_from(
                [release.signed, release.signed[:-1] + b"\x00", draw(st.binary(max_size=50))]
            )
        )
        return Offer(image=image, manifest=signed)
    if kind == "cancel":
        return Cancel(image=image, reason=draw(u16))
    return Poll(nonce=draw(u64))


@SOME
@given(st.lists(st.tuples(down_messages(), st.floats(0, 1)), max_size=60))
def test_receiver_never_raises_and_stores_only_verified_bytes(
    traffic: list[tuple[Message, float]],
) -> None:
    ours, theirs = small_release(0), small_release(1)
    by_bytes = {ours.signed: ours, theirs.signed: theirs}

    def verify(signed: bytes, at: UnixTime) -> Any:
        release = by_bytes.get(signed)
        return (release or ours).verify(signed, at)

    rx = Receiver(Limits(max_block=32, window=3, buffer=96), verify, max_transfers=1)
    stored: dict[bytes, dict[int, bytes]] = {}  # the CH's flash
    now = 0.0
    for message, dt in traffic:
        now += dt
        if isinstance(message, Offer):
            actions = rx.offer_received(message, VERIFY_AT, now)
        else:
            actions = rx.message_received(message, now)
        for action in actions + rx.handle_timer(now):
            if isinstance(action, DiscardImage):
                stored.pop(action.image, None)
            elif isinstance(action, StoreBlock):
                manifest = rx.manifest(action.image)
                assert manifest is not None
                assert hashlib.sha256(action.data).digest() == manifest.block_hash(action.index)
                blocks = stored.setdefault(action.image, {})
                assert action.index not in blocks  # each block is written once
                blocks[action.index] = action.data
                assert sum(map(len, blocks.values())) <= manifest.size
    for image, blocks in stored.items():
        assert all(rx.has_block(image, index) for index in blocks)
    Receiver.restore(rx.snapshot(), rx.limits, verify)  # whatever happened, it restores


@FUZZ
@given(st.binary(max_size=400))
def test_restore_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Receiver.restore(data, Limits(32, 3, 96), small_release(0).verify)


@SOME
@given(
    st.lists(
        st.one_of(
            st.builds(
                TransferAcked,
                st.just(b""),
                st.integers(0, 10),
                st.binary(max_size=3),
                st.integers(0, 5),
            ),
            st.builds(TransferRejected, st.just(b""), u16, text),
            st.builds(ImageHeld, st.just(b""), st.sampled_from([b"", b"\x00" * 32])),
        ),
        max_size=40,
    )
)
def test_sender_keeps_its_invariants_under_arbitrary_answers(answers: list[Message]) -> None:
    release = small_release(0)
    image = release.manifest.sha256
    sender = Sender(release.manifest, Limits(32, 4, 80), now=0.0, window=3)
    now = 0.0
    for answer in answers:
        message: Message = dataclasses.replace(answer, image=image)  # type: ignore[call-arg]
        if isinstance(message, ImageHeld) and not message.sha256:
            message = dataclasses.replace(message, sha256=image)
        now += 0.05
        with contextlib.suppress(ProtocolError):
            sender.message_received(message, now)
        sender.handle_timer(now)
        sender.next_actions(now, 10)
        assert 0 <= sender.blocks_acked <= sender.blocks_total
        assert sender.in_flight <= 3
        assert sender.in_flight_bytes <= 80
        if sender.state is SenderState.COMPLETE:
            assert sender.blocks_acked == sender.blocks_total
        if sender.state in (SenderState.COMPLETE, SenderState.FAILED):
            assert sender.next_deadline() is None  # nothing left to do once it ended


@FUZZ
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_sack_describes_exactly_the_held_set(case: tuple[int, set[int]]) -> None:
    size, held = case
    bitmap = Bitmap(size)
    for index in held:
        assert bitmap.add(index)
    base, bits = bitmap.sack()
    check_sack(base, bits, size)
    named = set(range(base)) | set(sack_indexes(base, bits))
    assert named == held
    assert base == min(set(range(size + 1)) - held)
    copy = Bitmap(size)
    assert sorted(copy.merge_sack(base, bits)) == sorted(held)
    again = Bitmap(size)
    again.replace_with_sack(base, bits)
    assert again.to_bytes() == bitmap.to_bytes()
    assert Bitmap.from_bytes(bitmap.to_bytes(), size).to_bytes() == bitmap.to_bytes()
    assert bitmap.highest() == max(held, default=-1)
