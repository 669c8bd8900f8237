"""A conformance kit for Communications Hub implementations: otad's side of SPEC, clause by clause.

``python -m loadtest conformance --broker HOST:PORT --guid GUID --trust DIR`` (or
:func:`run_conformance` from a test) connects to the broker with its own client id, plays otad
against the CH whose GUID it is given (publishing on ``ota/v1/ch/{guid}/down``, listening on
``.../up`` and ``.../state``, SPEC §2) and checks what the CH does against protocol/SPEC.md. Each
clause is one small ``async`` function registered in :data:`CLAUSES` with the SPEC section it
checks; it passes, fails (saying what SPEC expects and what the CH did) or is skipped (saying
why). Every message the CH sends is decoded with :func:`protocol.wire.messages.decode`: a message
that does not decode, or a type a CH never sends on that topic, fails the clause it arrived in.

The kit builds its own test images on the fly, signed with the release key found in the
``--trust`` directory (:func:`load_kit_key`), for the CH itself (device type ``CH``, hardware
range exactly the announced ``hw_version``), small (24 or more blocks of at most 1 KiB, within
the announced ``max_block`` and ``buffer``). Every image a clause offers is cancelled after it,
so the CH never runs out of transfer slots (``STORAGE_FULL``, §7.9).

What the kit can and cannot observe, and how it decides:

* **"At once"** (§7.5) is told apart from "after the ack delay" by time only: a SACK counts as
  immediate when it arrives within :attr:`Context.immediate` (0.25 s plus twice the slowest
  Offer round trip seen). A CH whose ack delay is shorter than that passes those clauses whether
  or not it acknowledges at once.
* **The last will** (§2) is visible only when the CH's connection dies without a DISCONNECT: the
  kit looks for ``HubWentOffline`` while it restarts the CH; with no restart, or a clean one,
  that clause is skipped and says so.
* **Rollback** (§6.4 checks 12-13): the kit cannot know the CH's installed sequence, so it offers
  sequence 0, which every CH must refuse (``REPLAYED`` with nothing installed, ``ROLLBACK``
  otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from mqttio import MqttClient, MqttSettings, create_client, parse_broker
from otad.ctl.imagetool import DEFAULT_IMAGE_TYPE, DEFAULT_MANUFACTURER
from otad.keyfiles import KeyFileError, load_private_key, public_key_path
from protocol.clock import Monotonic
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import MIN_BLOCK_SIZE, DeviceType, Manifest
from protocol.release.otaimg import build
from protocol.release.trust import TrustStore
from protocol.release.zigbee_ota import BASE_HEADER_LEN, SUB_ELEMENT_HEADER_LEN, wrap
from protocol.wan.sack import Bitmap, check_sack, covers
from protocol.wan.sender import (
    SendBlock,
    SendCancel,
    Sender,
    SenderAction,
    SendOffer,
    SendPoll,
    TransferCompleted,
    TransferFailed,
)
from protocol.wire import topics
from protocol.wire.limits import MAX_U32, MAX_U64
from protocol.wire.messages import (
    Block,
    Cancel,
    HubAnnounced,
    HubAnnouncedVersioned,
    HubWentOffline,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    Refused,
    TransferAcked,
    TransferRejected,
    decode,
    minor_version,
)

__all__ = [
    "CLAUSES",
    "Clause",
    "ClauseFailed",
    "ClauseResult",
    "ClauseSkipped",
    "Context",
    "Outcome",
    "Report",
    "clause",
    "load_kit_key",
    "run_conformance",
]

#: Message types a CH may publish on its up topic (SPEC §2) and on its state topic.
UPLINK_TYPES: tuple[type[Message], ...] = (TransferAcked, ImageHeld, TransferRejected)
ANNOUNCEMENT_TYPES: tuple[type[Message], ...] = (HubAnnounced, HubAnnouncedVersioned)
STATE_TYPES: tuple[type[Message], ...] = (*ANNOUNCEMENT_TYPES, HubWentOffline)

#: Blocks of a test image at least (the SPEC §7.3 example names block 19), and at most.
MIN_TEST_BLOCKS = 24
MAX_TEST_BLOCKS = 256
#: Largest block the kit uses (small images: tens of KiB).
MAX_TEST_BLOCK_SIZE = 1024
#: "At once" means within this much more than twice the slowest Offer round trip.
IMMEDIATE_SLACK = 0.25
#: How often a clause repeats a Block it wants a NO_TRANSFER answer to (the CH sends at most one
#: per image per ack delay, SPEC §7.2).
RESEND_INTERVAL = 0.5
#: How long a restarted CH may take to announce itself again, at least (a real one reboots).
RESTART_WAIT = 30.0

Restart = Callable[[], Awaitable[None]]
"""Restarts the CH under test (returns once it was told to; the kit waits for its announcement)."""


# ----------------------------------------------------------------------------- outcomes


class Outcome(Enum):
    """What became of one clause."""

    PASS = "PASS"  # noqa: S105 - an outcome, not a password
    FAIL = "FAIL"
    SKIP = "SKIP"


class ClauseFailed(Exception):  # noqa: N818 - what happened to the clause
    """The CH did not do what SPEC says: ``expected`` (SPEC's words) and ``seen`` (the CH's)."""

    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(f"expected {expected}; saw {seen}")
        self.expected = expected
        self.seen = seen


class ClauseSkipped(Exception):  # noqa: N818
    """The clause cannot be checked here; ``str(exc)`` says why."""


@dataclass(frozen=True, slots=True)
class ClauseResult:
    """The outcome of one clause."""

    name: str
    section: str
    description: str
    outcome: Outcome
    expected: str = ""
    seen: str = ""
    why: str = ""  # of a skip
    seconds: float = 0.0

    def line(self) -> str:
        """The one line the CLI prints for this clause."""
        text = f"{self.outcome.value}  {self.section:<10} {self.name:<22} {self.description}"
        if self.outcome is Outcome.FAIL:
            text += f" -- expected {self.expected}; saw {self.seen}"
        elif self.outcome is Outcome.SKIP:
            text += f" -- skipped: {self.why}"
        return text


@dataclass(slots=True)
class Report:
    """Every clause's result, in the order they ran."""

    guid: str
    results: list[ClauseResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ClauseResult]:
        """The clauses that failed."""
        return [r for r in self.results if r.outcome is Outcome.FAIL]

    @property
    def passed(self) -> bool:
        """True when no clause failed (skips do not fail a CH)."""
        return not self.failed

    def outcome(self, name: str) -> Outcome:
        """The outcome of the clause called ``name`` (``KeyError`` if it did not run)."""
        for result in self.results:
            if result.name == name:
                return result.outcome
        raise KeyError(name)

    def verdict(self) -> str:
        """The final line: whether the CH conforms, with the counts."""
        counts = {o: sum(1 for r in self.results if r.outcome is o) for o in Outcome}
        tally = (
            f"{counts[Outcome.PASS]} passed, {counts[Outcome.FAIL]} failed, "
            f"{counts[Outcome.SKIP]} skipped"
        )
        if self.passed:
            return f"verdict: {self.guid} CONFORMS ({tally})"
        names = ", ".join(r.name for r in self.failed)
        return f"verdict: {self.guid} DOES NOT CONFORM ({tally}: {names})"


