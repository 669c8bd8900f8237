"""A virtual premises: the home area network behind one virtual Communications Hub (sans MQTT).

A :class:`Premises` is everything on the HAN side of a CH, built from the same sans-IO machines
SPEC §8 describes and from the CH's own inventory (:class:`loadtest.hub.HubIdentity`): the CH's
OTA server (:class:`~protocol.han.server.HanServer`), and for each HAN device of the inventory
(what ``make_identity`` generates: ESME, GSME, PPMID and, on about 5% of premises, Alt HAN
bridges B1-B4 joined as a CAD or a PPMID; an HCALCS in the inventory is simulated alike) its
firmware slots and activator (:class:`~protocol.device.device.Device` over a
:class:`~protocol.device.device.MemorySlotStore`), its OTA client
(:class:`~protocol.han.client.HanClient`), its own signing key when its join mode can sign
(SPEC §8.8) and its radio link (:class:`loadtest.hanlink.HanLink`). The CH's own firmware is a
:class:`~protocol.device.device.Device` too, with no link.

Who calls what (the virtual CH shell, ``loadtest/hub.py``, or a virtual-time test)
==================================================================================

Same convention as the protocol machines (``protocol/__init__.py``): inputs take ``now`` last,
outcomes are drained with :meth:`Premises.events`, one timer (:meth:`Premises.next_deadline`,
:meth:`Premises.handle_timer`). Every ``now`` and every event's ``at`` is **shell time**
(:data:`~protocol.clock.UnixTime`: the shell's wall clock); the premises runs its HAN on HAN
time through its :class:`~loadtest.hanlink.HanClock` (``PremisesConfig.acceleration``: HAN time
runs that many times as fast; 1 means HAN time is the shell's clock). The HAN is a discrete-event
simulation: each input or timer call first runs everything due up to ``now``, each at its own
HAN instant, so a late timer call changes nothing but latency.

Inputs:

* ``Premises(identity, trust=..., activation_trust=..., config=..., now=..., on_ch_reboot=...)``:
  ``trust`` verifies manifests (the release keys, as the CH's), ``activation_trust`` verifies
  activation commands (otad's key); the devices start their periodic queries at seeded instants
  within their query interval (a sleepy GSME: its wake interval).
* :meth:`Premises.image_held` ``(manifest, signed_manifest, image, now)``: the CH holds a verified
  image. A CH image is held by the CH's device at once (no HAN transfer); any other is relayed
  to every device of the manifest's type whose hardware version is in its range (each device's
  own checks apply too), at most ``max_transfers`` K at a time, with a unicast ImageNotify.
  Raises :class:`ProtocolError` ``WRONG_DEVICE_TYPE`` when no device of that type is here.
* :meth:`Premises.image_discarded` ``(sha256, now)``: the CH dropped an image; it is no longer
  served.
* :meth:`Premises.activation_received` ``(device_id, signed_command, now)``: a command otad
  signed for one device (or for the CH, by its GUID) -- an activation, or a credentials command
  (SPEC §8.11: both ride in the WAN's ``Activate``; the device tells them apart by the ``"t"``
  inside the signed payload) -- carried to the device over its link (loss applies; a sleepy
  device gets it when it next wakes). ``ProtocolError`` ``WRONG_DEVICE`` for a device not on
  this premises.
* :meth:`Premises.version_read` ``(device_id, now)``: read a device's running version back; the
  answer is a :class:`VersionReported`.

Events (:data:`PremisesEvent`), each with the device id and the shell time it reached the CH:

* :class:`TransferProgressed` -- a relay's progress (bytes the device has asked up to), at most
  one report per ``progress_step`` of the image and not more often than
  ``progress_min_interval`` shell seconds;
* :class:`TransferEnded` -- a relay's outcome for one device, as GBCS's firmware transfer alert
  reports it (:class:`TransferOutcome`: HELD, DISCARDED with the device's reason,
  HARDWARE_MISMATCH, FAILED, TIMED_OUT). FAILED and TIMED_OUT are not final: the device may
  query again and a later HELD follows;
* :class:`ActivationAnswered` -- the device's :class:`~protocol.device.activation.
  ActivationResponse`, :class:`~protocol.device.activation.ActivationScheduled` or
  :class:`~protocol.device.activation.ActivationCancelled`;
* :class:`ActivationRefused` -- the device refused an activation command (``REPLAYED``,
  ``WRONG_DEVICE``, a signature reason);
* :class:`CredentialsReplaced` -- a device that signs carried out a credentials command: it
  generated a new key pair, and ``signed`` is its confirmation (SPEC §8.11), signed by the key
  the command named, for otad's :func:`~protocol.device.credentials.adopt_new_key`; from then on
  it signs with the new key (:meth:`Premises.public_key` returns it);
* :class:`CredentialsRefused` -- the device refused a credentials command (``NO_CREDENTIALS``
  for a CAD-joined bridge, ``REPLAYED``, ``WRONG_DEVICE``, ``UNKNOWN_KEY_ID`` for a forged one or
  one naming a key the device does not hold, ...). Which kind of command was refused is what it
  claimed to be, unverified (a forged command is told apart only for the event);
* :class:`AlertReceived` -- the signed :class:`~protocol.device.activation.ActivationAlert` of a
  device that can sign (NATIVE, PPMID-joined); verify it with :meth:`Premises.public_key`;
* :class:`VersionReported` -- a :class:`~protocol.device.activation.VersionReport`: the CH's
  evidence for a CAD-joined bridge (emitted when the rebooted device's next QueryNextImage
  carries the new version) or the answer to :meth:`Premises.version_read`.

And ``on_ch_reboot(fw_version)`` is called when the CH's own firmware activates (or rolls back):
the shell reconnects and announces ``fw_version``. :meth:`Premises.inventory` is the HAN
inventory with the versions the devices run now, for the next announcement.

Timing, and what a shell must allow for:

* a sleepy device (``PremisesConfig.sleepy``, the GSME by default) listens only for
  ``awake_window`` after it sent; the CH keeps what is for it (ImageNotify, an activation command,
  a version read) and hands it over when it next wakes, at most ``wake_interval`` HAN seconds
  later: otad's phase deadlines for a GSME must allow a wake interval per exchange;
* activation answers, credential confirmations and read-backs cross the lossy link once, with no
  CH-level retry (ZigBee's APS retries are in the loss figure): a lost activation answer is for
  otad's read-back with backoff, a lost confirmation for a new credentials command naming the
  key otad still trusts (SPEC §8.11);
* with ``acceleration`` f > 1 everything on the HAN sees HAN time, signed times included: a
  manifest's expiry and an activation's ``execute_at`` are reached after 1/f of the shell time
  to them (counted from the premises' creation). Tests of dated activations against otad's wall
  clock use f = 1.

Scenario knobs (:class:`PremisesConfig`): links per device type, K, the MinimumBlockPeriod, the
query and wake intervals, the share of devices whose self-test fails (seeded per device id, the
CH's own included: they roll back and answer ``SELF_TEST_FAILED``), a loss applied to activation
answers and credential confirmations only (to show read-back and recovery), the vendor and image
types the devices identify with. A device's keys are derived from the seed and its id
(:func:`device_key`: generation 0 is the key it starts with, generation n the one its n-th
credential replacement generates), so runs are reproducible.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from loadtest.hanlink import Direction, HanClock, HanLink, LinkConfig
from otad.ctl.imagetool import DEFAULT_IMAGE_TYPE, DEFAULT_MANUFACTURER
from protocol.clock import UnixTime, later
from protocol.device.activation import (
    ActivationCancelled,
    ActivationResponse,
    ActivationScheduled,
    VersionReport,
)
from protocol.device.credentials import CredentialsCommand, claimed_command_type
from protocol.device.device import (
    AlertRaised,
    CredentialsConfirmed,
    Device,
    DeviceIdentity,
    DeviceOutput,
    FirmwareInfo,
    JoinMode,
    MemorySlotStore,
)
from protocol.errors import ProtocolError, Reason
from protocol.han.client import ClientConfig, DownloadAborted, HanClient, ManifestRejected
from protocol.han.frames import (
    MAX_BLOCK_DATA,
    ImageBlockRequest,
    QueryNextImageRequest,
    ZclStatus,
    decode_frame,
)
from protocol.han.server import (
    HanServer,
    ImageDelivered,
    ImageSource,
    MoreImagesRequired,
    ProgressiveImage,
    ServerConfig,
    SessionFailed,
    SessionTimedOut,
)
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore
from protocol.wire.messages import HanDevice

if TYPE_CHECKING:  # loadtest.hub will import this module to run its premises: no cycle
    from loadtest.hub import HubIdentity

__all__ = [
    "ActivationAnswered",
    "ActivationRefused",
    "AlertReceived",
    "CredentialsRefused",
    "CredentialsReplaced",
    "Premises",
    "PremisesConfig",
    "PremisesEvent",
    "PremisesStats",
    "TransferEnded",
    "TransferOutcome",
    "TransferProgressed",
    "VersionReported",
    "device_key",
]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class PremisesConfig:
    """The scenario of one premises (durations in HAN seconds unless named shell)."""

    seed: int = 0
    acceleration: float = 1.0  # HAN time runs this many times as fast as shell time
    max_transfers: int = 2  # K: concurrent HAN transfers per CH
    minimum_block_period_ms: int = 100
    link: LinkConfig = field(default_factory=LinkConfig)
    links: Mapping[DeviceType, LinkConfig] = field(default_factory=dict)  # per type, else link
    query_interval: float = 300.0  # an always-on device queries this often
    sleepy: frozenset[DeviceType] = frozenset({DeviceType.GSME})
    wake_interval: float = 1800.0  # a sleepy device wakes and queries this often
    awake_window: float = 8.0  # a sleepy device listens this long after it last sent
    self_test_failure_share: float = 0.0  # devices (seeded) whose new image fails self-test
    activation_answer_loss: float = 0.0  # extra loss of activation answers (not read-backs)
    progress_step: float = 0.10  # report relay progress every this share of the image
    progress_min_interval: float = 0.0  # shell seconds between two progress reports, at least
    vendor: int = DEFAULT_MANUFACTURER  # ZigBee manufacturer code of every device here
    image_types: Mapping[DeviceType, int] = field(default_factory=dict)  # else the default

    def __post_init__(self) -> None:
        if self.max_transfers < 1:
            raise ValueError("max_transfers must be at least 1")
        if min(self.query_interval, self.wake_interval, self.awake_window) <= 0:
            raise ValueError("intervals must be positive")
        for share in (self.self_test_failure_share, self.activation_answer_loss):
            if not 0.0 <= share <= 1.0:
                raise ValueError("shares must be in [0, 1]")
        if not 0.0 < self.progress_step <= 1.0:
            raise ValueError("progress_step must be in (0, 1]")

    def link_for(self, device_type: DeviceType) -> LinkConfig:
        """The link a device of ``device_type`` has."""
        return self.links.get(device_type, self.link)

    def image_type_for(self, device_type: DeviceType) -> int:
        """The ZigBee OTA image type a device of ``device_type`` identifies with."""
        return self.image_types.get(device_type, DEFAULT_IMAGE_TYPE)


def device_key(seed: int, device_id: str, generation: int = 0) -> ec.EllipticCurvePrivateKey:
    """The signing key of device ``device_id`` in a run seeded ``seed`` (deterministic):
    ``generation`` 0 is the key it starts with, n the one its n-th credential replacement makes."""
    label = f"otad-loadtest/device-key/{seed}/{device_id}"
    if generation:
        label += f"/{generation}"
    digest = hashlib.sha256(label.encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest) % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _replacement_keys(seed: int, device_id: str) -> Callable[[], ec.EllipticCurvePrivateKey]:
    """The key generator of a device: generations 1, 2, ... of :func:`device_key`."""
    generations = itertools.count(1)
    return lambda: device_key(seed, device_id, next(generations))


# ----------------------------------------------------------------------------- events


class TransferOutcome(StrEnum):
    """A device's relay outcome (GBCS firmware transfer alert)."""

    HELD = "held"  # the device verified and holds the image
    DISCARDED = "discarded"  # the device refused or discarded it (reason says why)
    HARDWARE_MISMATCH = "hardware_mismatch"  # its hardware version is outside the range
    FAILED = "failed"  # the transfer was aborted (reason says why)
    TIMED_OUT = "timed_out"  # the device went silent mid-transfer


