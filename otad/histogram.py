"""A histogram owned by the event loop: fixed buckets, plain integers, no lock.

otad's data path runs on one event loop, so the code that sees an event (an acknowledgement's
round trip, a transfer's end, a lag sample) observes it into one of these at the cost of a
bisect and two additions. Nothing else writes it; :mod:`otad.metrics` copies it (on the loop)
into a :class:`HistogramSnapshot` for the Prometheus exposition, whose buckets are cumulative.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Histogram", "HistogramSnapshot"]


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A copy of a :class:`Histogram`: per-bucket (not cumulative) counts, the last one for the
    values above every bound (``+Inf``)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """Values observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of values <= le)`` per bound, then ``("+Inf", count)``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class Histogram:
    """Counts of observed values per bucket (``value <= bound``), and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        """``bounds``: the buckets' upper bounds (sorted and de-duplicated here)."""
        self.bounds = tuple(sorted(set(bounds)))
        if not self.bounds:
            raise ValueError("a histogram needs at least one bucket bound")
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one value (on the loop that owns the histogram)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        """A copy (take it on the owning loop)."""
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.total)
