"""make bench's printed result: the table, the targets verdicts and the machine-readable line."""

from __future__ import annotations

import argparse

import pytest

from loadtest.bench import OtadRun, report


def _run(us: float, hub_us: float) -> OtadRun:
    return OtadRun(blocks_per_s=20_000.0, seconds=13.0, blocks_sent=262_000, cpu_s=us * 0.262,
                   us_per_block=us, hub_us_per_block=hub_us, broker_us_per_block=16.0,
                   rss_idle=50 << 20, rss_peak=60 << 20, kib_per_session=10.0, held=1000,
                   hash_ok=1000, loop_lag_p99_ms=40.0, loop_lag_max_ms=90.0)  # fmt: skip


def test_the_last_line_has_every_figure_and_the_targets_are_judged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bases = [{"blocks_per_s": 25_000.0, "pub_cpu_us_per_block": 10.0,
              "hub_cpu_us_per_block": 14.0, "broker_cpu_us_per_block": 20.0}] * 3  # fmt: skip
    runs = [_run(14.0, 30.0), _run(15.0, 31.0), _run(16.0, 29.0)]
    args = argparse.Namespace(no_record=True)
    report(args, "python -m loadtest bench", bases, runs)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("bench: ")
    figures = dict(pair.split("=") for pair in out[-1].removeprefix("bench: ").split())
    assert figures == {
        "baseline_blocks_per_s": "25000", "otad_blocks_per_s": "20000", "ratio": "0.80",
        "us_per_block": "15.0", "kib_per_session": "10.0", "publisher_us_per_block": "10.0",
        "hub_us_per_block": "30.0", "baseline_hub_us_per_block": "14.0",
    }  # fmt: skip
    text = "\n".join(out)
    assert "otad CPU per block over the raw publisher's: 1.50x (target <= 1.5x): met" in text
    assert "virtual CH CPU per block: 30.0 us (target <= 15 us): MISSED" in text
    assert "whole-system ratio otad/baseline blocks/s: 0.80 (target >= 0.8): met" in text
    assert "| otad event-loop lag during the distribution, p99 / max (ms) | 40 / 90 | |" in text