@dataclass(frozen=True, slots=True)
class TransferProgressed:
    """A relay reached ``bytes_done`` of ``size`` bytes of image ``image_sha256``."""

    device_id: str
    image_sha256: bytes
    bytes_done: int
    size: int
    at: UnixTime


@dataclass(frozen=True, slots=True)
class TransferEnded:
    """A relay to one device ended with ``outcome`` (``reason`` for all but HELD)."""

    device_id: str
    image_sha256: bytes
    outcome: TransferOutcome
    reason: Reason | None
    at: UnixTime


@dataclass(frozen=True, slots=True)
class ActivationAnswered:
    """The device answered an activation command (or a scheduled one executed)."""

    device_id: str
    answer: ActivationResponse | ActivationScheduled | ActivationCancelled
    at: UnixTime


@dataclass(frozen=True, slots=True)
class ActivationRefused:
    """The device refused an activation command before acting on it."""

    device_id: str
    reason: Reason
    at: UnixTime


@dataclass(frozen=True, slots=True)
class AlertReceived:
    """A device-signed ActivationAlert (COSE_Sign1 bytes) reached the CH."""

    device_id: str
    signed: bytes
    at: UnixTime


@dataclass(frozen=True, slots=True)
class CredentialsReplaced:
    """A device replaced its key pair: ``signed`` is its CredentialsConfirmation (COSE_Sign1
    under the key the command named; SPEC §8.11), to relay to otad verbatim."""

    device_id: str
    signed: bytes
    at: UnixTime


