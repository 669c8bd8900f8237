"""Each HAN device's way from "its CH was sent the image" to "it runs it, proven" (SPEC §8.10).

A premises is a CH and the devices on its home area network; the WAN transfer
(:mod:`otad.distribution`) ends when the CH holds an image. This module follows every device the
image is for (and a CH itself, for a CH image) from there: the CH's HAN transfer, the signed
activation otad issues (``otactl activate``), and the proof that the device runs the new
firmware. One :class:`DeviceRecord` per (device, image), fed by

* the CH's reports on its up topic, routed here by type: ``DeviceTransferReported`` (the HAN
  transfer) and ``DeviceReported`` (an activation record of SPEC §8.7, relayed verbatim);
* otad's own actions: a distribution offering the image to the CH, the CH's WAN transfer
  ending, an activation command issued or cancelled, a read-back sent, a deadline passing;
* a CH's re-announcement, for a CH's own firmware (its announced version is what it runs).

States of one :class:`DeviceRecord` (the edges are :data:`TRANSITIONS`; :meth:`DeviceRecord.enter`
refuses any other)::

    OFFERED --WAN transfer held--> HELD_BY_CH --CH relays--> HAN_TRANSFER (%) --> HELD_BY_DEVICE
       |  (a CH image: the CH is the device)  |                   |                    |
       |                                      +------ activate ---+----- activate -----+
       |                                                          v
       |                          ACTIVATION_PENDING (a command issued, durable, unanswered)
       |                               |   success       |  signed alert / CH evidence / read-back
       |                               v                 v
       |                           ACTIVATED --proof--> CONFIRMED (by which proof)   [final]
       |                                                   ^
       +--> FAILED (reason) <-- any in-progress state --> TIMED_OUT (deadline passed) --+
              |  (distribute again: OFFERED)                  (late proof, or again)

Nothing stays in progress for ever: every in-progress state has a deadline. The HAN phases must
hear from the CH within ``activation.han_timeout_s`` (each report moves it on); an activation
waits ``response_timeout_s`` past its execution time, then otad reads the firmware version back
(``ReadVersion``) with waits doubling from ``read_back_backoff_s``, ``read_back_attempts``
times, and then the device ends TIMED_OUT. OFFERED waits for the WAN transfer, which ends by its
own rules (SPEC §7.11) and tells us.

A device counts as upgraded only when CONFIRMED, by one of (:class:`Proof`):

* ``signed_alert``: an ``ActivationAlert`` for this command's counter, the image's digest and
  its firmware version, verified against the device key otad trusts (``activation.device_keys``,
  or the key adopted from the device's credentials confirmation: :mod:`otad.credentials`);
* ``ch_evidence``: for a CAD-joined bridge, which cannot sign, the CH's ``VersionReport`` (it
  saw the device reboot and report the new version) for this command's counter;
* ``read_back``: a ``VersionReport`` answering otad's ``ReadVersion`` (or a CH's announcement of
  its own new version) showing the new version after this command was accepted (its counter is
  the device's last accepted one or below).

Durability: every state change is committed (durably, but HAN progress) before it is applied in
memory, so what ``otactl devices`` reports is never ahead of the store. An activation command's
counter, its signed bytes and the device's ACTIVATION_PENDING are one durable commit made
before the command is published (:meth:`otad.store.Store.issue_command`); after a restart,
every unanswered command is published again, byte for byte: a device that already accepted it
refuses it as ``REPLAYED`` (no device activates twice), one that never saw it executes it
(none is lost), and the read-back settles what the lost answers would have said.

Reports are handled one at a time, in arrival order, by :meth:`Devices.run` (one task; the
control commands take the same lock), so a record is never changed by two writers at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from mqttio import MqttClient, NotConnected
from otad.catalogue import Catalogue, Image
from otad.config import ActivationConfig
from otad.events import DeviceConfirmed, DeviceFailed, supplier_topic_id
from otad.keyfiles import load_private_key
from otad.outbox import EventPublisher
from otad.registry import Hub, Registry
from otad.store import CommandRow, DeviceRow, Store, StoreError, TransferState
from otad.timers import TimerHost
from protocol.device.activation import (
    MAX_MESSAGE_BYTES,
    MAX_SIGNED_BYTES,
    ActivationAlert,
    ActivationCancelled,
    ActivationCommand,
    ActivationRecord,
    ActivationResponse,
    ActivationScheduled,
    Outcome,
    VersionReport,
)
from protocol.device.credentials import CredentialsConfirmation
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import parse_sign1
from protocol.release.trust import TrustStore
from protocol.transitions import checked
from protocol.wire import cbor, topics
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.messages import (
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    Message,
    ReadVersion,
    minor_version,
)

log = logging.getLogger("otad.devices")

#: The WAN messages of SPEC §8.10 a CH sends about its devices (routed here from the up topic).
DEVICE_REPORTS: Final = (DeviceTransferReported, DeviceReported)
_COSE_SIGN1_TAG: Final = 0xD2  # CBOR tag 18, one byte: a signed record (an ActivationAlert)
_RECORDS: Final[dict[str, type[ActivationRecord]]] = {
    cls.TYPE: cls
    for cls in (ActivationResponse, ActivationScheduled, ActivationCancelled, VersionReport)
}


class DeviceState(enum.StrEnum):
    """Where one device stands with one image (see the module docstring)."""

    OFFERED = "offered"  # its CH was sent the image (the WAN transfer runs)
    HELD_BY_CH = "held_by_ch"  # its CH holds the image
    HAN_TRANSFER = "han_transfer"  # the CH relays it over the HAN (bytes_held of size)
    HELD_BY_DEVICE = "held_by_device"  # the device holds the whole image, verified
    ACTIVATION_PENDING = "activation_pending"  # a command issued (durable), not yet answered
    ACTIVATED = "activated"  # the device said success; its proof has not come yet
    CONFIRMED = "confirmed"  # proven to run the new firmware (proof says how): upgraded
    FAILED = "failed"  # it will not run the image (reason)
    TIMED_OUT = "timed_out"  # a deadline passed with nothing heard


class Proof(enum.StrEnum):
    """How a confirmation was proven (see the module docstring)."""

    SIGNED_ALERT = "signed_alert"
    CH_EVIDENCE = "ch_evidence"
    READ_BACK = "read_back"


_S = DeviceState
#: Every edge of a device's state. HAN_TRANSFER -> HAN_TRANSFER is progress; ACTIVATION_PENDING
#: -> ACTIVATION_PENDING a future-dated command scheduled or re-sent; -> OFFERED the image
#: distributed again after a failure.
TRANSITIONS: Final[dict[DeviceState, frozenset[DeviceState]]] = {
    _S.OFFERED: frozenset({_S.HELD_BY_CH, _S.HAN_TRANSFER, _S.HELD_BY_DEVICE, _S.FAILED}),
    _S.HELD_BY_CH: frozenset(
        {_S.HAN_TRANSFER, _S.HELD_BY_DEVICE, _S.ACTIVATION_PENDING, _S.FAILED, _S.TIMED_OUT}
    ),
    _S.HAN_TRANSFER: frozenset({_S.HAN_TRANSFER, _S.HELD_BY_DEVICE, _S.FAILED, _S.TIMED_OUT}),
    _S.HELD_BY_DEVICE: frozenset({_S.ACTIVATION_PENDING, _S.HAN_TRANSFER, _S.FAILED}),
    _S.ACTIVATION_PENDING: frozenset(
        {
            _S.ACTIVATION_PENDING,
            _S.ACTIVATED,
            _S.CONFIRMED,
            _S.HELD_BY_DEVICE,
            _S.HELD_BY_CH,
            _S.FAILED,
            _S.TIMED_OUT,
        }
    ),
    _S.ACTIVATED: frozenset({_S.CONFIRMED, _S.FAILED, _S.TIMED_OUT}),
    _S.CONFIRMED: frozenset(),
    _S.FAILED: frozenset({_S.OFFERED}),
    _S.TIMED_OUT: frozenset({_S.OFFERED, _S.CONFIRMED, _S.FAILED}),
}
#: States a HAN transfer report may move a record out of. Once a command was issued the image's
#: transfer is over: a late or repeated report (a CH's own HELD after its WAN ImageHeld) is
#: stale. ACTIVATION_PENDING -> HELD_BY_* is the cancel's edge, never a report's.
TRANSFER_REPORTABLE: Final = frozenset(
    {_S.OFFERED, _S.HELD_BY_CH, _S.HAN_TRANSFER, _S.HELD_BY_DEVICE}
)
#: States in which otad waits for something with a deadline.
IN_PROGRESS: Final = frozenset(
    {_S.HELD_BY_CH, _S.HAN_TRANSFER, _S.ACTIVATION_PENDING, _S.ACTIVATED}
)
#: States in which a device's premises is never forgotten (an image on its way, an activation's
#: outcome awaited); one of :data:`IN_PROGRESS` with a deadline armed is not forgotten either.
_FORGET_BLOCKED: Final = frozenset(
    {_S.OFFERED, _S.HAN_TRANSFER, _S.ACTIVATION_PENDING, _S.ACTIVATED}
)
#: States after which a proof is still accepted (a late alert after TIMED_OUT confirms).
_AWAITING_PROOF: Final = frozenset({_S.ACTIVATION_PENDING, _S.ACTIVATED, _S.TIMED_OUT})

#: What a CH's HAN outcome means for the device, where it is not progress or the image held.
_HAN_FAILURE: Final[dict[DeviceTransferState, Reason]] = {
    DeviceTransferState.REFUSED: Reason.MALFORMED,
    DeviceTransferState.HARDWARE_MISMATCH: Reason.HARDWARE_OUT_OF_RANGE,
    DeviceTransferState.DISCARDED: Reason.IMAGE_HASH,
    DeviceTransferState.FAILED: Reason.INTERNAL,
    DeviceTransferState.TIMED_OUT: Reason.TIMED_OUT,
}


@dataclass(slots=True)
class DeviceRecord:
    """One device's state for one image (its store row is :class:`otad.store.DeviceRow`)."""

    device_id: str
    image: bytes
    guid: str  # the premises: the CH the device is reached through
    device_type: DeviceType
    join_mode: JoinMode
    state: DeviceState = DeviceState.OFFERED  # the initial state, not an edge
    bytes_held: int = 0
    size: int = 0
    proof: Proof | None = None
    reason: str | None = None
    counter: int | None = None
    execute_at: int | None = None
    deadline: float | None = None
    read_attempts: int = 0
    updated_at: float = 0.0

    @property
    def is_ch(self) -> bool:
        """The CH itself (a CH image): it is its own device."""
        return self.device_id == self.guid

    @property
    def percent(self) -> int:
        """Of the HAN transfer (100 once the device holds the image)."""
        if self.state in (_S.OFFERED, _S.HELD_BY_CH):
            return 0
        if self.state is _S.HAN_TRANSFER:
            return min(100, self.bytes_held * 100 // self.size) if self.size else 0
        return 100 if self.bytes_held or self.state is not _S.FAILED else 0

    def enter(self, state: DeviceState) -> None:
        """Change state along an edge of :data:`TRANSITIONS`."""
        self.state = checked(TRANSITIONS, "DeviceRecord", self.state, state)

    def row(self) -> DeviceRow:
        """The store row."""
        return DeviceRow(
            self.device_id,
            self.image,
            self.guid,
            self.device_type.value,
            self.join_mode.value,
            self.state.value,
            self.bytes_held,
            self.size,
            None if self.proof is None else self.proof.value,
            self.reason,
            self.counter,
            self.execute_at,
            self.deadline,
            self.read_attempts,
            self.updated_at,
        )

    @classmethod
    def from_row(cls, row: DeviceRow) -> DeviceRecord:
        """The record of a store row."""
        return cls(
            row.device_id,
            bytes(row.image),
            row.guid,
            DeviceType(row.device_type),
            JoinMode(row.join_mode),
            DeviceState(row.state),
            row.bytes_held,
            row.size,
            None if row.proof is None else Proof(row.proof),
            row.reason,
            row.counter,
            row.execute_at,
            row.deadline,
            row.read_attempts,
            row.updated_at,
        )

    def copy(self) -> DeviceRecord:
        """A working copy (changed, committed, then put in place of this one)."""
        return replace(self)


@dataclass(slots=True)
class _Readers:
    """``otactl firmware-version`` calls waiting for one device's next VersionReport."""

    waiting: list[asyncio.Future[dict[str, Any]]] = field(default_factory=list)


class Devices:
    """Every device's state per image, its activation and its confirmation (module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        client: MqttClient,
        registry: Registry,
        catalogue: Catalogue,
        events: EventPublisher,
        timers: TimerHost,
        config: ActivationConfig,
        signing_key: ec.EllipticCurvePrivateKey | None,
        device_keys: Mapping[str, TrustStore],
        wall_clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        """``signing_key`` signs activation commands (None: ``activate`` is refused);
        ``device_keys`` verify each device's alerts (:class:`otad.credentials.DeviceKeys`: the
        one key trusted per device, changed as credentials are replaced)."""
        self._store = store
        self._client = client
        self._registry = registry
        self._catalogue = catalogue
        self._events = events
        self._timers = timers
        self._config = config
        self._signing_key = signing_key
        self._device_keys = device_keys
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.records: dict[tuple[str, bytes], DeviceRecord] = {}
        """What is committed, by (device id, image)."""
        self._by_device: dict[str, dict[bytes, DeviceRecord]] = collections.defaultdict(dict)
        self.state_counts: dict[DeviceState, int] = dict.fromkeys(DeviceState, 0)
        """Committed records by state (kept by :meth:`_put`: nothing walks the records)."""
        self._lock = asyncio.Lock()
        self._inbox: collections.deque[Callable[[], Awaitable[None]]] = collections.deque()
        self._wake = asyncio.Event()
        self._deadlines: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._readers: dict[str, _Readers] = collections.defaultdict(_Readers)
        self._started = False
        self.transfer_state: Callable[[str, bytes], TransferState | None] = lambda g, i: None
        """Where the WAN transfer of an image to a CH stands (the distribution's answer)."""
        self.published_commands = 0
        """Activate messages published (re-sends included)."""
        self.credentials_reported: Callable[[str, DeviceReported], Awaitable[None]] | None = None
        """Where a relayed credentials confirmation goes (:mod:`otad.credentials`)."""
        self.credentials_state: Callable[[str], str | None] = lambda device_id: None
        """A device's credential replacement state, for :meth:`listing`."""
        self.changed: Callable[[DeviceRecord], None] = lambda record: None
        """Told every record put in place (committed first): the campaigns follow them."""
        self.campaign_of: Callable[[str, str], str] = lambda device_id, image: ""
        """The campaign a (device, image hex) belongs to, for its alerts (otad.campaigns)."""

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read every device row from the store."""
        for row in await self._store.devices():
            self._put(DeviceRecord.from_row(row))

    async def start(self) -> None:
        """After the MQTT session is up: publish again every command not yet answered (a
        device that accepted one refuses it, one that never saw it executes it), and arm the
        deadlines."""
        self._started = True
        for command in await self._store.unanswered_commands():
            rec = self._by_device.get(command.device_id, {}).get(command.image)
            if rec is None or rec.state not in _AWAITING_PROOF or rec.counter is None:
                continue
            if command.counter == rec.counter or command.cancel:
                self._publish_command(command)  # ascending: an activation before its cancel
        for rec in self.records.values():
            self._arm(rec)

    async def run(self) -> None:
        """Handle the CHs' reports and otad's own events, in order (a daemon task)."""
        while True:
            await self._drain()
            self._wake.clear()
            if not self._inbox:
                await self._wake.wait()

    async def flushed(self) -> None:
        """Handle every report queued so far, and wait for the one in progress (shutdown; the
        in-memory shell, where :meth:`run` is not running)."""
        await self._drain()
        async with self._lock:
            pass

    async def _drain(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            try:
                async with self._lock:
                    await job()
            except StoreError as exc:
                # Nothing changed (a record is put in place only after its commit): the device
                # stays in its recorded state, and its deadline's read-back asks it again.
                log.error("device report not recorded, the store refused it: %s", exc)
            except Exception:
                log.exception("device report handling failed")

    def _queue(self, job: Callable[[], Awaitable[None]]) -> None:
        self._inbox.append(job)
        self._wake.set()

    def run_in_turn(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` in turn with the device reports, under :attr:`lock` (a deadline of
        :mod:`otad.credentials`)."""
        self._queue(job)

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a report, a deadline or a control command changes device state."""
        return self._lock

    # ------------------------------------------------------------------ inputs: the CH

    def report_received(self, guid: str, message: Message) -> None:
        """A ``DeviceTransferReported`` or ``DeviceReported`` from CH ``guid`` (the up topic's
        routing, synchronous): checked, then handled in turn by :meth:`run`."""
        hub = self._registry.get(guid)
        if hub is None or minor_version(hub.announcement) < 1:
            error = ProtocolError(Reason.UNKNOWN_TYPE, "a HAN report needs protocol 1.1 (§5)")
            self._registry.refused(guid, "up", message.TYPE, error)
            return
        if isinstance(message, DeviceTransferReported):
            self._queue(lambda: self._transfer_reported(guid, message))
        elif isinstance(message, DeviceReported):
            self._queue(lambda: self._device_reported(guid, message))

    def _refuse(self, guid: str, message: Message, reason: Reason, detail: str) -> None:
        self._registry.refused(guid, "up", message.TYPE, ProtocolError(reason, detail))

    def _record_of(
        self, guid: str, message: Message, device_id: str, image: bytes
    ) -> DeviceRecord | None:
        rec = self._by_device.get(device_id, {}).get(image)
        if rec is None:
            self._refuse(
                guid, message, Reason.NO_TRANSFER, f"{device_id} was not sent {image.hex()[:16]}"
            )
            return None
        if rec.guid != guid:
            self._refuse(guid, message, Reason.WRONG_DEVICE, f"{device_id} is not on this CH's HAN")
            return None
        return rec

    async def _transfer_reported(self, guid: str, message: DeviceTransferReported) -> None:
        rec = self._record_of(guid, message, message.device_id, message.image)
        if rec is None:
            return
        now = self._wall()
        new = rec.copy()
        new.bytes_held, new.size, new.updated_at = message.bytes_held, message.size, now
        state = message.state
        if state is DeviceTransferState.TRANSFERRING:
            target = _S.HAN_TRANSFER
        elif state is DeviceTransferState.HELD:
            target = _S.HELD_BY_DEVICE
        else:
            target = _S.FAILED
            reason = Reason(message.reason) if message.reason in Reason._value2member_map_ else None
            new.reason = (reason or _HAN_FAILURE[state]).name
        if rec.state not in TRANSFER_REPORTABLE or target not in TRANSITIONS[rec.state]:
            log.debug("%s: %s report in %s: stale, ignored", rec.device_id, state, rec.state)
            return
        new.enter(target)
        new.deadline = now + self._config.han_timeout_s if target in IN_PROGRESS else None
        durable = not (rec.state is _S.HAN_TRANSFER and target is _S.HAN_TRANSFER)
        await self._commit(new, durable=durable)
        if target is _S.FAILED:
            self._alert_failed(new, rolled_back=False)

    async def _device_reported(self, guid: str, message: DeviceReported) -> None:
        device_id = message.device_id
        if _claims_confirmation(message.record) and self.credentials_reported is not None:
            await self.credentials_reported(guid, message)  # verified there (SPEC §8.11)
            return
        if device_id not in self._by_device:
            self._refuse(guid, message, Reason.NO_TRANSFER, f"{device_id}: no image sent to it")
            return
        data = message.record
        try:
            if data[:1] == bytes([_COSE_SIGN1_TAG]):
                trust = self._device_keys.get(device_id)
                if trust is None:
                    raise ProtocolError(Reason.UNKNOWN_KEY_ID, f"no key for {device_id}")
                record: ActivationRecord = ActivationAlert.verify(data, trust)
            else:
                raw = cbor.loads(data, max_size=256, max_depth=1)
                kind = raw.get("t") if isinstance(raw, dict) else None
                cls = _RECORDS.get(kind) if isinstance(kind, str) else None
                if cls is None:
                    raise ProtocolError(Reason.UNKNOWN_TYPE, f"activation record {kind!r}")
                record = cls.decode(data)
        except ProtocolError as exc:
            self._refuse(guid, message, exc.reason, f"{device_id}: {exc.detail}")
            return
        if getattr(record, "device_id", None) != device_id:
            self._refuse(guid, message, Reason.WRONG_DEVICE, "the record names another device")
            return
        if isinstance(record, VersionReport):
            self._answer_readers(record, message.evidence)
        rec = self._awaiting(device_id, record)
        if rec is None or rec.guid != guid:
            log.debug("%s: %s matches no activation in progress", device_id, type(record).__name__)
            return
        if isinstance(record, ActivationResponse):
            await self._responded(rec, record)
        elif isinstance(record, ActivationScheduled):
            new = rec.copy()
            new.enter(_S.ACTIVATION_PENDING)
            new.execute_at = record.execute_at
            new.deadline = record.execute_at + self._config.response_timeout_s
            new.updated_at = self._wall()
            await self._commit(new)
        elif isinstance(record, ActivationCancelled):
            await self._cancelled(rec, record)
        elif isinstance(record, ActivationAlert):
            await self._alerted(guid, message, rec, record)
        elif isinstance(record, VersionReport):
            await self._version_reported(rec, record, message.evidence)

    def _awaiting(self, device_id: str, record: ActivationRecord) -> DeviceRecord | None:
        """The device's record that ``record`` answers: the one whose command it names (for a
        VersionReport: the newest awaiting proof, its counter at most the report's)."""
        candidates = [
            r
            for r in self._by_device.get(device_id, {}).values()
            if r.state in _AWAITING_PROOF and r.counter is not None
        ]
        if isinstance(record, ActivationCancelled):
            wanted = record.cancelled_counter
            return next((r for r in candidates if r.counter == wanted), None)
        counter = getattr(record, "counter", None)
        if isinstance(record, VersionReport):
            return max(candidates, key=lambda r: r.counter or 0, default=None)
        return next((r for r in candidates if r.counter == counter), None)

    async def _responded(self, rec: DeviceRecord, response: ActivationResponse) -> None:
        assert rec.counter is not None
        await self._store.answer_command(rec.device_id, rec.counter, self._wall())
        if rec.state is not _S.ACTIVATION_PENDING:
            return  # the proof came first (or a late answer after TIMED_OUT)
        new = rec.copy()
        new.updated_at = self._wall()
        if response.outcome is Outcome.SUCCESS:
            new.enter(_S.ACTIVATED)
            new.deadline = new.updated_at + self._config.response_timeout_s
            new.read_attempts = 0
            await self._commit(new)
            return
        new.enter(_S.FAILED)
        new.reason = (response.reason or Reason.ACTIVATION_FAILED).name
        new.deadline = None
        await self._commit(new)
        self._alert_failed(
            new,
            rolled_back=response.reason is Reason.SELF_TEST_FAILED,
            fw_version=response.running_fw_version,
        )

    async def _cancelled(self, rec: DeviceRecord, answer: ActivationCancelled) -> None:
        assert rec.counter is not None
        now = self._wall()
        await self._store.answer_command(rec.device_id, rec.counter, now)
        await self._store.answer_command(rec.device_id, answer.counter, now)
        if rec.state is not _S.ACTIVATION_PENDING:
            return
        new = rec.copy()
        new.enter(_S.HELD_BY_CH if rec.is_ch else _S.HELD_BY_DEVICE)
        new.execute_at = new.deadline = None
        new.reason = Reason.CANCELLED.name
        new.updated_at = now
        await self._commit(new)

    async def _alerted(
        self, guid: str, message: Message, rec: DeviceRecord, alert: ActivationAlert
    ) -> None:
        image = self._catalogue.images.get(rec.image)
        if image is None:
            return
        m = image.manifest
        if alert.image_sha256 != m.sha256 or alert.fw_version != m.fw_version:
            detail = f"{rec.device_id} signed version 0x{alert.fw_version:08x} of another image"
            self._refuse(guid, message, Reason.WRONG_IMAGE, detail)
            return
        await self._confirm(rec, Proof.SIGNED_ALERT, m.fw_version)

    async def _version_reported(
        self, rec: DeviceRecord, report: VersionReport, evidence: Evidence
    ) -> None:
        assert rec.counter is not None
        image = self._catalogue.images.get(rec.image)
        if image is None:
            return
        target = image.manifest.fw_version
        accepted = report.counter >= rec.counter  # the device took our command (or a later one)
        if report.fw_version == target and accepted:
            if rec.read_attempts == 0 and evidence is Evidence.CH and rec.join_mode is JoinMode.CAD:
                if report.counter == rec.counter:
                    await self._confirm(rec, Proof.CH_EVIDENCE, target)
                return
            if rec.read_attempts > 0 or rec.state is _S.TIMED_OUT:
                await self._confirm(rec, Proof.READ_BACK, target)
            return
        if rec.read_attempts == 0 or rec.state is _S.TIMED_OUT:
            return  # not an answer to our read
        if not accepted:
            # the command never reached the device: send the same one again
            for command in await self._store.unanswered_commands():
                if command.device_id == rec.device_id and command.counter == rec.counter:
                    self._publish_command(command)
            return
        if rec.execute_at is not None and rec.execute_at > self._wall():
            return  # accepted and scheduled: its time has not come
        # it took the command and still runs the old version: the activation failed, and
        # its answer was lost
        await self._store.answer_command(rec.device_id, rec.counter, self._wall())
        new = rec.copy()
        new.enter(_S.FAILED)
        new.reason = Reason.ACTIVATION_FAILED.name
        new.deadline = None
        new.updated_at = self._wall()
        await self._commit(new)
        self._alert_failed(new, rolled_back=False, fw_version=report.fw_version)

    async def _confirm(self, rec: DeviceRecord, proof: Proof, fw_version: int) -> None:
        assert rec.counter is not None
        new = rec.copy()
        new.enter(_S.CONFIRMED)
        new.proof, new.reason, new.deadline = proof, None, None
        new.updated_at = self._wall()
        await self._store.answer_command(rec.device_id, rec.counter, new.updated_at)
        await self._commit(new)
        self._events.emit(DeviceConfirmed(**self._alert_fields(new, fw_version), proof=proof.value))
        log.info("%s (%s) confirmed by %s", new.device_id, new.device_type, proof)

    def _alert_fields(self, rec: DeviceRecord, fw_version: int) -> dict[str, Any]:
        """What a device alert (confirmed or failed) says of its device, CH and supplier."""
        hub = self._registry.get(rec.guid)
        supplier = "" if hub is None else hub.announcement.supplier
        return {
            "time": rec.updated_at,
            "guid": rec.guid,
            "supplier": supplier,
            "supplier_topic": supplier_topic_id(supplier) if supplier else "unknown",
            "device_id": rec.device_id,
            "device_type": rec.device_type.value,
            "image": rec.image.hex(),
            "counter": rec.counter or 0,
            "campaign": self.campaign_of(rec.device_id, rec.image.hex()),
            "fw_version": fw_version,
        }

    def _alert_failed(self, rec: DeviceRecord, *, rolled_back: bool, fw_version: int = 0) -> None:
        self._events.emit(
            DeviceFailed(
                **self._alert_fields(rec, fw_version),
                state=rec.state.value,
                reason=rec.reason or "",
                rolled_back=rolled_back,
            )
        )

    def _answer_readers(self, report: VersionReport, evidence: Evidence) -> None:
        readers = self._readers.pop(report.device_id, None)
        if readers is None:
            return
        answer = {
            "device_id": report.device_id,
            "fw_version": report.fw_version,
            "fw_version_hex": f"0x{report.fw_version:08x}",
            "boot_count": report.boot_count,
            "counter": report.counter,
            "evidence": evidence.value,
        }
        for future in readers.waiting:
            if not future.done():
                future.set_result(answer)

    # ------------------------------------------------------------------ inputs: otad

    async def offered(
        self, image: Image, started: Sequence[str], already: Sequence[str] = ()
    ) -> int:
        """A distribution is sending ``image`` to the CHs ``started`` (and had sent or is
        sending it to ``already``): every device of theirs it is for is OFFERED (a CH image:
        the CH itself); HELD_BY_CH at once when the CH already holds it. Returns how many
        devices."""
        m = image.manifest
        now = self._wall()
        new_records: list[DeviceRecord] = []
        async with self._lock:
            earlier = frozenset(already)
            for guid in itertools.chain(started, already):
                hub = self._registry.get(guid)
                if hub is None:
                    continue
                targets: list[tuple[str, DeviceType, JoinMode]] = []
                if m.device_type is DeviceType.CH:
                    targets.append((guid, DeviceType.CH, JoinMode.NATIVE))
                else:
                    targets += [
                        (d.device_id, d.device_type, d.join_mode)
                        for d in hub.announcement.han
                        if d.device_type is m.device_type and m.hw_min <= d.hw_version <= m.hw_max
                    ]
                if not targets:
                    continue
                held = (
                    guid in earlier
                    and self.transfer_state(guid, image.sha256) is TransferState.HELD
                )
                for device_id, device_type, join_mode in targets:
                    old = self._by_device.get(device_id, {}).get(image.sha256)
                    if old is not None and old.state not in (_S.FAILED, _S.TIMED_OUT):
                        continue  # already on its way (or done)
                    rec = DeviceRecord(device_id, image.sha256, guid, device_type, join_mode)
                    if old is not None:
                        rec = old.copy()
                        rec.enter(_S.OFFERED)
                        rec.guid, rec.proof, rec.reason = guid, None, None
                        rec.counter = rec.execute_at = None
                        rec.bytes_held, rec.read_attempts = 0, 0
                    rec.size = m.size
                    rec.updated_at = now
                    if held:
                        rec.enter(_S.HELD_BY_CH)
                        rec.deadline = None if rec.is_ch else now + self._config.han_timeout_s
                    new_records.append(rec)
            if new_records:
                await self._store.save_devices([r.row() for r in new_records])
                for rec in new_records:
                    self._put(rec)
                    self._arm(rec)
        return len(new_records)

    def transfer_ended(
        self, guid: str, image: bytes, state: TransferState, reason: str | None
    ) -> None:
        """The WAN transfer of ``image`` to CH ``guid`` ended (the distribution's callback)."""
        self._queue(lambda: self._transfer_ended(guid, image, state, reason))

    async def _transfer_ended(
        self, guid: str, image: bytes, state: TransferState, reason: str | None
    ) -> None:
        now = self._wall()
        changed: list[DeviceRecord] = []
        hub = self._registry.get(guid)
        on_premises = [guid] + ([] if hub is None else [d.device_id for d in hub.announcement.han])
        for device_id in on_premises:
            rec = self._by_device.get(device_id, {}).get(image)
            if rec is None or rec.guid != guid or rec.state is not _S.OFFERED:
                continue
            new = rec.copy()
            new.updated_at = now
            if state is TransferState.HELD:
                new.enter(_S.HELD_BY_CH)
                # the CH's own image waits for the operator; a HAN device for its CH's relay
                new.deadline = None if new.is_ch else now + self._config.han_timeout_s
            else:
                new.enter(_S.FAILED)
                new.reason = (reason or state.value).upper()
            changed.append(new)
        if changed:
            await self._store.save_devices([r.row() for r in changed])
            for new in changed:
                self._put(new)
                self._arm(new)
                if new.state is _S.FAILED:
                    self._alert_failed(new, rolled_back=False)

    def hub_announced(self, hub: Hub) -> None:
        """A CH announced itself: after a CH image's activation, its announced version is a
        read-back of what it runs."""
        mine = self._by_device.get(hub.guid)
        if not mine:
            return
        for rec in list(mine.values()):
            image = self._catalogue.images.get(rec.image)
            if (
                image is not None
                and rec.state in (_S.ACTIVATION_PENDING, _S.ACTIVATED)
                and hub.announcement.fw_version == image.manifest.fw_version
            ):
                self._queue(functools.partial(self._ch_reannounced, rec.device_id, rec.image))

    async def _ch_reannounced(self, device_id: str, image: bytes) -> None:
        rec = self._by_device.get(device_id, {}).get(image)
        catalogued = self._catalogue.images.get(image)
        if (
            rec is None
            or catalogued is None
            or rec.state not in (_S.ACTIVATION_PENDING, _S.ACTIVATED)
        ):
            return
        await self._confirm(rec, Proof.READ_BACK, catalogued.manifest.fw_version)

    # ------------------------------------------------------------------ activation

    async def activate(
        self,
        image: Image,
        device_ids: Sequence[str],
        *,
        all_held: bool,
        execute_at: int | None,
    ) -> dict[str, Any]:
        """Sign and send one activation command per device (``all_held``: every device holding
        ``image``); ``execute_at`` (unix s) defers it. Returns ``{image, issued, refused}``."""
        key = self._signing_key
        if key is None:
            raise ProtocolError(Reason.UNKNOWN_KEY_ID, "no activation key: set [activation] key")
        async with self._lock:
            targets, refused = self._activation_targets(image, device_ids, all_held)
            issued = await asyncio.gather(
                *(self._issue(rec, key, execute_at=execute_at, cancel=False) for rec in targets)
            )
        return {"image": image.hex, "issued": list(issued), "refused": refused}

    async def cancel(self, image: Image, device_ids: Sequence[str]) -> dict[str, Any]:
        """Cancel the future-dated activations of ``image`` on ``device_ids``."""
        key = self._signing_key
        if key is None:
            raise ProtocolError(Reason.UNKNOWN_KEY_ID, "no activation key: set [activation] key")
        now = self._wall()
        async with self._lock:
            targets, refused = [], []
            for device_id in device_ids:
                rec = self._by_device.get(device_id, {}).get(image.sha256)
                if (
                    rec is None
                    or rec.state is not _S.ACTIVATION_PENDING
                    or rec.execute_at is None
                    or rec.execute_at <= now
                ):
                    refused.append(
                        _refusal(
                            device_id,
                            Reason.NO_TRANSFER,
                            "no future-dated activation of this image",
                        )
                    )
                    continue
                targets.append(rec)
            issued = await asyncio.gather(
                *(self._issue(rec, key, execute_at=None, cancel=True) for rec in targets)
            )
        return {"image": image.hex, "issued": list(issued), "refused": refused}

    def _activation_targets(
        self, image: Image, device_ids: Sequence[str], all_held: bool
    ) -> tuple[list[DeviceRecord], list[dict[str, str]]]:
        ready = (_S.HELD_BY_DEVICE,)
        targets: list[DeviceRecord] = []
        refused: list[dict[str, str]] = []
        if all_held:
            chosen = [
                r
                for r in self.records.values()
                if r.image == image.sha256
                and (r.state in ready or (r.is_ch and r.state is _S.HELD_BY_CH))
            ]
        else:
            chosen = []
            for device_id in dict.fromkeys(device_ids):
                rec = self._by_device.get(device_id, {}).get(image.sha256)
                if rec is None:
                    refused.append(
                        _refusal(device_id, Reason.NO_TRANSFER, "image never sent to it")
                    )
                elif not (rec.state in ready or (rec.is_ch and rec.state is _S.HELD_BY_CH)):
                    refused.append(
                        _refusal(device_id, Reason.NO_IMAGE_HELD, f"it is {rec.state.value}")
                    )
                else:
                    chosen.append(rec)
        for rec in sorted(chosen, key=lambda r: (r.guid, r.device_id)):
            hub = self._registry.get(rec.guid)
            if hub is None or minor_version(hub.announcement) < 1:
                refused.append(
                    _refusal(
                        rec.device_id,
                        Reason.UNSUPPORTED_VERSION,
                        "its CH does not speak protocol 1.1",
                    )
                )
                continue
            targets.append(rec)
        return targets, refused

    async def _issue(
        self,
        rec: DeviceRecord,
        key: ec.EllipticCurvePrivateKey,
        *,
        execute_at: int | None,
        cancel: bool,
    ) -> dict[str, Any]:
        image = self._catalogue.images[rec.image]
        digest = image.manifest.activation_digest  # what the device hashes (SPEC §8.7)
        now = self._wall()
        new = rec.copy()
        if not cancel:
            new.enter(_S.ACTIVATION_PENDING)
            new.execute_at = execute_at
            new.read_attempts = 0
            new.proof = new.reason = None
            new.deadline = max(now, execute_at or 0) + self._config.response_timeout_s
        new.updated_at = now

        def sign(counter: int) -> bytes:
            return ActivationCommand(
                rec.device_id, digest, counter, None if cancel else execute_at, cancel
            ).sign(key)

        def device_after(counter: int) -> DeviceRow:
            if not cancel:
                new.counter = counter
            return new.row()

        command = await self._store.issue_command(
            rec.device_id,
            rec.image,
            rec.guid,
            execute_at=None if cancel else execute_at,
            cancel=cancel,
            floor=int(now * 1000),
            sign=sign,
            device_after=device_after,
            now=now,
        )
        self._put(new)  # committed: now it may be reported, and sent
        self._arm(new)
        self._publish_command(command)
        return {
            "device_id": rec.device_id,
            "counter": command.counter,
            "execute_at": execute_at,
            "cancel": cancel,
        }

    def _publish_command(self, command: CommandRow) -> None:
        message = Activate(command.device_id, command.signed)
        try:
            self._client.publish(topics.down(command.guid), message.encode(), Activate.QOS, False)
        except NotConnected:
            log.warning(
                "%s: command %d not sent (offline); re-sent on its deadline",
                command.device_id,
                command.counter,
            )
            return
        self.published_commands += 1

    # ------------------------------------------------------------------ read-back

    async def read_version(self, device_id: str, wait_s: float) -> dict[str, Any]:
        """Send ``ReadVersion`` to a device and wait up to ``wait_s`` for its answer."""
        guid = self._guid_of(device_id)
        if guid is None:
            raise ProtocolError(Reason.WRONG_DEVICE, f"no CH lists device {device_id}")
        hub = self._registry.get(guid)
        if hub is None or minor_version(hub.announcement) < 1:
            raise ProtocolError(Reason.UNSUPPORTED_VERSION, "its CH does not speak protocol 1.1")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._readers[device_id].waiting.append(future)
        self._send_read(guid, device_id)
        try:
            async with asyncio.timeout(wait_s):
                answer = await future
        except TimeoutError:
            raise ProtocolError(
                Reason.TIMED_OUT, f"{device_id} did not answer in {wait_s} s"
            ) from None
        finally:
            readers = self._readers.get(device_id)
            if readers is not None and future in readers.waiting:
                readers.waiting.remove(future)
        return {"guid": guid, **answer}

    def _guid_of(self, device_id: str) -> str | None:
        for rec in self._by_device.get(device_id, {}).values():
            return rec.guid
        if self._registry.get(device_id) is not None:
            return device_id
        for hub in self._registry.hubs.values():
            if any(d.device_id == device_id for d in hub.announcement.han):
                return hub.guid
        return None

    def _send_read(self, guid: str, device_id: str) -> None:
        message = ReadVersion(device_id, self._rng.getrandbits(64))
        with contextlib.suppress(NotConnected):
            self._client.publish(topics.down(guid), message.encode(), ReadVersion.QOS, False)

    # ------------------------------------------------------------------ deadlines

    def _arm(self, rec: DeviceRecord) -> None:
        if rec.deadline is None or rec.state not in IN_PROGRESS or not self._started:
            return
        heapq.heappush(self._deadlines, (rec.deadline, next(self._order), rec.device_id, rec.image))
        self._rearm()

    def _rearm(self) -> None:
        if not self._deadlines:
            return
        at = self._deadlines[0][0]
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, at - self._wall())
        self._timer_at = at
        self._timer = self._timers.call_at(self._timers.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self._wall()
        due: list[tuple[str, bytes]] = []
        while self._deadlines and self._deadlines[0][0] <= now + 1e-6:
            _, _, device_id, image = heapq.heappop(self._deadlines)
            due.append((device_id, image))
        for device_id, image in dict.fromkeys(due):
            self._queue(functools.partial(self._deadline_passed, device_id, image))
        self._rearm()

    async def _deadline_passed(self, device_id: str, image: bytes) -> None:
        rec = self._by_device.get(device_id, {}).get(image)
        now = self._wall()
        if rec is None or rec.state not in IN_PROGRESS or rec.deadline is None:
            return
        if rec.deadline > now + 1e-6:
            self._arm(rec)  # moved on since this was armed
            return
        new = rec.copy()
        new.updated_at = now
        c = self._config
        if (
            rec.state in (_S.ACTIVATION_PENDING, _S.ACTIVATED)
            and rec.read_attempts < c.read_back_attempts
        ):
            new.read_attempts += 1
            new.deadline = now + c.read_back_backoff_s * 2 ** (new.read_attempts - 1)
            await self._commit(new, durable=False)
            self._send_read(rec.guid, rec.device_id)
            return
        new.enter(_S.TIMED_OUT)
        new.reason = Reason.TIMED_OUT.name
        new.deadline = None
        await self._commit(new)
        self._alert_failed(new, rolled_back=False)

    # ------------------------------------------------------------------ state

    async def _commit(self, new: DeviceRecord, *, durable: bool = True) -> None:
        """Commit a record's new state, then put it in place (and arm its deadline)."""
        await self._store.save_devices([new.row()], durable=durable)
        self._put(new)
        self._arm(new)

    def busy_on(self, guid: str) -> str | None:
        """Why the premises ``guid`` cannot be forgotten now (``fleet.forget``): a device of it
        with an image on its way or an activation whose outcome is awaited; None if none."""
        for rec in self.records.values():
            if rec.guid == guid and (
                rec.state in _FORGET_BLOCKED or (rec.state in IN_PROGRESS and rec.deadline)
            ):
                return f"device {rec.device_id} is {rec.state.value} (image {rec.image.hex()[:16]})"
        return None

    def forget_hub(self, guid: str) -> int:
        """Drop the premises' device records from memory (its store rows were deleted with the
        hub: :meth:`otad.store.Store.forget_hub`); return how many."""
        gone = [key for key, rec in self.records.items() if rec.guid == guid]
        for key in gone:
            rec = self.records.pop(key)
            self.state_counts[rec.state] -= 1
            by_image = self._by_device.get(rec.device_id)
            if by_image is not None:
                by_image.pop(rec.image, None)
                if not by_image:
                    del self._by_device[rec.device_id]
        return len(gone)

    def _put(self, rec: DeviceRecord) -> None:
        key = (rec.device_id, rec.image)
        old = self.records.get(key)
        if old is not None:
            self.state_counts[old.state] -= 1
        self.state_counts[rec.state] += 1
        self.records[key] = rec
        self._by_device[rec.device_id][rec.image] = rec
        self.changed(rec)

    @property
    def can_activate(self) -> bool:
        """Whether otad holds an activation signing key (``[activation] key``)."""
        return self._signing_key is not None

    def listing(self) -> list[dict[str, Any]]:
        """One row per (device, image), by premises and device (``otactl devices``)."""
        return [
            {
                "guid": r.guid,
                "device_id": r.device_id,
                "device_type": r.device_type.value,
                "join_mode": r.join_mode.value,
                "image": r.image.hex(),
                "state": r.state.value,
                "percent": r.percent,
                "proof": None if r.proof is None else r.proof.value,
                "reason": r.reason,
                "counter": r.counter,
                "execute_at": r.execute_at,
                "credentials": self.credentials_state(r.device_id),
                "updated_at": r.updated_at,
            }
            for r in sorted(self.records.values(), key=lambda r: (r.guid, r.device_id, r.image))
        ]


def _claims_confirmation(record: bytes) -> bool:
    """Whether a relayed record claims to be a credentials confirmation (a COSE_Sign1 whose
    payload's ``"t"`` says so), unverified: only to route it to the check that verifies it."""
    if record[:1] != bytes([_COSE_SIGN1_TAG]):
        return False
    try:
        payload = parse_sign1(record, max_size=MAX_SIGNED_BYTES).payload
        raw = cbor.loads(payload, max_size=MAX_MESSAGE_BYTES, max_depth=1)
    except ProtocolError:
        return False
    return isinstance(raw, dict) and raw.get("t") == CredentialsConfirmation.TYPE


def _refusal(device_id: str, reason: Reason, detail: str) -> dict[str, str]:
    return {"device_id": device_id, "reason": reason.name, "detail": detail}


def load_signing_key(path: Path | None) -> ec.EllipticCurvePrivateKey | None:
    """``activation.key``, or None when unset (read at start, in a thread)."""
    return None if path is None else load_private_key(path)
