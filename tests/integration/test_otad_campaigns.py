"""Staged campaigns end to end (issue 10): a real otad, a real Mosquitto, 300 virtual CHs that
reboot into their new image, and the operator's side through ``otactl campaign``.

* micro-pilot of 15 -> GO -> pilot -> GO (the roll-out's notice waived by two approvers) ->
  roll-out, every CH confirmed;
* a CH lost after its activation in the pilot (a power cut, its broker will published) holds
  the campaign within a tick: nothing more starts, in the pilot or after it, until a recorded GO
  resumes it to completion.

Everything is checked from outside: otactl's answers and exit codes, the campaign's retained
status, the monitoring feed. Each run prints the plan's estimate against the measured time."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from otad_harness import Setup, otactl, otactl_json, otad_with_fleet
from test_otad_activation import activation_setup

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttSettings, create_client
from otad.events import EVENT_TYPES, TransferHeld
from protocol.release.manifest import DeviceType
from protocol.wire import topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HUBS = 300
VERSION = 0x0104_0000
STAGES = ("micro-pilot:micro_pilot:15", "pilot:pilot:85", "roll-out:rollout")


def campaign_flags(campaign_id: str, image: str, *extra: str) -> list[str]:
    flags = ["--id", campaign_id, "--image", image, "--rate", "3000", "--seed", "3"]
    for stage in STAGES:
        flags += ["--stage", stage]
    return [*flags, *extra]


async def wait_status(
    broker: MosquittoBroker, campaign_id: str, done: Callable[[dict[str, Any]], bool], wait_s: float
) -> dict[str, Any]:
    """Poll ``otactl campaign status --json`` until ``done(status)``."""
    deadline = time.monotonic() + wait_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = otactl_json(broker, "campaign", "status", campaign_id)
        if done(status):
            return status
        await asyncio.sleep(0.5)
    raise AssertionError(f"campaign not there after {wait_s:.0f} s: {json.dumps(status)[:2000]}")


def state_is(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["state"] in states


def stage(status: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [s for s in status["stages"] if s["name"] == name]
    return found


async def expedite_and_go(broker: MosquittoBroker, campaign_id: str) -> None:
    """The roll-out's 7-day notice waived (an urgent fix: two approvers), then the GO."""
    asked = otactl(broker, "campaign", "expedite", campaign_id, "--justification",
                   "CVE-2026-0042 on the HAN radio stack")  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    approved = otactl(broker, "campaign", "expedite", campaign_id, "--approve")
    assert approved.returncode == 0, approved.stderr
    go = otactl(broker, "campaign", "approve", campaign_id, "--reason", "pilot clean")
    assert go.returncode == 0, go.stderr


@contextlib.asynccontextmanager
async def campaign_fleet(
    broker: MosquittoBroker, tmp_path: Path, hubs: int, **fleet_options: Any
) -> AsyncIterator[Setup]:
    """otad with an activation key, ``hubs`` virtual CHs that reboot into a new 4 KiB CH image
    (read back fast), the image imported."""
    release = make_release(
        tmp_path / "release", firmware_bytes=4 * 1024, device_type=DeviceType.CH, version=VERSION
    )
    act = activation_setup(broker, tmp_path, hubs, device_keys=False, response_timeout_s=3.0,
                           read_back_backoff_s=1.0)  # fmt: skip
    async with otad_with_fleet(
        broker, tmp_path, release, hubs=hubs, config=act.config, activation_trust_dir=act.trust,
        **fleet_options,
    ) as setup:  # fmt: skip
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        yield setup


class StatusFeed:
    """The campaign's retained status as a subscriber sees it (what ``watch`` follows)."""

    def __init__(self, broker: MosquittoBroker, campaign_id: str) -> None:
        self.seen: list[dict[str, Any]] = []
        self._client = create_client(
            "gmqtt", MqttSettings(client_id=f"feed-{campaign_id}", host=broker.host,
                                  port=broker.port)
        )  # fmt: skip
        self._client.set_message_handler(lambda t, p, r: self.seen.append(json.loads(p)))
        self._topic = topics.campaign_status(campaign_id)

    async def __aenter__(self) -> StatusFeed:
        await self._client.subscribe(self._topic, 1)
        await self._client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()


def report_estimate(label: str, plan: dict[str, Any], began: float, ended: float) -> None:
    measured = ended - began
    estimated = plan["estimate"]["total_s"]
    print(
        f"\n{label}: plan estimated {estimated:.1f} s, measured {measured:.1f} s"
        f" (ratio {measured / estimated:.2f}); assumptions: {plan['estimate']['assumptions']}"
    )


