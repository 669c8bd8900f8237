"""Scenario files: every shipped one loads, bad input names its field, a seed fixes the
timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.scenario import (
    MAX_HUBS,
    SCENARIO_DIR,
    ScenarioError,
    load_scenario,
    parse_scenario,
)


def _minimal(**tables: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"fleet": {"hubs": 100}}
    for name, table in tables.items():
        data[name] = {**data.get(name, {}), **table}
    return data


@pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.hubs >= 1
    assert scenario.stages[-1].size is None
    assert scenario.stages[-1].share is None


def test_the_must_show_scenario_is_what_issue_12_asks() -> None:
    five_k = load_scenario("5k")
    assert five_k.hubs == 5000
    assert five_k.ch_kib == 256
    assert five_k.bridge_kib > 0
    assert five_k.faults.wan_loss == pytest.approx(0.01)
    assert five_k.faults.flap_share == pytest.approx(0.05)
    assert len(five_k.faults.broker_restart_at_s) == 1
    assert len(five_k.faults.otad_kill_at_s) == 1
    assert len(five_k.flapping_hubs()) == 250
    assert load_scenario("demo").hubs == 300
    assert load_scenario("10k").hubs == 10_000


def test_defaults_fill_everything_but_the_hub_count() -> None:
    scenario = parse_scenario({"fleet": {"hubs": 7}}, default_name="x")
    assert scenario.name == "x"
    assert [s.kind for s in scenario.stages] == ["micro_pilot", "pilot", "rollout"]
    assert not scenario.faults.needs_proxy
    assert scenario.timeline() == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "fleet"),
        ({"fleet": {}}, "fleet.hubs"),
        ({"fleet": {"hubs": 0}}, "fleet.hubs"),
        ({"fleet": {"hubs": MAX_HUBS + 1}}, "fleet.hubs"),
        ({"fleet": {"hubs": "many"}}, "fleet.hubs"),
        ({"fleet": {"hubs": True}}, "fleet.hubs"),
        ({"fleet": {"hubs": 10, "hub": 3}}, "fleet.hub"),
        ({"fleet": {"hubs": 10}, "flet": {}}, "flet"),
        (_minimal(fleet={"bridge_share": 1.5}), "fleet.bridge_share"),
        (_minimal(fleet={"sleepy_gsme": "yes"}), "fleet.sleepy_gsme"),
        (_minimal(images={"bridge_type": "B9"}), "images.bridge_type"),
        (_minimal(images={"ch_kib": 0}), "images.ch_kib"),
        (_minimal(han={"block_size": 64}), "han.block_size"),
        (_minimal(han={"loss": 1.0}), "han.loss"),
        (_minimal(faults={"wan_loss": 1.0}), "faults.wan_loss"),
        (_minimal(faults={"wan_loss": -0.01}), "faults.wan_loss"),
        (_minimal(faults={"wan_latency_ms": "20"}), "faults.wan_latency_ms"),
        (_minimal(faults={"cloned_hubs": 101}), "faults.cloned_hubs"),
        (_minimal(faults={"otad_kill_at_s": [10, -1]}), "faults.otad_kill_at_s"),
        (_minimal(faults={"wan_cuts": [{"at_s": 5}]}), "faults.wan_cuts[0]"),
        (_minimal(faults={"wan_cuts": [{"at_s": 5, "share": 0.1, "x": 1}]}),
         "faults.wan_cuts[0].x"),
        (_minimal(faults={"flap_share": 0.1, "flap_every_s": 5, "flap_down_s": 5}),
         "faults.flap_down_s"),
        (_minimal(campaign={"stages": []}), "campaign.stages"),
        (_minimal(campaign={"thresholds": {"failed_rate": 2}}), "campaign.thresholds.failed_rate"),
        (_minimal(campaign={"thresholds": {"fail_rate": 0.1}}), "campaign.thresholds.fail_rate"),
        (_minimal(campaign={"deadlines": {"activation_s": -1}}), "campaign.deadlines.activation_s"),
        (_minimal(campaign={"stages": [{"name": "a", "kind": "beta"}]}), "campaign.stages[0].kind"),
        (_minimal(campaign={"stages": [{"kind": "pilot"}]}), "campaign.stages[0].name"),
        (_minimal(campaign={"stages": [{"name": "m", "kind": "micro_pilot", "size": 21},
                                       {"name": "r", "kind": "rollout"}]}),
         "campaign.stages[0].size"),
        (_minimal(campaign={"stages": [{"name": "m", "kind": "micro_pilot", "size": 9},
                                       {"name": "r", "kind": "rollout"}]}),
         "campaign.stages[0].size"),
        (_minimal(campaign={"stages": [{"name": "m", "kind": "micro_pilot", "share": 0.1},
                                       {"name": "r", "kind": "rollout"}]}),
         "campaign.stages[0].size"),
        (
            _minimal(campaign={"stages": [
                {"name": "a", "kind": "pilot", "size": 3, "share": 0.1}]}),
            "campaign.stages[0]",
        ),
        (
            _minimal(campaign={"stages": [
                {"name": "a", "kind": "pilot"}, {"name": "b", "kind": "rollout"}]}),
            "campaign.stages[0]",
        ),
        (
            _minimal(campaign={"stages": [
                {"name": "a", "kind": "pilot", "size": 1}, {"name": "a", "kind": "rollout"}]}),
            "campaign.stages[1].name",
        ),
    ],
)  # fmt: skip
def test_bad_input_is_a_typed_error_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(data)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_bad_files_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no scenario"):
        load_scenario(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[fleet\nhubs = 3\n")
    with pytest.raises(ScenarioError, match="not valid TOML") as caught:
        load_scenario(broken)
    assert caught.value.field == "file"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScenarioError):
        load_scenario(binary)


def _faulty(seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "fleet": {"hubs": 2000},
        "campaign": {"timeout_s": 300},
        "faults": {
            "wan_cuts": [{"at_s": 20, "share": 0.1}],
            "half_open": [{"at_s": 30, "share": 0.02, "for_s": 15}],
            "flap_share": 0.05,
            "flap_every_s": 40,
            "flap_down_s": 4,
            "broker_restart_at_s": [60],
            "otad_kill_at_s": [90],
        },
    }


def test_same_seed_same_timeline_another_seed_another() -> None:
    first = parse_scenario(_faulty(1)).timeline()
    assert first == parse_scenario(_faulty(1)).timeline()
    assert first != parse_scenario(_faulty(2)).timeline()
    assert [a.at_s for a in first] == sorted(a.at_s for a in first)
    kinds = {a.kind for a in first}
    assert kinds == {
        "cut",
        "half_open",
        "resume",
        "hub_down",
        "hub_up",
        "broker_restart",
        "otad_kill",
    }
    (cut,) = [a for a in first if a.kind == "cut"]
    assert len(cut.hubs) == 200
    assert len(set(cut.hubs)) == 200
    (hang,) = [a for a in first if a.kind == "half_open"]
    (resume,) = [a for a in first if a.kind == "resume"]
    assert resume.hubs == hang.hubs
    assert resume.at_s == hang.at_s + 15


def test_a_flapping_hub_comes_back_before_it_goes_down_again() -> None:
    scenario = parse_scenario(_faulty(3))
    assert len(scenario.flapping_hubs()) == 100
    by_hub: dict[int, list[tuple[float, str]]] = {}
    for action in scenario.timeline():
        if action.kind in ("hub_down", "hub_up"):
            by_hub.setdefault(action.hubs[0], []).append((action.at_s, action.kind))
    for moves in by_hub.values():
        kinds = [k for _, k in moves]
        assert kinds == ["hub_down", "hub_up"] * (len(kinds) // 2)
        assert all(at < 300 for at, k in moves if k == "hub_down")
        # every 40 s for 300 s: 7 or 8 outages per hub
        assert 7 <= len(kinds) // 2 <= 8


def test_campaign_spec_follows_the_contract() -> None:
    scenario = parse_scenario(
        _minimal(campaign={"stages": [
            {"name": "mp", "kind": "micro_pilot", "size": 15},
            {"name": "p", "kind": "pilot", "share": 0.25},
            {"name": "r", "kind": "rollout"},
        ], "auto_gate_soak_s": 2})
    )  # fmt: skip
    spec = scenario.campaign_spec("ab12", "lt-1")
    assert spec["id"] == "lt-1"
    assert spec["payload"] == {"kind": "image", "image": "ab12"}
    assert spec["stages"] == [
        {"name": "mp", "kind": "micro_pilot", "size": 15},
        {"name": "p", "kind": "pilot", "share": 0.25},
        {"name": "r", "kind": "rollout"},
    ]
    assert spec["policies"]["auto_gate_soak_s"] == 2.0
    assert "thresholds" not in spec["policies"]
    limited = parse_scenario(
        _minimal(campaign={"thresholds": {"category2_limit": 5, "failed_rate": 0.5},
                           "deadlines": {"activation_s": 120}})
    )  # fmt: skip
    policies = limited.campaign_spec("ab12", "lt-2")["policies"]
    assert policies["thresholds"] == {"category2_limit": 5, "failed_rate": 0.5}
    assert policies["deadlines"] == {"activation_s": 120.0}
