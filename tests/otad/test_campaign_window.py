"""The activation window: cron on Europe/London wall time, across both DST changes."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from otad.campaign import ActivationWindow
from protocol.clock import UnixTime


def utc(text: str) -> UnixTime:
    return UnixTime(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


def open_minutes(window: ActivationWindow, start: str, hours: int) -> int:
    """Real minutes the window is open in ``hours`` from ``start`` (UTC)."""
    t0 = utc(start)
    return sum(window.is_open(UnixTime(t0 + 60 * m + 30)) for m in range(hours * 60))


NIGHT = ActivationWindow("* 0-3 * * *")  # 00:00-03:59 local


def test_winter_and_summer_nights_are_four_real_hours_at_their_own_offset() -> None:
    assert open_minutes(NIGHT, "2026-01-14T20:00:00", 12) == 240
    assert NIGHT.is_open(utc("2026-01-15T03:30:00"))  # 03:30 GMT
    assert open_minutes(NIGHT, "2026-07-14T20:00:00", 12) == 240
    assert NIGHT.is_open(utc("2026-07-14T23:30:00"))  # 00:30 BST
    assert not NIGHT.is_open(utc("2026-07-15T03:30:00"))  # 04:30 BST: a UTC reading says open


def test_spring_forward_night_skips_the_missing_hour() -> None:
    # 2026-03-29 01:00 GMT becomes 02:00 BST: local 00:00-03:59 is 00:00-03:00 UTC.
    assert open_minutes(NIGHT, "2026-03-28T20:00:00", 12) == 180
    assert NIGHT.is_open(utc("2026-03-29T00:59:00"))  # 00:59 GMT
    assert NIGHT.is_open(utc("2026-03-29T01:00:00"))  # 02:00 BST
    assert NIGHT.is_open(utc("2026-03-29T02:59:00"))  # 03:59 BST
    assert not NIGHT.is_open(utc("2026-03-29T03:00:00"))  # 04:00 BST


def test_fall_back_night_has_the_repeated_hour_twice() -> None:
    # 2026-10-25 02:00 BST becomes 01:00 GMT: local 00:00-03:59 is 23:00 (24th)-04:00 UTC.
    assert open_minutes(NIGHT, "2026-10-24T20:00:00", 12) == 300
    assert NIGHT.is_open(utc("2026-10-24T23:00:00"))  # 00:00 BST
    assert NIGHT.is_open(utc("2026-10-25T00:30:00"))  # 01:30 BST
    assert NIGHT.is_open(utc("2026-10-25T01:30:00"))  # 01:30 GMT, the second time
    assert NIGHT.is_open(utc("2026-10-25T03:59:00"))  # 03:59 GMT
    assert not NIGHT.is_open(utc("2026-10-25T04:00:00"))
    assert not NIGHT.is_open(utc("2026-10-24T22:59:00"))  # 23:59 BST


def test_a_window_inside_the_skipped_hour_never_opens_that_night() -> None:
    window = ActivationWindow("* 1 * * *")  # 01:00-01:59 local: does not exist on 29 March
    assert open_minutes(window, "2026-03-28T20:00:00", 12) == 0
    assert open_minutes(window, "2026-03-29T20:00:00", 12) == 60
    assert open_minutes(window, "2026-10-24T20:00:00", 12) == 120  # twice on 25 October


def test_fields_weekdays_and_steps() -> None:
    weekdays = ActivationWindow("0-29 22 * * 1-5")  # Mon-Fri 22:00-22:29 local
    assert weekdays.is_open(utc("2026-07-13T21:15:00"))  # Monday 22:15 BST
    assert not weekdays.is_open(utc("2026-07-13T21:45:00"))  # 22:45
    assert not weekdays.is_open(utc("2026-07-12T21:15:00"))  # Sunday
    sunday = ActivationWindow("*/15 12 * * 7")  # 7 is Sunday, as 0
    assert sunday.is_open(utc("2026-07-12T11:30:10"))  # 12:30 BST
    assert not sunday.is_open(utc("2026-07-12T11:31:00"))
    first_or_monday = ActivationWindow("* 12 1 * 1")  # cron: day 1 OR Monday
    assert first_or_monday.is_open(utc("2026-07-01T11:00:00"))  # Wednesday the 1st
    assert first_or_monday.is_open(utc("2026-07-13T11:00:00"))  # a Monday
    assert not first_or_monday.is_open(utc("2026-07-14T11:00:00"))


@pytest.mark.parametrize("cron", ["* * * *", "60 * * * *", "* 5-2 * * *", "*/0 * * * *"])
def test_malformed_expressions_are_refused(cron: str) -> None:
    with pytest.raises(ValueError):
        ActivationWindow(cron)


def test_an_unknown_zone_is_refused_at_once() -> None:
    with pytest.raises(zoneinfo.ZoneInfoNotFoundError):
        ActivationWindow("* * * * *", "Europe/Atlantis")
