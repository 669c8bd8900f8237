"""Target selection against a fleet snapshot, exclusions with reasons, stratified stages."""

from __future__ import annotations

from collections import Counter

from campaignsim import hub, make_fleet

from otad.campaign import Selection, StageKind, StageSpec, assign_stages, select
from otad.campaign.targets import stage_sizes
from protocol.wire.devices import DeviceType


def test_selection_by_every_criterion_and_the_reason_for_each_exclusion() -> None:
    fleet = [
        hub(1, supplier="S-A", hw=0x0100, fw=0x10, segment="north"),
        hub(2, supplier="S-B", hw=0x0100, fw=0x10, segment="north"),
        hub(3, supplier="S-A", hw=0x0300, fw=0x10, segment="north"),
        hub(4, supplier="S-A", hw=0x0100, fw=0x99, segment="north"),
        hub(5, supplier="S-A", hw=0x0100, fw=0x10, segment="south"),
        hub(6, supplier="S-A", hw=0x0100, fw=0x10, segment="north", bridge=True),
        hub(7, supplier="S-A", hw=0x0100, fw=0x10, segment="north"),
    ]
    selection = Selection(
        DeviceType.CH,
        hw_min=0x0100,
        hw_max=0x0200,
        fw_versions=frozenset({0x10}),
        suppliers=frozenset({"S-A"}),
        segments=frozenset({"north"}),
        guids=frozenset(h.guid for h in fleet[:6]),
        alt_han=False,
    )
    targets, exclusions = select(selection, fleet)
    assert [t.guid for t in targets] == [fleet[0].guid]
    reasons = {e.guid: e.reason for e in exclusions}
    assert reasons == {
        fleet[1].guid: "supplier S-B not selected",
        fleet[2].guid: "hardware 0x0300 outside 0x0100..0x0200",
        fleet[3].guid: "runs firmware 0x00000099, not one the campaign upgrades",
        fleet[4].guid: "segment south not selected",
        fleet[5].guid: "has an Alt HAN bridge",
        fleet[6].guid: "not in the campaign's GUID list",
    }


def test_han_device_targets_and_alt_han_only() -> None:
    fleet = [hub(1), hub(2, bridge=True), hub(3, bridge=True, hw=0x0500)]
    bridges, exclusions = select(Selection(DeviceType.B2, alt_han=True, hw_max=0x0200), fleet)
    assert [t.device_id for t in bridges] == [fleet[1].han[1].device_id]
    assert bridges[0].guid == fleet[1].guid
    assert bridges[0].device_type is DeviceType.B2
    assert {e.guid: e.reason for e in exclusions} == {
        fleet[0].guid: "no Alt HAN bridge",
        fleet[2].guid: "hardware 0x0500 outside 0x0000..0x0200",
    }
    meters, _ = select(Selection(DeviceType.ESME), fleet)
    assert len(meters) == 3
    assert all(t.device_type is DeviceType.ESME for t in meters)
    none, why = select(Selection(DeviceType.GSME), fleet)
    assert none == []
    assert {e.reason for e in why} == {"no GSME on the HAN"}


PLAN = (
    StageSpec("micro", StageKind.MICRO_PILOT, size=15),
    StageSpec("pilot", StageKind.PILOT, share=0.2),
    StageSpec("wave-1", StageKind.ROLLOUT),
    StageSpec("wave-2", StageKind.ROLLOUT),
)


def test_stage_sizes_sizes_then_shares_then_the_rest() -> None:
    assert stage_sizes(PLAN, 300) == [15, 60, 113, 112]
    assert stage_sizes(PLAN, 12) == [12, 0, 0, 0]
    assert stage_sizes(PLAN[:2], 300) == [15, 285]  # all sized: the last takes the rest
    assert sum(stage_sizes(PLAN, 5000)) == 5000


def test_stages_are_stratified_never_registration_order() -> None:
    """The first 30 CHs registered share cell-0: none of the stages is one cell, and every
    stage's mix of cells, suppliers, hardware and firmware follows the fleet's."""
    fleet = make_fleet(300, segments=10)
    targets, _ = select(Selection(DeviceType.CH), fleet)
    stages = assign_stages(targets, PLAN, seed=1, campaign_id="c")
    assert [len(s) for s in stages] == [15, 60, 113, 112]
    assert sorted(t.device_id for s in stages for t in s) == sorted(t.device_id for t in targets)
    assert [t.guid for t in stages[0]] != [h.guid for h in fleet[:15]]
    for stage in stages:
        cells = Counter(t.segment for t in stage)
        assert max(cells.values()) <= len(stage) * 0.1 + 2, cells  # no cell fills a stage
    for stage in stages[1:]:  # 60+ targets: every cell, supplier, hw, fw in proportion
        n = len(stage)
        for key in ("segment", "supplier", "hw_version", "fw_version"):
            fleet_mix = Counter(getattr(t, key) for t in targets)
            stage_mix = Counter(getattr(t, key) for t in stage)
            for value, count in fleet_mix.items():
                expected = count * n / len(targets)
                assert abs(stage_mix[value] - expected) <= max(2.0, expected * 0.25), (
                    key,
                    value,
                    stage_mix[value],
                    expected,
                )
    micro_cells = Counter(t.segment for t in stages[0])
    assert len(micro_cells) >= 7  # 15 CHs over at least 7 of the 10 cells


def test_one_shared_cell_never_lands_in_one_stage() -> None:
    """A fleet where one cell is a third of it (registered together): its CHs go to every
    stage, whatever the seed."""
    fleet = [hub(i, segment="busy-cell" if i < 100 else f"cell-{i % 7}") for i in range(300)]
    targets, _ = select(Selection(DeviceType.CH), fleet)
    for seed in range(20):
        stages = assign_stages(targets, PLAN, seed=seed, campaign_id="c")
        busy = [sum(t.segment == "busy-cell" for t in s) for s in stages]
        assert all(n > 0 for n in busy), busy
        assert max(busy) <= 40, busy


def test_membership_is_seeded() -> None:
    targets, _ = select(Selection(DeviceType.CH), make_fleet(100))
    a = assign_stages(targets, PLAN, seed=3, campaign_id="c")
    b = assign_stages(list(reversed(targets)), PLAN, seed=3, campaign_id="c")
    c = assign_stages(targets, PLAN, seed=4, campaign_id="c")
    assert [[t.device_id for t in s] for s in a] == [[t.device_id for t in s] for s in b]
    assert [[t.device_id for t in s] for s in a] != [[t.device_id for t in s] for s in c]
