"""otactl campaign watch's view: bars, counts, rate, ETA, states in words, STALLED, the log,
and the screen it draws on (in place on a TTY, appended lines otherwise)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil

import pytest
from campaignjson import T0, counts, event, history, status

from otad.ctl.campaignview import (
    LOG_LINES,
    CampaignView,
    render_status,
    stage_bar,
    stalled_for,
    state_words,
    status_topic,
    watch_campaign,
)
from otad.ctl.live import Message, Screen
from protocol.wire import topics

CID = "fw-2026-12-ch"


def test_a_bar_shows_confirmed_then_settled_failures_then_the_rest() -> None:
    assert stage_bar(15, 3, 30, width=30) == "[" + "#" * 15 + "x" * 3 + "-" * 12 + "]"
    assert stage_bar(30, 0, 30, width=10) == "[##########]"
    assert stage_bar(0, 0, 0, width=4) == "[----]"
    # one failure among 5,000 still shows; more done than the bar holds never overflows it
    assert stage_bar(2490, 1, 5000, width=30).count("x") == 1
    assert stage_bar(60, 9, 50, width=10) == "[##########]"


def test_the_view_of_a_running_pilot() -> None:
    lines = render_status(status(), now=T0 + 1, log=[])
    assert lines[0] == ("campaign fw-2026-12-ch: image 9f86d081884c fw 0x01020304")
    assert lines[1] == ("  micro-pilot  [" + "#" * 30 + "] 100.0%  15/15 confirmed  gate GO")
    assert lines[2].startswith("> pilot        [" + "#" * 15 + "x-")
    assert lines[2].endswith(" 49.8%  2490/5000 confirmed, 10 failed")
    assert lines[3].endswith("0/0 confirmed  not started")
    assert lines[4] == "targets 5015 (excluded 12, blocked by dependency 0)"
    assert lines[5] == (
        "  pending 2000, started 400, held 80, activating 20, confirmed 2505, failed 6, timed_out 4"
    )
    assert lines[6] == "rate 48.5 confirmed/min (pacing 60 started/min)  ETA 1h02m (stage pilot)"
    assert lines[7] == "failures: BAD_SIGNATURE 6, HAN_TIMEOUT 4"
    assert lines[8] == "RUNNING"
    assert len(lines) == 9


def test_stalled_when_otad_says_so_or_when_nothing_moved_for_a_minute() -> None:
    quiet = status(last_change_at=T0 - 130.0)
    assert stalled_for(quiet, T0) == 130.0
    assert "STALLED for 2m10s" in render_status(quiet, now=T0)[6]
    # just under a minute is not a stall; just over is
    assert stalled_for(status(last_change_at=T0 - 59.0), T0) is None
    assert stalled_for(status(last_change_at=T0 - 61.0), T0) == 61.0
    # otad's own figure, brought forward to now by the local clock
    said = status(stalled_s=75.0, updated_at=T0, last_change_at=T0 - 75.0)
    assert stalled_for(said, T0 + 10) == 85.0
    # a campaign not running is not stalled, however quiet
    assert stalled_for(status(state="awaiting_gate", last_change_at=T0 - 9999), T0) is None


def test_a_dead_otad_shows_as_silence_and_then_stalled() -> None:
    # otad republishes at least every 10 s while active; no message for 45 s is shown, and the
    # local clock alone turns the last status into STALLED
    lines = render_status(status(), now=T0 + 45)
    assert "no status from otad for 45s (is it running and connected to this broker?)" in lines
    assert "STALLED for 47s" not in " ".join(lines)  # under a minute since the last change
    lines = render_status(status(), now=T0 + 120)
    assert any("STALLED for 2m02s" in line for line in lines)
    # a finished campaign is not republished: its silence says nothing
    done = status(state="completed", counts=counts(confirmed=5015))
    assert not any("no status" in line for line in render_status(done, now=T0 + 3600))


def test_states_in_words_with_the_command_that_moves_them_on() -> None:
    now = T0
    assert state_words(status(state="created"), now) == (
        f"CREATED: nothing started yet; run `otactl campaign start {CID}`"
    )
    assert state_words(status(state="awaiting_gate"), now) == (
        f"AWAITING GATE after stage pilot: run `otactl campaign approve {CID} --reason ...`"
        " (or `hold` for a NO-GO)"
    )
    assert state_words(status(state="on_hold", hold_reason="failed_rate 0.06 > 0.05"), now) == (
        "ON HOLD: failed_rate 0.06 > 0.05; a recorded GO resumes it:"
        f" `otactl campaign approve {CID} --reason ...`"
    )
    assert state_words(status(state="paused", hold_reason="supplier call"), now) == (
        f"PAUSED: supplier call; `otactl campaign resume {CID}`"
    )
    waiting = status(state="awaiting_notice", notice_at=T0, rollout_not_before=T0 + 7 * 86400)
    assert state_words(waiting, T0 + 86400) == (
        "AWAITING NOTICE until 2026-12-09T02:00:00.000Z (in 144h00m)"
    )
    assert state_words(status(state="awaiting_notice"), now).startswith(
        f"AWAITING NOTICE: none published; run `otactl campaign notice {CID}`"
    )
    assert state_words(status(state="completed"), now) == (
        f"COMPLETED with 10 failed target(s): `otactl campaign retry {CID}`"
    )
    assert state_words(status(state="completed", counts=counts(confirmed=3)), now) == "COMPLETED"
    assert state_words(status(state="aborted", hold_reason="bad build"), now) == (
        "ABORTED: bad build"
    )
    assert state_words(status(state="something_new"), now) == "SOMETHING_NEW"


def test_the_log_keeps_the_last_decisions_once_each() -> None:
    view = CampaignView(CID, status(), history())
    assert [e.kind for e in view.log] == ["stage_started", "gate_decided"]
    # the live event of a decision the history already had is not logged twice
    again = {**event(7, "campaign.gate_decided"), "stage": "micro-pilot", "actor": "bob",
             "reason": "15 of 15 confirmed", "time": T0 - 3600}  # fmt: skip
    view.received(Message(f"{topics.ROOT}/events/campaign.gate_decided", again, False))
    assert len(view.log) == 2
    # past the log's length only the last ones stay
    for seq in range(LOG_LINES + 3):
        body = {**event(100 + seq), "reason": f"reason {seq}"}
        view.received(Message(f"{topics.ROOT}/events/campaign.held", body, False))
    assert [e.reason for e in view.log] == [f"reason {s}" for s in range(3, LOG_LINES + 3)]
    # another campaign's events and other kinds are not this campaign's decisions
    view.received(Message("x", event(200, "campaign.held", "other"), False))
    view.received(Message("x", event(201, "transfer.failed"), False))
    assert view.log[-1].reason == f"reason {LOG_LINES + 2}"
    lines = view.render(T0)
    assert lines[-LOG_LINES - 1] == "last decisions:"
    assert lines[-1] == "  02:01:47Z  held  pilot  by otad: reason 7"


def test_the_view_takes_newer_statuses_only_and_notes_otad_offline() -> None:
    view = CampaignView(CID, status(updated_at=T0))
    older = status(state="on_hold", updated_at=T0 - 5)
    assert view.received(Message(status_topic(CID), older, True)) is False
    assert view.status["state"] == "running"
    newer = status(state="on_hold", updated_at=T0 + 1, hold_reason="category 1: 1 > 0")
    assert view.received(Message(status_topic(CID), newer, False)) is True
    assert view.status["hold_reason"] == "category 1: 1 > 0"
    # another campaign's status on the wrong topic changes nothing
    assert view.received(Message(status_topic(CID), status(id="x"), False)) is False
    offline = {"state": "offline"}
    assert view.received(Message(topics.OTAD_STATUS, offline, True)) is True
    assert any(line.startswith("otad is OFFLINE") for line in view.render(T0 + 2))
    assert view.received(Message(topics.OTAD_STATUS, {"state": "online"}, False)) is True
    assert not any("OFFLINE" in line for line in view.render(T0 + 2))


def test_status_topic_is_one_level_per_campaign() -> None:
    assert status_topic("c-20261202-a1b2c3") == "ota/v1/campaigns/c-20261202-a1b2c3/status"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_tty_screen_redraws_in_place_and_erases_what_a_longer_frame_left() -> None:
    out = _Tty()
    screen = Screen(out)
    screen.draw(["a", "b", "c"])
    screen.draw(["d", "e"])
    assert out.getvalue() == "a\x1b[K\nb\x1b[K\nc\x1b[K\n\x1b[3Fd\x1b[K\ne\x1b[K\n\x1b[J"


def test_a_tty_screen_cuts_lines_to_the_terminal_so_redraws_stay_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback: os.terminal_size((40, 24)))
    out = _Tty()
    Screen(out).draw(["x" * 100])
    assert out.getvalue() == "x" * 39 + "\x1b[K\n"


def test_a_plain_screen_appends_changed_frames_at_most_every_interval() -> None:
    out = io.StringIO()
    screen = Screen(out, plain_interval=3600)
    assert screen.draw(["one"]) is True
    assert screen.draw(["one"]) is False  # unchanged
    assert screen.draw(["two"]) is False  # changed, but not due
    assert screen.draw(["two"], force=True) is True  # a state change is always shown
    assert out.getvalue() == "one\ntwo\n"


async def test_watch_draws_each_change_and_returns_the_final_status() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()
    view = CampaignView(CID, status(updated_at=T0))
    out = io.StringIO()
    steps = [
        status(state="awaiting_gate", updated_at=T0 + 1),
        status(state="running", stage="roll-out", updated_at=T0 + 2),
        status(state="completed", updated_at=T0 + 3, counts=counts(confirmed=5015)),
    ]
    for body in steps:
        messages.put_nowait(Message(status_topic(CID), body, False))
    clock = iter(float(T0 + i) for i in range(100))
    final = await watch_campaign(
        view, messages, out, tty=False, tick_s=0.01, clock=lambda: next(clock)
    )
    assert final["state"] == "completed"
    states = [line for line in out.getvalue().splitlines() if line.isupper() or "GATE" in line]
    assert [s.split(":")[0].split(" ")[0] for s in states] == [
        "RUNNING", "AWAITING", "RUNNING", "COMPLETED",
    ]  # fmt: skip


async def test_watch_redraws_on_its_own_when_nothing_arrives() -> None:
    # no message at all: the local clock still moves the view to STALLED (a TTY redraws)
    messages: asyncio.Queue[Message] = asyncio.Queue()
    view = CampaignView(CID, status(last_change_at=T0, updated_at=T0))
    out = _Tty()
    times = iter([T0 + 1, T0 + 30, T0 + 90])

    def clock() -> float:
        try:
            return next(times)
        except StopIteration:
            view.status = {**view.status, "state": "aborted"}  # end the loop
            return T0 + 91

    await watch_campaign(view, messages, out, tick_s=0.01, clock=clock)
    assert "STALLED for 1m30s" in out.getvalue()


def test_wan_transfers_moving_are_not_a_stall_until_otad_goes_quiet() -> None:
    # thousands of transfers share the fleet's rate and end together: minutes with no target
    # changing state, while otad says its WAN moves (stalled_s null, wan present)
    moving = status(last_change_at=T0 - 300.0, published_at=T0 - 2.0, stalled_s=None,
                    wan={"blocks_acked": 450_000, "blocks_total": 1_150_000})  # fmt: skip
    assert stalled_for(moving, T0) is None
    lines = render_status(moving, now=T0)
    assert "WAN: 450,000 of 1,150,000 blocks of the active transfers acknowledged (39%)" in lines
    assert not any("STALLED" in line for line in lines)
    # the same status a long time later: otad said nothing since, so it is stalled since then
    assert stalled_for(moving, T0 + 120) == 122.0
