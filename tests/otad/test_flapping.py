"""Flapping CHs: the sans-IO detector on virtual time, then the registry and the distribution
in the daemon's shell (a cloned hub's take-over loop: announcement, will, announcement, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from shellkit import Shell, guids, shell

from otad.events import HubFlapping, HubOffline, HubOnline, HubSteady
from otad.flapping import (
    QUIET_S,
    THRESHOLD,
    TRANSITIONS,
    WINDOW_S,
    FlapAction,
    FlapDetector,
    FlapEnded,
    FlapInput,
    FlapStarted,
    FlapState,
)
from otad.registry import FLAP_WARNING_EVERY_S
from otad.store import TransferState
from protocol.wire.messages import Block

GUID, OTHER = guids(2)


def feed(detector: FlapDetector, guid: str, times: list[float]) -> list[FlapAction]:
    return [detector.changed(guid, t)[0] for t in times]


# --------------------------------------------------------------------------- the detector


def test_the_transition_table_covers_every_change_and_only_a_flapping_ch_goes_quiet() -> None:
    for state in FlapState:
        assert (state, FlapInput.CHANGE) in TRANSITIONS
        assert (state, FlapInput.BURST) in TRANSITIONS
    assert (FlapState.STEADY, FlapInput.QUIET) not in TRANSITIONS
    assert TRANSITIONS[(FlapState.FLAPPING, FlapInput.QUIET)] == (
        FlapState.STEADY,
        FlapAction.REPORT_ENDED,
    )


def test_a_broker_restart_and_an_activation_are_not_flapping() -> None:
    detector = FlapDetector()
    # offline + online at a broker restart, the same at a reboot 10 s later, then a third time:
    # six changes in a minute, fewer than THRESHOLD
    actions = feed(detector, GUID, [0.0, 0.5, 10.0, 10.4, 40.0, 40.3][: THRESHOLD - 2])
    assert set(actions) == {FlapAction.REPORT_CHANGE}
    assert not detector.flapping(GUID)
    assert detector.tick(1000.0) == []
    assert detector.tracked == 0  # forgotten once its changes left the window


def test_threshold_minus_one_changes_per_window_for_an_hour_never_flap() -> None:
    detector = FlapDetector()
    spacing = WINDOW_S / (THRESHOLD - 1) + 0.01  # never THRESHOLD within one window
    actions = feed(detector, GUID, [n * spacing for n in range(3600)])
    assert set(actions) == {FlapAction.REPORT_CHANGE}
    assert detector.tracked == 1


def test_a_take_over_loop_is_reported_once_held_back_and_ends_after_quiet() -> None:
    detector = FlapDetector()
    times = [n * 0.03 for n in range(1069)]  # the probe: 535 + 534 changes in 30 s
    results = [detector.changed(GUID, t) for t in times]
    actions = [a for a, _ in results]
    assert actions[: THRESHOLD - 1] == [FlapAction.REPORT_CHANGE] * (THRESHOLD - 1)
    assert actions[THRESHOLD - 1] is FlapAction.REPORT_STARTED
    assert set(actions[THRESHOLD:]) == {FlapAction.SUPPRESS}
    started = [s for _, s in results if s is not None]
    assert started == [FlapStarted(GUID, THRESHOLD, round(times[THRESHOLD - 1], 3))]
    assert detector.flapping(GUID)
    assert detector.flapping_count == 1
    last = times[-1]
    assert detector.tick(last + QUIET_S - 0.1) == []  # not quiet long enough
    assert detector.flapping(GUID)
    (ended,) = detector.tick(last + QUIET_S + 0.5)
    assert ended == FlapEnded(GUID, len(times), round(last, 3), round(QUIET_S + 0.5, 3))
    assert not detector.flapping(GUID)
    assert detector.tick(last + QUIET_S + 1.0) == []  # reported once
    # steady again: the next change is reported as usual, and a new burst is a new episode
    assert detector.changed(GUID, last + 200.0)[0] is FlapAction.REPORT_CHANGE
    later = [last + 300.0 + n for n in range(THRESHOLD)]
    assert feed(detector, GUID, later)[-1] is FlapAction.REPORT_STARTED


def test_a_change_within_quiet_keeps_the_episode_going() -> None:
    detector = FlapDetector()
    feed(detector, GUID, [n * 0.1 for n in range(THRESHOLD)])
    for n in range(1, 6):  # one change every QUIET_S - 1 s: never quiet, for 10 minutes
        now = n * (QUIET_S - 1.0)
        assert detector.tick(now) == []
        assert detector.changed(GUID, now)[0] is FlapAction.SUPPRESS
    assert detector.flapping(GUID)


def test_one_flapping_ch_does_not_touch_another() -> None:
    detector = FlapDetector()
    feed(detector, GUID, [n * 0.1 for n in range(THRESHOLD * 3)])
    assert detector.changed(OTHER, 1.0)[0] is FlapAction.REPORT_CHANGE
    assert not detector.flapping(OTHER)


@pytest.mark.parametrize("bad", [{"threshold": 1}, {"window_s": 0.0}, {"quiet_s": -1.0}])
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        FlapDetector(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- in the daemon


def take_over(s: Shell, guid: str, flaps: int, every_s: float) -> None:
    """Two connections with one client id: each take-over publishes the loser's will, then the
    winner announces; ``flaps`` such pairs, ``every_s`` apart (virtual time)."""
    for _ in range(flaps):
        s.drop(guid)
        s.clock.advance(every_s / 2)
        s.announce(guid)
        s.clock.advance(every_s / 2)
        s.pump()


async def test_a_cloned_hub_is_reported_once_its_transfer_suspended_then_resumed_when_steady(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with shell(tmp_path, firmware_bytes=64 * 1024) as s:
        for guid in (GUID, OTHER):
            s.add_ch(guid)
            s.announce(guid)
        await s.registry.flushed()
        await s.distribute()
        s.run_until(lambda: s.distribution.transfers[(GUID, s.image)].sender.blocks_acked > 4)
        await s.events.flush()
        before = s.events_published()
        with caplog.at_level(logging.WARNING, logger="otad.registry"):
            take_over(s, GUID, flaps=535, every_s=30.0 / 535)
        await s.events.flush()
        await s.registry.flushed()
        events = s.events_published()
        presence = [
            e for e in before + events if isinstance(e, HubOnline | HubOffline) and e.guid == GUID
        ]
        assert len(presence) == THRESHOLD - 1  # its first announcement counts; none after
        (flapping,) = [e for e in events if isinstance(e, HubFlapping)]
        assert (flapping.guid, flapping.changes) == (GUID, THRESHOLD)
        assert flapping.window_s < WINDOW_S
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"CH {GUID} is flapping" in warnings[0].getMessage()
        assert s.registry.hubs[GUID].flapping
        assert s.daemon.status.body("online").count(b'"flapping":1') == 1

        # Suspended: nothing more goes to it, and what "it" reports is dropped, while the
        # other CH's transfer goes on to the end.
        sent_to_clone = len(s.chs[GUID].received)
        s.run_until(lambda: s.distribution.transfers[(OTHER, s.image)].state
                    is TransferState.HELD)  # fmt: skip
        assert len(s.chs[GUID].received) == sent_to_clone
        assert s.distribution.transfers[(GUID, s.image)].state is TransferState.ACTIVE

        # Quiet for QUIET_S: one hub.steady, and the transfer re-synchronises and completes.
        s.clock.advance(QUIET_S + 1.0)
        assert s.registry.check_flapping(s.clock.time()) == 1
        s.run_until(lambda: s.distribution.transfers[(GUID, s.image)].state
                    is TransferState.HELD)  # fmt: skip
        await s.settle()
        events = s.events_published()
        (steady,) = [e for e in events if isinstance(e, HubSteady)]
        assert (steady.guid, steady.online) == (GUID, True)
        assert steady.changes == 1 + 2 * 535  # its first announcement was in the window too
        assert not [e for e in events if isinstance(e, HubOnline | HubOffline)]
        assert sum(type(m) is Block for m in s.chs[GUID].received) >= 1
        row = await s.recorded(GUID)
        assert row is not None
        assert row.state is TransferState.HELD
        hub_rows = {h.guid: h for h in await s.store.hubs()}
        assert hub_rows[GUID].online


async def test_many_clones_at_once_make_one_warning_that_counts_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = guids(50)
    async with shell(tmp_path) as s:
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        with caplog.at_level(logging.WARNING, logger="otad.registry"):
            for _ in range(THRESHOLD):
                for guid in fleet:
                    s.drop(guid)
                    s.announce(guid)
                s.clock.advance(0.1)
            s.clock.advance(FLAP_WARNING_EVERY_S + 0.1)
            take_over(s, fleet[0], flaps=3, every_s=0.1)  # no new episode: no new line
            for guid in guids(52)[50:]:  # a later clone, after the limit's interval
                s.add_ch(guid)
                for _ in range(THRESHOLD):
                    s.announce(guid)
                    s.drop(guid)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "49 other CH(s)" not in warnings[0]
        assert "49 other CH(s) started flapping since the last warning" in warnings[1]
        assert s.registry.flapping == 52
        await s.events.flush()
        flapping = [e for e in s.events_published() if isinstance(e, HubFlapping)]
        assert sorted(e.guid for e in flapping) == sorted(guids(52))
