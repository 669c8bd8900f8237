"""The retained status snapshot on ``ota/v1/otad/status``: otad's figures for anyone to read.

Published (QoS 1, retained) whenever it changes, at most every 2 s, and answered to ``otactl
status``. A clean stop publishes it once more with ``state: "offline"``; if otad dies instead,
the broker publishes its last will (:func:`lost_status`: who it was, ``state: "offline"``, and
why). Every figure in it is kept incrementally by its owner (registry, catalogue, distribution,
scheduler, event-loop lag monitor, outbox, reject log), so publishing it never walks the fleet.
Counts keep their zeros (a transfer state nobody is in, a reason nothing was refused for), so a
tool that makes one metric per key (mqtt2prometheus) sees every metric from the start.

Its shape is :class:`Status` (and :class:`LostStatus` for the will), documented in
``docs/EVENTS.md`` and checked by ``docs/events.schema.json``; ``v`` is the events' schema
version (:data:`otad.events.SCHEMA_VERSION`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypedDict

from mqttio import MqttClient, NotConnected
from otad.distribution import DistributionStatus
from otad.events import SCHEMA_VERSION, iso_time
from otad.jsonwire import dumps
from otad.looplag import LoopLagStatus
from otad.refusals import RefusalCounts
from otad.scheduler import SchedulerStatus

if TYPE_CHECKING:
    from otad.brokercheck import BrokerCheck
    from otad.catalogue import Catalogue
    from otad.distribution import Distribution
    from otad.looplag import LoopLag
    from otad.outbox import EventPublisher
    from otad.refusals import HubRefusals
    from otad.registry import Registry
    from otad.rejects import RejectLog


class HubCounts(TypedDict):
    """CHs otad knows, how many of them are online, and how many flap (otad.flapping)."""

    known: int
    online: int
    flapping: int


class StatusFields(TypedDict):
    """The figures of the status (everything but its envelope)."""

    version: str
    pid: int
    started_at: float
    started_at_iso: str
    library: str
    hubs: HubCounts
    images: int
    transfers: dict[str, int]
    stalled: int
    distributions: dict[str, DistributionStatus]
    scheduler: SchedulerStatus
    loop_lag: LoopLagStatus
    timer_spins: int
    events_seq: int
    events_backlog: int
    events_unconfirmed: int
    events_superseded: int
    blocks_published: int
    reports_received: int
    blocks_in_flight: int
    rejected: dict[str, int]
    refusals: RefusalCounts
    broker_warnings: list[str]
    degraded: list[str]


class Status(StatusFields):
    """The retained status as published (``state`` offline only after a clean stop)."""

    v: int
    state: Literal["online", "offline"]
    time: float
    time_iso: str


class LostStatus(TypedDict):
    """otad's last will on the status topic: published by the broker when it loses otad."""

    v: int
    state: Literal["offline"]
    version: str
    pid: int
    started_at: float
    started_at_iso: str
    reason: str


FIELD_DOCS: dict[str, str] = {
    "v": "schema version (1)",
    "state": "online, or offline (a clean stop, or the last will)",
    "time": "when the snapshot was taken, unix seconds",
    "time_iso": "the same, ISO 8601 UTC",
    "version": "otad's version",
    "pid": "otad's process id",
    "started_at": "when this otad process started, unix seconds",
    "started_at_iso": "the same, ISO 8601 UTC",
    "library": "the MQTT client library (gmqtt or aiomqtt)",
    "hubs": "CHs known (ever announced) and online now",
    "images": "images in the catalogue",
    "transfers": "transfers by state, all states, those ended before this run included, as"
    " recorded (an ended transfer whose final state is not yet durable is counted active)",
    "stalled": "transfers flagged stalled now",
    "distributions": "per image with transfers active, stalled or ended in the last 5 minutes",
    "scheduler": "the scheduler's limits in force, queues and counters",
    "loop_lag": "event-loop lag (p50, p99 and max over the window, worst since start), ms",
    "timer_spins": "timers re-armed due at once right after they ran (always 0)",
    "events_seq": "the highest event seq committed",
    "events_backlog": "events emitted, not yet committed to the outbox",
    "events_unconfirmed": "events committed, not yet confirmed published",
    "events_superseded": "progress reports dropped before their commit by a newer event",
    "blocks_published": "block messages published since start",
    "reports_received": "messages received on CHs' up topics since start",
    "blocks_in_flight": "blocks sent and not acknowledged, all CHs",
    "rejected": "input refused since start, by reason (every reason, zeros included)",
    "refusals": "refused CH messages reported (hub.refused), told to the CH (Refused, 1.1), "
    "and suppressed by the rate limit, since start",
    "broker_warnings": "the broker requirements (SPEC §1.1) otad's probe saw broken at its last"
    " connection, one line each naming the requirement; empty when none (otad.brokercheck)",
    "degraded": "why otad is degraded now, one line each (the store failing to commit on a full"
    " disk or an I/O error, ended transfers not yet recorded); empty when healthy. Nothing is"
    " reported ahead of what is durable: unrecorded ends are shown active",
    "reason": "why the will was published (connection lost)",
}
"""What each top-level key of the status says (``docs/EVENTS.md`` and the schema)."""


