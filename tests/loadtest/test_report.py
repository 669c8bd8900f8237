"""The load-test report: figures derived from the samples and statuses given, files written."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.report import (
    CampaignRecord,
    RunRecord,
    Sample,
    build_report,
    percentile,
    write_report,
)


def _record() -> RunRecord:
    samples = [
        Sample(t=float(t), confirmed_by_stage={"CH/mp": min(t, 3), "CH/ro": max(0, t - 3)},
               hub_blocks=100 * t, otad_cpu_s=0.5 * t, otad_rss_bytes=50 << 20,
               broker_cpu_s=0.1 * t, broker_rss_bytes=5 << 20, hubs_cpu_s=0.8 * t,
               loop_lag_p99_ms=1.0 + t, loop_lag_max_ms=2.0 + t,
               rtt_ms=[10.0 + t, 20.0 + t], retransmissions=t, blocks_sent=100 * t)
        for t in range(1, 11)
    ]  # fmt: skip
    status = {
        "id": "c1",
        "state": "completed",
        "targets": 12,
        "counts": {"confirmed": 10, "failed": 1, "timed_out": 1},
        "failures": {"SELF_TEST_FAILED": 1, "WAN_DELIVERY_TIMEOUT": 1},
        "stages": [
            {"name": "mp", "targets": 3, "gate": "go", "counts": {"confirmed": 3}},
            {"name": "ro", "targets": 9, "gate": "",
             "counts": {"confirmed": 7, "failed": 1, "timed_out": 1}},
        ],
    }  # fmt: skip
    plan = {
        "stages": [{"name": "mp", "hubs": 3}, {"name": "ro", "hubs": 9}],
        "estimate": {"total_s": 12.5},
    }
    history = [{"kind": "gate_decided", "stage": "mp", "actor": "otad:auto-gate"}]
    return RunRecord(
        scenario="t",
        hubs=12,
        samples=samples,
        campaigns=[CampaignRecord("CH", plan, status, history)],
        duration_s=10.0,
        image_bytes=32768,
        wan_block_bytes_sent=400_000,
        wan_blocks_sent=420,
        confirmations_by_method={"signed_alert": 10},
        alerts_published=11,
        otad_cpu_s=5.0,
        otad_peak_rss_bytes=60 << 20,
        broker_cpu_s=1.0,
        rtt_all_ms=[float(n) for n in range(1, 101)],
    )


def test_figures_come_from_the_record() -> None:
    report = build_report(_record())
    assert report["devices_targeted"] == 12
    assert report["devices_confirmed"] == 10
    assert report["failures"] == {"SELF_TEST_FAILED": 1, "WAN_DELIVERY_TIMEOUT": 1}
    assert report["estimated_duration_s"] == 12.5
    assert report["estimate_error"] == 0.25
    assert report["blocks_per_s"] == 42.0
    assert report["retransmission_ratio"] == 0.01
    assert report["loop_lag_p99_ms"] == 11.0
    assert report["ack_rtt_ms"] == {"samples": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0}
    mp, ro = report["stages"]
    assert (mp["name"], mp["hubs"], mp["confirmed"], mp["failed"]) == ("mp", 3, 3, 0)
    assert (mp["gate_decision"], mp["gate_actor"]) == ("go", "otad:auto-gate")
    assert (ro["confirmed"], ro["failed"], ro["gate_decision"]) == (7, 2, None)


def test_what_was_not_measured_is_null_not_zero() -> None:
    record = _record()
    record.samples = []
    record.rtt_all_ms = []
    record.wan_blocks_sent = 0
    record.campaigns[0].plan = {}
    report = build_report(record)
    assert report["estimated_duration_s"] is None
    assert report["blocks_per_s"] is None
    assert report["retransmission_ratio"] is None
    assert report["loop_lag_p99_ms"] is None
    assert report["ack_rtt_ms"]["p50"] is None


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_write_report_writes_json_markdown_and_every_plot(tmp_path: Path) -> None:
    report = write_report(_record(), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "report.md").read_text()
    for name in ("confirmed", "wan_blocks", "ack_rtt", "retransmissions", "failures",
                 "resources", "loop_lag"):  # fmt: skip
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"]({name}.png)" in markdown
    assert "| mp | 3 | 3 | 3 | 0 | go |" in markdown


def test_each_stage_measured_against_its_estimate_and_the_fleet_rate_it_implies() -> None:
    record = _record()
    campaign = record.campaigns[0]
    stages = [dict(s) for s in campaign.status["stages"]]
    stages[0] |= {"started_at": 100.0, "settled_at": 104.0}
    stages[1] |= {"started_at": 110.0, "settled_at": 160.0}
    campaign.status = {**campaign.status, "stages": stages}
    campaign.plan = {
        **campaign.plan,
        "estimate": {
            "total_s": 60.0,
            "model": {"fleet_blocks_per_s": 1000.0, "tick_s": 2.0},
            "stages": [
                {"name": "mp", "distribute_s": 1.0, "han_s": 0.0, "activate_s": 3.0,
                 "soak_s": 5.0, "total_s": 11.0},
                {"name": "ro", "distribute_s": 30.0, "han_s": 0.0, "activate_s": 3.0,
                 "soak_s": 0.0, "total_s": 35.0},
            ],
        },
    }  # fmt: skip
    report = build_report(record)
    mp, ro = report["stages"]
    assert (mp["estimated_s"], mp["measured_s"]) == (11.0, 10.0)  # to the next stage's start
    assert (ro["estimated_s"], ro["measured_s"]) == (35.0, 50.0)  # to its settling
    # the roll-out's WAN took 50 - 3 - 2 = 45 s where 30 were planned at 1,000 blocks/s
    (c,) = report["campaigns"]
    assert c["implied_fleet_blocks_per_s"] == round(1000.0 * 30.0 / 45.0, 1)
    assert c["estimate_model"]["fleet_blocks_per_s"] == 1000.0


def test_a_failure_on_a_ch_with_no_fault_fails_the_run() -> None:
    from loadtest.run import build_and_check
    from loadtest.scenario import parse_scenario

    flapping = parse_scenario({"fleet": {"hubs": 12}, "faults": {"flap_share": 0.5}})
    record = _record()
    record.campaigns[0].status = dict(record.campaigns[0].status)
    on_flapper = {"guid": "A", "device_id": "A", "device_type": "CH", "state": "failed",
                  "reason": "WAN_DELIVERY_TIMEOUT", "faults": ["flapping"]}  # fmt: skip
    on_healthy = {**on_flapper, "guid": "B", "device_id": "B", "reason": "NO_IMAGE_HELD",
                  "faults": []}  # fmt: skip
    record.failed_devices = [on_flapper]
    record.campaigns[0].status["counts"] = {"confirmed": 11, "failed": 1}
    record.campaigns[0].status["failures"] = {"WAN_DELIVERY_TIMEOUT": 1}
    assert build_and_check(record, flapping)["ok"] is True
    record.failed_devices = [on_flapper, on_healthy]
    record.campaigns[0].status["counts"] = {"confirmed": 10, "failed": 2}
    record.campaigns[0].status["failures"] = {"NO_IMAGE_HELD": 1, "WAN_DELIVERY_TIMEOUT": 1}
    record.notes = []
    report = build_and_check(record, flapping)
    assert report["ok"] is False
    assert report["failures_by_fault"] == {
        "flapping": {"WAN_DELIVERY_TIMEOUT": 1}, "none": {"NO_IMAGE_HELD": 1},
    }  # fmt: skip
    assert any("on CHs the scenario put no fault on: B NO_IMAGE_HELD" in n for n in report["notes"])


def test_a_benchmark_section_holds_the_command_versions_and_figures() -> None:
    from loadtest.report import benchmark_section

    report = build_report(_record())
    text = benchmark_section(report, "python -m loadtest run t --record", "2026-12-01 19:20 UTC",
                             {"python": "3.11.7"})  # fmt: skip
    assert text.startswith("## Load test t: 2026-12-01 19:20 UTC\n")
    assert "Command: `python -m loadtest run t --record`" in text
    assert "Versions: python 3.11.7" in text
    assert "| devices targeted / confirmed | 12 / 10 |" in text
    assert "| CH mp | 3 | 3 | 0 | go |" in text
    assert "| CH ro | 9 | 7 | 2 | - |" in text
