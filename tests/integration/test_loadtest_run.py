"""``python -m loadtest run``: Ctrl-C stops everything it started, bad scenarios are typed
errors, and a small real run (Mosquitto, fault proxy, otad, 20 premises, staged campaigns)
ends with a report whose figures come from the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]

SMALL = """
name = "small"
seed = 4
[fleet]
hubs = {hubs}
procs = {procs}
bridge_share = 1.0
[images]
ch_kib = 32
bridge_kib = 8
[han]
acceleration = 400.0
[campaign]
stages = [{{name = "micro-pilot", kind = "micro_pilot", size = 10}},
          {{name = "roll-out", kind = "rollout"}}]
auto_gate_soak_s = 1.0
timeout_s = 240
[faults]
wan_latency_ms = 5
wan_loss = 0.01
"""


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                line for line in (entry / "status").read_text().splitlines()
                if line.startswith("State:")
            )  # fmt: skip
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append((int(entry.name), cmdline[:200]))
    return found


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live (non-zombie) process below ``root``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                found[pid] = cmd.decode(errors="replace")[:200]
                frontier.append(pid)
    return found


def _alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _start(scenario: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", "run", str(scenario), "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def test_ctrl_c_leaves_no_process_behind(tmp_path: Path) -> None:
    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL.format(hubs=30, procs=2))
    out = tmp_path / "run"
    proc = _start(scenario, out)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        lines.append(line)
        if "virtual CHs in 2 process(es)" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    else:
        pytest.fail("the run ended before its hubs were up:\n" + "".join(lines))
    started = _descendants(proc.pid)
    kinds = " ".join(started.values())
    assert "mosquitto" in kinds
    assert "otad run" in kinds
    assert "loadtest _proxy" in kinds
    assert kinds.count("_worker") == 2
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    rest, _ = proc.communicate(timeout=90)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "interrupted" in output
    time.sleep(0.5)
    assert _alive(set(started)) == [], output
    assert _processes_mentioning(str(out)) == [], output


def test_a_bad_scenario_is_a_typed_error_and_starts_nothing(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text("[fleet]\nhubs = 10\n[faults]\nwan_loss = 1.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "run", str(scenario), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "faults.wan_loss: must be in [0, 1)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_small_run_confirms_every_device_and_reports_what_it_measured(tmp_path: Path) -> None:
    scenario = tmp_path / "small.toml"
    scenario.write_text(SMALL.format(hubs=20, procs=1))
    out = tmp_path / "run"
    proc = _start(scenario, out)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True
    assert report["hubs"] == 20
    assert report["devices_targeted"] > 20  # the CHs and the bridges of type B2
    assert report["devices_confirmed"] == report["devices_targeted"]
    assert report["failures"] == {}
    assert sum(report["confirmations_by_method"].values()) == report["devices_confirmed"]
    assert report["alerts_published"] >= report["devices_confirmed"]
    names = [(s["campaign"], s["name"]) for s in report["stages"]]
    assert ("CH", "micro-pilot") in names
    assert ("CH", "roll-out") in names
    assert all(s["gate_decision"] in ("go", None) for s in report["stages"])
    assert sum(s["confirmed"] for s in report["stages"]) == report["devices_confirmed"]
    assert report["estimated_duration_s"] > 0
    assert report["duration_s"] > 0
    assert report["image_bytes"] > 32 * 1024
    # every CH got its image over the WAN: at least one copy per CH of the CH image
    assert report["wan_block_bytes_sent"] >= 20 * (32 * 1024 - 1024)
    assert report["blocks_per_s"] > 0
    assert report["otad_cpu_s"] > 0
    assert report["otad_peak_rss_bytes"] > 10 * 2**20
    assert report["loop_lag_p99_ms"] is not None
    assert report["ack_rtt_ms"]["samples"] > 0
    assert report["ack_rtt_ms"]["p50"] >= 10.0  # 5 ms injected each way
    assert report["proxy"]["dropped"] > 0  # 1% of the publishes
    for png in ("confirmed", "wan_blocks", "ack_rtt", "retransmissions", "failures",
                "resources", "loop_lag"):  # fmt: skip
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png}.png)" in (out / "report.md").read_text()
    assert _processes_mentioning(str(out)) == []
