"""A live terminal progress line, for ``otactl watch``, the demo and the benchmarks.

On a TTY one line is redrawn in place (``\\r``, padded to the last width); otherwise a plain line
is printed at most every ``plain_interval`` seconds (logs, CI), plus the final state.

The ETA comes from the rate over the last ``rate_window`` seconds, not since the start, so a bar
opened half-way through (``otactl watch``) or one whose pace changed tells the truth. When
nothing has moved for ``stalled_after`` seconds -- or the caller says so, because otad reported
the distribution stalled -- the line says ``STALLED for 42s`` instead of an ETA that would only
grow.
"""

from __future__ import annotations

import collections
import shutil
import sys
import time
from typing import TextIO


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1m15s"``; ``None`` -> ``"?"``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressBar:
    """``done / total`` with a bar, an ETA (or STALLED) and extra text. Call :meth:`update`
    often, :meth:`close` once."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
        plain_interval: float = 2.0,
        width: int = 30,
        rate_window: float = 10.0,
        stalled_after: float | None = 10.0,
    ) -> None:
        """``stalled_after`` None: never decide "stalled" by itself (the caller may still)."""
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval = plain_interval
        self.width = width
        self.rate_window = rate_window
        self.stalled_after = stalled_after
        self.started = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._moved_at = self.started
        self._last_done: int | None = None
        self._last_plain = -1e9
        self._last_len = 0
        self._last_line = ""
        self._closed = False

    def _note(self, done: int, now: float) -> None:
        if self._last_done is None or done != self._last_done:
            if self._last_done is not None and done > self._last_done:
                self._moved_at = now
            self._last_done = done
        samples = self._samples
        samples.append((now, done))
        while len(samples) > 2 and samples[1][0] <= now - self.rate_window:
            samples.popleft()

    def rate(self) -> float | None:
        """Items per second over the last ``rate_window`` seconds (None: not known yet)."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return None
        return max(0.0, (d1 - d0) / (t1 - t0))

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since ``done`` last grew (0 while it moves)."""
        now = time.monotonic() if now is None else now
        return now - self._moved_at

    def render(
        self, done: int, extra: str = "", now: float | None = None, *, stalled: bool = False
    ) -> str:
        """The progress line for ``done`` items (no terminal control characters)."""
        now = time.monotonic() if now is None else now
        self._note(done, now)
        total = self.total
        fraction = min(1.0, done / total) if total else 1.0
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        idle = self.stalled_for(now)
        if done < total and (
            stalled or (self.stalled_after is not None and idle >= self.stalled_after)
        ):
            when = f"STALLED for {format_duration(idle)}"
        else:
            eta: float | None = None
            rate = self.rate()
            if done >= total:
                eta = 0.0
            elif rate:
                eta = (total - done) / rate
            when = f"ETA {format_duration(eta)}"
        elapsed = now - self.started
        # most useful first: a narrow terminal cuts the line from the right
        parts = [
            f"{self.label} " if self.label else "",
            f"[{bar}] {fraction * 100:5.1f}%  {when}",
            f"  {extra}" if extra else "",
            f"  {done}/{total}  elapsed {format_duration(elapsed)}",
        ]
        return "".join(parts)

    def update(
        self, done: int, extra: str = "", *, force: bool = False, stalled: bool = False
    ) -> None:
        """Redraw (TTY) or print a line if due (plain). ``stalled`` forces the STALLED state
        (otad said so) while ``done`` is short of the total."""
        if self._closed:
            return
        now = time.monotonic()
        line = self.render(done, extra, now, stalled=stalled)
        self._last_line = line
        if self.tty:
            columns = shutil.get_terminal_size((120, 24)).columns
            line = line[: max(20, columns - 1)]
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self._last_len = len(line)
        elif force or now - self._last_plain >= self.plain_interval:
            self._last_plain = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, done: int | None = None, extra: str = "") -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        if done is not None:
            self.update(done, extra, force=True)
            if self.tty:
                self.stream.write("\n")
        elif self.tty and self._last_len:
            self.stream.write("\n")
        self.stream.flush()
        self._closed = True
