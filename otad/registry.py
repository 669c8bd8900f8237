"""Fleet registry: which Communications Hubs exist, what they declared, and whether they are online.

A CH announces itself with a retained :class:`~protocol.wire.messages.HubAnnounced` on
``ota/v1/ch/{guid}/state``; its last will, :class:`~protocol.wire.messages.HubWentOffline`,
replaces it when the broker loses the connection. The registry is the only place those messages are
interpreted. Everything that arrives there is untrusted and checked before anything changes:

* the topic must parse and name a well-formed GUID (``BAD_IDENTIFIER``);
* the payload must fit the announcement cap (``TOO_LARGE``) and decode strictly;
* an announcement's ``guid`` must equal the topic's (``BAD_IDENTIFIER``), its supplier and
  segment must be safe topic levels (they name per-supplier topics and rate-cap buckets), its
  limits must be usable (``MALFORMED``), and its HAN devices must have known types;
* any other message type on a state topic is ``UNKNOWN_TYPE``.

A refused message is logged with its reason (rate-limited per reason) and changes nothing. An
accepted change is written to the store (``committed``, not durable: a CH re-announces itself
after a power cut) and reported to the daemon through the ``on_change`` callback, which emits the
``hub.online`` / ``hub.offline`` events and resumes or suspends that CH's transfers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from otad.rejects import RejectLog
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import MIN_BLOCK_SIZE, DeviceType
from protocol.wire import topics
from protocol.wire.messages import HubAnnounced, HubWentOffline, decode

log = logging.getLogger("otad.registry")

#: Largest payload accepted on a state topic (the announcement cap).
MAX_STATE_BYTES = HubAnnounced.MAX_BYTES


@dataclass(slots=True)
class Hub:
    """One CH as the registry knows it: its last accepted announcement and its presence."""

    guid: str
    announcement: HubAnnounced
    online: bool
    first_seen: float
    last_seen: float

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
    topics.check_level(message.supplier)
    topics.check_level(message.segment)
    limits = message.limits
    if limits.max_block < MIN_BLOCK_SIZE or limits.window < 1:
        raise ProtocolError(
            Reason.MALFORMED,
            f"unusable limits (max_block {limits.max_block}, window {limits.window})",
        )
    if limits.buffer < limits.max_block:
        raise ProtocolError(Reason.MALFORMED, "buffer smaller than one block")
    seen: set[str] = set()
    for device in message.han:
        DeviceType.parse(device.device_type)
        topics.check_level(device.device_id)
        if device.device_id in seen:
            raise ProtocolError(Reason.MALFORMED, f"HAN device {device.device_id} listed twice")
        seen.add(device.device_id)


class Registry:
    """In-memory view of the fleet, loaded from and written through to the store."""

    def __init__(
        self,
        *,
        persist: Callable[[HubAnnounced | None, str, bool, float], None],
        on_change: ChangeHandler,
        rejects: RejectLog | None = None,
    ) -> None:
        """``persist(announcement_or_None, guid, online, now)`` schedules the store write (an
        announcement to upsert, or None for an online-flag change); ``on_change`` is told about
        every accepted change."""
        self._persist = persist
        self._on_change = on_change
        self.rejects = rejects or RejectLog(log)
        self.hubs: dict[str, Hub] = {}
        self.online = 0
        """How many CHs are online now (kept incrementally)."""

    def load(self, hubs: Iterable[Hub]) -> None:
        """Start from the hubs the store remembers."""
        for hub in hubs:
            self.hubs[hub.guid] = hub
        self.online = sum(1 for h in self.hubs.values() if h.online)

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
        if len(payload) > MAX_STATE_BYTES:
            self.rejects.reject(
                f"state message from {guid}", Reason.TOO_LARGE, f"{len(payload)} bytes"
            )
            return None
        try:
            message = decode(payload, max_size=MAX_STATE_BYTES)
            if type(message) is HubAnnounced:
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
            self.rejects.reject(f"state message from {guid}", exc.reason, exc.detail)
            return None

    def _announced(self, message: HubAnnounced, retain: bool, now: float) -> Hub | None:
        hub = self.hubs.get(message.guid)
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
                self._on_change(hub, True, True, False)
                return hub
            hub.announcement = message
            hub.online = True
        if not was_online:
            self.online += 1
        self._persist(message, message.guid, True, now)
        self._on_change(hub, was_online, True, True)
        return hub

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
        self._persist(None, guid, False, now)
        self._on_change(hub, True, False, True)
        return hub
