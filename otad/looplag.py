"""Event-loop lag, measured continuously: how late a short sleep wakes up.

Everything otad does runs on one event loop, so a callback that hogs it (a huge message, a walk
over every CH, a blocking call that slipped in) delays every transfer, every timer and every
control request at once. :class:`LoopLag` sleeps ``interval`` seconds again and again and records
how much later than asked it woke; the last ``window`` seconds of samples give the figures in the
retained status (p50, p99, max) that operators -- and the service watchdog -- read.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final, TypedDict

from otad.histogram import Histogram

#: Seconds between samples, and seconds of samples kept.
DEFAULT_INTERVAL: Final = 0.1
DEFAULT_WINDOW: Final = 60.0
#: Upper bounds (seconds) of the lag histogram's buckets (:mod:`otad.metrics`).
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLagStatus(TypedDict):
    """The lag in the status snapshot (:meth:`LoopLag.snapshot`), milliseconds."""

    p50_ms: float  # over the window
    p99_ms: float
    max_ms: float
    worst_ms: float  # since the process started
    window_s: float  # seconds of samples the figures cover


class LoopLag:
    """The lag monitor (one task: :meth:`run`)."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, window: float = DEFAULT_WINDOW):
        """Sample every ``interval`` seconds; keep ``window`` seconds of samples."""
        self.interval = interval
        self._samples: collections.deque[float] = collections.deque(
            maxlen=max(1, round(window / interval))
        )
        self.worst = 0.0
        """Largest lag ever seen by this process, seconds."""
        self.last_sample_at: float | None = None
        """Loop time of the newest sample (a watchdog can tell the monitor itself is alive)."""
        self.histogram = Histogram(LAG_BUCKETS)
        """Every sample since start (the Prometheus histogram ``otad_event_loop_lag_seconds``)."""

    def record(self, lag: float, now: float) -> None:
        """Add one sample (``lag`` seconds late at loop time ``now``)."""
        lag = max(0.0, lag)
        self._samples.append(lag)
        self.last_sample_at = now
        self.histogram.observe(lag)
        if lag > self.worst:
            self.worst = lag

    async def run(self) -> None:
        """Task: sample until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.record(now - asked - self.interval, now)

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the samples in the window, seconds (0 with none)."""
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index]

    def snapshot(self) -> LoopLagStatus:
        """Figures for the status topic, milliseconds."""
        recent = max(self._samples, default=0.0)
        return {
            "p50_ms": round(self.percentile(0.5) * 1e3, 2),
            "p99_ms": round(self.percentile(0.99) * 1e3, 2),
            "max_ms": round(recent * 1e3, 2),
            "worst_ms": round(self.worst * 1e3, 2),
            "window_s": round(len(self._samples) * self.interval, 1),
        }