# ----------------------------------------------------------------------------- the link


@dataclass(frozen=True, slots=True)
class Received:
    """One message from the CH as the kit received it."""

    at: float  # event-loop time
    topic: str  # "up" or "state"
    retained: bool
    message: Message | None  # None when it did not decode
    error: ProtocolError | None = None

    def problem(self) -> str | None:
        """Why this message breaks SPEC by itself (does not decode, wrong type), or None."""
        if self.error is not None:
            return (
                f"an undecodable message on {self.topic}: {self.error.reason.name}"
                f" ({self.error.detail})"
            )
        allowed = UPLINK_TYPES if self.topic == "up" else STATE_TYPES
        if not isinstance(self.message, allowed):
            return f"{type(self.message).__name__} on the {self.topic} topic"
        return None


def describe(message: Message | None) -> str:
    """A short human description of a CH message, for FAIL lines."""
    if isinstance(message, TransferAcked):
        return (
            f"TransferAcked(base={message.base}, bitmap={message.bitmap.hex(' ') or '-'}, "
            f"credit={message.credit})"
        )
    if isinstance(message, TransferRejected):
        return f"TransferRejected({reason_name(message.reason)}, {message.detail!r})"
    if isinstance(message, ImageHeld):
        return f"ImageHeld(sha256={message.sha256.hex()[:16]}...)"
    return type(message).__name__


def reason_name(code: int) -> str:
    """The §4 name of a reason code (the number if it has none)."""
    try:
        return Reason(code).name
    except ValueError:
        return str(code)


class Probe:
    """The kit's one MQTT connection: publishes on the CH's down topic and records everything
    the CH publishes on its up and state topics (decoded, in arrival order)."""

    def __init__(self, client: MqttClient, guid: str) -> None:
        self.guid = guid
        self.received: list[Received] = []
        self._client = client
        self._down = topics.down(guid)
        self._up = topics.up(guid)
        self._state = topics.state(guid)
        self._loop = asyncio.get_running_loop()
        self._waiters: list[asyncio.Future[None]] = []
        client.set_message_handler(self._on_message)

    @classmethod
    async def connect(cls, host: str, port: int, guid: str, *, library: str = "gmqtt") -> Probe:
        """Connect with a client id of its own and subscribe to the CH's up and state topics."""
        settings = MqttSettings(
            client_id=f"otad-conformance-{guid}-{os.urandom(3).hex()}",
            host=host,
            port=port,
            reconnect_min=0.2,
            reconnect_max=2.0,
        )
        client = create_client(library, settings)
        probe = cls(client, guid)
        await client.subscribe(probe._up, 1)
        await client.subscribe(probe._state, 1)
        await client.connect(fail_fast=True)
        return probe

    async def close(self) -> None:
        """Disconnect."""
        await self._client.disconnect()

    def now(self) -> float:
        """The event loop's (monotonic) time."""
        return self._loop.time()

    def send(self, message: Message) -> None:
        """Publish ``message`` to the CH at its type's QoS."""
        self._client.publish(self._down, message.encode(), message.QOS, False)

    def cursor(self) -> Cursor:
        """A reader of the messages that arrive from now on."""
        return Cursor(self, len(self.received))

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        kind = "up" if topic == self._up else "state" if topic == self._state else topic
        try:
            received = Received(self.now(), kind, retain, decode(payload))
        except ProtocolError as exc:
            received = Received(self.now(), kind, retain, None, exc)
        self.received.append(received)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_more(self, count: int, seconds: float) -> None:
        """Return when more than ``count`` messages were received, or after ``seconds``."""
        if len(self.received) > count or seconds <= 0:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, seconds)


class Cursor:
    """Reads the CH's messages in order from a position; fails the clause on one that breaks
    SPEC by itself (see :meth:`Received.problem`)."""

    def __init__(self, probe: Probe, position: int) -> None:
        self._probe = probe
        self.position = position
        self.skipped: list[Received] = []  # read past without matching (for FAIL lines)

    async def next(self, match: Callable[[Received], bool], within: float) -> Received | None:
        """The next message matching ``match`` within ``within`` seconds, or None."""
        probe = self._probe
        deadline = probe.now() + within
        while True:
            while self.position < len(probe.received):
                received = probe.received[self.position]
                self.position += 1
                problem = received.problem()
                if problem is not None:
                    raise ClauseFailed("every CH message to decode as SPEC §3 says", problem)
                if match(received):
                    return received
                self.skipped.append(received)
            left = deadline - probe.now()
            if left <= 0:
                return None
            await probe.wait_for_more(len(probe.received), left)

    def seen(self, image: bytes | None = None) -> str:
        """What was read past (for ``image`` if given), summarised for a FAIL line."""
        messages = [
            r.message
            for r in self.skipped
            if r.message is not None
            and (image is None or getattr(r.message, "image", None) == image)
        ]
        if not messages:
            return "nothing"
        shown = ", ".join(describe(m) for m in messages[-3:])
        return shown if len(messages) <= 3 else f"... {shown}"


# ----------------------------------------------------------------------------- test images


