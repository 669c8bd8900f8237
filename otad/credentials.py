"""Replacing a device's signing key over the air (SPEC §8.11; DP170 question 3).

A device that signs its activation alerts (a native device, a PPMID-joined Alt HAN bridge) has
one key otad trusts for it (:class:`DeviceKeys`). ``otactl credentials replace --device ID...``
has it make a new key pair and confirm it:

* otad signs a :class:`~protocol.device.credentials.CredentialsCommand` naming (``current_kid``)
  the key it trusts now, with the device's next counter: the one sequence activation commands
  draw from too (:meth:`otad.store.Store.issue_credentials`, committed durably before the
  command is published), and sends it in an ``Activate`` as it sends activation commands;
* the device answers with a confirmation signed by that key (relayed by its CH in a
  ``DeviceReported``, routed here by :mod:`otad.devices`); otad checks it with
  :func:`~protocol.device.credentials.adopt_new_key` and, in one durable change, trusts the new
  key and records the replacement done (``credentials.replaced``). From then on an alert signed
  by the old key is refused (``UNKNOWN_KEY_ID``);
* no confirmation within ``activation.credentials_timeout_s``: a new command (a new counter)
  naming the *same* key, still the one otad trusts. If only the confirmation was lost, the device
  holds that key as its previous one, signs with it, drops the key otad never adopted and makes
  another (SPEC §8.11's two-key recovery). After ``credentials_attempts`` commands the
  replacement ends FAILED (``credentials.failed``) and otad still trusts the old key.

Refused by otad before anything is sent: a device no CH lists (``WRONG_DEVICE``), one behind a CH
older than protocol 1.1 (``UNSUPPORTED_VERSION``), a CAD-joined one, which holds no credentials
(``NO_CREDENTIALS``), one otad holds no key for (``UNKNOWN_KEY_ID``). A device refuses a replayed
or forged command itself; it sends nothing back (SPEC §8.11), so otad's deadline runs.

**Where adopted keys live: in the store**, table ``device_keys``, over the operator's
``[activation] device_keys`` directory (left as it is). The adoption must be one durable change
with the replacement's end (a crash between renaming a PEM file and committing the state would
leave the two disagreeing about which key is trusted), otad's configuration may be read-only to
it (``ProtectSystem=strict``), and the store is what otad already backs up and restores whole. A
directory key that is neither the adopted key nor the one it replaced was put there after the
replacement (the device re-enrolled out of band, SPEC §8.11): it wins, with a warning.

States of one device's :class:`Replacement` (:data:`TRANSITIONS`)::

    PENDING --confirmation adopted--> REPLACED --replace again--> PENDING
       | (deadline: a new command, same key)          FAILED --replace again--> PENDING
       +--every attempt timed out--> FAILED

Reports and deadlines are handled in turn with the device reports of :mod:`otad.devices` (its
task and lock), so a replacement is never changed by two writers at once.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from mqttio import MqttClient, NotConnected
from otad.config import ActivationConfig
from otad.events import CredentialsFailed, CredentialsReplaced
from otad.keyfiles import load_public_key
from otad.outbox import EventPublisher
from otad.registry import Registry
from otad.store import CredentialsRow, DeviceKeyRow, Store
from otad.timers import TimerHost
from protocol.device.credentials import CredentialsCommand, adopt_new_key, load_spki, spki
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id
from protocol.release.trust import TrustStore
from protocol.transitions import checked
from protocol.wire import topics
from protocol.wire.devices import DeviceType
from protocol.wire.messages import Activate, DeviceReported, minor_version

if TYPE_CHECKING:
    from otad.devices import Devices

log = logging.getLogger("otad.credentials")


class CredentialsState(enum.StrEnum):
    """Where one device's replacement stands (see the module docstring)."""

    PENDING = "pending"  # a command issued (durable), its confirmation awaited
    REPLACED = "replaced"  # the new key adopted: otad trusts only it
    FAILED = "failed"  # no confirmation after every attempt: the old key still trusted


