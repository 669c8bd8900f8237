"""How a write that is retried until it succeeds is logged: once when it starts failing, then
every :data:`REPEAT_S` with the count, then once when it succeeds again.

A full disk fails the outbox, the final-state writer and the progress batch every second; an
ERROR per try would flood the journal (often on that same disk) with the same line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

#: Seconds between two ERROR lines of one failing write.
REPEAT_S: Final = 60.0


class RetriedWrite:
    """The log of one kind of write that is retried (see the module docstring)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``what`` names the write in the log lines ("recording final states")."""
        self._log = logger
        self._what = what
        self._clock = clock
        self._failing_since: float | None = None
        self._logged_at = 0.0
        self._failures = 0

    @property
    def failing(self) -> bool:
        """Whether the last try failed."""
        return self._failing_since is not None

    def failed(self, exc: BaseException) -> None:
        """A try failed with ``exc`` (it will be retried)."""
        now = self._clock()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = self._logged_at = now
            self._log.error("%s failed (will retry): %s", self._what, exc)
        elif now - self._logged_at >= REPEAT_S:
            self._logged_at = now
            self._log.error(
                "%s still failing, %d tries over %.0f s (will retry): %s",
                self._what,
                self._failures,
                now - self._failing_since,
                exc,
            )

    def succeeded(self) -> None:
        """A try succeeded (logged only if tries had failed)."""
        if self._failing_since is None:
            return
        self._log.warning(
            "%s succeeded again after %d failed tries over %.0f s",
            self._what,
            self._failures,
            self._clock() - self._failing_since,
        )
        self._failing_since = None
        self._failures = 0
