"""Flapping CHs: a presence that changes too often to mean anything.

A cloned hub (two devices, or two processes, with one GUID and so one MQTT client id) makes the
broker hand the session from one connection to the other and back: each take-over publishes the
loser's last will, each reconnect a new announcement, hundreds a minute (the probe measured 445 +
449 connections, 535 ``hub.online`` and 534 ``hub.offline`` in 30 s). A CH in a reconnect loop
looks the same. Reported per change, that is one durable event per flap and no word of why.

:class:`FlapDetector` is the sans-IO judge of it: the registry feeds it every presence change
of a CH (online after an announcement, offline after a last will; a take-over makes both) with
the monotonic time, and calls :meth:`FlapDetector.tick` now and then; it answers with what to
report. A live re-announcement of an online CH is not a change (a CH may announce whenever it
is polled). Time is passed in and nothing here does I/O, so the tests run it on virtual time.

State machine, per CH (the transitions are :data:`TRANSITIONS`)::

    STEADY --change--> STEADY      the change is reported as usual (hub.online / hub.offline)
    STEADY --change, the THRESHOLD-th within WINDOW_S--> FLAPPING
                                   report FlapStarted once (hub.flapping + a WARNING)
    FLAPPING --change--> FLAPPING  counted, nothing reported (no event per flap)
    FLAPPING --tick, QUIET_S since the last change--> STEADY
                                   report FlapEnded once (hub.steady, with the presence now)

A CH that never flaps costs one short deque of change times; a steady CH's entry is dropped once
its changes are older than the window (:meth:`FlapDetector.tick`), so memory follows the CHs
that changed recently, not the fleet.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Final


class FlapState(enum.Enum):
    """Where one CH's presence stands."""

    STEADY = "steady"
    FLAPPING = "flapping"


class FlapInput(enum.Enum):
    """What the detector is told."""

    CHANGE = "change"  # a presence change of the CH (online, offline)
    BURST = "burst"  # a change that makes THRESHOLD within WINDOW_S (derived from CHANGE)
    QUIET = "quiet"  # a tick finds QUIET_S without a change (derived from the tick)


class FlapAction(enum.Enum):
    """What a transition asks the caller to do."""

    REPORT_CHANGE = "report the change"
    REPORT_STARTED = "report the episode started"
    SUPPRESS = "count it, report nothing"
    REPORT_ENDED = "report the episode ended"


TRANSITIONS: Final[dict[tuple[FlapState, FlapInput], tuple[FlapState, FlapAction]]] = {
    (FlapState.STEADY, FlapInput.CHANGE): (FlapState.STEADY, FlapAction.REPORT_CHANGE),
    (FlapState.STEADY, FlapInput.BURST): (FlapState.FLAPPING, FlapAction.REPORT_STARTED),
    (FlapState.FLAPPING, FlapInput.CHANGE): (FlapState.FLAPPING, FlapAction.SUPPRESS),
    (FlapState.FLAPPING, FlapInput.BURST): (FlapState.FLAPPING, FlapAction.SUPPRESS),
    (FlapState.FLAPPING, FlapInput.QUIET): (FlapState.STEADY, FlapAction.REPORT_ENDED),
}
"""(state, input) -> (next state, action). A pair not listed changes nothing (QUIET while
STEADY)."""

#: Presence changes within WINDOW_S that make a CH flapping. A broker restart costs every CH two
#: (offline, online), a CH's firmware activation two or three; a cloned hub makes dozens a
#: minute.
THRESHOLD: Final = 8
WINDOW_S: Final = 60.0
#: Seconds without a change after which a flapping CH is steady again.
QUIET_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class FlapStarted:
    """A CH started flapping: ``changes`` presence changes within ``window_s`` seconds."""

    guid: str
    changes: int
    window_s: float


@dataclass(frozen=True, slots=True)
class FlapEnded:
    """A flapping CH has been quiet for ``quiet_s``: ``changes`` presence changes were held
    back over ``flapped_s`` seconds of flapping."""

    guid: str
    changes: int
    flapped_s: float
    quiet_s: float


@dataclass(slots=True)
class _Presence:
    state: FlapState = FlapState.STEADY
    recent: collections.deque[float] = field(default_factory=collections.deque)
    last_change: float = 0.0
    episode_began: float = 0.0
    episode_changes: int = 0


class FlapDetector:
    """Judges presence changes per CH (see the module docstring)."""

    def __init__(
        self, *, threshold: int = THRESHOLD, window_s: float = WINDOW_S, quiet_s: float = QUIET_S
    ) -> None:
        """``threshold`` changes within ``window_s`` seconds start an episode; ``quiet_s``
        seconds without one end it."""
        if threshold < 2:
            raise ValueError(f"threshold must be >= 2, got {threshold}")
        if not window_s > 0 or not quiet_s > 0:
            raise ValueError(f"window_s and quiet_s must be > 0, got {window_s}, {quiet_s}")
        self._threshold = threshold
        self._window = window_s
        self._quiet = quiet_s
        self._hubs: dict[str, _Presence] = {}
        self._flapping: set[str] = set()

    def changed(self, guid: str, now: float) -> tuple[FlapAction, FlapStarted | None]:
        """CH ``guid``'s presence changed at ``now`` (monotonic seconds): what to do with the
        change, and the episode that it starts (None unless the action is REPORT_STARTED)."""
        p = self._hubs.get(guid)
        if p is None:
            p = self._hubs[guid] = _Presence()
        p.last_change = now
        recent = p.recent
        recent.append(now)
        while recent and recent[0] <= now - self._window:
            recent.popleft()
        while len(recent) > self._threshold:
            recent.popleft()
        burst = len(recent) >= self._threshold
        state, action = TRANSITIONS[(p.state, FlapInput.BURST if burst else FlapInput.CHANGE)]
        started = None
        if action is FlapAction.REPORT_STARTED:
            p.episode_began = recent[0]
            p.episode_changes = len(recent)
            self._flapping.add(guid)
            started = FlapStarted(guid, len(recent), round(now - recent[0], 3))
        elif action is FlapAction.SUPPRESS:
            p.episode_changes += 1
        p.state = state
        return action, started

    def tick(self, now: float) -> list[FlapEnded]:
        """Time passed: the episodes that ended (``QUIET_S`` without a change). Also forgets
        steady CHs whose changes left the window. O(CHs changed recently)."""
        ended: list[FlapEnded] = []
        for guid in list(self._flapping):
            p = self._hubs[guid]
            if now - p.last_change < self._quiet:
                continue
            state, action = TRANSITIONS[(p.state, FlapInput.QUIET)]
            assert action is FlapAction.REPORT_ENDED
            p.state = state
            self._flapping.discard(guid)
            ended.append(
                FlapEnded(
                    guid,
                    p.episode_changes,
                    round(p.last_change - p.episode_began, 3),
                    round(now - p.last_change, 3),
                )
            )
            p.recent.clear()
        for guid, p in list(self._hubs.items()):
            if p.state is FlapState.STEADY and now - p.last_change >= self._window:
                del self._hubs[guid]
        return ended

    def flapping(self, guid: str) -> bool:
        """Whether CH ``guid`` is flapping now."""
        return guid in self._flapping

    @property
    def flapping_count(self) -> int:
        """How many CHs are flapping now."""
        return len(self._flapping)

    @property
    def tracked(self) -> int:
        """CHs whose recent changes are remembered (bounded by those that changed within the
        window, plus the flapping ones)."""
        return len(self._hubs)
