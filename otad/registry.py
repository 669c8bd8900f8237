"""Fleet registry: which Communications Hubs exist, what they declared, and whether they are online.

A CH announces itself with a retained :class:`~protocol.wire.messages.HubAnnounced` on
``ota/v1/ch/{guid}/state``; its last will, :class:`~protocol.wire.messages.HubWentOffline`,
replaces it when the broker loses the connection. The registry is the only place those messages are
interpreted. Everything that arrives there is untrusted and checked before anything changes:

* the topic must parse and name a well-formed GUID (``BAD_IDENTIFIER``);
* the payload must fit the announcement cap (``TOO_LARGE``) and decode strictly;
* an announcement (``HubAnnounced``, or ``HubAnnouncedVersioned`` from a CH of protocol 1.1)
  must name the topic's GUID (``BAD_IDENTIFIER``), its supplier and segment must be labels
  (SPEC §3: printable text of 1-64 characters, ``MALFORMED``), and its HAN devices must have
  known types, each listed once; its limits are not judged here (SPEC §7.4: a transfer that
  they cannot carry fails ``LIMITS_EXCEEDED``);
* any other message type on a state topic is ``UNKNOWN_TYPE``.

A refused message changes nothing; it is journalled, reported to monitors and told to the CH
(:mod:`otad.refusals`, SPEC §5.1). An
accepted change gets its ``hub.online`` / ``hub.offline`` event and is reported through the
``on_change`` callback (the distribution resumes or suspends that CH's transfers). It is written to
the store behind the message handler's back: queued in memory and written, group-committed
(``committed``, not durable: a CH re-announces itself after a power cut), by the registry's task
(:meth:`Registry.run`). Whoever needs a hub's row in the store (a transfer row refers to it)
waits for :meth:`Registry.flushed`. At start the registry is loaded from the store
(:meth:`Registry.load`).

A CH that was never real (anyone could announce one before the broker had ACLs) is removed by
:meth:`Registry.forget` (``otactl fleet forget``): its row, HAN devices, ended transfers and
device records go, a ``hub.forgotten`` event says so, and the GUID is remembered as forgotten, so
the broker's retained copy of its announcement, replayed at every (re)connection, does not bring
it back. A live announcement does: a real CH that connects again is a member of the fleet again.

Flapping (:mod:`otad.flapping`). Every presence change (online after an announcement, offline
after a last will) goes through a :class:`~otad.flapping.FlapDetector` first. A CH whose
presence changes too often (a cloned hub: two connections with one GUID taking the MQTT session
over from each other; a reconnect loop) is reported once, with a ``hub.flapping`` event and a
WARNING (at most one WARNING per :data:`FLAP_WARNING_EVERY_S` for the whole fleet, the others
counted into the next), and from then until it is steady: no ``hub.online`` / ``hub.offline``
event, no store write and no ``on_change`` per flap, its transfers suspended
(``on_flapping``). When it has been quiet for the detector's ``quiet_s`` (checked once a second
by :meth:`Registry.run`), ``hub.steady`` says how many changes were held back and whether it is
online, its presence is written, and an online CH is reported to ``on_change`` as (re)arrived.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from otad.events import HubFlapping, HubForgotten, HubOffline, HubOnline, HubSteady
from otad.flapping import FlapAction, FlapDetector, FlapEnded, FlapStarted
from otad.outbox import EventPublisher
from otad.refusals import HubRefusals
from otad.rejects import RejectLog
from otad.store import Store
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType
from protocol.wire import topics
from protocol.wire.devices import JoinMode
from protocol.wire.limits import check_label
from protocol.wire.messages import (
    HanDevice,
    HubAnnounced,
    HubAnnouncedVersioned,
    HubWentOffline,
    declaring_minor,
    decode,
    minor_version,
    peek_type,
)

log = logging.getLogger("otad.registry")

#: Largest payload accepted on a state topic (the announcement cap).
MAX_STATE_BYTES = HubAnnounced.MAX_BYTES
#: At most one flapping WARNING this often, fleet-wide (the CHs that started flapping in between
#: are counted in the next one; each has its ``hub.flapping`` event).
FLAP_WARNING_EVERY_S: Final = 10.0
#: How often :meth:`Registry.run` asks the detector which episodes ended.
FLAP_CHECK_S: Final = 1.0


@dataclass(slots=True)
class Hub:
    """One CH as the registry knows it: its last accepted announcement and its presence."""

    guid: str
    announcement: HubAnnounced
    online: bool
    first_seen: float
    last_seen: float
    flapping: bool = False
    """Its presence flaps (:mod:`otad.flapping`): its transfers stay suspended until it is
    steady."""

    @property
    def segment(self) -> str:
        """Network segment (shared cell) the CH declared."""
        return self.announcement.segment

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (``fleet.list``)."""
        a = self.announcement
        return {
            "guid": self.guid,
            "online": self.online,
            "fw_version": a.fw_version,
            "hw_version": a.hw_version,
            "supplier": a.supplier,
            "segment": a.segment,
            "limits": {
                "max_block": a.limits.max_block,
                "window": a.limits.window,
                "buffer": a.limits.buffer,
            },
            "han": [
                {
                    "device_id": d.device_id,
                    "device_type": d.device_type,
                    "join_mode": d.join_mode,
                    "fw_version": d.fw_version,
                    "hw_version": d.hw_version,
                }
                for d in a.han
            ],
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


ChangeHandler = Callable[[Hub, bool, bool, bool], None]
"""``on_change(hub, was_online, announced, changed)``: called after an accepted state change, and
for a live (not retained) re-announcement of an online CH, which means its connection came back
(or it announces whenever it is polled). ``announced`` is True for an announcement, False for a
last will; ``changed`` is False for an announcement identical to the one already known."""


def check_announcement(message: HubAnnounced, topic_guid: str) -> None:
    """Raise :class:`ProtocolError` unless ``message`` is an acceptable announcement for the
    CH named by the topic."""
    if message.guid != topic_guid:
        raise ProtocolError(
            Reason.BAD_IDENTIFIER,
            f"announcement for {message.guid!r} on the state topic of {topic_guid}",
        )
    check_label(message.supplier, "supplier")
    check_label(message.segment, "segment")
    # Limits are not checked here: a CH whose limits cannot carry an image's blocks is still in
    # the fleet, and a transfer of such an image to it fails LIMITS_EXCEEDED (SPEC §7.4).
    seen: set[str] = set()
    for device in message.han:
        DeviceType.parse(device.device_type)
        topics.check_level(device.device_id)
        if device.device_id in seen:
            raise ProtocolError(Reason.MALFORMED, f"HAN device {device.device_id} listed twice")
        seen.add(device.device_id)


class Registry:
    """In-memory view of the fleet, loaded from and written behind to the store."""

    def __init__(
        self,
        store: Store,
        events: EventPublisher,
        *,
        on_change: ChangeHandler,
        rejects: RejectLog | None = None,
        refusals: HubRefusals | None = None,
        on_flapping: Callable[[Hub], None] | None = None,
        flaps: FlapDetector | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_change`` is told about every accepted change, after its event is emitted (not
        while the CH flaps); ``refusals`` tells a CH's refused messages (only journalled in
        ``rejects`` without); ``on_flapping`` is told when a CH starts flapping and when it is
        steady again (``hub.flapping`` says which). ``flaps`` judges presence changes on the
        ``monotonic`` clock (seconds); ``wall_clock`` dates the events of episodes that end."""
        self._store = store
        self._on_flapping = on_flapping
        self.flaps = flaps or FlapDetector()
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._flap_warned_at = float("-inf")
        self._flap_unwarned = 0
        self._events = events
        self._on_change = on_change
        self.rejects = rejects or RejectLog(log)
        self.refusals = refusals
        self.hubs: dict[str, Hub] = {}
        self.online = 0
        """How many CHs are online now (kept incrementally)."""
        # hub changes not yet handed to the store: (announcement to upsert, or None for an
        # online-flag change, guid, online, when)
        self._unwritten: collections.deque[tuple[HubAnnounced | None, str, bool, float]] = (
            collections.deque()
        )
        self._writing: asyncio.Future[None] | None = None  # the batch being written now
        self._wake = asyncio.Event()
        self.forgotten: set[str] = set()
        """GUIDs forgotten and not heard live since (their retained announcements are ignored)."""
        self._returned: set[str] = set()  # forgotten CHs heard live: their upsert un-forgets

    # ------------------------------------------------------------------ persistence

    async def load(self) -> None:
        """Start from the hubs the store remembers (their last announcements and presence)."""
        devices: dict[str, list[HanDevice]] = {}
        for d in await self._store.han_devices():
            devices.setdefault(d.guid, []).append(
                HanDevice(
                    d.device_id,
                    DeviceType(d.device_type),
                    JoinMode(d.join_mode),
                    d.fw_version,
                    d.hw_version,
                )
            )
        for row in await self._store.hubs():
            announcement = declaring_minor(
                HubAnnounced(
                    guid=row.guid,
                    fw_version=row.fw_version,
                    hw_version=row.hw_version,
                    supplier=row.supplier,
                    segment=row.segment,
                    limits=row.limits,
                    han=tuple(devices.get(row.guid, ())),
                ),
                row.protocol_minor,
            )
            self.hubs[row.guid] = Hub(
                row.guid, announcement, row.online, row.first_seen, row.last_seen
            )
        self.online = sum(1 for h in self.hubs.values() if h.online)
        self.forgotten = await self._store.forgotten_hubs()

    async def run(self) -> None:
        """Task: write the hub changes to the store as they come, and end flapping episodes
        (every :data:`FLAP_CHECK_S` while the detector remembers any change), until
        cancelled."""
        while True:
            timeout = FLAP_CHECK_S if self.flaps.tracked else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            self.check_flapping(self._monotonic())
            await self.flushed()

    async def flushed(self) -> None:
        """Wait until every hub change accepted so far is committed to the store (a change that
        cannot be written is logged, not raised: the CH announces itself again)."""
        while self._unwritten or self._writing is not None:
            if self._writing is not None:
                await asyncio.shield(self._writing)
            else:
                await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        batch = list(self._unwritten)
        self._unwritten.clear()
        writing = self._writing = asyncio.get_running_loop().create_future()
        try:
            returned, self._returned = self._returned, set()
            jobs = [
                self._store.upsert_hub(a, now, online=online, returned=guid in returned)
                if a is not None
                else self._store.set_hub_online(guid, online, now)
                for a, guid, online, now in batch
            ]
            for result in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.error("cannot record a hub change: %s", result)
        finally:
            self._writing = None
            writing.set_result(None)

    def _write_behind(
        self, announcement: HubAnnounced | None, guid: str, online: bool, now: float
    ) -> None:
        self._unwritten.append((announcement, guid, online, now))
        self._wake.set()

    # ------------------------------------------------------------------ state messages

    def get(self, guid: str) -> Hub | None:
        """The hub, or None if it never announced itself."""
        return self.hubs.get(guid)

    def state_received(self, topic: str, payload: bytes, retain: bool, now: float) -> Hub | None:
        """Handle one message from a CH's state topic; return the hub if it was accepted and
        reported to ``on_change``. ``retain`` says the broker replayed a retained copy."""
        try:
            guid, leaf = topics.parse_ch_topic(topic)
        except ProtocolError as exc:
            self.rejects.reject(f"state message on {topic[:80]!r}", exc.reason, exc.detail)
            return None
        if leaf != "state":  # the daemon routes only state topics here
            return None
        if not payload:  # a retained message being cleared
            return None
        try:
            if len(payload) > MAX_STATE_BYTES:
                raise ProtocolError(Reason.TOO_LARGE, f"state message of {len(payload)} bytes")
            message = decode(payload, max_size=MAX_STATE_BYTES)
            if isinstance(message, HubAnnounced):
                check_announcement(message, guid)
                return self._announced(message, retain, now)
            if type(message) is HubWentOffline:
                if message.guid != guid:
                    raise ProtocolError(
                        Reason.BAD_IDENTIFIER,
                        f"last will for {message.guid!r} on the state topic of {guid}",
                    )
                return self._went_offline(guid, now)
            raise ProtocolError(
                Reason.UNKNOWN_TYPE, f"{type(message).__name__} is not a state message"
            )
        except ProtocolError as exc:
            of = 0 if exc.reason is Reason.TOO_LARGE else peek_type(payload)
            self.refused(guid, "state", of, exc, 1 if of == HubAnnouncedVersioned.TYPE else 0)
            return None

    def refused(self, guid: str, leaf: str, of: int, error: ProtocolError, minor: int = 0) -> None:
        """A message of type ``of`` from CH ``guid`` was refused: tell it (SPEC §5.1) at the
        higher of ``minor`` (what the refused message declared) and the minor version of the
        CH's latest accepted announcement."""
        hub = self.hubs.get(guid)
        if hub is not None:
            minor = max(minor, minor_version(hub.announcement))
        if self.refusals is None:
            self.rejects.reject(f"{leaf} message from {guid}", error.reason, error.detail)
        else:
            self.refusals.refuse(guid, leaf, of, error, minor)

    def _announced(self, message: HubAnnounced, retain: bool, now: float) -> Hub | None:
        hub = self.hubs.get(message.guid)
        if hub is None and message.guid in self.forgotten:
            if retain:
                log.debug("retained announcement of forgotten %s ignored", message.guid)
                return None
            self.forgotten.discard(message.guid)
            self._returned.add(message.guid)
            log.info("forgotten CH %s announced itself again: known again", message.guid)
        if hub is None:
            hub = Hub(message.guid, message, True, now, now)
            self.hubs[message.guid] = hub
            was_online = False
        else:
            was_online = hub.online
            unchanged = was_online and hub.announcement == message
            if unchanged and retain:
                return None  # a retained copy we already know (e.g. after our reconnect)
            hub.last_seen = now
            if unchanged:  # live re-announcement: the CH (re)connected or answered a Poll
                if not hub.flapping:
                    self._on_change(hub, True, True, False)
                return hub
            hub.announcement = message
            hub.online = True
        if not was_online:
            self.online += 1
            if not self._presence_reported(hub, now):
                return hub
        elif hub.flapping:
            return hub  # a changed announcement: written when it is steady
        self._write_behind(message, message.guid, True, now)
        if not was_online:
            self._events.emit(self._online_event(hub, now))
        self._on_change(hub, was_online, True, True)
        return hub

    async def forget(
        self, guid: str, now: float, *, busy: Callable[[str], str | None]
    ) -> tuple[Hub, int, int]:
        """Remove CH ``guid`` from the fleet and the store, emit ``hub.forgotten``; return the
        hub as it was and the (transfer rows, device records) deleted with it. ``busy(guid)``,
        asked with nothing awaited before the removal (so no transfer can start in between),
        says why it cannot be forgotten now. Raises ``ProtocolError`` (``UNKNOWN_HUB``,
        ``HUB_BUSY``); a store failure puts the hub back and propagates."""
        await self.flushed()  # an announcement written after the delete would bring it back
        hub = self.hubs.get(guid)
        if hub is None:
            raise ProtocolError(Reason.UNKNOWN_HUB, "never announced, or forgotten already")
        why = busy(guid)
        if why is not None:
            raise ProtocolError(Reason.HUB_BUSY, why)
        del self.hubs[guid]
        if hub.online:
            self.online -= 1
        self.forgotten.add(guid)
        try:
            transfers, devices = await self._store.forget_hub(guid, now)
        except BaseException:
            self.forgotten.discard(guid)
            if guid not in self.hubs:  # nothing announced it meanwhile
                self.hubs[guid] = hub
                self.online += hub.online
            raise
        self._events.emit(
            HubForgotten(
                time=now, guid=guid, online=hub.online, transfers=transfers, devices=devices
            )
        )
        log.warning(
            "CH %s forgotten (%s; %d transfer(s), %d device record(s) removed)",
            guid,
            "online" if hub.online else "offline",
            transfers,
            devices,
        )
        return hub, transfers, devices

    @staticmethod
    def _online_event(hub: Hub, now: float) -> HubOnline:
        a = hub.announcement
        return HubOnline(
            time=now,
            guid=hub.guid,
            segment=a.segment,
            supplier=a.supplier,
            fw_version=a.fw_version,
            hw_version=a.hw_version,
        )

    def _went_offline(self, guid: str, now: float) -> Hub | None:
        hub = self.hubs.get(guid)
        if hub is None:
            log.debug("last will of %s, which never announced itself", guid)
            return None
        if not hub.online:
            return None
        hub.online = False
        self.online -= 1
        hub.last_seen = now
        if not self._presence_reported(hub, now):
            return hub
        self._write_behind(None, guid, False, now)
        self._events.emit(HubOffline(time=now, guid=guid))
        self._on_change(hub, True, False, True)
        return hub

    # ------------------------------------------------------------------ flapping

    def _presence_reported(self, hub: Hub, now: float) -> bool:
        """Judge a presence change of ``hub`` (already applied in memory): True if it is
        reported as usual, False if the CH flaps (the change is held back)."""
        action, started = self.flaps.changed(hub.guid, self._monotonic())
        if action is FlapAction.REPORT_CHANGE:
            return True
        if started is not None:
            self._flapping_started(hub, started, now)
        return False

    def _flapping_started(self, hub: Hub, started: FlapStarted, now: float) -> None:
        hub.flapping = True
        self._events.emit(
            HubFlapping(time=now, guid=hub.guid, changes=started.changes, window_s=started.window_s)
        )
        mono = self._monotonic()
        if mono - self._flap_warned_at < FLAP_WARNING_EVERY_S:
            self._flap_unwarned += 1
        else:
            others = self._flap_unwarned
            self._flap_warned_at, self._flap_unwarned = mono, 0
            log.warning(
                "CH %s is flapping: %d presence changes in %.1f s (a cloned hub, two"
                " connections with one GUID, or a reconnect loop); its transfers are suspended"
                " and its online/offline events held back until it is steady%s",
                hub.guid,
                started.changes,
                started.window_s,
                f"; {others} other CH(s) started flapping since the last warning" if others else "",
            )
        if self._on_flapping is not None:
            self._on_flapping(hub)

    def check_flapping(self, monotonic_now: float) -> int:
        """End the flapping episodes that are over (quiet long enough); return how many."""
        ended = self.flaps.tick(monotonic_now)
        for episode in ended:
            hub = self.hubs.get(episode.guid)
            if hub is not None:
                self._flapping_ended(hub, episode)
        return len(ended)

    def _flapping_ended(self, hub: Hub, episode: FlapEnded) -> None:
        hub.flapping = False
        now = self._wall_clock()
        self._write_behind(hub.announcement if hub.online else None, hub.guid, hub.online, now)
        self._events.emit(
            HubSteady(
                time=now,
                guid=hub.guid,
                online=hub.online,
                changes=episode.changes,
                flapped_s=episode.flapped_s,
                quiet_s=episode.quiet_s,
            )
        )
        log.info(
            "CH %s is steady again (%s) after %d presence changes over %.1f s",
            hub.guid,
            "online" if hub.online else "offline",
            episode.changes,
            episode.flapped_s,
        )
        if self._on_flapping is not None:
            self._on_flapping(hub)
        if hub.online:
            self._on_change(hub, False, True, True)  # as if it just arrived: re-synchronise

    @property
    def flapping(self) -> int:
        """How many CHs flap now."""
        return self.flaps.flapping_count
