"""The activation window: a cron-like expression evaluated on the local wall clock.

Distribution may run at any time; an activation is issued only while the window is open
(SPEC-independent operator policy, issue 10). The window is the set of local minutes that a
five-field cron expression matches -- ``minute hour day-of-month month day-of-week`` -- in an
IANA zone (``Europe/London`` by default), read through :mod:`zoneinfo`::

    "* 1-3 * * 1-5"     01:00-03:59 local, Monday to Friday
    "*/1 22-23,0-4 * * *"  every night 22:00-04:59 local

Each field takes ``*``, ``a``, ``a-b``, ``a,b,...`` and ``/step``; day-of-week is 0-7 (0 and 7
are Sunday). As in cron, when both day-of-month and day-of-week are restricted a day matching
either is in. Because the match is made on the *local* time of each instant, both DST changes
come out right without a special case: on the spring-forward night the skipped local hour never
occurs (a 00:00-03:59 window lasts three real hours), on the fall-back night the repeated hour
occurs twice and is open both times (five real hours).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from protocol.clock import UnixTime

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7))


def _parse_field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"cron step must be positive: {part!r}")
        if body == "*":
            first, last = low, high
        elif "-" in body:
            a, b = body.split("-", 1)
            first, last = int(a), int(b)
        else:
            first = last = int(body)
        if not low <= first <= last <= high:
            raise ValueError(f"cron field {part!r} outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class ActivationWindow:
    """When activations may be issued: ``cron`` matched on the wall clock of ``timezone``."""

    cron: str = "* * * * *"
    timezone: str = "Europe/London"
    _parsed: tuple[frozenset[int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = self.cron.split()
        if len(parts) != len(_FIELDS):
            raise ValueError(f"a cron expression has five fields: {self.cron!r}")
        parsed = tuple(
            _parse_field(text, low, high)
            for text, (_, low, high) in zip(parts, _FIELDS, strict=True)
        )
        weekdays = parsed[4]
        if 7 in weekdays:
            weekdays = (weekdays - {7}) | {0}
        object.__setattr__(self, "_parsed", (*parsed[:4], weekdays))
        ZoneInfo(self.timezone)  # an unknown zone fails here, not at the first activation

    def is_open(self, at: UnixTime) -> bool:
        """Whether the window is open at ``at`` (its local minute matches the expression)."""
        local = dt.datetime.fromtimestamp(at, ZoneInfo(self.timezone))
        minutes, hours, days, months, weekdays = self._parsed
        if local.minute not in minutes or local.hour not in hours or local.month not in months:
            return False
        day_ok = local.day in days
        weekday_ok = (local.isoweekday() % 7) in weekdays
        parts = self.cron.split()
        if parts[2] != "*" and parts[4] != "*":
            return day_ok or weekday_ok
        return day_ok and weekday_ok
