"""The device verifier/activator: one active image, one pending image, signed activation.

Meant for the virtual HAN devices (bridges B1-B4, ESME, ...) and the virtual CH's own firmware;
their shells are issue 9's, today the tests drive it (with a :class:`~protocol.han.client.HanClient`
feeding it). Sans-IO: flash is behind the small :class:`SlotStore` interface (tests use
:class:`MemorySlotStore`; a virtual device may back it with a file), time comes in as ``now``,
the one timer (a future-dated activation) is exposed by :meth:`Device.next_deadline` and fired by
:meth:`Device.handle_timer`, and the self-test result is injected.

Two small machines run side by side, the pending slot (:class:`SlotState`) and the activation
(:class:`ActivationState`); SPEC §8.6 draws both and lists every edge (:data:`SLOT_TRANSITIONS`,
:data:`ACTIVATION_TRANSITIONS` are those tables). An immediate activation command executes at
once and leaves the activation IDLE.

What is checked, and when:

* A manifest (:meth:`Device.manifest_received`) is verified completely -- trust store, vendor,
  device type, hardware version, image type, and anti-rollback of its sequence against the
  *active* image's (``ROLLBACK`` lower, ``REPLAYED`` equal) and against a pending image's --
  before the pending slot is touched. Nothing is stored for a refused manifest.
* Image bytes (:meth:`Device.image_data_received`) are buffered until one manifest block is
  complete, checked against its signed block hash, and only then written: a corrupt block never
  reaches flash and is re-fetched alone. When the last block is written, the whole image is read
  back from storage and hashed (the CH is not trusted to have delivered what was signed).
* An activation command (:meth:`Device.activation_received`) is accepted only if its signature
  verifies, it names this device (``WRONG_DEVICE``) and its counter is strictly greater than the
  last accepted one (``REPLAYED``); the counter is then consumed. At execution time (now, or at
  ``execute_at``) the pending image is **re-hashed from storage**, never from a cached digest
  (time of check is time of use), over what the manifest's activation digest covers (v2: the
  Manufacturer Image, every byte after the OTA header, as GBCS says; v1: the whole file): no
  image -> ``NO_IMAGE_HELD``; command hash differs from the held image's activation digest or
  the stored bytes no longer hash to it -> ``HASH_MISMATCH``; otherwise the slots
  swap, the injected self-test runs, and a failure swaps back (``ACTIVATION_FAILED``, reason
  ``SELF_TEST_FAILED``).
* Success yields the confirmation evidence the join mode allows: a device-signed
  :class:`~protocol.device.activation.ActivationAlert` (native devices, bridges joined as a PPMID)
  or a
  :class:`~protocol.device.activation.VersionReport` (bridges joined as a CAD, which cannot sign).
* A credentials command (:meth:`Device.credentials_received`, SPEC §8.11) passes the same
  signature, ``WRONG_DEVICE`` and ``REPLAYED`` checks against the *same* counter, then
  ``NO_CREDENTIALS`` for a device that cannot sign (CAD-joined) and ``UNKNOWN_KEY_ID`` when it
  names a key the device does not hold; the device then generates a new key pair (the injected
  ``key_generator``), answers with a
  :class:`~protocol.device.credentials.CredentialsConfirmation` signed by the key the command
  named, and signs every later alert with the new key. :meth:`Device.command_received` takes
  either kind of command, told apart by the ``"t"`` inside the signed payload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.clock import UnixTime
from protocol.device.activation import (
    ActivationAlert,
    ActivationCancelled,
    ActivationCommand,
    ActivationResponse,
    ActivationScheduled,
    Outcome,
    VersionReport,
)
from protocol.device.credentials import (
    CredentialsCommand,
    CredentialsConfirmation,
    DeviceCommand,
    verify_command,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id
from protocol.release.manifest import DeviceType, Manifest, ManifestV2
from protocol.release.trust import Target, TrustStore, verify_manifest
from protocol.release.zigbee_ota import BASE_HEADER_LEN, OtaHeader
from protocol.transitions import checked
from protocol.wire.devices import JoinMode as JoinMode  # re-exported: callers import it here
from protocol.wire.limits import HASH_LEN, check_eui64

REHASH_CHUNK = 4096  # bytes read from storage at a time when re-hashing
_MAX_OTA_HEADER_LEN = BASE_HEADER_LEN + 1 + 8 + 4  # every optional header field present


class SlotState(Enum):
    """State of the pending image slot."""

    EMPTY = "empty"
    RECEIVING = "receiving"
    HELD = "held"


class ActivationState(Enum):
    """Whether a future-dated activation is waiting for its time."""

    IDLE = "idle"
    SCHEDULED = "scheduled"


#: The pending slot's edges (SPEC §8.6 draws and lists them). RECEIVING -> RECEIVING is a newer
#: verified manifest restarting the slot (erased first).
SLOT_TRANSITIONS: Final[dict[SlotState, frozenset[SlotState]]] = {
    SlotState.EMPTY: frozenset({SlotState.RECEIVING}),
    SlotState.RECEIVING: frozenset({SlotState.RECEIVING, SlotState.HELD, SlotState.EMPTY}),
    SlotState.HELD: frozenset({SlotState.RECEIVING, SlotState.EMPTY}),
}

#: The activation's edges (SPEC §8.6). SCHEDULED -> SCHEDULED is a newer future-dated command
#: replacing the scheduled one.
ACTIVATION_TRANSITIONS: Final[dict[ActivationState, frozenset[ActivationState]]] = {
    ActivationState.IDLE: frozenset({ActivationState.SCHEDULED}),
    ActivationState.SCHEDULED: frozenset({ActivationState.IDLE, ActivationState.SCHEDULED}),
}


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the device is: what a manifest and an activation command must match."""

    device_id: str  # EUI-64, 16 upper-case hex digits
    device_type: DeviceType
    hw_version: int
    vendor: int  # ZigBee manufacturer code
    image_type: int  # ZigBee OTA image type
    join_mode: JoinMode

    def __post_init__(self) -> None:
        try:
            check_eui64(self.device_id, "device id")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class FirmwareInfo:
    """The image in a slot: version, manifest sequence (anti-rollback value) and digest."""

    fw_version: int
    sequence: int
    sha256: bytes = bytes(HASH_LEN)