@dataclass(frozen=True, slots=True)
class CredentialsRefused:
    """The device refused a credentials command before acting on it (SPEC §8.11)."""

    device_id: str
    reason: Reason
    at: UnixTime


@dataclass(frozen=True, slots=True)
class VersionReported:
    """The CH's VersionReport of a device: CAD evidence, or a read-back's answer."""

    device_id: str
    report: VersionReport
    at: UnixTime


PremisesEvent = (
    TransferProgressed
    | TransferEnded
    | ActivationAnswered
    | ActivationRefused
    | AlertReceived
    | CredentialsReplaced
    | CredentialsRefused
    | VersionReported
)


@dataclass(slots=True)
class PremisesStats:
    """What a test or a summary reads."""

    frames_sent: int = 0  # on every link, both ways
    frames_lost: int = 0
    frames_held_asleep: int = 0  # frames the CH kept for a sleeping device until it woke
    answers_dropped: int = 0  # answers and confirmations lost to ``activation_answer_loss``
    max_concurrent_transfers: int = 0  # the most HAN sessions transferring at once
    image_bytes_delivered: int = 0  # bytes of the images devices reported held


# ----------------------------------------------------------------------------- internals


@dataclass(frozen=True, slots=True)
class _ToCh:
    device_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class _ToDevice:
    device_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class _Command:
    device_id: str
    signed: bytes
    credentials: bool  # claims to be a credentials command (unverified: for the events only)


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: Reason
    credentials: bool


