"""A seeded, virtual-time WAN link, and a harness that runs a Sender against a Receiver over it.

:class:`SimLink` models the MQTT path between otad and one CH, one :class:`Path` per direction:
one-way ``latency``, uniform extra ``jitter`` (first-in first-out, as on a TCP-carried MQTT
stream), random ``loss``, ``duplicate`` copies (a QoS 1 redelivery: arrives later, out of
order), and ``reorder`` (a message is held back ``reorder_delay`` so later ones overtake it). All
randomness comes from one ``random.Random(seed)``, so a run is reproducible.

:class:`TransferRun` wires a real :class:`~protocol.wan.sender.Sender` (with an in-memory image
store standing in for otad's) to a :class:`Hub` (a :class:`~protocol.wan.receiver.Receiver` plus an
in-memory block store standing in for the CH's flash). Every message crosses the link as bytes:
``encode()`` on one side, :func:`protocol.wire.messages.decode` on the other, so the wire format is
exercised. Manifests are really signed (:func:`protocol.release.cose.sign1`) and really verified
(:func:`protocol.release.trust.verify_manifest`) before any block is accepted.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.clock import UnixTime
from protocol.errors import ProtocolError
from protocol.release import cose, trust
from protocol.release.manifest import DeviceType, Manifest
from protocol.wan.receiver import (
    DiscardImage,
    Receiver,
    ReceiverAction,
    Reply,
    StoreBlock,
    VerifyImage,
)
from protocol.wan.sack import sack_indexes
from protocol.wan.sender import (
    SendBlock,
    SendCancel,
    Sender,
    SenderEvent,
    SenderState,
    SendOffer,
    SendPoll,
)
from protocol.wire.messages import (
    Block,
    Cancel,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    TransferAcked,
    decode,
)

CREATED = 1_700_000_000
EXPIRES = 1_800_000_000
VERIFY_AT = UnixTime(CREATED + 100)  # the CH's wall clock when an Offer arrives, unix seconds
DOWN, UP = "down", "up"

# --------------------------------------------------------------------------- releases


@dataclass(frozen=True)
class Release:
    """An image, its manifest, the signed manifest, and a trust store that verifies it."""

    image: bytes
    manifest: Manifest
    signed: bytes
    trust: trust.TrustStore

    def verify(self, signed: bytes, at: UnixTime = VERIFY_AT) -> Manifest:
        """The CH's ``verify_manifest`` closure (``at``: the transfer's update-start instant)."""
        return trust.verify_manifest(signed, self.trust, now=at)

    def block(self, index: int) -> bytes:
        size = self.manifest.block_size
        return self.image[index * size : (index + 1) * size]


_KEY: ec.EllipticCurvePrivateKey | None = None


def signing_key() -> ec.EllipticCurvePrivateKey:
    """One P-256 release key per test process."""
    global _KEY
    if _KEY is None:
        _KEY = ec.generate_private_key(ec.SECP256R1())
    return _KEY


def make_release(
    size: int = 256 * 1024,
    block_size: int = 1024,
    *,
    seed: int = 0,
    key: ec.EllipticCurvePrivateKey | None = None,
    store: trust.TrustStore | None = None,
) -> Release:
    """A random image of ``size`` bytes with a signed manifest."""
    image = random.Random(seed).randbytes(size)
    manifest = Manifest.for_image(
        image,
        vendor=0x1234,
        image_type=1,
        device_type=DeviceType.CH,
        hw_min=1,
        hw_max=9,
        fw_version=0x0102_0304 + seed,
        sequence=10 + seed,
        block_size=block_size,
        created=CREATED,
        expires=EXPIRES,
    )
    key = key or signing_key()
    signed = cose.sign1(manifest.encode(), key)
    return Release(image, manifest, signed, store or trust.TrustStore([key.public_key()]))


# --------------------------------------------------------------------------- the link


@dataclass
class Path:
    """Impairments of one direction of the link."""

    latency: float = 0.05
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.03


@dataclass
class PathStats:
    sent: int = 0
    bytes: int = 0
    lost: int = 0
    duplicated: int = 0
    delivered: int = 0


# ``tamper(data, now)`` may return other bytes, or None to drop the message.
Tamper = Callable[[bytes, float], "bytes | None"]


class SimLink:
    """Two one-way paths on virtual time; :meth:`pop` hands out messages in arrival order."""

    def __init__(self, seed: int, down: Path | None = None, up: Path | None = None) -> None:
        self.rng = random.Random(seed)
        self.paths = {DOWN: down or Path(), UP: up or Path()}
        self.stats = {DOWN: PathStats(), UP: PathStats()}
        self.tamper: dict[str, Tamper | None] = {DOWN: None, UP: None}
        self._fifo = {DOWN: 0.0, UP: 0.0}
        self._queue: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()

    def send(self, direction: str, data: bytes, now: float) -> None:
        path, stats, rng = self.paths[direction], self.stats[direction], self.rng
        stats.sent += 1
        stats.bytes += len(data)
        tamper = self.tamper[direction]
        if tamper is not None:
            tampered = tamper(data, now)
            if tampered is None:
                stats.lost += 1
                return
            data = tampered
        if rng.random() < path.loss:
            stats.lost += 1
            return
        copies = 2 if rng.random() < path.duplicate else 1
        stats.duplicated += copies - 1
        at = max(now + path.latency + rng.uniform(0.0, path.jitter), self._fifo[direction])
        self._fifo[direction] = at
        arrivals = [at]
        if copies == 2:
            arrivals.append(at + rng.uniform(0.0, path.latency))  # a redelivery comes later
        for arrival in arrivals:
            held = path.reorder_delay if rng.random() < path.reorder else 0.0
            heapq.heappush(self._queue, (arrival + held, next(self._order), direction, data))

    def hold(self, direction: str, data: bytes, until: float) -> None:
        """Deliver ``data`` again at ``until`` (a broker queueing it for an offline client)."""
        self.stats[direction].delivered -= 1
        heapq.heappush(self._queue, (until, next(self._order), direction, data))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop(self) -> tuple[float, str, bytes]:
        at, _, direction, data = heapq.heappop(self._queue)
        self.stats[direction].delivered += 1
        return at, direction, data

    def drop_in_flight(self, direction: str) -> int:
        """Lose every message still travelling in ``direction`` (its receiver went down)."""
        kept = [item for item in self._queue if item[2] != direction]
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        heapq.heapify(self._queue)
        self.stats[direction].lost += dropped
        return dropped


# --------------------------------------------------------------------------- the CH


class Hub:
    """The CH shell: a Receiver, an in-memory block store, and the persisted snapshot."""

    def __init__(
        self, limits: Limits, verify: Callable[[bytes, UnixTime], Manifest], **receiver_kw: object
    ) -> None:
        self.limits = limits
        self.verify = verify
        self.receiver_kw = receiver_kw
        self.receiver = Receiver(limits, verify, **receiver_kw)  # type: ignore[arg-type]
        self.store: dict[bytes, dict[int, bytes]] = {}
        self.persisted = self.receiver.snapshot()
        self.corrupt_writes = 0
        self.rewrites = 0
        self.decode_errors = 0
        self.restarts = 0

    def receive(self, message: Message, now: float) -> list[ReceiverAction]:
        """Feed one downlink message to the receiver (an Offer arrives at ``VERIFY_AT``)."""
        if isinstance(message, Offer):
            return self.receiver.offer_received(message, VERIFY_AT, now)
        return self.receiver.message_received(message, now)

    def stored_bytes(self, image: bytes) -> int:
        return sum(len(b) for b in self.store.get(image, {}).values())

    def assembled(self, image: bytes) -> bytes:
        blocks = self.store.get(image, {})
        return b"".join(blocks[i] for i in sorted(blocks))

    def apply(self, actions: list[ReceiverAction], now: float) -> list[Message]:
        """Carry out the receiver's actions; return the messages to publish upstream."""
        out: list[Message] = []
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, StoreBlock):
                manifest = self.receiver.manifest(action.image)
                assert manifest is not None
                if hashlib.sha256(action.data).digest() != manifest.block_hash(action.index):
                    self.corrupt_writes += 1
                blocks = self.store.setdefault(action.image, {})
                if action.index in blocks:
                    self.rewrites += 1
                assert action.offset == action.index * manifest.block_size
                blocks[action.index] = action.data
                assert self.stored_bytes(action.image) <= manifest.size
            elif isinstance(action, VerifyImage):
                image = self.assembled(action.image)[: action.size]
                digest = hashlib.sha256(image).digest()
                queue.extend(self.receiver.image_hashed(action.image, digest, now))
            elif isinstance(action, DiscardImage):
                self.store.pop(action.image, None)
            else:
                assert isinstance(action, Reply)
                if isinstance(action.message, (TransferAcked, ImageHeld)):
                    self.persisted = self.receiver.snapshot()  # durable before acknowledged
                out.append(action.message)
        return out

    def restart(self) -> None:
        """Power-cycle: the receiver comes back from the persisted snapshot; blocks stay."""
        self.restarts += 1
        self.receiver = Receiver.restore(
            self.persisted,
            self.limits,
            self.verify,
            **self.receiver_kw,  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------- the run


@dataclass
class Sent:
    at: float
    index: int
    copy: int  # 1 for the first send of this index, 2 for the second...
    ack_now: bool


@dataclass
class Arrived:
    at: float
    index: int
    sent_at: float


@dataclass
class TransferRun:
    """One Sender and one Hub over a SimLink, stepped on virtual time."""

    release: Release
    seed: int = 1
    down: Path = field(default_factory=Path)
    up: Path = field(default_factory=Path)
    limits: Limits = field(default_factory=lambda: Limits(max_block=1024, window=16, buffer=65536))
    window: int | None = None
    budget: int = 1000
    sender_kw: dict[str, object] = field(default_factory=dict)
    receiver_kw: dict[str, object] = field(default_factory=dict)
    start: float = 0.0

    def __post_init__(self) -> None:
        self.link = SimLink(self.seed, self.down, self.up)
        self.hub = Hub(self.limits, self.release.verify, **self.receiver_kw)
        self.now = self.start
        self.sender = self.new_sender()
        self.events: list[SenderEvent] = []
        self.sends: list[Sent] = []
        self.send_count: Counter[int] = Counter()
        self.arrivals: list[Arrived] = []
        self.sender_errors = 0
        self.hub_down_until = float("-inf")
        self.broker_queues = False
        self.daemon_down_until = float("-inf")
        self.retired: list[Sender] = []  # senders of earlier otad incarnations
        # independent bookkeeping of what the sender may know is held (SACKs it received)
        self.known_held: set[int] = set()
        self.max_unacked = 0
        self.max_unacked_bytes = 0
        self.on_step: list[Callable[[TransferRun], None]] = []

    def new_sender(self, acked: bytes | None = None) -> Sender:
        return Sender(
            self.release.manifest,
            self.limits,
            now=self.now,
            window=self.window,
            acked=acked,
            **self.sender_kw,  # type: ignore[arg-type]
        )

    # -- plumbing

    def _pump(self) -> None:
        now = self.now
        if now < self.daemon_down_until:
            return
        for action in self.sender.next_actions(now, self.budget):
            message: Message
            if isinstance(action, SendOffer):
                message = Offer(image=action.image, manifest=self.release.signed)
            elif isinstance(action, SendCancel):
                message = Cancel(image=action.image, reason=action.reason)
            elif isinstance(action, SendPoll):
                message = Poll(nonce=len(self.sends))
            else:
                assert isinstance(action, SendBlock)
                index = action.index
                self.send_count[index] += 1
                self.sends.append(Sent(now, index, self.send_count[index], action.ack_now))
                message = Block(
                    image=action.image,
                    index=index,
                    data=self.release.block(index),
                    ack_now=action.ack_now,
                )
                unacked = {s.index for s in self.sends} - self.known_held
                self.max_unacked = max(self.max_unacked, len(unacked))
                unacked_bytes = sum(self.release.manifest.block_length(i) for i in unacked)
                self.max_unacked_bytes = max(self.max_unacked_bytes, unacked_bytes)
            self.link.send(DOWN, message.encode(), now)
        self.events.extend(self.sender.events())

    def _deliver(self, direction: str, data: bytes, now: float) -> None:
        try:
            message = decode(data)
        except ProtocolError:
            if direction == DOWN:
                self.hub.decode_errors += 1
            else:
                self.sender_errors += 1
            return
        if direction == DOWN:
            if now < self.hub_down_until:
                if self.broker_queues:
                    self.link.hold(DOWN, data, self.hub_down_until)
                return
            if isinstance(message, Block):
                self.arrivals.append(Arrived(now, message.index, now))
            actions = self.hub.receive(message, now)
            for reply in self.hub.apply(actions, now):
                self.link.send(UP, reply.encode(), now)
            return
        if now < self.daemon_down_until:
            return  # otad is not running: nobody reads its topic
        if isinstance(message, TransferAcked):
            self.known_held.update(range(message.base))
            self.known_held.update(sack_indexes(message.base, message.bitmap))
        try:
            self.sender.message_received(message, now)
        except ProtocolError:
            self.sender_errors += 1

    def restart_hub(self, downtime: float, *, broker_queues: bool = False) -> None:
        """The CH reboots now and is unreachable for ``downtime`` seconds.

        ``broker_queues=False`` is the worst case (QoS 0 or a clean session): everything on its
        way to the CH, and everything sent while it is down, is lost. ``True`` models a
        persistent MQTT session: the broker holds those messages and delivers them, in order,
        when the CH is back."""
        self.broker_queues = broker_queues
        if not broker_queues:
            self.link.drop_in_flight(DOWN)
        self.hub_down_until = self.now + downtime
        self.hub.restart()

    def restart_daemon(self, downtime: float, acked: bytes | None) -> None:
        """kill -9 otad now; it comes back ``downtime`` seconds later with a new Sender resuming
        from ``acked`` (its journal)."""
        self.retired.append(self.sender)
        self.daemon_down_until = self.now + downtime
        self.now, now = self.daemon_down_until, self.now
        self.sender = self.new_sender(acked)
        self.now = now

    @property
    def bytes_sent(self) -> int:
        """Block bytes sent by every otad incarnation."""
        return self.sender.bytes_sent + sum(s.bytes_sent for s in self.retired)

    def step(self) -> bool:
        """Advance to the next event; False when nothing is left to happen."""
        link_at = self.link.next_time()
        receiver_at = self.hub.receiver.next_deadline()
        if receiver_at is not None:
            receiver_at = max(receiver_at, self.hub_down_until)  # a CH that is down sleeps
        times = [t for t in (link_at, self.sender.next_deadline(), receiver_at) if t is not None]
        if not times:
            return False
        self.now = max(self.now, min(times))
        now = self.now
        if link_at is not None and link_at <= now:
            _, direction, data = self.link.pop()
            self._deliver(direction, data, now)
        elif receiver_at is not None and receiver_at <= now:
            for reply in self.hub.apply(self.hub.receiver.handle_timer(now), now):
                self.link.send(UP, reply.encode(), now)
        else:
            self.sender.handle_timer(now)
        self._pump()
        for hook in self.on_step:
            hook(self)
        return True

    def run(self, max_time: float = 600.0) -> TransferRun:
        """Run until the sender finishes; fail the test if virtual time passes ``max_time``."""
        self._pump()
        while self.sender.state not in (SenderState.COMPLETE, SenderState.FAILED):
            if not self.step():
                raise AssertionError(f"deadlock at t={self.now:.3f} in {self.sender.state}")
            if self.now > self.start + max_time:
                raise AssertionError(f"not finished after {max_time} s: {self.sender.state}")
        return self

    @property
    def sends_per_block(self) -> float:
        return self.sender.blocks_sent / self.sender.blocks_total
