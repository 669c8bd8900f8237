"""Prometheus metrics: ``GET http://127.0.0.1:9464/metrics`` (``[metrics]`` in the config).

Nothing here counts anything. Every figure is already kept by its owner, incrementally, for the
retained status (:mod:`otad.status`) or for this endpoint: the registry (hubs online), the
distribution (transfers by state, bytes and repeats sent, transfer durations, acknowledgement
round trips), the scheduler (blocks published), the devices (by state), the outbox (events
published), the control plane (commands by outcome), the reject log (refusals by reason), the
event-loop lag monitor (its samples) and the campaign engine (campaigns by state, through a
callable the daemon passes). :class:`OtadCollector`, a custom collector in a dedicated
:class:`~prometheus_client.CollectorRegistry`, turns one :class:`Figures` snapshot into metric
families at each scrape, so the data path pays nothing for the endpoint.

Threads. ``prometheus_client`` serves HTTP from a thread of its own, so a scrape never waits
for the event loop to be free to accept or answer, and a slow scraper never blocks the loop.
The owners' figures are plain attributes and dicts that the loop mutates; the collector does
not read them from its thread. It hands the snapshot over through the loop instead
(:class:`LoopHandover`): ``call_soon_threadsafe`` runs :func:`take_figures` between two loop
callbacks, where every figure is consistent with every other, and the scrape thread waits for
the copy (immutable: tuples and fresh dicts) for at most ``timeout`` seconds. A snapshot is a
few dozen integers and three histograms' bucket lists, so it costs the loop microseconds, once
per scrape. If the loop does not answer in time (it is blocked: exactly what an operator needs
to know) the scrape still answers, with ``otad_loop_responsive 0`` and ``otad_build_info`` only.

Families (every label value present from the start, zeros included, so a rate or an absence
alert works before the first event):

==========================================  =======================================================
``otad_build_info``                          version, python, mqtt_library (value 1)
``otad_loop_responsive``                     1 when the loop answered the scrape, else 0
``otad_hubs{state}``                         CHs known, ``online`` / ``offline``
``otad_transfers{state}``                    transfers by :class:`~otad.store.TransferState`
``otad_devices{state}``                      device records by :class:`~otad.devices.DeviceState`
``otad_campaigns{state}``                    campaigns by :class:`~otad.campaign.CampaignState`
``otad_blocks_sent_total``                   block messages published
``otad_block_bytes_sent_total``              block payload bytes published, repeats included
``otad_retransmissions_total``               blocks published again within a sender's life
``otad_events_published_total``              events confirmed published by the outbox
``otad_control_commands_total{command,outcome}``  answered requests (``ok`` or the error reason)
``otad_refusals_total{reason}``              input refused, by :class:`~protocol.errors.Reason`
``otad_hub_refusals_total{outcome}``         CH refusals ``reported``, ``told``, ``suppressed``
``otad_transfer_duration_seconds{state}``    start to end of a transfer, by how it ended
``otad_ack_round_trip_seconds``              acknowledgement round trips (blocks sent once)
``otad_event_loop_lag_seconds``              the lag monitor's samples (every 0.1 s)
==========================================  =======================================================

Counters count since the process started (Prometheus handles the reset at a restart).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import platform
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from otad.campaign.engine import CampaignState
from otad.config import MetricsConfig
from otad.devices import DeviceState
from otad.histogram import HistogramSnapshot
from otad.store import TransferState
from protocol.errors import Reason

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from otad.control import Control
    from otad.devices import Devices
    from otad.distribution import Distribution
    from otad.looplag import LoopLag
    from otad.outbox import EventPublisher
    from otad.refusals import HubRefusals
    from otad.registry import Registry
    from otad.rejects import RejectLog

__all__ = [
    "Figures",
    "LoopHandover",
    "MetricsServer",
    "OtadCollector",
    "Sources",
    "take_figures",
]

log = logging.getLogger("otad.metrics")

#: Seconds a scrape waits for the event loop to hand over the figures.
HANDOVER_TIMEOUT_S: Final = 5.0

_T = TypeVar("_T")

CampaignCounts = Callable[[], Mapping[str, int]]
"""Campaigns by :class:`~otad.campaign.CampaignState` value (the engine's answer)."""


def no_campaigns() -> Mapping[str, int]:
    """The campaign counts before a campaign engine is wired: none in any state."""
    return {}


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """The labels of ``otad_build_info``."""

    version: str
    mqtt_library: str
    python: str = field(default_factory=platform.python_version)


@dataclass(frozen=True, slots=True)
class Sources:
    """Where each figure is kept (the daemon's parts)."""

    registry: Registry
    distribution: Distribution
    devices: Devices
    events: EventPublisher
    control: Control
    rejects: RejectLog
    refusals: HubRefusals
    loop_lag: LoopLag
    campaigns: CampaignCounts = no_campaigns


@dataclass(frozen=True, slots=True)
class Figures:
    """One consistent copy of every figure (taken on the event loop by :func:`take_figures`)."""

    hubs_known: int
    hubs_online: int
    transfers: Mapping[str, int]
    devices: Mapping[str, int]
    campaigns: Mapping[str, int]
    blocks_sent: int
    bytes_sent: int
    retransmissions: int
    events_published: int
    commands: Mapping[tuple[str, str], int]
    refusals: Mapping[str, int]
    hub_refusals: Mapping[str, int]
    transfer_durations: Mapping[str, HistogramSnapshot]
    round_trips: HistogramSnapshot
    loop_lag: HistogramSnapshot


def take_figures(sources: Sources) -> Figures:
    """Copy every figure now (call on the event loop: the owners mutate them there)."""
    s = sources
    distribution = s.distribution
    campaigns = s.campaigns()
    return Figures(
        hubs_known=len(s.registry.hubs),
        hubs_online=s.registry.online,
        transfers=distribution.counts(),
        devices={state.value: n for state, n in s.devices.state_counts.items()},
        campaigns={state.value: int(campaigns.get(state.value, 0)) for state in CampaignState},
        blocks_sent=distribution.scheduler.blocks_published,
        bytes_sent=distribution.sent.bytes_sent,
        retransmissions=distribution.sent.retransmissions,
        events_published=s.events.published,
        commands=dict(s.control.outcomes),
        refusals=dict(s.rejects.counts),
        hub_refusals=_hub_refusals(s.refusals),
        transfer_durations={
            state.value: h.snapshot() for state, h in distribution.durations.items()
        },
        round_trips=distribution.round_trips.snapshot(),
        loop_lag=s.loop_lag.histogram.snapshot(),
    )


def _hub_refusals(refusals: HubRefusals) -> dict[str, int]:
    counts = refusals.counts()
    return {
        "reported": counts["reported"],
        "told": counts["told"],
        "suppressed": counts["suppressed"],
    }


class LoopHandover:
    """Runs a function on an event loop for a caller in another thread, and waits for it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, timeout: float = HANDOVER_TIMEOUT_S
    ) -> None:
        """``loop``: the loop that owns what the function reads."""
        self._loop = loop
        self._timeout = timeout

    def call(self, fn: Callable[[], _T]) -> _T | None:
        """``fn()`` run on the loop; None if the loop did not run it within the timeout (or
        is closed). Never call it from the loop's own thread (it would wait for itself)."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed
            return None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None


class OtadCollector(Collector):
    """The metric families of one :class:`Figures` snapshot per scrape (see the module
    docstring)."""

    def __init__(self, figures: Callable[[], Figures | None], build: BuildInfo) -> None:
        """``figures()`` returns the snapshot, or None when the loop did not answer."""
        self._figures = figures
        self._build = build

    def collect(self) -> Iterator[Metric]:
        """Called by ``prometheus_client`` (in the HTTP server's thread) at each scrape."""
        b = self._build
        info = GaugeMetricFamily(
            "otad_build_info",
            "otad's version, the Python it runs on and its MQTT client library",
            labels=("version", "python", "mqtt_library"),
        )
        info.add_metric((b.version, b.python, b.mqtt_library), 1)
        yield info
        f = self._figures()
        yield GaugeMetricFamily(
            "otad_loop_responsive",
            "1 when otad's event loop handed this scrape its figures in time, 0 when it was "
            "blocked (then only otad_build_info is reported)",
            value=0 if f is None else 1,
        )
        if f is None:
            return
        yield from self._gauges(f)
        yield from self._counters(f)
        yield from self._histograms(f)

    @staticmethod
    def _gauges(f: Figures) -> Iterator[Metric]:
        hubs = GaugeMetricFamily(
            "otad_hubs", "CHs otad knows (ever announced), by online state", labels=("state",)
        )
        hubs.add_metric(("online",), f.hubs_online)
        hubs.add_metric(("offline",), f.hubs_known - f.hubs_online)
        yield hubs
        for name, doc, states, counts in (
            ("otad_transfers", "transfers by state (ended ones included)", TransferState,
             f.transfers),
            ("otad_devices", "HAN devices (and CHs as their own device) by state, per image",
             DeviceState, f.devices),
            ("otad_campaigns", "campaigns by state", CampaignState, f.campaigns),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, doc, labels=("state",))
            for state in states:
                family.add_metric((state.value,), counts.get(state.value, 0))
            yield family

    @staticmethod
    def _counters(f: Figures) -> Iterator[Metric]:
        for name, doc, value in (
            ("otad_blocks_sent", "block messages published, repeats included", f.blocks_sent),
            ("otad_block_bytes_sent", "block payload bytes published, repeats included",
             f.bytes_sent),
            ("otad_retransmissions", "blocks published again within a sender's life",
             f.retransmissions),
            ("otad_events_published", "events confirmed published from the outbox",
             f.events_published),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=value)
        commands = CounterMetricFamily(
            "otad_control_commands",
            "control requests answered, by command and outcome (ok, or the error's reason)",
            labels=("command", "outcome"),
        )
        for (command, outcome), n in sorted(f.commands.items()):
            commands.add_metric((command, outcome), n)
        yield commands
        refusals = CounterMetricFamily(
            "otad_refusals",
            "input otad refused (CH messages, control requests, topics), by reason",
            labels=("reason",),
        )
        for reason in Reason:
            refusals.add_metric((reason.name,), f.refusals.get(reason.name, 0))
        yield refusals
        told = CounterMetricFamily(
            "otad_hub_refusals",
            "refused CH messages: reported as hub.refused, told to the CH (Refused), or "
            "suppressed by the rate limit",
            labels=("outcome",),
        )
        for outcome in ("reported", "told", "suppressed"):
            told.add_metric((outcome,), f.hub_refusals.get(outcome, 0))
        yield told

    @staticmethod
    def _histograms(f: Figures) -> Iterator[Metric]:
        durations = HistogramMetricFamily(
            "otad_transfer_duration_seconds",
            "wall-clock seconds from a transfer's start to its end, by final state",
            labels=("state",),
        )
        for state, snapshot in sorted(f.transfer_durations.items()):
            durations.add_metric((state,), snapshot.cumulative(), snapshot.total)
        yield durations
        for name, doc, snapshot in (
            ("otad_ack_round_trip_seconds",
             "acknowledgement round trips measured by the senders (blocks sent once)",
             f.round_trips),
            ("otad_event_loop_lag_seconds",
             "how late the lag monitor's 0.1 s sleeps woke (every sample since start)",
             f.loop_lag),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, doc)
            family.add_metric((), snapshot.cumulative(), snapshot.total)
            yield family


class MetricsServer:
    """The ``/metrics`` HTTP endpoint: ``prometheus_client``'s server, in its own thread."""

    def __init__(self, config: MetricsConfig, collector: OtadCollector) -> None:
        """Serve ``collector`` (alone, in a registry of its own) as ``config`` says."""
        self._config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port listened on (None when not serving)."""
        return None if self._server is None else int(self._server.server_port)

    async def start(self) -> bool:
        """Listen (resolving and binding in a worker thread); False, with a WARNING, if the
        address cannot be had: monitoring must never stop a distribution."""
        c = self._config
        try:
            self._server, self._thread = await asyncio.to_thread(
                start_http_server, c.port, c.host, self.registry
            )
        except OSError as exc:
            problem = exc.strerror or exc
            log.warning("metrics not served: cannot listen on %s:%d: %s", c.host, c.port, problem)
            return False
        log.info("metrics on http://%s:%d/metrics", c.host, self.port)
        return True

    async def stop(self) -> None:
        """Stop serving (the thread ends after the scrape in progress, if any)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        await asyncio.to_thread(_shut, server, thread)


def _shut(server: WSGIServer, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(5.0)


async def serve(config: MetricsConfig, sources: Sources, build: BuildInfo) -> MetricsServer | None:
    """Start the endpoint for the daemon (None when ``[metrics] enabled = false`` or the
    address could not be had)."""
    if not config.enabled:
        return None
    handover = LoopHandover(asyncio.get_running_loop())
    collector = OtadCollector(lambda: handover.call(lambda: take_figures(sources)), build)
    server = MetricsServer(config, collector)
    return server if await server.start() else None
