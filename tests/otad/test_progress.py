"""The progress line: an ETA from the recent rate, and STALLED instead of an ETA that grows."""

from __future__ import annotations

import io

from otad.ctl.watch import distribution_line
from otad.progress import ProgressBar, format_duration


def bar(**kw: object) -> ProgressBar:
    return ProgressBar(1000, label="x", stream=io.StringIO(), tty=False, **kw)  # type: ignore[arg-type]


def test_eta_comes_from_the_recent_rate_not_from_the_start() -> None:
    b = bar(rate_window=10.0)
    start = b.started
    b.render(0, now=start)
    b.render(0, now=start + 100)  # a long idle start (e.g. opened before the distribution)
    b.render(100, now=start + 105)
    line = b.render(200, now=start + 110)  # 20 blocks/s over the last 10 s
    assert "ETA 40s" in line  # 800 left at 20/s, not 800 at 200/110 s


def test_no_progress_for_a_while_reads_stalled_not_a_growing_eta() -> None:
    b = bar(stalled_after=10.0)
    start = b.started
    b.render(500, now=start)
    assert "STALLED" not in b.render(500, now=start + 5)
    line = b.render(500, now=start + 42)
    assert "STALLED for 42s" in line
    assert "ETA" not in line
    assert "STALLED" not in b.render(501, now=start + 43)  # it moved again


def test_the_caller_can_say_stalled_and_a_finished_bar_never_is() -> None:
    b = bar(stalled_after=None)
    start = b.started
    assert "STALLED" in b.render(10, now=start, stalled=True)
    assert "ETA 0s" in b.render(1000, now=start + 1, stalled=True)


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(42) == "42s"
    assert format_duration(75) == "1m15s"
    assert format_duration(7300) == "2h01m"


def test_a_distribution_line_counts_held_transfers_whole_and_reports_failures() -> None:
    entry = {
        "transfers": {"active": 3, "held": 5, "failed": 2},
        "blocks_per_transfer": 10,
        "blocks_acked": 12,
        "stalled_transfers": 1,
    }
    done, total, extra = distribution_line("ab" * 32, entry)
    assert (done, total) == (5 * 10 + 12, (3 + 5) * 10)
    assert extra == "held 5/10  active 3  failed 2  stalled 1"
