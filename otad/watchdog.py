"""The service watchdog: ``WATCHDOG=1`` only while otad is healthy, and ``STATUS=`` lines.

systemd kills and restarts a ``WatchdogSec=`` service whose pings stop. A ping must therefore
mean "this daemon is doing its work", not "some thread is alive". :class:`Watchdog` is one task
on the event loop that wakes every ``interval`` (half the watchdog timeout, as
sd_watchdog_enabled(3) recommends) and pings only if :func:`unhealthy_reasons` finds nothing:

* the event loop is not blocked: the watchdog's own wake-up was on time (within ``max_lag``);
  while the loop is blocked nothing runs at all, so no ping can go out, and once it unblocks the
  late wake-up withholds the ping of that turn;
* the lag monitor (:mod:`otad.looplag`) is still sampling (its newest sample is recent);
* the store's writer is alive: :attr:`otad.store.Store.healthy` (the writer task runs and the
  last batch flush succeeded) and a trivial read job, queued behind whatever the writer is
  doing, answers within ``writer_stall`` seconds (a writer stuck in a hung ``fsync`` or a
  wedged SQLite call never answers it).

Each turn it also sends a ``STATUS=`` line when it changed (hubs online, transfers active, and
the reasons otad is degraded), so ``systemctl status otad`` shows what the daemon is doing.
Without a watchdog (``$WATCHDOG_USEC`` unset) the same task runs for the status lines alone,
every :data:`STATUS_INTERVAL` seconds.

The decision (:func:`unhealthy_reasons`) is a pure function of one :class:`HealthSample`, so it
is tested without an event loop; the task only gathers samples and sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from otad.looplag import LoopLag
from otad.sdnotify import Notifier
from otad.store import Store

__all__ = ["STATUS_INTERVAL", "HealthLimits", "HealthSample", "Watchdog", "unhealthy_reasons"]

log = logging.getLogger("otad.watchdog")

#: Seconds between status lines when systemd runs no watchdog.
STATUS_INTERVAL: Final = 5.0


@dataclass(frozen=True, slots=True)
class HealthLimits:
    """How much delay counts as unhealthy, seconds."""

    max_lag: float  # the watchdog's wake-up may be this late
    writer_stall: float  # the writer must answer a probe within this

    @classmethod
    def for_timeout(cls, timeout: float) -> HealthLimits:
        """Limits for a watchdog timeout of ``timeout`` seconds (pings every ``timeout / 2``):
        a wake-up a quarter of the timeout late, or a probe unanswered for half of it, is ill."""
        return cls(max_lag=timeout / 4, writer_stall=timeout / 2)


@dataclass(frozen=True, slots=True)
class HealthSample:
    """What one watchdog turn saw (loop times, seconds)."""

    now: float
    wake_late: float  # how much later than asked this turn woke
    lag_sampled_at: float | None  # the lag monitor's newest sample (None: none yet)
    lag_interval: float  # the lag monitor's sampling interval
    store_healthy: bool
    probe_pending_since: float | None  # a writer probe queued then and not answered yet


def unhealthy_reasons(sample: HealthSample, limits: HealthLimits) -> list[str]:
    """Why otad must not ping the watchdog now (empty: healthy)."""
    reasons = []
    if sample.wake_late > limits.max_lag:
        reasons.append(f"event loop blocked for {sample.wake_late:.1f} s")
    if (
        sample.lag_sampled_at is None
        or sample.now - sample.lag_sampled_at > sample.lag_interval + limits.max_lag
    ):
        reasons.append("event-loop lag monitor not sampling")
    if not sample.store_healthy:
        reasons.append("store writer stopped or its batch flush failing")
    if (
        sample.probe_pending_since is not None
        and sample.now - sample.probe_pending_since > limits.writer_stall
    ):
        stuck = sample.now - sample.probe_pending_since
        reasons.append(f"store writer has not answered for {stuck:.1f} s")
    return reasons


async def _noop_read(tx: object) -> None:
    """The writer probe: a job that does nothing but must wait its turn in the writer."""


class Watchdog:
    """The watchdog and status task (see the module docstring)."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        timeout: float | None,
        loop_lag: LoopLag,
        store: Store,
        status_line: Callable[[], str],
    ) -> None:
        """``timeout``: the watchdog timeout in seconds (None: no pings, status lines only);
        ``status_line()``: the daemon's one-line summary."""
        self._notifier = notifier
        self.timeout = timeout
        self.interval = STATUS_INTERVAL if timeout is None else timeout / 2
        self.limits = HealthLimits.for_timeout(timeout if timeout is not None else 60.0)
        self._loop_lag = loop_lag
        self._store = store
        self._status_line = status_line
        self._probe: asyncio.Future[None] | None = None
        self._probe_since: float | None = None
        self._last_status = ""
        self.reasons: list[str] = []
        """Why the latest turn found otad unhealthy (empty: healthy)."""
        self.pings = 0

    def _probe_writer(self, now: float) -> float | None:
        """Keep one probe job in the writer's queue; return since when one is unanswered."""
        probe = self._probe
        if probe is not None and probe.done():
            if not probe.cancelled():
                probe.exception()  # retrieved: the store's health says why it failed
            self._probe = probe = None
            self._probe_since = None
        if probe is None:
            try:
                self._probe = asyncio.ensure_future(self._store.read(_noop_read, name="probe"))
            except Exception:  # the store is closed or failed: store.healthy says so
                return None
            self._probe_since = now
            return None
        return self._probe_since

    def check(self, now: float, wake_late: float) -> list[str]:
        """One turn's health decision (probing the writer as a side effect)."""
        sample = HealthSample(
            now=now,
            wake_late=wake_late,
            lag_sampled_at=self._loop_lag.last_sample_at,
            lag_interval=self._loop_lag.interval,
            store_healthy=self._store.healthy,
            probe_pending_since=self._probe_writer(now),
        )
        return unhealthy_reasons(sample, self.limits)

    def status_text(self) -> str:
        """The status line, with the reasons otad is degraded, if any."""
        line = self._status_line()
        if self.reasons:
            line += "; DEGRADED: " + ", ".join(self.reasons)
        return line

    async def run(self) -> None:
        """Task: one turn every ``interval`` until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = loop.time() + self.interval
                await asyncio.sleep(self.interval)
                now = loop.time()
                reasons = self.check(now, now - due)
                if reasons != self.reasons and reasons:
                    log.warning("unhealthy, not pinging the watchdog: %s", "; ".join(reasons))
                elif reasons != self.reasons:
                    log.info("healthy again")
                self.reasons = reasons
                if self.timeout is not None and not reasons:
                    self._notifier.watchdog()
                    self.pings += 1
                line = self.status_text()
                if line != self._last_status:
                    self._last_status = line
                    self._notifier.status(line)
        finally:
            if self._probe is not None:
                self._probe.cancel()