@pytest.mark.timeout(420)
async def test_micro_pilot_go_pilot_go_rollout_confirms_all_300(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    async with campaign_fleet(broker, tmp_path, HUBS, procs=2) as setup:
        release = setup.release
        flags = campaign_flags("c300", release.sha256)
        plan = otactl_json(broker, "campaign", "plan", *flags)
        assert [(s["name"], s["targets"]) for s in plan["stages"]] == [
            ("micro-pilot", 15), ("pilot", 85), ("roll-out", 200)
        ]  # fmt: skip
        assert plan["exclusions"] == []
        assert plan["wan_bytes"] >= HUBS * 4 * 1024
        members = {m["device_id"]: m["stage"] for m in plan["members"]}
        created = otactl_json(broker, "campaign", "create", *flags)
        assert created["state"] == "created"
        async with StatusFeed(broker, "c300") as feed:
            began = time.monotonic()
            assert otactl(broker, "campaign", "start", "c300").returncode == 0
            status = await wait_status(broker, "c300", state_is("awaiting_gate"), 120)
            assert stage(status, "micro-pilot")["counts"] == {"confirmed": 15}
            assert stage(status, "pilot")["counts"] == {"pending": 85}  # nothing before a GO
            go = otactl(broker, "campaign", "approve", "c300", "--reason", "micro-pilot clean")
            assert go.returncode == 0, go.stderr
            status = await wait_status(broker, "c300", state_is("awaiting_gate"), 120)
            assert stage(status, "pilot")["counts"] == {"confirmed": 85}
            early = otactl(broker, "campaign", "resume", "c300")  # not paused: refused, typed
            assert early.returncode == 1
            await expedite_and_go(broker, "c300")
            status = await wait_status(broker, "c300", state_is("completed"), 180)
            ended = time.monotonic()
        assert status["counts"] == {"confirmed": HUBS}
        assert {s["name"]: s["gate"] for s in status["stages"]} == {
            "micro-pilot": "go", "pilot": "go", "roll-out": ""
        }  # fmt: skip
        fleet = otactl_json(broker, "fleet", "list")
        assert {h["fw_version"] for h in fleet} == {VERSION}
        history = otactl_json(broker, "campaign", "history", "c300")
        # the same plan again: the pacing model now has this deployment's measured figures
        replan = otactl_json(broker, "campaign", "plan", *campaign_flags("c300b", release.sha256))
        kinds_wanted = [k for k in EVENT_TYPES if k.startswith("campaign.")]
        events = otactl_json(
            broker, "campaign", "events", "--campaign", "c300", "--limit", "1000",
            *(arg for k in kinds_wanted for arg in ("--kind", k)),
        )  # fmt: skip
        held = setup.monitor.of_kind(TransferHeld)
    report_estimate("300 CHs, 3 stages", plan, began, ended)
    report_estimate("300 CHs, 3 stages, planned again after it", replan, began, ended)
    assert any("median of" in line for line in replan["estimate"]["assumptions"])
    kinds = [h["kind"] for h in history]
    assert kinds.count("stage_started") == 3
    assert kinds.count("gate_decided") == 2
    assert kinds[-1] == "completed"
    requester, approver = (
        next(h["actor"] for h in history if h["kind"] == k)
        for k in ("expedite_requested", "expedited")
    )
    assert requester
    assert approver
    assert requester != approver  # two authenticated clients
    gos = [h for h in history if h["kind"] == "gate_decided"]
    assert all(h["actor"].startswith("otactl-") for h in gos)  # the client, not "otad"
    assert [h["reason"] for h in gos] == ["GO: micro-pilot clean", "GO: pilot clean"]
    assert {e["kind"] for e in events} >= {
        "campaign.created", "campaign.stage.started", "campaign.gate.opened",
        "campaign.gate.decided", "campaign.expedite.requested", "campaign.expedited",
        "campaign.completed",
    }  # fmt: skip
    assert {e.campaign for e in held} == {"c300"}  # every transfer event names its campaign
    # stage membership as planned: the same seed and id give the same stratified draw
    started = [h for h in history if h["kind"] == "stage_started"]
    assert [h["stage"] for h in started] == ["micro-pilot", "pilot", "roll-out"]
    assert sorted(set(members.values())) == ["micro-pilot", "pilot", "roll-out"]
    assert feed.seen
    assert feed.seen[-1]["state"] == "completed"  # the retained status followed


@pytest.mark.timeout(420)
async def test_a_ch_lost_after_activation_in_the_pilot_holds_until_a_recorded_go(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    async with campaign_fleet(broker, tmp_path, HUBS, procs=2) as setup:
        release = setup.release
        flags = campaign_flags("c1", release.sha256, "--lost-after", "3s")
        plan = otactl_json(broker, "campaign", "plan", *flags)
        pilot = [m["guid"] for m in plan["members"] if m["stage"] == "pilot"]
        otactl_json(broker, "campaign", "create", *flags)
        began = time.monotonic()
        assert otactl(broker, "campaign", "start", "c1").returncode == 0
        await wait_status(broker, "c1", state_is("awaiting_gate"), 120)
        assert otactl(broker, "campaign", "approve", "c1", "--reason", "ok").returncode == 0
        asked = otactl(broker, "campaign", "expedite", "c1", "--justification", "urgent fix")
        assert asked.returncode == 0, asked.stderr
        assert otactl(broker, "campaign", "expedite", "c1", "--approve").returncode == 0
        victim = await first_confirmed(setup, pilot)
        await setup.fleet.stop_hubs([victim], crash=True)  # a power cut after its activation
        held = await wait_status(broker, "c1", state_is("on_hold"), 60)
        assert "category-1" in held["hold_reason"]
        assert stage(held, "pilot")["counts"].get("lost") == 1
        frozen = _not_pending(held)
        await asyncio.sleep(8)  # four ticks and more: nothing new is started or activated
        later = otactl_json(broker, "campaign", "status", "c1")
        assert later["state"] == "on_hold"
        assert _not_pending(later) == frozen
        assert stage(later, "roll-out")["counts"] == {"pending": 200}
        resumed = otactl(broker, "campaign", "resume", "c1")  # a hold needs a recorded GO
        assert resumed.returncode == 1
        assert "approve" in resumed.stderr
        go = otactl(broker, "campaign", "approve", "c1", "--reason", "INC-7: site power cut")
        assert go.returncode == 0, go.stderr
        # the pilot settles (if it had not), then its gate: the roll-out (notice waived)
        after = await wait_status(broker, "c1", state_is("awaiting_gate", "completed"), 120)
        if after["state"] == "awaiting_gate":
            assert otactl(broker, "campaign", "approve", "c1", "--reason", "ok").returncode == 0
        done = await wait_status(broker, "c1", state_is("completed"), 240)
        ended = time.monotonic()
        history = otactl_json(broker, "campaign", "history", "c1")
    report_estimate("300 CHs, a category-1 hold (manual GO time included)", plan, began, ended)
    assert done["counts"] == {"confirmed": HUBS - 1, "lost": 1}
    assert done["failures"] == {"its CH offline for 3 s after activation": 1}
    holds = [h for h in history if h["kind"] == "held"]
    assert len(holds) == 1
    assert holds[0]["actor"] == "otad"
    resumed_by = [h for h in history if h["kind"] == "resumed"]
    assert resumed_by
    assert resumed_by[0]["reason"] == "INC-7: site power cut"


async def first_confirmed(setup: Setup, guids: list[str], wait_s: float = 120) -> str:
    """The first of ``guids`` whose CH is confirmed running the new image."""
    deadline = time.monotonic() + wait_s
    wanted = set(guids)
    while time.monotonic() < deadline:
        rows = otactl_json(setup.broker, "devices", "--image", setup.release.sha256)
        for row in rows:
            if row["device_id"] in wanted and row["state"] == "confirmed":
                return str(row["device_id"])
        await asyncio.sleep(0.2)
    raise AssertionError("no pilot CH confirmed")


def _not_pending(status: dict[str, Any]) -> dict[str, int]:
    return {
        s["name"]: sum(n for state, n in s["counts"].items() if state != "pending")
        for s in status["stages"]
    }


@pytest.mark.timeout(480)
async def test_kill_9_three_times_mid_campaign_loses_and_repeats_nothing(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """otad is SIGKILLed three times while a staged campaign with automatic gates runs (the
    notice waived before it starts), and restarted each time: the campaign completes with every
    CH confirmed, each CH got one activation command, and each stage start, gate decision and
    the completion happened once."""
    hubs = 60
    async with campaign_fleet(broker, tmp_path, hubs) as setup:
        otad, release = setup.otad, setup.release
        flags = ["--id", "k1", "--image", release.sha256, "--rate", "600", "--auto-gate", "2s",
                 "--stage", "micro-pilot:micro_pilot:10", "--stage", "pilot:pilot:20",
                 "--stage", "roll-out:rollout"]  # fmt: skip
        otactl_json(broker, "campaign", "create", *flags)
        asked = otactl(broker, "campaign", "expedite", "k1", "--justification", "urgent fix")
        assert asked.returncode == 0, asked.stderr
        assert otactl(broker, "campaign", "expedite", "k1", "--approve").returncode == 0
        assert otactl(broker, "campaign", "start", "k1").returncode == 0
        for pause in (2.0, 4.0, 3.0):  # into the micro-pilot, the pilot, the roll-out
            await asyncio.sleep(pause)
            otad.kill()
            otad.start()
            await setup.monitor.wait_online(otad)
        done = await wait_status(broker, "k1", state_is("completed"), 240)
        history = otactl_json(broker, "campaign", "history", "k1")
    otad.stop_quietly()
    assert done["counts"] == {"confirmed": hubs}
    with contextlib.closing(otad.db()) as db:
        commands = db.execute(
            "SELECT device_id, COUNT(*) FROM activation_commands WHERE cancel = 0"
            " GROUP BY device_id"
        ).fetchall()
    assert len(commands) == hubs
    assert {n for _device, n in commands} == {1}  # no CH was sent a second activation
    steps = collections.Counter((h["kind"], h["stage"]) for h in history)
    assert steps[("stage_started", "micro-pilot")] == 1
    assert steps[("stage_started", "pilot")] == 1
    assert steps[("stage_started", "roll-out")] == 1
    assert steps[("gate_decided", "micro-pilot")] == 1
    assert steps[("gate_decided", "pilot")] == 1
    assert steps[("completed", "roll-out")] == 1
    assert steps[("expedited", "")] == 1
