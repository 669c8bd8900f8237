"""One ``loop.call_at`` per sans-IO machine, re-armed from the machine's ``next_deadline()``.

Every machine in :mod:`protocol` (and :class:`otad.scheduler.Scheduler`) says when it next
needs :meth:`handle_timer` through ``next_deadline()``; the shell holds one :class:`TimerSlot`
per machine, as aioquic's asyncio adapter holds one timer per connection.

Re-arming is lazy: a deadline later than the armed one keeps the armed handle (the callback
finds the deadline not yet due and re-arms for it), so the hot path -- every acknowledgement
moves a retransmission deadline later -- never cancels a handle. A deadline in the past means
"now".

A machine whose deadline is still due right after its own timer ran would make the loop spin
(the bug this guards against: a transfer waiting for budget whose Offer could not go out re-armed
its timer in the past on every loop turn, at 100% CPU). So a slot re-armed *from inside its own
callback* for a deadline no later than the instant it fired is counted in
:attr:`TimerStats.spins` and pushed :data:`SPIN_GUARD_S` into the future instead; the status
snapshot shows the count, and the tests assert it stays 0.

The slot runs on a :class:`TimerHost`: its clock and its ``call_at``. The event loop is one (the
daemon's); the tests' virtual time is another, so a shell built on timer slots is tested without
a real clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger("otad.timers")

#: How far a spinning timer is pushed into the future.
SPIN_GUARD_S: Final = 0.05


class TimerHandle(Protocol):
    """What :meth:`TimerHost.call_at` returns (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None:
        """Make sure the callback does not run."""


class TimerHost(Protocol):
    """A monotonic clock and timers on it (``asyncio.AbstractEventLoop`` is one)."""

    def time(self) -> float:
        """The clock, seconds."""
        ...

    def call_at(self, when: float, callback: Callable[[], object], /) -> TimerHandle:
        """Run ``callback()`` once the clock reaches ``when``."""
        ...


class TimerStats:
    """Counters shared by a family of timer slots."""

    __slots__ = ("spins",)

    def __init__(self) -> None:
        self.spins = 0
        """Re-arms for a deadline that was due again right after its timer ran."""


class TimerSlot:
    """A lazily re-armed ``loop.call_at`` for one machine (see the module docstring)."""

    __slots__ = ("_at", "_callback", "_fired_at", "_firing", "_handle", "_host", "_stats")

    def __init__(
        self,
        host: TimerHost,
        callback: Callable[[], None],
        stats: TimerStats | None = None,
    ) -> None:
        """``callback()`` runs when the armed deadline comes (on ``host``'s clock)."""
        self._host = host
        self._callback = callback
        self._stats = stats
        self._handle: TimerHandle | None = None
        self._at = 0.0
        self._firing = False
        self._fired_at = 0.0

    @property
    def armed_at(self) -> float | None:
        """The time (on the host's clock) the slot fires at, or None."""
        return self._at if self._handle is not None else None

    def arm(self, deadline: float | None) -> None:
        """Make sure the callback runs no later than ``deadline`` (None: nothing to add)."""
        if deadline is None:
            return
        handle = self._handle
        if handle is not None:
            if deadline >= self._at:
                return
            handle.cancel()
        if self._firing and deadline <= self._fired_at:
            spins = 1
            if self._stats is not None:
                self._stats.spins += 1
                spins = self._stats.spins
            if spins & (spins - 1) == 0:  # 1st, 2nd, 4th, 8th...: never a flood
                log.error("a timer was due again right after it ran (%d times so far)", spins)
            deadline = self._host.time() + SPIN_GUARD_S
        self._at = deadline
        self._handle = self._host.call_at(deadline, self._fire)

    def cancel(self) -> None:
        """Disarm."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Disarm for good and let go of the callback (which usually holds the slot's owner:
        the pair is then freed at once, not by the cyclic garbage collector)."""
        self.cancel()
        self._callback = _closed

    def _fire(self) -> None:
        self._handle = None
        self._firing = True
        self._fired_at = self._host.time()
        try:
            self._callback()
        finally:
            self._firing = False


def _closed() -> None:
    """The callback of a closed slot."""