class StatusSnapshot:
    """Builds the status fields from the daemon's parts (cheap: nothing walks the fleet)."""

    def __init__(
        self,
        *,
        version: str,
        started_at: float,
        library: str,
        registry: Registry,
        catalogue: Catalogue,
        distribution: Distribution,
        loop_lag: LoopLag,
        events: EventPublisher,
        rejects: RejectLog,
        refusals: HubRefusals,
        broker_check: BrokerCheck,
        degraded: Callable[[], list[str]],
        clock: Callable[[], float],
    ) -> None:
        """``clock`` is the distribution's monotonic clock (idle times, waits); ``degraded()``
        says why otad is degraded now (:attr:`otad.daemon.Daemon.degraded`)."""
        self._version = version
        self._started_at = round(started_at, 3)
        self._library = library
        self._registry = registry
        self._catalogue = catalogue
        self._distribution = distribution
        self._loop_lag = loop_lag
        self._events = events
        self._rejects = rejects
        self._refusals = refusals
        self._broker_check = broker_check
        self._degraded = degraded
        self._clock = clock

    def __call__(self) -> StatusFields:
        """The figures now."""
        distribution = self._distribution
        scheduler = distribution.scheduler
        events = self._events
        now = self._clock()
        return {
            "version": self._version,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "started_at_iso": iso_time(self._started_at),
            "library": self._library,
            "hubs": {
                "known": len(self._registry.hubs),
                "online": self._registry.online,
                "flapping": self._registry.flapping,
            },
            "images": len(self._catalogue.images),
            "transfers": distribution.counts(recorded=True),
            "stalled": distribution.stalled_count,
            "distributions": distribution.distributions(now),
            "scheduler": scheduler.snapshot(now),
            "loop_lag": self._loop_lag.snapshot(),
            "timer_spins": distribution.timer_stats.spins,
            "events_seq": events.last_seq,
            "events_backlog": events.backlog,
            "events_unconfirmed": events.unconfirmed,
            "events_superseded": events.superseded,
            "blocks_published": scheduler.blocks_published,
            "reports_received": distribution.up_messages,
            "blocks_in_flight": scheduler.inflight,
            "rejected": dict(self._rejects.counts),
            "refusals": self._refusals.counts(),
            "broker_warnings": list(self._broker_check.warnings),
            "degraded": self._degraded(),
        }


def lost_status(version: str, started_at: float) -> bytes:
    """otad's last will on the status topic (:class:`LostStatus`)."""
    started = round(started_at, 3)
    will: LostStatus = {
        "v": SCHEMA_VERSION,
        "state": "offline",
        "version": version,
        "pid": os.getpid(),
        "started_at": started,
        "started_at_iso": iso_time(started),
        "reason": "connection lost",
    }
    return dumps(will)


#: The retained status is published at least this often while otad runs (its ``time`` moves;
#: ``[events] status_heartbeat_s``):
#: a live otad can be told from a retained copy of a dead one's (another otad starting on the
#: same broker waits for it, :meth:`otad.daemon.Daemon.connect`).
HEARTBEAT_S = 30.0


class StatusPublisher:
    """The retained status snapshot: published when it changes, at most every ``interval``,
    and at least every :data:`HEARTBEAT_S`."""

    def __init__(
        self,
        client: MqttClient,
        topic: str,
        snapshot: Callable[[], StatusFields],
        *,
        interval: float = 2.0,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``snapshot()`` returns the current fields; ``clock`` (unix seconds) dates them."""
        self._client = client
        self._topic = topic
        self._snapshot = snapshot
        self._interval = interval
        self._clock = clock
        self._last: StatusFields | None = None
        self._published_at = -1e18
        self._heartbeat_s = heartbeat_s
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Publish soon (something important changed, e.g. the connection came back)."""
        self._last = None
        self._wake.set()

    def body(self, state: Literal["online", "offline"]) -> bytes:
        """The JSON status now, with ``state``."""
        return self._body(state, self._snapshot())

    def _body(self, state: Literal["online", "offline"], fields: StatusFields) -> bytes:
        now = round(self._clock(), 3)
        status: Status = {
            "v": SCHEMA_VERSION,
            "state": state,
            "time": now,
            "time_iso": iso_time(now),
            **fields,
        }
        return dumps(status)

    async def run(self) -> None:
        """Publish the online snapshot whenever it changed, until cancelled."""
        while True:
            current = self._snapshot()
            stale = self._clock() - self._published_at >= self._heartbeat_s
            if (current != self._last or stale) and self._client.connected:
                try:
                    self._client.publish(self._topic, self._body("online", current), 1, True)
                except NotConnected:
                    pass
                else:
                    self._last = current
                    self._published_at = self._clock()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()

    def publish_offline(self) -> None:
        """Publish the retained offline snapshot (clean shutdown)."""
        with contextlib.suppress(NotConnected):
            self._client.publish(self._topic, self.body("offline"), 1, True)