@dataclass(frozen=True, slots=True)
class _VersionRead:
    device_id: str


@dataclass(frozen=True, slots=True)
class _Answer:
    device_id: str
    answer: DeviceOutput | _Refusal


_Delivery = _ToCh | _ToDevice | _Command | _VersionRead | _Answer
_DeviceBound = _ToDevice | _Command | _VersionRead


@dataclass(slots=True)
class _Relay:
    manifest: Manifest
    targets: frozenset[str]
    held: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Progress:
    step: int = -1
    at: float = float("-inf")


class _Node:
    """One HAN device: its slots, activator, client, key, link and sleep."""

    __slots__ = (
        "awake_until",
        "client",
        "client_config",
        "device",
        "evidence",
        "held",
        "inventory",
        "last_failure",
        "link",
        "progress",
        "sleepy",
        "start_at",
    )

    def __init__(
        self,
        inventory: HanDevice,
        device: Device,
        client_config: ClientConfig,
        link: HanLink,
        *,
        sleepy: bool,
        start_at: UnixTime,
    ) -> None:
        self.inventory = inventory
        self.device = device
        self.client_config = client_config
        self.client = self._new_client()
        self.link = link
        self.sleepy = sleepy
        self.awake_until = UnixTime(float("-inf"))
        self.held: list[_DeviceBound] = []  # kept by the CH while the device sleeps
        self.start_at: UnixTime | None = start_at
        self.last_failure: Reason | None = None
        self.evidence: VersionReport | None = None  # CAD: until its next query shows it
        self.progress: dict[bytes, _Progress] = {}

    def _new_client(self) -> HanClient:
        seed = int(self.device.identity.device_id, 16) ^ self.device.boot_count
        return HanClient(self.device, self.client_config, rng=random.Random(seed))

    def reboot(self) -> None:
        """The device restarted: a fresh OTA client (RAM state lost), same flash."""
        self.client = self._new_client()

    def awake(self, at: UnixTime) -> bool:
        return not self.sleepy or at <= self.awake_until


# ----------------------------------------------------------------------------- the premises


