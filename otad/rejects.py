"""Refused input, logged by reason and counted.

Everything a CH, an operator tool or a stranger sends otad is untrusted; whatever is refused (a
malformed report, an announcement on another hub's topic, an image signed by an unknown key) is
recorded here with its typed :class:`~protocol.errors.Reason`: the first few of each reason per
window in full, then a count, so a hostile flood cannot fill the journal. ``counts`` keeps every
refusal for the status snapshot (``rejected``), with every reason from zero.
"""

from __future__ import annotations

import logging
import time

from protocol.errors import Reason


class RejectLog:
    """Logs refused input by reason: the first few of each reason per window in full, then a
    count, so a hostile flood cannot fill the journal. ``counts`` keeps every refusal."""

    def __init__(self, logger: logging.Logger, *, per_window: int = 20, window: float = 10.0):
        """Log at most ``per_window`` messages per reason every ``window`` seconds."""
        self._log = logger
        self._per_window = per_window
        self._window = window
        self._seen: dict[Reason, tuple[float, int]] = {}
        self.counts: dict[str, int] = dict.fromkeys((r.name for r in Reason), 0)

    def reject(self, what: str, reason: Reason, detail: str) -> None:
        """Record one refusal of ``what`` for ``reason``."""
        self.counts[reason.name] += 1
        now = time.monotonic()
        start, n = self._seen.get(reason, (now, 0))
        if now - start >= self._window:
            if n > self._per_window:
                self._log.warning(
                    "%d more %s refusals in the last %.0f s",
                    n - self._per_window,
                    reason.name,
                    self._window,
                )
            start, n = now, 0
        n += 1
        self._seen[reason] = (start, n)
        if n <= self._per_window:
            self._log.warning("refused %s: %s: %s", what, reason.name, detail[:200])