_S = CredentialsState
#: Every edge. PENDING -> PENDING is a retry (or the operator asking again).
TRANSITIONS: Final[dict[CredentialsState, frozenset[CredentialsState]]] = {
    _S.PENDING: frozenset({_S.PENDING, _S.REPLACED, _S.FAILED}),
    _S.REPLACED: frozenset({_S.PENDING}),
    _S.FAILED: frozenset({_S.PENDING}),
}


# --------------------------------------------------------------------------- device keys


def load_device_keys(directory: Path | None) -> dict[str, ec.EllipticCurvePublicKey]:
    """``activation.device_keys``: ``<DEVICE_ID>.pem`` (a P-256 public key) per device that
    signs its activation alerts, by device id (read at start, in a thread). Files whose name is
    not an EUI-64 are skipped with a warning."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    if directory is None:
        return keys
    for path in sorted(Path(directory).glob("*.pem")):
        device_id = path.stem
        if len(device_id) != 16 or any(c not in "0123456789ABCDEF" for c in device_id):
            log.warning("device key %s: the name is not a device id (EUI-64): skipped", path)
            continue
        keys[device_id] = load_public_key(path)
    return keys


class DeviceKeys(Mapping[str, TrustStore]):
    """The one key otad trusts per device for its alerts, as a trust store of that key by device
    id: the operator's file, or the key adopted from the device's last confirmation."""

    def __init__(self, files: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
        """``files``: :func:`load_device_keys`."""
        self._keys: dict[str, ec.EllipticCurvePublicKey] = dict(files)
        self._trust: dict[str, TrustStore] = {}

    def overlay(self, adopted: Sequence[DeviceKeyRow]) -> None:
        """Put the keys adopted from confirmations (the store's) in place of the files', unless
        the file holds a third key: one the operator enrolled after the replacement."""
        for row in adopted:
            file_key = self._keys.get(row.device_id)
            if file_key is not None and spki(file_key) not in (row.spki, row.replaced_spki):
                log.warning(
                    "%s: its key file holds a key newer than the one adopted from its"
                    " confirmation %d (re-enrolled): the file's key is trusted",
                    row.device_id,
                    row.counter,
                )
                continue
            self.adopt(row.device_id, load_spki(row.spki))

    def key(self, device_id: str) -> ec.EllipticCurvePublicKey | None:
        """The public key otad trusts for ``device_id``, or None."""
        return self._keys.get(device_id)

    def adopt(self, device_id: str, key: ec.EllipticCurvePublicKey) -> None:
        """Trust exactly ``key`` for ``device_id`` from now on."""
        self._keys[device_id] = key
        self._trust.pop(device_id, None)

    def __getitem__(self, device_id: str) -> TrustStore:
        trust = self._trust.get(device_id)
        if trust is None:
            trust = self._trust[device_id] = TrustStore([self._keys[device_id]])
        return trust

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# --------------------------------------------------------------------------- replacements


@dataclass(slots=True)
class Replacement:
    """One device's credential replacement (its store row is :class:`otad.store.CredentialsRow`)."""

    device_id: str
    guid: str  # the premises: the CH the device is reached through
    device_type: DeviceType
    state: CredentialsState
    counter: int  # the last command issued
    current_kid: bytes  # the key it named: the key otad trusted when it was issued
    attempts: int  # commands issued for this replacement
    deadline: float | None
    reason: str | None = None
    new_kid: bytes | None = None
    updated_at: float = 0.0

    def enter(self, state: CredentialsState) -> None:
        """Change state along an edge of :data:`TRANSITIONS`."""
        self.state = checked(TRANSITIONS, "Replacement", self.state, state)

    def row(self) -> CredentialsRow:
        """The store row."""
        return CredentialsRow(
            self.device_id,
            self.guid,
            self.device_type.value,
            self.state.value,
            self.counter,
            self.current_kid,
            self.attempts,
            self.deadline,
            self.reason,
            self.new_kid,
            self.updated_at,
        )

    @classmethod
    def from_row(cls, row: CredentialsRow) -> Replacement:
        """The replacement of a store row."""
        return cls(
            row.device_id,
            row.guid,
            DeviceType(row.device_type),
            CredentialsState(row.state),
            row.counter,
            row.current_kid,
            row.attempts,
            row.deadline,
            row.reason,
            row.new_kid,
            row.updated_at,
        )

    def to_json(self) -> dict[str, Any]:
        """For ``otactl``."""
        return {
            "device_id": self.device_id,
            "guid": self.guid,
            "device_type": self.device_type.value,
            "state": self.state.value,
            "counter": self.counter,
            "attempts": self.attempts,
            "old_kid": self.current_kid.hex(),
            "new_kid": None if self.new_kid is None else self.new_kid.hex(),
            "reason": self.reason,
            "updated_at": self.updated_at,
        }


class Credentials:
    """Every device's credential replacement (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        client: MqttClient,
        registry: Registry,
        events: EventPublisher,
        timers: TimerHost,
        config: ActivationConfig,
        signing_key: ec.EllipticCurvePrivateKey | None,
        device_keys: DeviceKeys,
        devices: Devices,
        wall_clock: Callable[[], float],
    ) -> None:
        """``signing_key`` signs the commands (otad's activation key; None: refused);
        ``device_keys`` is the one set :class:`otad.devices.Devices` verifies alerts with;
        ``devices`` handles reports in turn, and these with them."""
        self._store = store
        self._client = client
        self._registry = registry
        self._events = events
        self._timers = timers
        self._config = config
        self._signing_key = signing_key
        self._keys = device_keys
        self._devices = devices
        self._wall = wall_clock
        self.records: dict[str, Replacement] = {}
        """What is committed, by device id."""
        self.changed: Callable[[Replacement], None] = lambda replacement: None
        """Told every replacement put in place (committed first): the campaigns follow them."""
        self.campaign_of: Callable[[str, str], str] = lambda device_id, artifact: ""
        """The campaign a device's replacement belongs to, for its events (otad.campaigns)."""
        self._timers_by_device: dict[str, Any] = {}
        self._started = False
        self.published_commands = 0
        """Credentials commands published (retries included)."""

    async def load(self) -> None:
        """Read the replacements and the adopted keys (before any report is handled)."""
        self._keys.overlay(await self._store.device_keys())
        for row in await self._store.credentials():
            self.records[row.device_id] = Replacement.from_row(row)

    def start(self) -> None:
        """After the MQTT session is up: arm the deadlines of the replacements in progress (a
        command unanswered across a restart is followed by a new one at its deadline)."""
        self._started = True
        for rec in self.records.values():
            self._arm(rec)

    # ------------------------------------------------------------------ otactl

    async def replace(self, device_ids: Sequence[str]) -> dict[str, Any]:
        """Send each device a credentials command; ``{issued, refused}``. A device with a
        replacement in progress is sent a new command at once (as its retry would be)."""
        key = self._signing_key
        if key is None:
            raise ProtocolError(Reason.UNKNOWN_KEY_ID, "no activation key: set [activation] key")
        issued: list[dict[str, Any]] = []
        refused: list[dict[str, str]] = []
        async with self._devices.lock:
            for device_id in dict.fromkeys(device_ids):
                try:
                    guid, device_type, trusted = self._target(device_id)
                except ProtocolError as exc:
                    refused.append(
                        {"device_id": device_id, "reason": exc.reason.name, "detail": exc.detail}
                    )
                    continue
                rec = await self._issue(device_id, guid, device_type, key_id(trusted), key, 1)
                issued.append({"device_id": device_id, "counter": rec.counter, "guid": guid})
        return {"issued": issued, "refused": refused}

    def _target(self, device_id: str) -> tuple[str, DeviceType, ec.EllipticCurvePublicKey]:
        for hub in self._registry.hubs.values():
            for entry in hub.announcement.han:
                if entry.device_id != device_id:
                    continue
                if minor_version(hub.announcement) < 1:
                    raise ProtocolError(
                        Reason.UNSUPPORTED_VERSION, "its CH does not speak protocol 1.1"
                    )
                if not entry.join_mode.can_sign:
                    raise ProtocolError(
                        Reason.NO_CREDENTIALS,
                        f"joined as {entry.join_mode.value}: it holds no credentials to replace",
                    )
                trusted = self._keys.key(device_id)
                if trusted is None:
                    raise ProtocolError(
                        Reason.UNKNOWN_KEY_ID, "otad holds no key for it ([activation] device_keys)"
                    )
                return hub.guid, entry.device_type, trusted
        raise ProtocolError(Reason.WRONG_DEVICE, "no CH lists it on its HAN")

    def listing(self) -> list[dict[str, Any]]:
        """Every replacement, by premises and device (``otactl credentials list``)."""
        return [
            r.to_json() for r in sorted(self.records.values(), key=lambda r: (r.guid, r.device_id))
        ]

    def busy_on(self, guid: str) -> str | None:
        """A credential replacement awaiting its confirmation on premises ``guid`` (it blocks
        ``fleet.forget``), or None."""
        for rec in self.records.values():
            if rec.guid == guid and rec.state is CredentialsState.PENDING:
                return f"device {rec.device_id} is replacing its credentials"
        return None

    def state_of(self, device_id: str) -> str | None:
        """The device's replacement state (``otactl devices``' credentials column), or None."""
        rec = self.records.get(device_id)
        return None if rec is None else rec.state.value

    # ------------------------------------------------------------------ commands

    async def _issue(
        self,
        device_id: str,
        guid: str,
        device_type: DeviceType,
        current_kid: bytes,
        key: ec.EllipticCurvePrivateKey,
        attempts: int,
    ) -> Replacement:
        now = self._wall()
        old = self.records.get(device_id)
        new = Replacement(
            device_id,
            guid,
            device_type,
            _S.PENDING,
            1,
            current_kid,
            attempts,
            now + self._config.credentials_timeout_s,
            updated_at=now,
        )
        if old is not None:
            checked(TRANSITIONS, "Replacement", old.state, _S.PENDING)

        def sign(counter: int) -> bytes:
            return CredentialsCommand(device_id, counter, current_kid).sign(key)

        def row_after(counter: int) -> CredentialsRow:
            new.counter = counter
            return new.row()

        _, signed = await self._store.issue_credentials(
            device_id, floor=int(now * 1000), sign=sign, row_after=row_after
        )
        self._put(new)  # committed: now it may be reported, and sent
        message = Activate(device_id, signed)
        try:
            self._client.publish(topics.down(guid), message.encode(), Activate.QOS, False)
            self.published_commands += 1
        except NotConnected:
            log.warning("%s: credentials command %d not sent (offline)", device_id, new.counter)
        return new

    # ------------------------------------------------------------------ the confirmation

    async def confirmation_reported(self, guid: str, message: DeviceReported) -> None:
        """A ``DeviceReported`` whose record claims to be a credentials confirmation (called
        in turn by :mod:`otad.devices`): adopt the new key, or refuse it with its reason."""
        device_id = message.device_id
        rec = self.records.get(device_id)
        if rec is None or rec.state is not _S.PENDING:
            self._refuse(guid, message, Reason.NO_TRANSFER, "no credential replacement pending")
            return
        if rec.guid != guid:
            self._refuse(guid, message, Reason.WRONG_DEVICE, f"{device_id} is not on this CH's HAN")
            return
        trusted = self._keys.key(device_id)
        if trusted is None or key_id(trusted) != rec.current_kid:
            self._refuse(guid, message, Reason.UNKNOWN_KEY_ID, "the named key is no longer held")
            return
        try:
            new_key = adopt_new_key(
                message.record, trusted_key=trusted, device_id=device_id, counter=rec.counter
            )
        except ProtocolError as exc:
            self._refuse(guid, message, exc.reason, f"{device_id}: {exc.detail}")
            return
        now = self._wall()
        done = replace(rec)
        done.enter(_S.REPLACED)
        done.new_kid, done.deadline, done.reason, done.updated_at = key_id(new_key), None, None, now
        await self._store.adopt_device_key(
            DeviceKeyRow(device_id, spki(new_key), spki(trusted), rec.counter, now), done.row()
        )
        self._keys.adopt(device_id, new_key)
        self._put(done)
        self._events.emit(
            CredentialsReplaced(
                time=now,
                guid=guid,
                device_id=device_id,
                device_type=done.device_type.value,
                counter=done.counter,
                attempts=done.attempts,
                old_kid=done.current_kid.hex(),
                campaign=self.campaign_of(device_id, "credentials"),
                new_kid=key_id(new_key).hex(),
            )
        )
        log.info("%s: credentials replaced (command %d)", device_id, done.counter)

    def _refuse(self, guid: str, message: DeviceReported, reason: Reason, detail: str) -> None:
        self._registry.refused(guid, "up", message.TYPE, ProtocolError(reason, detail))

    # ------------------------------------------------------------------ deadlines

    def _put(self, rec: Replacement) -> None:
        self.records[rec.device_id] = rec
        self._arm(rec)
        self.changed(rec)

    def _arm(self, rec: Replacement) -> None:
        handle = self._timers_by_device.pop(rec.device_id, None)
        if handle is not None:
            handle.cancel()
        if not self._started or rec.state is not _S.PENDING or rec.deadline is None:
            return
        delay = max(0.0, rec.deadline - self._wall())
        job = functools.partial(self._deadline_passed, rec.device_id, rec.counter)
        self._timers_by_device[rec.device_id] = self._timers.call_at(
            self._timers.time() + delay, lambda: self._devices.run_in_turn(job)
        )

    async def _deadline_passed(self, device_id: str, counter: int) -> None:
        rec = self.records.get(device_id)
        if rec is None or rec.state is not _S.PENDING or rec.counter != counter:
            return  # moved on since this was armed
        key = self._signing_key
        if rec.attempts < self._config.credentials_attempts and key is not None:
            log.info("%s: no confirmation of credentials command %d: again", device_id, counter)
            await self._issue(
                device_id, rec.guid, rec.device_type, rec.current_kid, key, rec.attempts + 1
            )
            return
        now = self._wall()
        failed = replace(rec)
        failed.enter(_S.FAILED)
        failed.reason, failed.deadline, failed.updated_at = Reason.TIMED_OUT.name, None, now
        await self._store.save_credentials(failed.row())
        self._put(failed)
        self._events.emit(
            CredentialsFailed(
                time=now,
                guid=failed.guid,
                device_id=device_id,
                device_type=failed.device_type.value,
                counter=failed.counter,
                attempts=failed.attempts,
                old_kid=failed.current_kid.hex(),
                campaign=self.campaign_of(device_id, "credentials"),
                reason=failed.reason,
            )
        )
        log.warning("%s: credentials not replaced after %d command(s)", device_id, rec.attempts)

    def shutdown(self) -> None:
        """Cancel the deadline timers."""
        for handle in self._timers_by_device.values():
            with contextlib.suppress(Exception):
                handle.cancel()
        self._timers_by_device.clear()


__all__ = [
    "TRANSITIONS",
    "Credentials",
    "CredentialsState",
    "DeviceKeys",
    "Replacement",
    "load_device_keys",
]
