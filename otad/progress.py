"""A live terminal progress line.

On a TTY one line is redrawn in place (``\\r``, padded to the last width); otherwise a plain line
is printed at most every ``plain_interval`` seconds (logs, CI), plus the final state.
"""

from __future__ import annotations

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
    """``done / total`` with a bar, rates and an ETA. Call :meth:`update` often, :meth:`close` once.

    ``extra`` text (e.g. ``"12.3 MB/s  12,000 blocks/s"``) is appended to the line.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
        plain_interval: float = 2.0,
        width: int = 30,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval = plain_interval
        self.width = width
        self.started = time.monotonic()
        self._last_plain = -1e9
        self._last_len = 0
        self._last_line = ""
        self._closed = False

    def render(self, done: int, extra: str = "", now: float | None = None) -> str:
        """The progress line for ``done`` items (no terminal control characters)."""
        now = time.monotonic() if now is None else now
        total = self.total
        fraction = min(1.0, done / total) if total else 1.0
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.started
        eta: float | None = None
        if done >= total:
            eta = 0.0
        elif done > 0 and elapsed > 0:
            eta = elapsed * (total - done) / done
        # most useful first: a narrow terminal cuts the line from the right
        parts = [
            f"{self.label} " if self.label else "",
            f"[{bar}] {fraction * 100:5.1f}%  ETA {format_duration(eta)}",
            f"  {extra}" if extra else "",
            f"  {done}/{total}  elapsed {format_duration(elapsed)}",
        ]
        return "".join(parts)

    def update(self, done: int, extra: str = "", *, force: bool = False) -> None:
        """Redraw (TTY) or print a line if due (plain)."""
        if self._closed:
            return
        now = time.monotonic()
        line = self.render(done, extra, now)
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