def load_kit_key(directory: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The release signing key in the kit's ``--trust`` directory.

    Layout: exactly one PKCS#8 private key ``NAME.pem`` with its public key ``NAME.pub.pem``
    beside it, as ``otactl keys new --out DIR/NAME.pem`` writes them; the CH under test trusts
    ``NAME.pub.pem`` (a copy of it in the CH's own trust store). Raises ``KeyFileError``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise KeyFileError(f"{path}: not a directory")
    keys = sorted(p for p in path.glob("*.pem") if not p.name.endswith(".pub.pem") and p.is_file())
    if len(keys) != 1:
        found = ", ".join(p.name for p in keys) or "none"
        raise KeyFileError(
            f"{path}: needs exactly one private signing key NAME.pem (with NAME.pub.pem beside "
            f"it; `otactl keys new --out {path}/release.pem` makes them), found {found}"
        )
    if not public_key_path(keys[0]).is_file():
        raise KeyFileError(f"{keys[0]}: no public key {public_key_path(keys[0]).name} beside it")
    return load_private_key(keys[0])


@dataclass(frozen=True, slots=True)
class TestImage:
    """A signed test image: the ``Offer`` manifest bytes and the OTA file the blocks carry."""

    signed: bytes
    data: bytes
    manifest: Manifest

    @property
    def image(self) -> bytes:
        """The image's wire name (its SHA-256)."""
        return self.manifest.sha256

    @property
    def count(self) -> int:
        """How many blocks it has."""
        return self.manifest.block_count

    def block(self, index: int, *, ack_now: bool = False) -> Block:
        """Block ``index`` as a conforming sender sends it."""
        start = index * self.manifest.block_size
        data = self.data[start : start + self.manifest.block_length(index)]
        return Block(self.image, index, data, ack_now)

    def offer(self) -> Offer:
        """The ``Offer`` of this image."""
        return Offer(self.image, self.signed)


class ImageFactory:
    """Signed test images that fit the announced CH (``otaimg.build``: the project's signer)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, announcement: HubAnnounced) -> None:
        limits = announcement.limits
        self.key = key
        self.announcement = announcement
        self.block_size = min(MAX_TEST_BLOCK_SIZE, limits.max_block, limits.buffer)
        #: blocks the CH takes unacknowledged at once (window and buffer)
        self.window = max(1, min(limits.window, limits.buffer // self.block_size))
        self.blocks = min(MAX_TEST_BLOCKS, max(MIN_TEST_BLOCKS, self.window + 4))
        self._sequence = int(time.time())

    def make(
        self,
        *,
        device_type: DeviceType = DeviceType.CH,
        sequence: int | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        expired: bool = False,
        blocks: int | None = None,
    ) -> TestImage:
        """A fresh image (random content) of ``blocks`` blocks, the last one half full."""
        count = self.blocks if blocks is None else blocks
        size = count * self.block_size - self.block_size // 2
        overhead = BASE_HEADER_LEN + 4 + SUB_ELEMENT_HEADER_LEN  # header with a hw range
        hw = self.announcement.hw_version
        ota = wrap(
            os.urandom(max(1, size - overhead)),
            manufacturer_code=DEFAULT_MANUFACTURER,
            image_type=DEFAULT_IMAGE_TYPE,
            file_version=(self.announcement.fw_version + 1) & MAX_U32,
            hw_min=hw,
            hw_max=hw,
        )
        now = int(time.time())
        if sequence is None:
            self._sequence += 1
            sequence = self._sequence
        created, expires = (now - 2 * 86_400, now - 86_400) if expired else (now - 60, now + 86_400)
        signed = build(
            ota,
            key or self.key,
            device_type=device_type,
            sequence=min(sequence, MAX_U64),
            block_size=self.block_size,
            created=created,
            expires=expires,
        )
        manifest = Manifest.decode(_payload(signed.signed_manifest, key or self.key))
        return TestImage(signed.signed_manifest, signed.image, manifest)


def _payload(signed: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The manifest bytes of ``signed`` (verified against ``key``: the kit checks its own work)."""
    return TrustStore([key.public_key()]).verify(signed, max_size=len(signed))


# ----------------------------------------------------------------------------- the context


@dataclass(slots=True)
class Context:
    """What the clauses share: the link, the CH's announcement, the image factory, the restart."""

    probe: Probe
    guid: str
    key: ec.EllipticCurvePrivateKey
    timeout: float
    restart: Restart | None
    announcement: HubAnnounced | None = None
    factory: ImageFactory | None = None
    offer_rtt: float = 0.0  # slowest Offer round trip seen
    offered: set[bytes] = field(default_factory=set)  # images to cancel after the clause
    credits: list[int] = field(default_factory=list)  # credit of every SACK the kit waited for
    will_seen: HubWentOffline | None = None
    restarted: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(8))

    # -------------------------------------------------------------- what a clause needs

    @property
    def limits(self) -> Limits:
        """The announced limits (the clause is skipped when there is no usable announcement)."""
        return self.images().announcement.limits

    @property
    def immediate(self) -> float:
        """How soon a SACK must come to count as sent "at once" (see the module docstring)."""
        return IMMEDIATE_SLACK + 2 * self.offer_rtt

    def images(self) -> ImageFactory:
        """The image factory; skips the clause when the CH gave no usable announcement."""
        if self.factory is None:
            raise ClauseSkipped("no usable announcement from the CH (see 'announcement')")
        return self.factory

    def image(
        self,
        *,
        device_type: DeviceType = DeviceType.CH,
        sequence: int | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        expired: bool = False,
    ) -> TestImage:
        """A fresh signed test image (see :meth:`ImageFactory.make`)."""
        return self.images().make(
            device_type=device_type, sequence=sequence, key=key, expired=expired
        )

    def send(self, message: Message) -> None:
        """Publish to the CH; an offered image is cancelled after the clause."""
        if isinstance(message, Offer):
            self.offered.add(message.image)
        self.probe.send(message)

    async def expect(
        self,
        match: Callable[[Message], bool],
        expected: str,
        *,
        cursor: Cursor,
        within: float | None = None,
        image: bytes | None = None,
    ) -> Message:
        """The next CH message ``match`` accepts, or fail with ``expected`` and what came."""
        wait = self.timeout if within is None else within
        received = await cursor.next(lambda r: r.message is not None and match(r.message), wait)
        if received is None or received.message is None:
            raise ClauseFailed(expected, f"{cursor.seen(image)} within {wait:.2f} s")
        message = received.message
        if isinstance(message, TransferAcked):
            self.credits.append(message.credit)
        return message

    async def sack(
        self,
        image: TestImage,
        expected: str,
        *,
        cursor: Cursor,
        within: float | None = None,
        also: Callable[[TransferAcked], bool] = lambda m: True,
    ) -> TransferAcked:
        """The next ``TransferAcked`` for ``image`` that ``also`` accepts. A refusal of the image
        fails at once (with its reason); a SACK naming blocks past the image fails too."""

        def match(message: Message) -> bool:
            if getattr(message, "image", None) != image.image:
                return False
            if isinstance(message, TransferRejected):
                return True
            return isinstance(message, TransferAcked) and also(message)

        message = await self.expect(
            match, expected, cursor=cursor, within=within, image=image.image
        )
        if not isinstance(message, TransferAcked):
            raise ClauseFailed(expected, describe(message))
        try:
            check_sack(message.base, message.bitmap, image.count)
        except ProtocolError as exc:
            raise ClauseFailed(
                f"a SACK within the image's {image.count} blocks", exc.detail
            ) from None
        return message

    async def open_transfer(self, image: TestImage) -> TransferAcked:
        """Offer ``image`` and require the answer of §7.2 for a new image: an empty SACK."""
        cursor = self.probe.cursor()
        sent = self.probe.now()
        self.send(image.offer())
        ack = await self.sack(
            image, "the Offer of a new image answered with TransferAcked", cursor=cursor
        )
        self.offer_rtt = max(self.offer_rtt, self.probe.now() - sent)
        if (ack.base, ack.bitmap) != (0, b""):
            raise ClauseFailed("an empty SACK (base 0, no bitmap) for a new image", describe(ack))
        return ack

    async def deliver_blocks(
        self, image: TestImage, indexes: Sequence[int], *, resend: bool = True
    ) -> TransferAcked | ImageHeld:
        """Send ``indexes`` (in that order, repeats allowed) a window at a time, each window's
        last block with ``ack_now``, and wait until a SACK covers the whole window (or the CH
        reports the image held). With ``resend`` the window goes again once a second meanwhile
        (blocks travel at QoS 0). Returns the last answer."""
        window = self.images().window
        last: TransferAcked | ImageHeld | None = None
        for start in range(0, len(indexes), window):
            chunk = list(indexes[start : start + window])
            last = await self._deliver_window(image, chunk, resend)
        assert last is not None
        return last

    async def _deliver_window(
        self, image: TestImage, chunk: list[int], resend: bool
    ) -> TransferAcked | ImageHeld:
        def answered(message: Message) -> bool:
            if getattr(message, "image", None) != image.image:
                return False
            if isinstance(message, (ImageHeld, TransferRejected)):
                return True
            return isinstance(message, TransferAcked) and all(
                covers(i, message.base, message.bitmap) for i in chunk
            )

        expected = f"a SACK covering blocks {sorted(set(chunk))}"
        cursor = self.probe.cursor()
        deadline = self.probe.now() + self.timeout
        while True:
            for position, index in enumerate(chunk):
                self.send(image.block(index, ack_now=position == len(chunk) - 1))
            left = deadline - self.probe.now()
            try:
                message = await self.expect(
                    answered,
                    expected,
                    cursor=cursor,
                    within=max(0.0, min(1.0, left) if resend else left),
                    image=image.image,
                )
            except ClauseFailed:
                if not resend or self.probe.now() >= deadline:
                    raise
                continue
            if isinstance(message, TransferRejected):
                raise ClauseFailed(expected, describe(message))
            assert isinstance(message, (TransferAcked, ImageHeld))
            return message

    async def expect_no_transfer(self, image: bytes, block: Block, why: str) -> None:
        """Send ``block`` (again every :data:`RESEND_INTERVAL`) until the CH answers
        ``TransferRejected(NO_TRANSFER)`` for its image; fail if it answers anything else."""
        cursor = self.probe.cursor()
        deadline = self.probe.now() + self.timeout
        expected = f"TransferRejected(NO_TRANSFER) for a Block after {why}"
        while self.probe.now() < deadline:
            self.probe.send(block)
            received = await cursor.next(
                lambda r: getattr(r.message, "image", None) == image,
                min(RESEND_INTERVAL, max(0.0, deadline - self.probe.now())),
            )
            if received is None:
                continue
            message = received.message
            if isinstance(message, TransferRejected) and message.reason == Reason.NO_TRANSFER:
                return
            raise ClauseFailed(expected, describe(message))
        raise ClauseFailed(expected, f"nothing within {self.timeout:.2f} s")

    async def poll(self, image: TestImage) -> Message:
        """Poll the CH and return its answer for ``image`` (``TransferAcked`` or ``ImageHeld``)."""
        cursor = self.probe.cursor()
        self.probe.send(Poll(self.rng.getrandbits(64)))
        return await self.expect(
            lambda m: (
                getattr(m, "image", None) == image.image
                and isinstance(m, (TransferAcked, ImageHeld))
            ),
            "a Poll answered with the image's state (§7.2)",
            cursor=cursor,
            image=image.image,
        )

    async def drive(self, image: TestImage, *, holds_manifest: bool = False) -> ImageHeld:
        """Transfer ``image`` with :class:`protocol.wan.sender.Sender` (otad's own machine) to
        the end; return the CH's ``ImageHeld``, or fail with the transfer's reason."""
        probe = self.probe
        sender = Sender(
            image.manifest, self.limits, now=Monotonic(probe.now()), holds_manifest=holds_manifest
        )
        cursor = probe.cursor()
        recent: deque[Message] = deque(maxlen=3)  # the CH's last messages for the image
        allowed = 4 * self.timeout + 0.2 * image.count
        deadline = probe.now() + allowed
        expected = "the transfer driven by otad's Sender to end with ImageHeld"
        while True:
            self._publish(image, sender.next_actions(Monotonic(probe.now()), image.count))
            for event in sender.events():
                if isinstance(event, TransferCompleted):
                    return next(m for m in reversed(recent) if isinstance(m, ImageHeld))
                if isinstance(event, TransferFailed):
                    last = ", ".join(describe(m) for m in recent) or "nothing"
                    raise ClauseFailed(
                        expected,
                        f"it failed {event.reason.name} ({event.detail}); last from the CH: {last}",
                    )
            left = deadline - probe.now()
            if left <= 0:
                last = ", ".join(describe(m) for m in recent) or "nothing"
                raise ClauseFailed(
                    expected,
                    f"still {sender.state.value} after {allowed:.0f} s; last from the CH: {last}",
                )
            due = sender.next_deadline()
            wait = left if due is None else min(left, due - probe.now())
            received = await cursor.next(
                lambda r: getattr(r.message, "image", None) == image.image, max(0.0, wait)
            )
            now = Monotonic(probe.now())
            if received is None or received.message is None:
                sender.handle_timer(now)
                continue
            message = received.message
            recent.append(message)
            if isinstance(message, TransferAcked):
                self.credits.append(message.credit)
            if isinstance(message, ImageHeld) and message.sha256 != image.image:
                raise ClauseFailed("ImageHeld with the image's SHA-256", message.sha256.hex())
            try:
                sender.message_received(message, now)
            except ProtocolError as exc:
                raise ClauseFailed(
                    "messages otad's Sender can apply", f"{describe(message)}: {exc}"
                ) from None

    def _publish(self, image: TestImage, actions: Iterable[SenderAction]) -> None:
        """Carry out what the Sender asks for, as otad's shell does."""
        for action in actions:
            if isinstance(action, SendOffer):
                self.send(image.offer())
            elif isinstance(action, SendPoll):
                self.probe.send(Poll(self.rng.getrandbits(64)))
            elif isinstance(action, SendBlock):
                self.probe.send(image.block(action.index, ack_now=action.ack_now))
            elif isinstance(action, SendCancel):
                self.probe.send(Cancel(image.image, action.reason))

    async def cleanup(self) -> None:
        """Cancel every image offered during the clause (the CH discards them, §7.2)."""
        for image in sorted(self.offered):
            self.probe.send(Cancel(image, Reason.CANCELLED))
        self.offered.clear()


# ----------------------------------------------------------------------------- clauses


ClauseFunction = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Clause:
    """One check of SPEC: a name, the section, one line saying what it checks, the check."""

    name: str
    section: str
    description: str
    run: ClauseFunction


#: Every clause, in the order they run (add one with :func:`clause`).
CLAUSES: list[Clause] = []


def clause(name: str, section: str, description: str) -> Callable[[ClauseFunction], ClauseFunction]:
    """Register the decorated ``async def check(ctx)`` as a clause (appended to :data:`CLAUSES`)."""

    def register(run: ClauseFunction) -> ClauseFunction:
        if any(c.name == name for c in CLAUSES):
            raise ValueError(f"duplicate clause {name!r}")
        CLAUSES.append(Clause(name, section, description, run))
        return run

    return register


@clause("announcement", "§2 §3 §7.4", "a retained, decodable HubAnnounced with usable limits")
async def check_announcement(ctx: Context) -> None:
    """The retained state: an announcement whose guid is the topic's, with limits the kit (and
    otad) can serve. Sets up the context's image factory."""
    probe = ctx.probe
    cursor = Cursor(probe, 0)  # the retained message came with the subscription
    received = await cursor.next(lambda r: r.topic == "state" and r.retained, ctx.timeout)
    if received is None:
        raise ClauseFailed(
            "a retained message on ota/v1/ch/{guid}/state",
            f"{cursor.seen()} within {ctx.timeout:.2f} s",
        )
    message = received.message
    if isinstance(message, HubWentOffline):
        raise ClauseFailed("the CH online (a retained HubAnnounced)", "HubWentOffline")
    assert isinstance(message, HubAnnounced)
    if message.guid != ctx.guid:
        raise ClauseFailed(f"guid {ctx.guid} (the topic's, §2)", f"guid {message.guid}")
    limits = message.limits
    if limits.window < 1 or limits.max_block < MIN_BLOCK_SIZE or limits.buffer < MIN_BLOCK_SIZE:
        raise ClauseFailed(
            f"usable limits (window >= 1, max_block and buffer >= {MIN_BLOCK_SIZE} B)",
            f"max_block {limits.max_block}, window {limits.window}, buffer {limits.buffer}",
        )
    ctx.announcement = message
    ctx.factory = ImageFactory(ctx.key, message)


@clause("offer-answered", "§7.2", "an Offer of a new image is answered with an empty SACK")
async def check_offer_answered(ctx: Context) -> None:
    """§7.2: the answer to an Offer is the CH's state, empty for an image it never saw."""
    ack = await ctx.open_transfer(ctx.image())
    if ack.credit > ctx.limits.window:
        raise ClauseFailed(f"credit <= window {ctx.limits.window}", describe(ack))


def _bad_manifest_clause(
    name: str, description: str, reasons: tuple[Reason, ...], make: Callable[[Context], TestImage]
) -> None:
    """Register a clause offering a manifest the CH must refuse with one of ``reasons``."""

    async def check(ctx: Context) -> None:
        image = make(ctx)
        cursor = ctx.probe.cursor()
        ctx.send(image.offer())
        wanted = " or ".join(f"TransferRejected({r.name})" for r in reasons)
        answer = await ctx.expect(
            lambda m: getattr(m, "image", None) == image.image,
            wanted,
            cursor=cursor,
            image=image.image,
        )
        if not (isinstance(answer, TransferRejected) and answer.reason in reasons):
            raise ClauseFailed(wanted, describe(answer))
        await ctx.expect_no_transfer(image.image, image.block(0), "a refused Offer")

    clause(name, "§6.4 §7.9", description)(check)


def _bad_signature(ctx: Context) -> TestImage:
    image = ctx.image()
    signed = bytearray(image.signed)
    signed[-1] ^= 0x01  # the last byte of the COSE_Sign1 is the signature's
    return TestImage(bytes(signed), image.data, image.manifest)


def _wrong_device_type(ctx: Context) -> TestImage:
    present = {device.device_type for device in ctx.images().announcement.han}
    for kind in DeviceType:
        if kind is not DeviceType.CH and kind.value not in present:
            return ctx.image(device_type=kind)
    raise ClauseSkipped("the CH announced a HAN device of every type")


_bad_manifest_clause(
    "manifest-bad-signature",
    "a manifest whose signature does not verify is refused, no state kept",
    (Reason.BAD_SIGNATURE,),
    _bad_signature,
)
_bad_manifest_clause(
    "manifest-unknown-key",
    "a manifest signed by a key the CH does not trust is refused",
    (Reason.UNKNOWN_KEY_ID,),
    lambda ctx: ctx.image(key=ec.generate_private_key(ec.SECP256R1())),
)
_bad_manifest_clause(
    "manifest-expired",
    "an expired manifest is refused",
    (Reason.EXPIRED,),
    lambda ctx: ctx.image(expired=True),
)
_bad_manifest_clause(
    "manifest-device-type",
    "a manifest for a device type the premises lacks is refused",
    (Reason.WRONG_DEVICE_TYPE,),
    _wrong_device_type,
)
_bad_manifest_clause(
    "manifest-rollback",
    "a manifest of sequence 0 (never above the installed one) is refused",
    (Reason.ROLLBACK, Reason.REPLAYED),
    lambda ctx: ctx.image(sequence=0),
)


@clause("block-bad-hash", "§7.9 §7.5", "a block failing its signed hash: not held, SACK at once")
async def check_block_bad_hash(ctx: Context) -> None:
    """A corrupt block 0 is dropped and answered at once; the genuine one is then taken."""
    image = ctx.image()
    await ctx.open_transfer(image)
    good = image.block(0)
    corrupt = Block(image.image, 0, bytes([good.data[0] ^ 0xFF]) + good.data[1:])
    await _expect_dropped(ctx, image, corrupt, "a block whose hash is wrong")
    cursor = ctx.probe.cursor()
    ctx.send(image.block(0, ack_now=True))
    await ctx.sack(
        image,
        "the genuine block 0 held after a corrupt copy (base 1)",
        cursor=cursor,
        also=lambda m: m.base >= 1,
    )


async def _expect_dropped(ctx: Context, image: TestImage, block: Block, what: str) -> None:
    """Send ``block`` (without ack_now) to a transfer holding nothing: the CH must answer at
    once with a SACK that does not hold it (§7.9)."""
    cursor = ctx.probe.cursor()
    ctx.send(block)
    ack = await ctx.sack(
        image, f"an immediate SACK after {what}", cursor=cursor, within=ctx.immediate
    )
    if covers(block.index, ack.base, ack.bitmap):
        raise ClauseFailed(f"{what} not held", describe(ack))


@clause("block-wrong-length", "§7.9", "blocks longer or shorter than their slot: not held, SACK")
async def check_block_wrong_length(ctx: Context) -> None:
    """One byte too many (``BLOCK_SIZE`` / ``TOO_MANY_BYTES``) and one too few (``BLOCK_SIZE``)."""
    image = ctx.image()
    await ctx.open_transfer(image)
    good = image.block(0)
    await _expect_dropped(
        ctx, image, Block(image.image, 0, good.data + b"\0"), "a block one byte too long"
    )
    await _expect_dropped(
        ctx, image, Block(image.image, 0, good.data[:-1]), "a block one byte too short"
    )


@clause("block-out-of-range", "§7.9", "a block past the image's last index changes nothing")
async def check_block_out_of_range(ctx: Context) -> None:
    """Index ``count`` is dropped: the state a Poll reports afterwards is still empty."""
    image = ctx.image()
    await ctx.open_transfer(image)
    ctx.send(Block(image.image, image.count, image.block(0).data, True))
    state = await ctx.poll(image)
    if not isinstance(state, TransferAcked) or (state.base, state.bitmap) != (0, b""):
        raise ClauseFailed("the state unchanged (an empty SACK)", describe(state))


@clause("block-unknown-image", "§7.2 §7.9", "a block for an image never offered: NO_TRANSFER")
async def check_block_unknown_image(ctx: Context) -> None:
    """A Block naming an unknown digest creates no state and is answered NO_TRANSFER."""
    image = hashlib.sha256(os.urandom(32)).digest()
    await ctx.expect_no_transfer(
        image, Block(image, 0, os.urandom(ctx.images().block_size)), "no Offer at all"
    )


@clause("sack-layout", "§7.3", "SACK base and LSB-first bitmap exact (SPEC's example 29 80)")
async def check_sack_layout(ctx: Context) -> None:
    """Blocks {0, 1, 2, 4, 7, 9, 19} one by one, each with ack_now: every SACK is exactly the
    set held so far; the last is ``base 3, bitmap 29 80``."""
    image = ctx.image()
    await ctx.open_transfer(image)
    held = Bitmap(image.count)
    for index in (0, 1, 2, 4, 7, 9, 19):
        held.add(index)
        base, bitmap = held.sack()
        cursor = ctx.probe.cursor()
        ctx.send(image.block(index, ack_now=True))
        ack = await ctx.sack(image, f"a SACK after block {index}", cursor=cursor)
        if (ack.base, ack.bitmap) != (base, bitmap):
            raise ClauseFailed(
                f"base {base}, bitmap {bitmap.hex(' ') or '-'} after block {index}",
                describe(ack),
            )
    state = await ctx.poll(image)
    if not isinstance(state, TransferAcked) or (state.base, state.bitmap) != (3, b"\x29\x80"):
        raise ClauseFailed("the Poll answered base 3, bitmap 29 80", describe(state))


@clause("sack-at-once", "§7.5", "SACK at once on a gap, a filled gap, ack_now and a duplicate")
async def check_sack_at_once(ctx: Context) -> None:
    """Block 2 (a gap opens), block 0 (fills part of it), block 1 with ack_now (in order, would
    otherwise wait), block 1 again (a duplicate): each answered within :attr:`immediate`."""
    image = ctx.image()
    await ctx.open_transfer(image)
    steps = (
        (image.block(2), "a gap (block 2 first)", (0, b"\x02")),
        (image.block(0), "a block filling part of the gap", (1, b"\x01")),
        (image.block(1, ack_now=True), "ack_now", (3, b"")),
        (image.block(1), "a duplicate", (3, b"")),
    )
    for block, what, (base, bitmap) in steps:
        cursor = ctx.probe.cursor()
        ctx.send(block)
        ack = await ctx.sack(
            image, f"a SACK at once after {what}", cursor=cursor, within=ctx.immediate
        )
        if (ack.base, ack.bitmap) != (base, bitmap):
            raise ClauseFailed(
                f"base {base}, bitmap {bitmap.hex(' ') or '-'} after {what}", describe(ack)
            )


@clause("window-honoured", "§7.4", "a full window (and buffer) of blocks is all acknowledged")
async def check_window(ctx: Context) -> None:
    """Exactly ``min(window, buffer / block)`` blocks at once: the CH takes them all."""
    image = ctx.image()
    await ctx.open_transfer(image)
    window = ctx.images().window
    ack = await ctx.deliver_blocks(image, list(range(window)), resend=False)
    if not isinstance(ack, TransferAcked) or ack.base < window:
        raise ClauseFailed(f"base {window} after a window of {window}", describe(ack))


@clause("duplicates-reordered", "§1 §7.9", "every block twice, shuffled: ImageHeld, right digest")
async def check_duplicates_reordered(ctx: Context) -> None:
    """Each index sent twice in a shuffled order (a window at a time) ends in ImageHeld with the
    image's SHA-256."""
    image = ctx.image()
    await ctx.open_transfer(image)
    order = [*range(image.count), *range(image.count)]
    ctx.rng.shuffle(order)
    cursor = ctx.probe.cursor()
    await ctx.deliver_blocks(image, order)
    held = await ctx.expect(
        lambda m: getattr(m, "image", None) == image.image and isinstance(m, ImageHeld),
        "ImageHeld once every block is held",
        cursor=cursor,
        image=image.image,
    )
    assert isinstance(held, ImageHeld)
    if held.sha256 != image.image:
        raise ClauseFailed(f"sha256 {image.image.hex()}", held.sha256.hex())


@clause("full-transfer", "§7", "a transfer driven by otad's Sender ends in ImageHeld")
async def check_full_transfer(ctx: Context) -> None:
    """protocol.wan.sender.Sender from Offer to ImageHeld with the image's digest."""
    await ctx.drive(ctx.image())


@clause("held-re-reported", "§7.2", "a held image is re-reported on Poll and on a repeated Offer")
async def check_held_re_reported(ctx: Context) -> None:
    """After ImageHeld, a Poll and a repeated Offer are each answered ImageHeld (what rescues a
    lost ImageHeld)."""
    image = ctx.image()
    await ctx.drive(image)
    state = await ctx.poll(image)
    if not isinstance(state, ImageHeld) or state.sha256 != image.image:
        raise ClauseFailed("ImageHeld (with its digest) in answer to a Poll", describe(state))
    cursor = ctx.probe.cursor()
    ctx.send(image.offer())
    answer = await ctx.expect(
        lambda m: getattr(m, "image", None) == image.image,
        "ImageHeld in answer to a repeated Offer",
        cursor=cursor,
        image=image.image,
    )
    if not isinstance(answer, ImageHeld) or answer.sha256 != image.image:
        raise ClauseFailed("ImageHeld (with its digest) to a repeated Offer", describe(answer))


@clause("minor-version", "§5", "the announcement declares the CH's minor version (1.0 or 1.1)")
async def check_minor_version(ctx: Context) -> None:
    """A HubAnnounced declares 1.0; a HubAnnouncedVersioned its ``minor`` (at least 1). The
    clauses marked 1.1 below run only for a CH that declared it."""
    announcement = ctx.announcement
    if announcement is None:
        raise ClauseSkipped("no usable announcement from the CH (see 'announcement')")
    if isinstance(announcement, HubAnnouncedVersioned) and announcement.minor < 1:
        raise ClauseFailed("minor >= 1 in a HubAnnouncedVersioned", f"minor {announcement.minor}")


def _needs_1_1(ctx: Context) -> None:
    if ctx.announcement is None or minor_version(ctx.announcement) < 1:
        raise ClauseSkipped("the CH declared protocol 1.0 (a 1.1 clause)")


@clause("held-block-reported", "§5", "1.1: a Block for a held image is answered with ImageHeld")
async def check_held_block_reported(ctx: Context) -> None:
    """A repeat of the ImageHeld that may have been lost, whatever otad sends next."""
    _needs_1_1(ctx)
    image = ctx.image()
    await ctx.drive(image)
    cursor = ctx.probe.cursor()
    ctx.send(image.block(0))
    answer = await ctx.expect(
        lambda m: isinstance(m, ImageHeld) and m.image == image.image,
        "ImageHeld in answer to a Block for the held image",
        cursor=cursor,
        image=image.image,
    )
    if not isinstance(answer, ImageHeld) or answer.sha256 != image.image:
        raise ClauseFailed("ImageHeld with the image's digest", describe(answer))


@clause("refused-understood", "§5.1", "1.1: a Refused is taken silently; the CH keeps working")
async def check_refused_understood(ctx: Context) -> None:
    """The CH answers nothing to a Refused (never a TransferRejected about it), and still
    answers the next Offer. Reports of images it holds or receives (late repeats of earlier
    clauses' ImageHeld and SACKs) are not answers to the Refused and are not counted."""
    _needs_1_1(ctx)
    cursor = ctx.probe.cursor()
    ctx.send(Refused(of=HubAnnouncedVersioned.TYPE, reason=Reason.MALFORMED, detail="conformance"))
    answer = await cursor.next(
        lambda r: r.topic == "up" and not isinstance(r.message, (ImageHeld, TransferAcked)),
        ctx.immediate,
    )
    if answer is not None:
        raise ClauseFailed("no answer to a Refused", describe(answer.message))
    await ctx.open_transfer(ctx.image())


@clause("resume-after-restart", "§7.8", "after a CH restart the SACK keeps every acked block")
async def check_resume(ctx: Context) -> None:
    """Half the image acknowledged, the CH restarted, a new announcement, a re-Offer: the SACK
    holds every block acknowledged before (persist-before-ack) and the transfer completes."""
    if ctx.restart is None:
        raise ClauseSkipped("no restart command given (--restart-command)")
    image = ctx.image()
    await ctx.open_transfer(image)
    ack = await ctx.deliver_blocks(image, list(range(image.count // 2)))
    if not isinstance(ack, TransferAcked):
        raise ClauseFailed("a SACK for half the image", describe(ack))
    acknowledged = [i for i in range(image.count) if covers(i, ack.base, ack.bitmap)]
    await _restart(ctx)
    cursor = ctx.probe.cursor()
    ctx.send(image.offer())
    state = await ctx.sack(image, "a SACK answering the re-Offer after the restart", cursor=cursor)
    lost = [i for i in acknowledged if not covers(i, state.base, state.bitmap)]
    if lost:
        raise ClauseFailed(
            f"every block acknowledged before the restart still held ({len(acknowledged)})",
            f"{describe(state)}: blocks {lost[:8]} forgotten",
        )
    await ctx.drive(image, holds_manifest=True)


async def _restart(ctx: Context) -> None:
    """Restart the CH and wait for its new announcement (noting a last will on the way)."""
    assert ctx.restart is not None
    cursor = ctx.probe.cursor()
    await ctx.restart()
    ctx.restarted = True
    wait = max(RESTART_WAIT, 3 * ctx.timeout)

    def announced(received: Received) -> bool:
        if isinstance(received.message, HubWentOffline):
            ctx.will_seen = received.message
        return received.topic == "state" and isinstance(received.message, ANNOUNCEMENT_TYPES)

    if await cursor.next(announced, wait) is None:
        raise ClauseFailed("a new HubAnnounced after the restart", f"nothing within {wait:.0f} s")


@clause("last-will", "§2", "the CH's last will is a retained HubWentOffline with its guid")
async def check_last_will(ctx: Context) -> None:
    """Seen only if the restart cut the connection (a clean DISCONNECT discards the will)."""
    if not ctx.restarted:
        raise ClauseSkipped("not observable without a restart (--restart-command) that cuts")
    if ctx.will_seen is None:
        raise ClauseSkipped("not observable: the restart disconnected cleanly (no will published)")
    if ctx.will_seen.guid != ctx.guid:
        raise ClauseFailed(f"HubWentOffline(guid {ctx.guid})", f"guid {ctx.will_seen.guid}")


@clause("cancel", "§7.2", "after Cancel, a Block for the image is answered NO_TRANSFER")
async def check_cancel(ctx: Context) -> None:
    """Cancel discards the image and its state."""
    image = ctx.image()
    await ctx.open_transfer(image)
    await ctx.deliver_blocks(image, [0, 1])
    ctx.probe.send(Cancel(image.image, Reason.CANCELLED))
    await asyncio.sleep(ctx.immediate)  # Cancel is QoS 1, Blocks QoS 0: let it arrive first
    await ctx.expect_no_transfer(image.image, image.block(2), "Cancel")


@clause("credit-within-window", "§7.3 §7.4", "every SACK's credit is at most the window")
async def check_credit(ctx: Context) -> None:
    """Over every SACK the clauses above waited for."""
    if not ctx.credits:
        raise ClauseSkipped("no SACK seen")
    window = ctx.limits.window
    over = [c for c in ctx.credits if c > window]
    if over:
        raise ClauseFailed(f"credit <= window {window}", f"credit {max(over)}")


# ----------------------------------------------------------------------------- the runner


async def run_conformance(
    broker: str | tuple[str, int],
    guid: str,
    trust_dir: str | os.PathLike[str],
    *,
    restart: Restart | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - a budget per answer, not a deadline
    library: str = "gmqtt",
    clauses: Iterable[Clause] | None = None,
    on_result: Callable[[ClauseResult], None] | None = None,
) -> Report:
    """Check the CH ``guid`` on ``broker`` clause by clause (see the module docstring).

    ``trust_dir`` holds the release key the CH trusts (:func:`load_kit_key`); ``restart``
    restarts the CH (the resume and last-will clauses are skipped without it); ``timeout`` is
    how long the kit waits for an answer SPEC requires. ``on_result`` sees each result as it
    comes. Raises ``KeyFileError`` for an unusable key directory and ``MqttConnectError`` when
    the broker cannot be reached; everything the CH does is in the report.
    """
    host, port = parse_broker(broker) if isinstance(broker, str) else broker
    topics.check_guid(guid)
    key = load_kit_key(trust_dir)
    probe = await Probe.connect(host, port, guid, library=library)
    ctx = Context(probe=probe, guid=guid, key=key, timeout=timeout, restart=restart)
    report = Report(guid)
    try:
        for item in CLAUSES if clauses is None else clauses:
            result = await _run_one(ctx, item)
            report.results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        await probe.close()
    return report


async def _run_one(ctx: Context, item: Clause) -> ClauseResult:
    started = ctx.probe.now()
    first = len(ctx.probe.received)
    outcome, expected, seen, why = Outcome.PASS, "", "", ""
    try:
        await item.run(ctx)
    except ClauseFailed as exc:
        outcome, expected, seen = Outcome.FAIL, exc.expected, exc.seen
    except ClauseSkipped as exc:
        outcome, why = Outcome.SKIP, str(exc)
    finally:
        await ctx.cleanup()
    if outcome is Outcome.PASS:
        for received in ctx.probe.received[first:]:
            problem = received.problem()
            if problem is not None:
                outcome = Outcome.FAIL
                expected, seen = "every CH message to decode as SPEC §3 says", problem
                break
    return ClauseResult(
        item.name,
        item.section,
        item.description,
        outcome,
        expected=expected,
        seen=seen,
        why=why,
        seconds=ctx.probe.now() - started,
    )


def restart_command(command: str) -> Restart:
    """A :data:`Restart` that runs ``command`` in a shell and requires exit status 0."""

    async def restart() -> None:
        process = await asyncio.create_subprocess_shell(command)
        status = await process.wait()
        if status != 0:
            raise ClauseFailed(f"the restart command {command!r} to exit 0", f"status {status}")

    return restart
