"""Refusals told: what otad refused from a CH reaches the journal, the monitors and the CH itself.

SPEC §5.1. A message from a CH that otad refuses (an announcement or last will on its state
topic, a report on its up topic) changes nothing; before this module it only produced a log
line, so a CH could not tell "refused" from "no update for you" (an announcement with a supplier
``"Acme Ltd"`` made a hub silently vanish). Each refusal of a CH's message now goes

* to the journal, logged and counted by reason (:class:`otad.rejects.RejectLog`, as every
  refused input; the status snapshot's ``rejected``);
* to monitors, as a ``hub.refused`` event (:class:`otad.events.HubRefused`);
* to the CH, as a :class:`~protocol.wire.messages.Refused` on its down topic, if it declared
  protocol 1.1 or later (a 1.0 CH would not understand it: SPEC §5).

The event and the ``Refused`` are rate-limited: one per (CH, reason) per :data:`PER_HUB_S`, and
at most :data:`MAX_PER_SECOND` in all (a token bucket), so a CH stuck in a loop, or many CHs
with the same bad firmware, cannot turn refusals into a flood of events and downlink messages.
What the limit suppresses is counted (:meth:`HubRefusals.counts`). Input that names no CH (a
topic that does not parse) is only journalled: there is nobody to tell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, TypedDict

from mqttio import MqttClient, NotConnected
from otad.events import HubRefused
from otad.outbox import EventPublisher
from otad.rejects import RejectLog
from protocol.errors import ProtocolError
from protocol.wire import topics
from protocol.wire.messages import Refused

log = logging.getLogger("otad.refusals")

PER_HUB_S: Final = 60.0
"""At most one event and one ``Refused`` per (CH, reason) per this many seconds."""
MAX_PER_SECOND: Final = 100.0
"""At most this many refusals told per second in all (burst: one second's worth)."""
MAX_DETAIL: Final = 200
_FORGET_AFTER: Final = 100_000  # (CH, reason) entries kept before the expired ones are dropped


class RefusalCounts(TypedDict):
    """The refusals in the status snapshot."""

    reported: int  # hub.refused events emitted
    told: int  # Refused messages published to CHs
    suppressed: int  # refusals the rate limit kept from monitors and CHs (journalled only)


class HubRefusals:
    """Tells a refusal of a CH's message to the journal, the monitors and (1.1) the CH."""

    def __init__(
        self,
        rejects: RejectLog,
        events: EventPublisher,
        client: MqttClient,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``client`` is the data session (the CH's down topic); ``monotonic`` paces the rate
        limits, ``wall_clock`` stamps the events."""
        self._rejects = rejects
        self._events = events
        self._client = client
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._last: dict[tuple[str, int], float] = {}
        self._tokens = MAX_PER_SECOND
        self._tokens_at = monotonic()
        self.reported = 0
        self.told = 0
        self.suppressed = 0

    def refuse(self, guid: str, leaf: str, of: int, error: ProtocolError, minor: int) -> None:
        """Record that a message of type ``of`` (0: undecodable) from CH ``guid`` on its
        ``leaf`` topic (``state``, ``up``) was refused with ``error``; ``minor`` is the minor
        protocol version the CH speaks (SPEC §5), deciding whether it is told."""
        self._rejects.reject(f"{leaf} message from {guid}", error.reason, error.detail)
        now = self._monotonic()
        key = (guid, int(error.reason))
        last = self._last.get(key)
        if (last is not None and now - last < PER_HUB_S) or not self._take_token(now):
            self.suppressed += 1
            return
        if len(self._last) >= _FORGET_AFTER:
            self._last = {k: t for k, t in self._last.items() if now - t < PER_HUB_S}
        self._last[key] = now
        detail = error.detail[:MAX_DETAIL]
        told = minor >= 1 and self._tell(guid, of, error, detail)
        self._events.emit(
            HubRefused(
                time=self._wall_clock(),
                guid=guid,
                source=leaf,
                of=of,
                reason=error.reason.name,
                detail=detail,
                told=told,
            )
        )
        self.reported += 1

    def _tell(self, guid: str, of: int, error: ProtocolError, detail: str) -> bool:
        refused = Refused(of=of, reason=int(error.reason), detail=detail)
        try:
            self._client.publish(topics.down(guid), refused.encode(), Refused.QOS, False)
        except NotConnected:
            return False
        self.told += 1
        return True

    def _take_token(self, now: float) -> bool:
        self._tokens = min(MAX_PER_SECOND, self._tokens + (now - self._tokens_at) * MAX_PER_SECOND)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def counts(self) -> RefusalCounts:
        """What was told and what the rate limit suppressed, since start."""
        return {"reported": self.reported, "told": self.told, "suppressed": self.suppressed}
