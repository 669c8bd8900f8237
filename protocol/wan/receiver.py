"""The receiving half of a WAN transfer: a Communications Hub taking images from otad (SPEC §7).

Theory of operation
-------------------

One :class:`Receiver` per CH holds the state of every image being received: the verified
:class:`~protocol.release.manifest.Manifest` (and the signed bytes it came from), a bitmap of the
blocks held, and the acknowledgement bookkeeping. It is sans-IO: the shell feeds it decoded messages
and the time, and carries out the actions it returns --

* :class:`Reply` -- publish this message upstream (``TransferAcked``, ``ImageHeld``,
  ``TransferRejected``);
* :class:`StoreBlock` -- write these bytes at this offset of the image. Emitted only after the
  block passed every check, so nothing unverified is ever written;
* :class:`VerifyImage` -- every block is held: re-hash the *stored* image (not a RAM copy:
  what is checked is what is used), run the whole-image checks of SPEC §6.4 (15-17:
  :func:`protocol.release.otaimg.check_image`) on it, and report the digest with
  :meth:`Receiver.image_hashed` -- or a failed check with :meth:`Receiver.image_refused`;
* :class:`DiscardImage` -- delete whatever is stored for the image.

Per-image phases: SPEC §7.10 draws them and lists every edge; :data:`TRANSITIONS` is that table.

An Offer for an image already known is answered with its current state (``TransferAcked`` or
``ImageHeld``): that is how a restarted otad learns what a CH holds. A ``Poll`` is answered with
the state of every image.

Time of trust (SPEC §6.4 check 8, §7.9). A transfer's *update-start instant* is the CH's wall clock
(``wall``) when the Offer that created it arrived; every later verification of a manifest for that
image (a repeated Offer, a re-signed manifest, :meth:`Receiver.restore`) runs at that instant, so
a transfer that started before its manifest expired is never refused ``EXPIRED`` while it lives.
An Offer after the transfer was forgotten starts a new one, checked at its own arrival.

A repeated Offer with another signed manifest for a known image (SPEC §7.9): same size, block
size and block hashes -- the blocks are kept and the new manifest adopted (it verified); another
block layout -- the old blocks are discarded and the transfer starts empty.

Checks on a block: SPEC §7.9, in its order. A failure drops the block and counts the reason in
:attr:`Receiver.rejected` -- nothing is stored, nothing raises; a block for an image without a
transfer creates no state, and one ``TransferRejected(NO_TRANSFER)`` per image per ack delay
tells a sender whose CH lost its state to offer again. A block that arrives while more new
blocks have come since the last acknowledgement than the advertised credit (or more bytes than
``limits.buffer``) is still accepted if valid, and counted as ``LIMITS_EXCEEDED`` (the sender
overran the window).

Acknowledgement policy. The SACK (:mod:`protocol.wan.sack`) is sent

* at once when the block is out of order (a gap opened), fills a gap, is a duplicate or is
  corrupt (so the sender repairs within a round trip), when the block asks for it
  (``Block.ack_now``: the sender is about to stall), when the image is complete, and in answer
  to an Offer or a Poll;
* otherwise after ``ack_every`` new blocks (default: half the window), or ``ack_delay`` seconds
  after the first unacknowledged one, whichever comes first.

``credit`` is always ``min(limits.window, 65535)``: a constant credit equal to the window, which
SPEC §7.3 allows (a CH may announce less, never more).

Durability. :meth:`Receiver.snapshot` is the CH's state as CBOR (signed manifest, bitmap, phase
per image). The CH shell must persist it before it publishes a ``Reply`` that acknowledges
blocks, so what a sender was told is held survives a restart; :meth:`Receiver.restore` re-verifies
every manifest (a transfer whose manifest no longer verifies is discarded) and the blocks already
stored are kept. A restored image whose blocks are all held is re-hashed (``VerifyImage`` from the
first :meth:`Receiver.handle_timer`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from protocol.clock import Monotonic, UnixTime, later
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import Manifest
from protocol.transitions import checked
from protocol.wan.sack import Bitmap
from protocol.wire import cbor
from protocol.wire.limits import HASH_LEN, MAX_U16
from protocol.wire.messages import (
    MAX_TEXT,
    Block,
    Cancel,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    TransferAcked,
    TransferRejected,
)

SNAPSHOT_VERSION = 1
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_TRANSFERS = 64


class TransferPhase(Enum):
    """Where one image stands on the receiving side."""

    RECEIVING = 0  # blocks missing
    VERIFYING = 1  # every block held; the shell is re-hashing the stored image
    HELD = 2  # the stored image hashed to the manifest's digest


#: One image's edges on the receiving side (SPEC §7.10 draws and lists them). A transfer starts
#: RECEIVING (or VERIFYING when restored with every block held) and ends by being forgotten
#: (Cancel, a re-hash mismatch, a manifest that no longer verifies), which is not a phase.
TRANSITIONS: Final[dict[TransferPhase, frozenset[TransferPhase]]] = {
    TransferPhase.RECEIVING: frozenset({TransferPhase.VERIFYING}),
    TransferPhase.VERIFYING: frozenset({TransferPhase.HELD}),
    TransferPhase.HELD: frozenset(),
}


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Reply:
    """Publish ``message`` to otad (on the CH's ``up`` topic)."""

    message: Message


@dataclass(frozen=True, slots=True)
class StoreBlock:
    """Write ``data`` (already verified against the signed block hash) at ``offset``."""

    image: bytes
    index: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class VerifyImage:
    """Every block is held: hash the first ``size`` stored bytes, then call ``image_hashed``."""

    image: bytes
    size: int


@dataclass(frozen=True, slots=True)
class DiscardImage:
    """Delete whatever is stored of the image (idempotent)."""

    image: bytes


ReceiverAction = Reply | StoreBlock | VerifyImage | DiscardImage
#: ``verify(signed, at)``: the full check of a signed manifest (SPEC §6.4 steps 1-13) with ``at``
#: as the update-start instant of step 8; returns the :class:`Manifest` or raises ProtocolError.
VerifyManifest = Callable[[bytes, UnixTime], Manifest]


class _Transfer:
    __slots__ = (
        "ack_due",
        "base",
        "held",
        "highest",
        "manifest",
        "new_blocks",
        "new_bytes",
        "phase",
        "sha256",
        "signed",
        "started",
        "unacked",
        "verify_pending",
    )

    def __init__(self, signed: bytes, manifest: Manifest, held: Bitmap, started: UnixTime) -> None:
        self.signed = signed
        self.started = started  # the update-start instant: every verification of it runs here
        self.manifest = manifest
        self.held = held
        self.base = held.first_missing()
        self.highest = held.highest()
        # the initial phase, not an edge
        self.phase = TransferPhase.VERIFYING if held.full() else TransferPhase.RECEIVING
        self.sha256 = b""
        self.unacked = 0
        self.new_blocks = 0
        self.new_bytes = 0
        self.ack_due: Monotonic | None = None
        self.verify_pending = False

    def enter(self, phase: TransferPhase) -> None:
        """Change phase along an edge of :data:`TRANSITIONS` (``IllegalTransitionError`` if not)."""
        self.phase = checked(TRANSITIONS, "Receiver", self.phase, phase)


class Receiver:
    """A CH's (or HAN device's) state machine for receiving images (see the module docstring)."""

    __slots__ = (
        "_ack_delay",
        "_ack_every",
        "_credit",
        "_max_transfers",
        "_no_transfer_at",
        "_no_transfer_image",
        "_pending",
        "_transfers",
        "_verify",
        "acks_sent",
        "blocks_stored",
        "bytes_stored",
        "duplicates",
        "limits",
        "rejected",
    )

    def __init__(
        self,
        limits: Limits,
        verify_manifest: VerifyManifest,
        *,
        ack_every: int | None = None,
        ack_delay: float = 0.05,
        max_transfers: int = 4,
    ) -> None:
        """``limits`` are what this CH declares; ``verify_manifest(signed, at)`` turns signed
        manifest bytes into a :class:`Manifest` or raises ``ProtocolError`` (the shell closes it
        over :func:`protocol.release.trust.verify_manifest` with its trust store and target,
        passing ``at`` as its ``now``).
        ``ack_every`` defaults to half the window (at least 1)."""
        if limits.window < 1:
            raise ValueError("a receiver's window must be >= 1")
        if ack_every is not None and ack_every < 1:
            raise ValueError("ack_every must be >= 1")
        if ack_delay < 0 or max_transfers < 1:
            raise ValueError("ack_delay must be >= 0 and max_transfers >= 1")
        self.limits = limits
        self._verify = verify_manifest
        self._ack_every = ack_every if ack_every is not None else max(1, -(-limits.window // 2))
        self._ack_delay = ack_delay
        self._max_transfers = max_transfers
        self._credit = min(limits.window, MAX_U16)
        self._transfers: dict[bytes, _Transfer] = {}
        self._pending: list[ReceiverAction] = []
        # the last TransferRejected(NO_TRANSFER) sent (one per image per ack delay, SPEC §7.2)
        self._no_transfer_image = b""
        self._no_transfer_at = Monotonic(float("-inf"))
        self.rejected: Counter[Reason] = Counter()
        self.blocks_stored = 0
        self.bytes_stored = 0
        self.duplicates = 0
        self.acks_sent = 0

    # ------------------------------------------------------------------ introspection

    def images(self) -> list[bytes]:
        """Digests of the images this receiver holds state for."""
        return list(self._transfers)

    def phase(self, image: bytes) -> TransferPhase | None:
        """The phase of ``image``, or None if there is no transfer for it."""
        transfer = self._transfers.get(image)
        return None if transfer is None else transfer.phase

    def manifest(self, image: bytes) -> Manifest | None:
        """The verified manifest of ``image``, if known."""
        transfer = self._transfers.get(image)
        return None if transfer is None else transfer.manifest

    def signed_manifest(self, image: bytes) -> bytes | None:
        """The signed manifest (COSE_Sign1 bytes) of ``image`` as it was offered, if known: what
        a CH hands on to the HAN devices it relays the image to (SPEC §8.2)."""
        transfer = self._transfers.get(image)
        return None if transfer is None else transfer.signed

    def blocks_held(self, image: bytes) -> int:
        """How many blocks of ``image`` are held (0 if unknown)."""
        transfer = self._transfers.get(image)
        return 0 if transfer is None else transfer.held.count

    def has_block(self, image: bytes, index: int) -> bool:
        """True if block ``index`` of ``image`` is held (verified and stored)."""
        transfer = self._transfers.get(image)
        return transfer is not None and index in transfer.held

    # ------------------------------------------------------------------ input

    def message_received(self, msg: Message, now: Monotonic) -> list[ReceiverAction]:
        """Handle one decoded message from otad (``Block``, ``Cancel``, ``Poll``; an ``Offer``
        goes to :meth:`offer_received`, which needs the wall clock too: a ``ValueError`` here).

        Never raises for bad input: bad blocks are refused and counted in :attr:`rejected`;
        other message types are counted as ``UNKNOWN_TYPE``."""
        if isinstance(msg, Block):
            return self._on_block(msg, now)
        if isinstance(msg, Offer):
            raise ValueError("an Offer goes to offer_received(msg, wall, now)")
        if isinstance(msg, Cancel):
            self._transfers.pop(msg.image, None)
            return [DiscardImage(msg.image)]
        if isinstance(msg, Poll):
            actions: list[ReceiverAction] = []
            for transfer in self._transfers.values():
                actions.extend(self._state_reply(transfer))
            return actions
        self.rejected[Reason.UNKNOWN_TYPE] += 1
        return []

    def offer_received(self, msg: Offer, wall: UnixTime, now: Monotonic) -> list[ReceiverAction]:
        """Handle an ``Offer``. ``wall`` is the CH's wall clock at its arrival: the update-start
        instant of a transfer it creates (whole seconds; see the module docstring). Never raises
        for bad input: a refused Offer is answered ``TransferRejected`` and counted."""
        return self._on_offer(msg, UnixTime(float(int(wall))))

    def image_hashed(self, image: bytes, sha256: bytes, now: Monotonic) -> list[ReceiverAction]:
        """The shell re-hashed the stored ``image`` (after :class:`VerifyImage`): report it."""
        transfer = self._transfers.get(image)
        if transfer is None or transfer.phase is not TransferPhase.VERIFYING:
            return []
        transfer.verify_pending = False
        if sha256 == transfer.manifest.sha256:
            transfer.enter(TransferPhase.HELD)
            transfer.sha256 = sha256
            return [Reply(ImageHeld(image=image, sha256=sha256))]
        return self._refuse_image(
            transfer, Reason.IMAGE_HASH, "stored image does not hash to the manifest digest"
        )

    def image_refused(
        self, image: bytes, error: ProtocolError, now: Monotonic
    ) -> list[ReceiverAction]:
        """The shell's whole-image check of the stored ``image`` (after :class:`VerifyImage`;
        SPEC §6.4 checks 14-17, :func:`protocol.release.otaimg.check_image`) failed with
        ``error``: report ``TransferRejected(error.reason)``, discard the image, forget it."""
        transfer = self._transfers.get(image)
        if transfer is None or transfer.phase is not TransferPhase.VERIFYING:
            return []
        transfer.verify_pending = False
        return self._refuse_image(transfer, error.reason, error.detail)

    def _refuse_image(
        self, transfer: _Transfer, reason: Reason, detail: str
    ) -> list[ReceiverAction]:
        image = transfer.manifest.sha256
        del self._transfers[image]
        return [self._reject(image, reason, detail), DiscardImage(image)]

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> Monotonic | None:
        """When :meth:`handle_timer` must next be called (0.0, a past instant: at once), or None."""
        if self._pending:
            return Monotonic(0.0)
        due = [t.ack_due for t in self._transfers.values() if t.ack_due is not None]
        return min(due) if due else None

    def handle_timer(self, now: Monotonic) -> list[ReceiverAction]:
        """Send the delayed acknowledgements due at ``now`` (and, once after a restore, the
        re-hash and discard actions the restore decided on)."""
        actions, self._pending = self._pending, []
        for transfer in self._transfers.values():
            if transfer.ack_due is not None and now >= transfer.ack_due:
                actions.append(self._ack(transfer))
        return actions

    # ------------------------------------------------------------------ offers

    def _on_offer(self, msg: Offer, wall: UnixTime) -> list[ReceiverAction]:
        image = msg.image
        actions: list[ReceiverAction] = []
        known = self._transfers.get(image)
        started = known.started if known is not None else wall
        try:
            manifest = self._verify(msg.manifest, started)
        except ProtocolError as exc:
            if self._transfers.pop(image, None) is not None:
                actions.append(DiscardImage(image))
            return [*actions, self._reject(image, exc.reason, exc.detail)]
        if manifest.sha256 != image:
            return [self._reject(image, Reason.WRONG_IMAGE, "manifest is for another image")]
        largest = manifest.block_length(0)
        if largest > self.limits.max_block:
            detail = f"blocks of {largest} B > max_block {self.limits.max_block}"
            return [self._reject(image, Reason.LIMITS_EXCEEDED, detail)]
        transfer = self._transfers.get(image)
        if transfer is not None:
            old = transfer.manifest
            if (old.size, old.block_size, old.block_hashes) == (
                manifest.size,
                manifest.block_size,
                manifest.block_hashes,
            ):
                transfer.signed = bytes(msg.manifest)
                transfer.manifest = manifest
                return self._state_reply(transfer)
            del self._transfers[image]
            actions.append(DiscardImage(image))
        if len(self._transfers) >= self._max_transfers:
            detail = f"already receiving {len(self._transfers)} images"
            return [*actions, self._reject(image, Reason.STORAGE_FULL, detail)]
        transfer = _Transfer(bytes(msg.manifest), manifest, Bitmap(manifest.block_count), started)
        self._transfers[image] = transfer
        actions.append(self._ack(transfer))
        return actions

    def _reject(self, image: bytes, reason: Reason, detail: str) -> Reply:
        self.rejected[reason] += 1
        return Reply(TransferRejected(image=image, reason=reason, detail=detail[:MAX_TEXT]))

    # ------------------------------------------------------------------ blocks

    def _on_block(self, msg: Block, now: Monotonic) -> list[ReceiverAction]:
        transfer = self._transfers.get(msg.image)
        if transfer is None:
            self.rejected[Reason.NO_TRANSFER] += 1
            if (
                msg.image != self._no_transfer_image
                or now >= self._no_transfer_at + self._ack_delay
            ):
                self._no_transfer_image, self._no_transfer_at = msg.image, now
                rejected = TransferRejected(
                    image=msg.image, reason=Reason.NO_TRANSFER, detail="no transfer: offer it"
                )
                return [Reply(rejected)]
            return []
        reason = self._check(transfer, msg)
        if reason is not None:
            self.rejected[reason] += 1
            if reason is Reason.BLOCK_OUT_OF_RANGE:
                return []
            return self._state_reply(transfer)
        index = msg.index
        if transfer.phase is not TransferPhase.RECEIVING or index in transfer.held:
            self.duplicates += 1
            return self._state_reply(transfer)
        return self._store(transfer, msg, now)

    def _check(self, transfer: _Transfer, msg: Block) -> Reason | None:
        manifest = transfer.manifest
        index, length = msg.index, len(msg.data)
        if index >= manifest.block_count:
            return Reason.BLOCK_OUT_OF_RANGE
        expected = manifest.block_length(index)
        if length > manifest.block_size or length > self.limits.max_block:
            return Reason.BLOCK_SIZE
        if length > expected:
            return Reason.TOO_MANY_BYTES
        if length < expected:
            return Reason.BLOCK_SIZE
        digest = hashlib.sha256(msg.data).digest()
        if digest == manifest.block_hash(index):
            return None
        for other in self._transfers.values():
            if (
                other is not transfer
                and index < other.manifest.block_count
                and other.manifest.block_hash(index) == digest
            ):
                return Reason.WRONG_IMAGE
        return Reason.BLOCK_HASH

    def _store(self, transfer: _Transfer, msg: Block, now: Monotonic) -> list[ReceiverAction]:
        manifest = transfer.manifest
        index, data = msg.index, bytes(msg.data)
        transfer.held.add(index)
        self.blocks_stored += 1
        self.bytes_stored += len(data)
        transfer.new_blocks += 1
        transfer.new_bytes += len(data)
        if transfer.new_blocks > max(self._credit, 1) or transfer.new_bytes > max(
            self.limits.buffer, manifest.block_length(0)
        ):
            self.rejected[Reason.LIMITS_EXCEEDED] += 1
        old_base, old_highest = transfer.base, transfer.highest
        if index == old_base:
            transfer.base = transfer.held.first_missing(index + 1)
        transfer.highest = max(old_highest, index)
        actions: list[ReceiverAction] = [
            StoreBlock(msg.image, index, index * manifest.block_size, data)
        ]
        if transfer.held.full():
            transfer.enter(TransferPhase.VERIFYING)
            transfer.verify_pending = True
            actions.append(self._ack(transfer))
            actions.append(VerifyImage(msg.image, manifest.size))
            return actions
        transfer.unacked += 1
        if (
            msg.ack_now
            or index != old_base
            or index < old_highest
            or transfer.unacked >= self._ack_every
        ):
            actions.append(self._ack(transfer))
        elif transfer.ack_due is None:
            transfer.ack_due = later(now, self._ack_delay)
        return actions

    # ------------------------------------------------------------------ replies

    def _ack(self, transfer: _Transfer) -> Reply:
        base, bitmap = transfer.held.sack(transfer.base)
        transfer.unacked = 0
        transfer.new_blocks = 0
        transfer.new_bytes = 0
        transfer.ack_due = None
        self.acks_sent += 1
        image = transfer.manifest.sha256
        return Reply(TransferAcked(image=image, base=base, bitmap=bitmap, credit=self._credit))

    def _state_reply(self, transfer: _Transfer) -> list[ReceiverAction]:
        image = transfer.manifest.sha256
        if transfer.phase is TransferPhase.HELD:
            return [Reply(ImageHeld(image=image, sha256=transfer.sha256))]
        actions: list[ReceiverAction] = [self._ack(transfer)]
        if transfer.phase is TransferPhase.VERIFYING and not transfer.verify_pending:
            transfer.verify_pending = True
            actions.append(VerifyImage(image, transfer.manifest.size))
        return actions

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> bytes:
        """The state to persist: per image its digest, signed manifest, bitmap, phase, computed
        digest and update-start instant (``s``, whole unix seconds)."""
        return cbor.dumps(
            {
                "v": SNAPSHOT_VERSION,
                "transfers": [
                    {
                        "i": image,
                        "m": transfer.signed,
                        "h": transfer.held.to_bytes(),
                        "p": transfer.phase.value,
                        "d": transfer.sha256,
                        "s": int(transfer.started),
                    }
                    for image, transfer in self._transfers.items()
                ],
            }
        )

    @classmethod
    def restore(
        cls,
        data: bytes,
        limits: Limits,
        verify_manifest: VerifyManifest,
        *,
        ack_every: int | None = None,
        ack_delay: float = 0.05,
        max_transfers: int = 4,
    ) -> Receiver:
        """Rebuild a receiver from :meth:`snapshot` bytes, re-verifying every manifest.

        Raises ``ProtocolError`` when the snapshot itself is not well formed. A transfer whose
        manifest no longer verifies at its update-start instant (key revoked...), whose entry
        does not fit its manifest, or that has no update-start instant (a snapshot of an older
        version of this code) is dropped, and a :class:`DiscardImage` for it comes from the first
        :meth:`handle_timer`; so does a :class:`VerifyImage` for every image with all blocks held
        that was not yet reported held.
        """
        receiver = cls(
            limits,
            verify_manifest,
            ack_every=ack_every,
            ack_delay=ack_delay,
            max_transfers=max_transfers,
        )
        raw = cbor.loads(data, max_size=MAX_SNAPSHOT_BYTES, max_depth=4)
        if not isinstance(raw, dict) or set(raw) != {"v", "transfers"}:
            raise ProtocolError(Reason.MALFORMED, "snapshot is not a {v, transfers} map")
        if raw["v"] != SNAPSHOT_VERSION:
            raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"snapshot version {raw['v']!r}")
        entries = raw["transfers"]
        if not isinstance(entries, list) or len(entries) > MAX_SNAPSHOT_TRANSFERS:
            raise ProtocolError(Reason.MALFORMED, "snapshot transfers is not a bounded array")
        for entry in entries:
            receiver._restore_entry(entry)
        return receiver

    def _restore_entry(self, entry: Any) -> None:
        fields = {"i": bytes, "m": bytes, "h": bytes, "p": int, "d": bytes, "s": int}
        if not isinstance(entry, dict) or set(entry) not in (set(fields), set(fields) - {"s"}):
            raise ProtocolError(Reason.MALFORMED, "snapshot entry has the wrong keys")
        for key, kind in fields.items():
            if key in entry and type(entry[key]) is not kind:
                raise ProtocolError(Reason.MALFORMED, f"snapshot entry {key!r} has a wrong type")
        image: bytes = entry["i"]
        if len(image) != HASH_LEN or image in self._transfers:
            raise ProtocolError(Reason.MALFORMED, "snapshot entry has a bad or repeated image")
        if "s" not in entry:  # its update-start instant is unknown: it cannot be re-verified
            self._pending.append(DiscardImage(image))
            return
        started = UnixTime(float(entry["s"]))
        try:
            manifest = self._verify(entry["m"], started)
            if manifest.sha256 != image:
                raise ProtocolError(Reason.WRONG_IMAGE, "snapshot manifest is for another image")
            held = Bitmap.from_bytes(entry["h"], manifest.block_count)
            phase = TransferPhase(entry["p"])
        except (ProtocolError, ValueError):
            self._pending.append(DiscardImage(image))
            return
        if len(self._transfers) >= self._max_transfers or (
            phase is not TransferPhase.RECEIVING and not held.full()
        ):
            self._pending.append(DiscardImage(image))
            return
        transfer = _Transfer(entry["m"], manifest, held, started)
        if phase is TransferPhase.HELD and entry["d"] == manifest.sha256:
            transfer.enter(TransferPhase.HELD)
            transfer.sha256 = manifest.sha256
        elif transfer.phase is TransferPhase.VERIFYING:
            transfer.verify_pending = True
            self._pending.append(VerifyImage(image, manifest.size))
        self._transfers[image] = transfer