class SlotStore(Protocol):
    """The device's flash, as the protocol sees it: a writable pending slot and an A/B swap."""

    def erase_pending(self) -> None:
        """Empty the pending slot."""

    def write_pending(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the pending slot."""

    def read_pending(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes from ``offset`` of the pending slot."""

    def swap(self) -> None:
        """Exchange the active and pending slots (what the bootloader does on activation)."""


class MemorySlotStore:
    """An in-memory :class:`SlotStore` that counts what it is asked to do (tests, simulators)."""

    __slots__ = ("active", "erases", "pending", "swaps", "writes")

    def __init__(self, active: bytes = b"") -> None:
        self.active = bytearray(active)
        self.pending = bytearray()
        self.writes = 0
        self.erases = 0
        self.swaps = 0

    def erase_pending(self) -> None:
        """Empty the pending slot."""
        self.pending = bytearray()
        self.erases += 1

    def write_pending(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (zero-filling any gap)."""
        end = offset + len(data)
        if len(self.pending) < end:
            self.pending.extend(bytes(end - len(self.pending)))
        self.pending[offset:end] = data
        self.writes += 1

    def read_pending(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes from ``offset``."""
        return bytes(self.pending[offset : offset + length])

    def swap(self) -> None:
        """Exchange the slots."""
        self.active, self.pending = self.pending, self.active
        self.swaps += 1


@dataclass(frozen=True, slots=True)
class AlertRaised:
    """Output: the device signed an activation alert (``signed`` is its COSE_Sign1)."""

    signed: bytes


@dataclass(frozen=True, slots=True)
class CredentialsConfirmed:
    """Output: the device replaced its key pair; ``signed`` is the COSE_Sign1 of its
    :class:`~protocol.device.credentials.CredentialsConfirmation` (under the key the command
    named), what otad adopts the new key from (SPEC §8.11)."""

    signed: bytes


DeviceOutput = (
    ActivationResponse
    | ActivationScheduled
    | ActivationCancelled
    | AlertRaised
    | VersionReport
    | CredentialsConfirmed
)
"""What the device sends back (through its CH) after a command or timer."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key pair from the platform's generator (the default ``key_generator``)."""
    return ec.generate_private_key(ec.SECP256R1())


class Device:
    """One device's firmware slots and activation logic (see the module docstring)."""

    def __init__(
        self,
        identity: DeviceIdentity,
        trust: TrustStore,
        store: SlotStore,
        *,
        running: FirmwareInfo,
        activation_trust: TrustStore | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        self_test: Callable[[Manifest], bool] | None = None,
        last_counter: int = 0,
        boot_count: int = 0,
        key_generator: Callable[[], ec.EllipticCurvePrivateKey] = generate_key,
        previous_signing_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        """``trust`` verifies manifests (release keys); ``activation_trust`` (default: the same)
        verifies activation and credentials commands. ``signing_key`` is required when the join
        mode can sign. ``self_test`` decides whether a freshly activated image passes (default:
        it does). ``key_generator`` makes the key pair a credentials command asks for;
        ``previous_signing_key`` is the key before ``signing_key`` while otad may not have
        adopted ``signing_key`` yet (SPEC §8.11; both restored by the shell after a restart).
        """
        if identity.join_mode.can_sign and signing_key is None:
            raise ValueError(f"join mode {identity.join_mode.value} needs a signing key")
        self.identity = identity
        self.trust = trust
        self.activation_trust = activation_trust if activation_trust is not None else trust
        self.store = store
        self.signing_key = signing_key
        self.previous_signing_key = previous_signing_key
        self.key_generator = key_generator
        self.self_test: Callable[[Manifest], bool] = self_test or (lambda _manifest: True)
        self.running = running
        self.previous: FirmwareInfo | None = None
        self.last_counter = last_counter
        self.boot_count = boot_count
        self._slot_state = SlotState.EMPTY  # the initial state, not an edge
        self.pending_manifest: Manifest | None = None
        self.signed_manifest: bytes | None = None
        self.stored_bytes = 0  # verified bytes written to the pending slot
        self.next_offset = 0  # next image offset the device expects
        self._buffer = bytearray()  # bytes of the current manifest block, not yet verified
        self._scheduled: ActivationCommand | None = None  # IDLE: the initial state

    # ------------------------------------------------------------------ properties

    @property
    def slot_state(self) -> SlotState:
        """The pending slot's :class:`SlotState`."""
        return self._slot_state

    @property
    def scheduled(self) -> ActivationCommand | None:
        """The future-dated activation waiting for its time, if any."""
        return self._scheduled

    @property
    def activation_state(self) -> ActivationState:
        """SCHEDULED while a future-dated activation waits for its time."""
        return ActivationState.IDLE if self._scheduled is None else ActivationState.SCHEDULED

    def _enter_slot(self, state: SlotState) -> None:
        """Change the slot's state along an edge of :data:`SLOT_TRANSITIONS`."""
        self._slot_state = checked(SLOT_TRANSITIONS, "Device slot", self._slot_state, state)

    def _schedule(self, command: ActivationCommand | None) -> None:
        """Schedule ``command`` (``None``: nothing) along an edge of
        :data:`ACTIVATION_TRANSITIONS`."""
        new = ActivationState.IDLE if command is None else ActivationState.SCHEDULED
        checked(ACTIVATION_TRANSITIONS, "Device activation", self.activation_state, new)
        self._scheduled = command

    @property
    def holds_image(self) -> bool:
        """Whether a complete, verified pending image is held."""
        return self.slot_state is SlotState.HELD

    # ------------------------------------------------------------------ distribution

    def check_manifest(self, signed: bytes, now: UnixTime) -> Manifest:
        """Verify ``signed`` for this device without changing any state; ``ProtocolError``.

        Checks: signature (trust store), expiry, vendor, device type, hardware version, image
        type, sequence above the active image's, and not below a pending image's.
        """
        target = Target(
            device_type=self.identity.device_type,
            hw_version=self.identity.hw_version,
            installed_sequence=self.running.sequence,
            vendor=self.identity.vendor,
        )
        manifest = verify_manifest(signed, self.trust, now=now, target=target)
        if manifest.image_type != self.identity.image_type:
            raise ProtocolError(
                Reason.WRONG_DEVICE_TYPE,
                f"image type 0x{manifest.image_type:04x}, device 0x{self.identity.image_type:04x}",
            )
        held = self.pending_manifest
        if held is not None and signed != self.signed_manifest:
            if manifest.sequence < held.sequence:
                raise ProtocolError(
                    Reason.ROLLBACK, f"sequence {manifest.sequence} < pending {held.sequence}"
                )
            if manifest.sequence == held.sequence:
                raise ProtocolError(
                    Reason.REPLAYED, f"another manifest with pending sequence {held.sequence}"
                )
        return manifest

    def manifest_received(self, signed: bytes, now: UnixTime) -> Manifest:
        """Verify a signed manifest for this device and prepare the pending slot for its image.

        Raises ``ProtocolError`` (nothing stored, slot untouched) for any failure of
        :meth:`check_manifest`. The manifest already pending again resumes a partial download
        from the last verified block (or keeps a held image).
        """
        manifest = self.check_manifest(signed, now)
        if self.slot_state is not SlotState.EMPTY and signed == self.signed_manifest:
            self._buffer.clear()  # resume from the last verified block
            self.next_offset = self.stored_bytes
            return manifest
        self.store.erase_pending()
        self._enter_slot(SlotState.RECEIVING)
        self.pending_manifest = manifest
        self.signed_manifest = bytes(signed)
        self.stored_bytes = 0
        self.next_offset = 0
        self._buffer.clear()
        return manifest

    def image_data_received(self, offset: int, data: bytes) -> int:
        """Take ``data`` at ``offset`` of the pending image; return the next offset expected.

        Raises ``ProtocolError``: ``NO_TRANSFER`` without an accepted manifest,
        ``BLOCK_OUT_OF_RANGE`` for an offset other than :attr:`next_offset`, ``TOO_MANY_BYTES``
        past the signed size, ``BLOCK_HASH`` when a manifest block does not match its signed
        hash (the block is dropped; fetch again from :attr:`next_offset`), ``IMAGE_HASH`` when
        the stored image does not hash to the signed digest (the slot is erased).
        """
        manifest = self.pending_manifest
        if self.slot_state is not SlotState.RECEIVING or manifest is None:
            raise ProtocolError(Reason.NO_TRANSFER, "no verified manifest for image bytes")
        if offset != self.next_offset:
            raise ProtocolError(
                Reason.BLOCK_OUT_OF_RANGE, f"offset {offset}, expected {self.next_offset}"
            )
        if not data:
            raise ProtocolError(Reason.MALFORMED, "empty image data")
        if offset + len(data) > manifest.size:
            raise ProtocolError(Reason.TOO_MANY_BYTES, f"{offset + len(data)} > {manifest.size}")
        self._buffer += data
        self.next_offset += len(data)
        while self.stored_bytes < manifest.size:
            index = self.stored_bytes // manifest.block_size
            need = manifest.block_length(index)
            if len(self._buffer) < need:
                break
            block = bytes(self._buffer[:need])
            if hashlib.sha256(block).digest() != manifest.block_hash(index):
                self._buffer.clear()
                self.next_offset = self.stored_bytes
                raise ProtocolError(Reason.BLOCK_HASH, f"manifest block {index} hash mismatch")
            self.store.write_pending(self.stored_bytes, block)
            self.stored_bytes += need
            del self._buffer[:need]
        if self.stored_bytes == manifest.size:
            if self._rehash(manifest.size) != manifest.sha256:
                self._discard()
                raise ProtocolError(Reason.IMAGE_HASH, "stored image does not match the manifest")
            self._enter_slot(SlotState.HELD)
        return self.next_offset

    # ------------------------------------------------------------------ activation

    def activation_received(self, signed: bytes, now: UnixTime) -> list[DeviceOutput]:
        """Verify and accept an activation command; execute it now or schedule it.

        Raises ``ProtocolError`` for a bad signature (the trust store's reasons),
        ``WRONG_DEVICE`` for a command addressed to another device and ``REPLAYED`` for a
        counter not greater than the last accepted. Returns the answers to send back.
        """
        return self._activate(ActivationCommand.verify(signed, self.activation_trust), now)

    def command_received(self, signed: bytes, now: UnixTime) -> list[DeviceOutput]:
        """Verify any command otad signed for this device and act on it: an activation
        (:meth:`activation_received`) or a credentials command (:meth:`credentials_received`),
        told apart by the ``"t"`` inside the signed payload (``UNKNOWN_TYPE`` for neither)."""
        command = verify_command(signed, self.activation_trust)
        if isinstance(command, CredentialsCommand):
            return self._replace_credentials(command)
        return self._activate(command, now)

    def credentials_received(self, signed: bytes, now: UnixTime) -> list[DeviceOutput]:
        """Verify a credentials command and replace the signing key (SPEC §8.11).

        Raises ``ProtocolError``, nothing changed and no counter consumed: the signature's
        reasons, ``WRONG_DEVICE``, ``REPLAYED`` (counter not greater than the last accepted
        command's, activation or credentials), ``NO_CREDENTIALS`` (this device cannot sign: a
        CAD-joined bridge), ``UNKNOWN_KEY_ID`` (``current_kid`` is neither the current key nor
        the one before it). Returns the :class:`CredentialsConfirmed` to send back.
        """
        del now  # a replacement is immediate; ``now`` keeps the convention of every input
        return self._replace_credentials(CredentialsCommand.verify(signed, self.activation_trust))

    def _check_fresh(self, command: DeviceCommand) -> None:
        if command.device_id != self.identity.device_id:
            raise ProtocolError(
                Reason.WRONG_DEVICE, f"for {command.device_id}, I am {self.identity.device_id}"
            )
        if command.counter <= self.last_counter:
            raise ProtocolError(
                Reason.REPLAYED, f"counter {command.counter} <= last {self.last_counter}"
            )

    def _replace_credentials(self, command: CredentialsCommand) -> list[DeviceOutput]:
        self._check_fresh(command)
        current = self.signing_key
        if not self.identity.join_mode.can_sign or current is None:
            raise ProtocolError(
                Reason.NO_CREDENTIALS,
                f"joined as {self.identity.join_mode.value}: no credentials to replace",
            )
        previous = self.previous_signing_key
        if command.current_kid == key_id(current.public_key()):
            signer, kept = current, current  # otad adopted the current key: keep it as previous
        elif previous is not None and command.current_kid == key_id(previous.public_key()):
            signer, kept = previous, previous  # otad missed the last confirmation
        else:
            raise ProtocolError(
                Reason.UNKNOWN_KEY_ID, f"no key {command.current_kid.hex()} on this device"
            )
        new = self.key_generator()
        signed = CredentialsConfirmation.create(
            self.identity.device_id, command.counter, old_key=signer, new_key=new
        )
        self.last_counter = command.counter
        self.previous_signing_key = kept
        self.signing_key = new
        return [CredentialsConfirmed(signed)]

    def _activate(self, command: ActivationCommand, now: UnixTime) -> list[DeviceOutput]:
        self._check_fresh(command)
        self.last_counter = command.counter
        if command.cancel:
            scheduled = self.scheduled
            cancelled: int | None = None
            if scheduled is not None and scheduled.image_sha256 == command.image_sha256:
                cancelled = scheduled.counter
                self._schedule(None)
            return [ActivationCancelled(self.identity.device_id, command.counter, cancelled)]
        if command.execute_at is not None and command.execute_at > now:
            self._schedule(command)
            return [
                ActivationScheduled(self.identity.device_id, command.counter, command.execute_at)
            ]
        return self._execute(command)

    def next_deadline(self) -> UnixTime | None:
        """When :meth:`handle_timer` must next be called (a scheduled activation), or ``None``."""
        if self.scheduled is None or self.scheduled.execute_at is None:
            return None
        return UnixTime(float(self.scheduled.execute_at))

    def handle_timer(self, now: UnixTime) -> list[DeviceOutput]:
        """Execute a scheduled activation whose time has come."""
        command = self.scheduled
        if command is None or command.execute_at is None or now < command.execute_at:
            return []
        self._schedule(None)
        return self._execute(command)

    # ------------------------------------------------------------------ internals

    def _response(
        self, command: ActivationCommand, outcome: Outcome, reason: Reason | None
    ) -> ActivationResponse:
        return ActivationResponse(
            self.identity.device_id, command.counter, outcome, self.running.fw_version, reason
        )

    def _execute(self, command: ActivationCommand) -> list[DeviceOutput]:
        manifest = self.pending_manifest
        if self.slot_state is not SlotState.HELD or manifest is None:
            return [self._response(command, Outcome.NO_IMAGE_HELD, Reason.NO_IMAGE_HELD)]
        if command.image_sha256 != manifest.activation_digest:
            # the command names another image: keep ours, refuse to switch
            return [self._response(command, Outcome.HASH_MISMATCH, Reason.HASH_MISMATCH)]
        if self._activation_rehash(manifest) != command.image_sha256:
            # the stored bytes changed since they were verified: the image is unusable
            self._discard()
            return [self._response(command, Outcome.HASH_MISMATCH, Reason.HASH_MISMATCH)]
        self.store.swap()
        self.boot_count += 1
        old = self.running
        self.running = FirmwareInfo(manifest.fw_version, manifest.sequence, manifest.sha256)
        if not self.self_test(manifest):
            self.store.swap()  # roll back: the previous image is active again
            self.boot_count += 1
            self.running = old
            self._discard()
            return [self._response(command, Outcome.ACTIVATION_FAILED, Reason.SELF_TEST_FAILED)]
        self.previous = old
        self._enter_slot(SlotState.EMPTY)  # the pending slot now holds the previous image
        self.pending_manifest = None
        self.signed_manifest = None
        self.stored_bytes = self.next_offset = 0
        response = self._response(command, Outcome.SUCCESS, None)
        return [response, self._evidence(command)]

    def _evidence(self, command: ActivationCommand) -> AlertRaised | VersionReport:
        if self.identity.join_mode.can_sign:
            assert self.signing_key is not None  # checked in __init__
            alert = ActivationAlert(
                self.identity.device_id,
                self.running.fw_version,
                self.running.sha256,
                command.counter,
            )
            return AlertRaised(alert.sign(self.signing_key))
        return VersionReport(
            self.identity.device_id, self.running.fw_version, self.boot_count, command.counter
        )

    def _activation_rehash(self, manifest: Manifest) -> bytes:
        """The stored pending image's activation digest, re-read now: v1 the whole file, v2 the
        bytes after the OTA header (whose length is read from the stored header too)."""
        if not isinstance(manifest, ManifestV2):
            return self._rehash(manifest.size)
        try:
            header = OtaHeader.parse(self.store.read_pending(0, _MAX_OTA_HEADER_LEN))
        except ProtocolError:
            return bytes(HASH_LEN)  # the stored header no longer parses: cannot match
        return self._rehash(manifest.size, header.header_length)

    def _rehash(self, size: int, start: int = 0) -> bytes:
        digest = hashlib.sha256()
        offset = start
        while offset < size:
            chunk = self.store.read_pending(offset, min(REHASH_CHUNK, size - offset))
            if not chunk:
                break  # storage shorter than the image: the digest will not match
            digest.update(chunk)
            offset += len(chunk)
        return digest.digest()

    def _discard(self) -> None:
        self.store.erase_pending()
        self._enter_slot(SlotState.EMPTY)
        self.pending_manifest = None
        self.signed_manifest = None
        self.stored_bytes = self.next_offset = 0
        self._buffer.clear()
