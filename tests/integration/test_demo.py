"""``make demo`` end to end, smaller: ``python -m loadtest demo`` against its own Mosquitto and
otad, with a CH image and a B2 bridge image relayed over the premises' HAN, activated and
confirmed; its report.json says so, field by field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.runner import FleetConfig
from protocol.wire.devices import DeviceType, JoinMode

pytestmark = [pytest.mark.slow, pytest.mark.broker]

HUBS = 40
BRIDGE_SHARE = 0.5
IMAGE_KIB = 32
BRIDGE_IMAGE_KIB = 4


def run_demo(work: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    argv = [
        sys.executable, "-m", "loadtest", "demo", "--hubs", str(HUBS),
        "--bridge-share", str(BRIDGE_SHARE), "--image-kib", str(IMAGE_KIB),
        "--bridge-image-kib", str(BRIDGE_IMAGE_KIB), "--work-dir", str(work),
        "--timeout", "180", *extra,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    report_path = work / "report.json"
    assert f"report               : {report_path}" in done.stdout, done.stdout + done.stderr
    return done, json.loads(report_path.read_text())


def fleet_b2s() -> list[tuple[str, JoinMode]]:
    """The B2 bridges of the demo's fleet (seed 0), from the hubs' own identities."""
    config = FleetConfig("127.0.0.1", 1, "/unused", HUBS, bridge_share=BRIDGE_SHARE)
    return [
        (d.device_id, d.join_mode)
        for i in range(HUBS)
        for d in config.identity(i).han
        if d.device_type is DeviceType.B2
    ]


def test_the_demo_confirms_every_device_and_reports_it(tmp_path: Path) -> None:
    done, report = run_demo(tmp_path / "demo")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo: OK" in done.stdout
    b2s = fleet_b2s()
    assert b2s, "the scenario has B2 bridges"
    cad = sum(1 for _, mode in b2s if mode is JoinMode.CAD)
    ppmid = len(b2s) - cad
    targeted = HUBS + len(b2s)  # every CH for the CH image, every B2 for the bridge image
    assert report["devices_targeted"] == targeted
    assert report["devices_confirmed"] == targeted
    # by capability: a CAD bridge by the CH's evidence, a PPMID-joined one and a CH (which signs
    # its alert before it reboots into the new image) by a signed alert
    # (a CH rebooting into its image announces its new version, a read-back proof, which may
    # reach otad before its signed alert does: the alert's QoS 1 delivery can finish only
    # after the reconnect)
    by_method = report["confirmations_by_method"]
    assert set(by_method) <= {"ch_evidence", "signed_alert", "read_back"}
    assert by_method.get("ch_evidence", 0) == cad
    assert by_method.get("signed_alert", 0) + by_method.get("read_back", 0) == ppmid + HUBS
    assert by_method.get("read_back", 0) <= HUBS // 4
    assert report["failures"] == {}
    assert report["alerts_published"] == targeted  # one device.confirmed per device
    sizes = {i["device_type"]: i["size"] for i in report["images"]}
    assert set(sizes) == {"CH", "B2"}
    assert report["image_bytes"] == sizes["CH"] + sizes["B2"]
    # one WAN copy per CH and image: every CH the CH image, the CHs with a B2 the bridge image
    assert report["wan_copies"] == HUBS + len(b2s)
    # (a block the CH acknowledged late on a busy machine may be sent again)
    one_copy_each = HUBS * sizes["CH"] + len(b2s) * sizes["B2"]
    assert one_copy_each <= report["wan_block_bytes_sent"] <= one_copy_each * 1.05
    assert 0 < report["duration_s"] < 180
    # each image through a staged campaign with automatic gates
    stages = report["stages"]
    ch = [row for row in stages if row["campaign"] == "demo-ch"]
    assert [row["name"] for row in ch] == ["micro-pilot", "pilot", "roll-out"]
    assert [row["hubs"] for row in ch] == [10, 8, 22]  # 10, 20% of 40, the rest
    assert [row["gate_decision"] for row in ch] == ["go", "go", "none"]
    assert sum(row["confirmed"] for row in ch) == HUBS
    b2_rows = [row for row in stages if row["campaign"] == "demo-b2"]
    assert sum(row["targets"] for row in b2_rows) == len(b2s)
    assert sum(row["confirmed"] for row in b2_rows) == len(b2s)
    assert all(row["failed"] == 0 for row in stages)
    assert [c["state"] for c in report["campaigns"]] == ["completed", "completed"]
    assert report["estimated_duration_s"] > 0


def test_a_share_failing_self_test_is_reported_by_reason_never_confirmed(tmp_path: Path) -> None:
    done, report = run_demo(tmp_path / "demo", "--self-test-failures", "0.2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    failed = report["failures"].get("SELF_TEST_FAILED", 0)
    assert failed > 0
    assert set(report["failures"]) == {"SELF_TEST_FAILED"}
    assert report["devices_confirmed"] + failed == report["devices_targeted"]
    assert sum(report["confirmations_by_method"].values()) == report["devices_confirmed"]
    assert report["alerts_published"] == report["devices_targeted"]  # failures alerted too


def test_a_demo_that_gives_up_still_reports_who_did_not_finish(tmp_path: Path) -> None:
    done, report = run_demo(tmp_path / "demo", "--timeout", "1")
    assert done.returncode == 1
    assert "not finished after 1 s" in done.stdout
    assert "demo: FAILED" in done.stdout
    assert report["unfinished"]
    unfinished = sum(report["unfinished"].values())
    ended = report["devices_confirmed"] + sum(report["failures"].values())
    assert ended + unfinished == report["devices_targeted"]