class Premises:
    """The HAN of one virtual CH (see the module docstring for the API)."""

    def __init__(
        self,
        identity: HubIdentity,
        *,
        trust: TrustStore,
        activation_trust: TrustStore,
        now: UnixTime,
        config: PremisesConfig | None = None,
        on_ch_reboot: Callable[[int], None] | None = None,
    ) -> None:
        self.identity = identity
        self.config = cfg = config or PremisesConfig()
        self.clock = HanClock(now, cfg.acceleration)
        self.on_ch_reboot = on_ch_reboot
        self.stats = PremisesStats()
        self.server = HanServer(
            ServerConfig(
                max_data_size=MAX_BLOCK_DATA,  # each device asks its own link's block size
                minimum_block_period_ms=cfg.minimum_block_period_ms,
                max_sessions=cfg.max_transfers,
            )
        )
        self._han_now = self.clock.han(now)
        self._rng = random.Random(f"{cfg.seed}/premises/{identity.guid}")
        self._events: list[PremisesEvent] = []
        self._heap: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._relays: dict[bytes, _Relay] = {}
        self._wanted: set[str] = set()  # devices some relay is for (their queries are simulated)
        self._boots: dict[str, int] = {}  # boot counts seen, by device id (CH: its GUID)
        self.ch = self._device(
            identity.guid,
            DeviceType.CH,
            JoinMode.NATIVE,
            identity.fw_version,
            identity.hw_version,
            trust,
            activation_trust,
        )
        self._nodes: dict[str, _Node] = {}
        for han in identity.han:
            device = self._device(
                han.device_id,
                han.device_type,
                han.join_mode,
                han.fw_version,
                han.hw_version,
                trust,
                activation_trust,
            )
            sleepy = han.device_type in cfg.sleepy
            interval = cfg.wake_interval if sleepy else cfg.query_interval
            link_config = cfg.link_for(han.device_type)
            self._nodes[han.device_id] = _Node(
                han,
                device,
                ClientConfig(
                    max_data_size=link_config.block_size,
                    query_interval=interval,
                    # a sleepy device holding an image still wakes every wake interval
                    upgrade_end_requery=min(interval, ClientConfig().upgrade_end_requery),
                ),
                HanLink(link_config, f"{cfg.seed}/link/{han.device_id}"),
                sleepy=sleepy,
                start_at=later(self._han_now, self._rng.uniform(0.0, interval)),
            )

    def _device(
        self,
        device_id: str,
        device_type: DeviceType,
        join_mode: JoinMode,
        fw_version: int,
        hw_version: int,
        trust: TrustStore,
        activation_trust: TrustStore,
    ) -> Device:
        cfg = self.config
        fails = (
            random.Random(f"{cfg.seed}/self-test/{device_id}").random()
            < cfg.self_test_failure_share
        )
        identity = DeviceIdentity(
            device_id,
            device_type,
            hw_version,
            cfg.vendor,
            cfg.image_type_for(device_type),
            join_mode,
        )
        return Device(
            identity,
            trust,
            MemorySlotStore(f"factory {device_type.value} {fw_version:#x}".encode()),
            running=FirmwareInfo(fw_version, 0),
            activation_trust=activation_trust,
            signing_key=device_key(cfg.seed, device_id) if join_mode.can_sign else None,
            self_test=(lambda _manifest: not fails),
            key_generator=_replacement_keys(cfg.seed, device_id),
        )

    # ------------------------------------------------------------------ queries

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The HAN devices' ids, in inventory order (the CH's own GUID not included)."""
        return tuple(self._nodes)

    def device(self, device_id: str) -> Device:
        """The :class:`Device` of ``device_id`` (a HAN device, or the CH by its GUID)."""
        if device_id == self.identity.guid:
            return self.ch
        return self._node(device_id).device

    def public_key(self, device_id: str) -> ec.EllipticCurvePublicKey | None:
        """The public key ``device_id`` signs its alerts with now (after a credential replacement
        the new one; ``None``: CAD-joined, it cannot sign)."""
        key = self.device(device_id).signing_key
        return None if key is None else key.public_key()

    def inventory(self) -> tuple[HanDevice, ...]:
        """The HAN inventory with the firmware versions the devices run now."""
        return tuple(
            replace(n.inventory, fw_version=n.device.running.fw_version)
            for n in self._nodes.values()
        )

    @property
    def ch_fw_version(self) -> int:
        """The firmware version the CH runs now."""
        return self.ch.running.fw_version

    def link(self, device_id: str) -> HanLink:
        """The link of a HAN device (for its counters)."""
        return self._node(device_id).link

    def events(self) -> list[PremisesEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ inputs

    def image_held(
        self,
        manifest: Manifest,
        signed_manifest: bytes,
        image: bytes | ImageSource,
        now: UnixTime,
    ) -> None:
        """The CH holds this verified image: hold it (a CH image) or relay it (module doc)."""
        at = self._advance(now)
        if manifest.device_type is DeviceType.CH:
            self._hold_on_ch(manifest, signed_manifest, image, at)
            return
        of_type = [
            n for n in self._nodes.values() if n.inventory.device_type is manifest.device_type
        ]
        if not of_type:
            raise ProtocolError(
                Reason.WRONG_DEVICE_TYPE,
                f"no {manifest.device_type.value} on the HAN of {self.identity.guid}",
            )
        targets: list[str] = []
        for n in of_type:
            if manifest.hw_min <= n.inventory.hw_version <= manifest.hw_max:
                targets.append(n.inventory.device_id)
            else:
                self._ended(
                    n,
                    manifest.sha256,
                    TransferOutcome.HARDWARE_MISMATCH,
                    Reason.HARDWARE_OUT_OF_RANGE,
                    at,
                )
        if not targets:
            return
        source = (
            ProgressiveImage(manifest.size, bytes(image))
            if isinstance(image, (bytes, bytearray))
            else image
        )
        self._relays[manifest.sha256] = _Relay(manifest, frozenset(targets))
        self._wanted.update(targets)
        self.server.add_image(signed_manifest, manifest, source, targets=targets)
        for peer, frame in self.server.image_notify(manifest.sha256, targets):
            self._to_device(self._nodes[peer], _ToDevice(peer, frame), at)

    def image_discarded(self, sha256: bytes, now: UnixTime) -> None:
        """The CH dropped an image: it is no longer served."""
        self._advance(now)
        self._relays.pop(sha256, None)
        self._wanted = {t for relay in self._relays.values() for t in relay.targets}
        self.server.remove_image(sha256)

    def activation_received(self, device_id: str, signed_command: bytes, now: UnixTime) -> None:
        """Carry a signed command (activation or credentials) to ``device_id`` (the CH: its
        GUID)."""
        at = self._advance(now)
        command = _Command(
            device_id,
            bytes(signed_command),
            claimed_command_type(signed_command) is CredentialsCommand,
        )
        if device_id == self.identity.guid:
            self._ch_activation(command, at)
            return
        node = self._nodes.get(device_id)
        if node is None:
            raise ProtocolError(Reason.WRONG_DEVICE, f"{device_id} is not on this premises")
        self._to_device(node, command, at)

    def version_read(self, device_id: str, now: UnixTime) -> None:
        """Read ``device_id``'s running version (answered by a :class:`VersionReported`)."""
        at = self._advance(now)
        if device_id == self.identity.guid:
            self._emit(VersionReported(device_id, self._report(self.ch), self.clock.shell(at)))
            return
        node = self._nodes.get(device_id)
        if node is None:
            raise ProtocolError(Reason.WRONG_DEVICE, f"{device_id} is not on this premises")
        self._to_device(node, _VersionRead(device_id), at)

    # ------------------------------------------------------------------ timer

    def next_deadline(self) -> UnixTime | None:
        """When :meth:`handle_timer` must next be called (shell time), or ``None``."""
        due = self._next_due()
        return None if due is None else self.clock.shell(UnixTime(due))

    def handle_timer(self, now: UnixTime) -> None:
        """Run the HAN up to ``now``: deliveries, machine timers, scheduled activations."""
        self._advance(now)

    # ------------------------------------------------------------------ simulation

    def _next_due(self) -> float | None:
        candidates: list[float | None] = [self.server.next_deadline(), self.ch.next_deadline()]
        if self._heap:
            candidates.append(self._heap[0][0])
        for n in self._nodes.values():
            client_due = n.client.next_deadline() if self._polls(n) else None
            candidates.extend((n.start_at, client_due, n.device.next_deadline()))
        return min((c for c in candidates if c is not None), default=None)

    def _polls(self, node: _Node) -> bool:
        """Whether ``node``'s OTA client timers are simulated. An always-on device that no
        image here is for only ever hears NO_IMAGE_AVAILABLE to its periodic query, which
        changes nothing: at 300x acceleration those queries were one a second per device,
        45,000 a second for 10,000 premises -- the virtual fleet's CPU, for nothing. A sleepy
        device keeps its wake cycle (frames for it wait for it to wake)."""
        return node.sleepy or node.inventory.device_id in self._wanted

    def _advance(self, now: UnixTime) -> UnixTime:
        """Run everything due by shell instant ``now``, in HAN-time order; the HAN instant."""
        until = self.clock.han(now)
        while True:
            due = self._next_due()
            if due is None or (due > until and self.clock.shell(UnixTime(due)) > now):
                break
            at = UnixTime(max(due, self._han_now))
            self._han_now = at
            self._step(at)
        self._han_now = UnixTime(max(self._han_now, until))
        return self._han_now

    def _step(self, at: UnixTime) -> None:
        """Do the one earliest thing due at ``at``."""
        if self._heap and self._heap[0][0] <= at:
            self._deliver(heapq.heappop(self._heap)[2], at)
            return
        server_due = self.server.next_deadline()
        if server_due is not None and server_due <= at:
            for peer, frame in self.server.handle_timer(at):
                self._to_device(self._nodes[peer], _ToDevice(peer, frame), at)
            self._server_events(at)
            return
        ch_due = self.ch.next_deadline()
        if ch_due is not None and ch_due <= at:
            self._ch_outputs(self.ch.handle_timer(at), at)
            return
        for n in self._nodes.values():
            if n.start_at is not None and n.start_at <= at:
                n.start_at = None
                self._client_sent(n, n.client.start(at), at)
                return
            client_due = n.client.next_deadline() if self._polls(n) else None
            if client_due is not None and client_due <= at:
                self._client_sent(n, n.client.handle_timer(at), at)
                return
            device_due = n.device.next_deadline()
            if device_due is not None and device_due <= at:
                self._device_outputs(n, n.device.handle_timer(at), at)
                return
        raise AssertionError("nothing was due")  # _next_due said something was

    def _push(self, at: UnixTime, delivery: _Delivery) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), delivery))

    def _to_device(self, node: _Node, delivery: _DeviceBound, at: UnixTime) -> None:
        """CH -> device over the link; a sleeping device's frames wait for it to wake."""
        if not node.awake(at):
            node.held.append(delivery)
            self.stats.frames_held_asleep += 1
            return
        self._transmit(node, Direction.TO_DEVICE, delivery, at)

    def _to_ch(self, node: _Node, delivery: _ToCh | _Answer, at: UnixTime) -> None:
        """Device -> CH over the link; the device is awake for a while after sending."""
        node.awake_until = later(at, self.config.awake_window)
        self._transmit(node, Direction.TO_CH, delivery, at)
        held, node.held = node.held, []
        for waiting in held:
            self._transmit(node, Direction.TO_DEVICE, waiting, at)

    def _transmit(
        self, node: _Node, direction: Direction, delivery: _Delivery, at: UnixTime
    ) -> None:
        arrival = node.link.transmit(direction, at)
        self.stats.frames_sent += 1
        if arrival is None:
            self.stats.frames_lost += 1
            return
        self._push(arrival, delivery)

    def _deliver(self, delivery: _Delivery, at: UnixTime) -> None:
        if isinstance(delivery, _ToCh):
            self._frame_at_ch(self._nodes[delivery.device_id], delivery.data, at)
        elif isinstance(delivery, _Answer):
            self._answer_at_ch(delivery.device_id, delivery.answer, at)
        else:
            node = self._nodes[delivery.device_id]
            if isinstance(delivery, _ToDevice):
                self._client_sent(node, node.client.unicast_received(delivery.data, at), at)
            elif isinstance(delivery, _Command):
                try:
                    outputs = node.device.command_received(delivery.signed, at)
                except ProtocolError as exc:
                    self._answer(node, _Refusal(exc.reason, delivery.credentials), at)
                    return
                self._device_outputs(node, outputs, at)
            else:
                self._to_ch(node, _Answer(node.inventory.device_id, self._report(node.device)), at)

    # ------------------------------------------------------------------ device side

    def _client_sent(self, node: _Node, frames: list[bytes], at: UnixTime) -> None:
        for event in node.client.events():
            if isinstance(event, (DownloadAborted, ManifestRejected)):
                node.last_failure = event.reason
        for frame in frames:
            self._to_ch(node, _ToCh(node.inventory.device_id, frame), at)

    def _device_outputs(self, node: _Node, outputs: list[DeviceOutput], at: UnixTime) -> None:
        for output in outputs:
            if isinstance(output, VersionReport):
                node.evidence = output  # the CH sees it when the rebooted device queries
            else:
                self._answer(node, output, at)
        if node.device.boot_count != self._boots.get(node.inventory.device_id, 0):
            # it swapped slots (and maybe back): rebooted, its OTA client starts afresh
            self._boots[node.inventory.device_id] = node.device.boot_count
            node.reboot()
            node.start_at = at

    def _answer(self, node: _Node, answer: DeviceOutput | _Refusal, at: UnixTime) -> None:
        if self.config.activation_answer_loss and (
            self._rng.random() < self.config.activation_answer_loss
        ):
            self.stats.answers_dropped += 1
            node.awake_until = later(at, self.config.awake_window)
            return
        self._to_ch(node, _Answer(node.inventory.device_id, answer), at)

    @staticmethod
    def _report(device: Device) -> VersionReport:
        return VersionReport(
            device.identity.device_id,
            device.running.fw_version,
            device.boot_count,
            device.last_counter,
        )

    # ------------------------------------------------------------------ CH side

    def _frame_at_ch(self, node: _Node, data: bytes, at: UnixTime) -> None:
        peer = node.inventory.device_id
        self._observe(node, data, at)
        for to, frame in self.server.frame_received(peer, data, at):
            self._to_device(self._nodes[to], _ToDevice(to, frame), at)
        self.stats.max_concurrent_transfers = max(
            self.stats.max_concurrent_transfers, self.server.transferring
        )
        self._server_events(at)

    def _observe(self, node: _Node, data: bytes, at: UnixTime) -> None:
        """What the CH learns from a device's frame: its version (CAD evidence), its progress."""
        try:
            frame = decode_frame(data)
        except ProtocolError:
            return
        if isinstance(frame, QueryNextImageRequest):
            evidence = node.evidence
            if evidence is not None and frame.file_version == evidence.fw_version:
                node.evidence = None
                self._emit(VersionReported(evidence.device_id, evidence, self.clock.shell(at)))
        elif isinstance(frame, ImageBlockRequest):
            self._progressed(node, frame, at)

    def _progressed(self, node: _Node, frame: ImageBlockRequest, at: UnixTime) -> None:
        peer = node.inventory.device_id
        for sha, relay in self._relays.items():
            m = relay.manifest
            if peer in relay.targets and (m.vendor, m.image_type, m.fw_version) == (
                frame.manufacturer_code,
                frame.image_type,
                frame.file_version,
            ):
                progress = node.progress.setdefault(sha, _Progress())
                step = int(frame.file_offset / m.size / self.config.progress_step)
                shell_at = self.clock.shell(at)
                if step > progress.step and (
                    shell_at - progress.at >= self.config.progress_min_interval
                ):
                    progress.step, progress.at = step, shell_at
                    self._emit(TransferProgressed(peer, sha, frame.file_offset, m.size, shell_at))
                return

    def _server_events(self, at: UnixTime) -> None:
        for event in self.server.events():
            node = self._nodes.get(event.peer)
            relay = self._relays.get(event.image_sha256)
            if node is None or relay is None or event.peer not in relay.targets:
                continue
            if isinstance(event, (ImageDelivered, MoreImagesRequired)):
                if event.peer not in relay.held:
                    relay.held.add(event.peer)
                    self.stats.image_bytes_delivered += relay.manifest.size
                    self._ended(node, event.image_sha256, TransferOutcome.HELD, None, at)
            elif isinstance(event, SessionFailed):
                reason = node.last_failure or (
                    Reason.IMAGE_HASH
                    if event.status is ZclStatus.INVALID_IMAGE
                    else Reason.CANCELLED
                )
                if reason is Reason.HARDWARE_OUT_OF_RANGE:
                    outcome = TransferOutcome.HARDWARE_MISMATCH
                elif event.status is ZclStatus.INVALID_IMAGE:
                    outcome = TransferOutcome.DISCARDED
                else:
                    outcome = TransferOutcome.FAILED
                self._ended(node, event.image_sha256, outcome, reason, at)
            elif isinstance(event, SessionTimedOut):
                self._ended(
                    node, event.image_sha256, TransferOutcome.TIMED_OUT, Reason.TIMED_OUT, at
                )

    def _ended(
        self,
        node: _Node,
        sha256: bytes,
        outcome: TransferOutcome,
        reason: Reason | None,
        at: UnixTime,
    ) -> None:
        node.last_failure = None
        node.progress.pop(sha256, None)
        self._emit(
            TransferEnded(node.inventory.device_id, sha256, outcome, reason, self.clock.shell(at))
        )

    def _answer_at_ch(self, device_id: str, answer: DeviceOutput | _Refusal, at: UnixTime) -> None:
        shell_at = self.clock.shell(at)
        if isinstance(answer, _Refusal):
            refused = CredentialsRefused if answer.credentials else ActivationRefused
            self._emit(refused(device_id, answer.reason, shell_at))
        elif isinstance(answer, CredentialsConfirmed):
            self._emit(CredentialsReplaced(device_id, answer.signed, shell_at))
        elif isinstance(answer, AlertRaised):
            self._emit(AlertReceived(device_id, answer.signed, shell_at))
        elif isinstance(answer, VersionReport):
            self._emit(VersionReported(device_id, answer, shell_at))
        else:
            self._emit(ActivationAnswered(device_id, answer, shell_at))

    def _emit(self, event: PremisesEvent) -> None:
        self._events.append(event)

    # ------------------------------------------------------------------ the CH's own firmware

    def _hold_on_ch(
        self, manifest: Manifest, signed_manifest: bytes, image: bytes | ImageSource, at: UnixTime
    ) -> None:
        guid = self.identity.guid
        data = (
            bytes(image) if isinstance(image, (bytes, bytearray)) else image.read(0, manifest.size)
        )
        try:
            if data is None:
                raise ProtocolError(Reason.NO_TRANSFER, "the CH image is not all here")
            self.ch.manifest_received(signed_manifest, at)
            offset = self.ch.next_offset
            while not self.ch.holds_image:
                chunk = data[offset : offset + manifest.block_size]
                offset = self.ch.image_data_received(offset, chunk)
        except ProtocolError as exc:
            outcome = (
                TransferOutcome.HARDWARE_MISMATCH
                if exc.reason is Reason.HARDWARE_OUT_OF_RANGE
                else TransferOutcome.DISCARDED
            )
            self._emit(
                TransferEnded(guid, manifest.sha256, outcome, exc.reason, self.clock.shell(at))
            )
            return
        self._emit(
            TransferEnded(guid, manifest.sha256, TransferOutcome.HELD, None, self.clock.shell(at))
        )

    def _ch_activation(self, command: _Command, at: UnixTime) -> None:
        try:
            outputs = self.ch.command_received(command.signed, at)
        except ProtocolError as exc:
            self._answer_at_ch(self.identity.guid, _Refusal(exc.reason, command.credentials), at)
            return
        self._ch_outputs(outputs, at)

    def _ch_outputs(self, outputs: list[DeviceOutput], at: UnixTime) -> None:
        for output in outputs:
            self._answer_at_ch(self.identity.guid, output, at)
        if self.ch.boot_count != self._boots.get(self.identity.guid, 0):
            self._boots[self.identity.guid] = self.ch.boot_count
            if self.on_ch_reboot is not None:
                self.on_ch_reboot(self.ch.running.fw_version)

    def _node(self, device_id: str) -> _Node:
        node = self._nodes.get(device_id)
        if node is None:
            raise KeyError(device_id)
        return node
