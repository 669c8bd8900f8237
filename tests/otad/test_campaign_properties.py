"""Properties of the campaign engine: targets only move forward and every count is derived from
them, whatever the order of events (duplicates and replays included); the state survives a
restart at any step, and replaying the journal gives the same decisions, none repeated."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from campaignsim import T0, Run, ch_spec, make_fleet

from otad.campaign import (
    CampaignAborted,
    CampaignPaused,
    CampaignResumed,
    CampaignStarted,
    CampaignState,
    Decision,
    DecisionKind,
    Engine,
    ExpediteApproved,
    ExpediteRequested,
    GateDecided,
    HubVersionReported,
    Input,
    NoticePublished,
    Policies,
    Rate,
    TargetReported,
    TargetState,
    Thresholds,
    Ticked,
    input_from_data,
    input_to_data,
)
from otad.campaign.engine import ACTIVE, REPORTABLE, TARGET_TRANSITIONS
from protocol.clock import UnixTime

K = DecisionKind
S = TargetState


def _reachable(state: TargetState) -> frozenset[TargetState]:
    """Every state reachable from ``state`` along the edges (one input may take several)."""
    seen: set[TargetState] = set()
    todo = [state]
    while todo:
        for nxt in TARGET_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


FORWARD = {state: _reachable(state) for state in TargetState}


def random_inputs(rng: random.Random, engine: Engine, n: int) -> list[Input]:
    """Reports in any order for any target (duplicates and replays of earlier inputs among
    them), ticks with the clock jumping either way, and operator commands."""
    devices = sorted(
        d for stage in ("micro", "pilot", "rollout") for d in engine.stage_members(stage)
    )
    reportable = sorted(REPORTABLE)
    now = float(T0)
    items: list[Input] = [CampaignStarted(UnixTime(now), "alice")]
    for _ in range(n):
        now += rng.choice((0.0, 1.0, 5.0, 60.0, 3600.0, -30.0))
        at = UnixTime(now)
        roll = rng.random()
        if roll < 0.55:
            items.append(TargetReported(at, rng.choice(devices), rng.choice(reportable)))
        elif roll < 0.75:
            items.append(Ticked(at))
        elif roll < 0.85 and len(items) > 1:
            items.append(rng.choice(items))  # a replay of an earlier input, duplicates too
        else:
            items.append(
                rng.choice(
                    (
                        GateDecided(at, rng.choice(("alice", "bob")), rng.random() < 0.8, "r"),
                        CampaignPaused(at, "alice", "p"),
                        CampaignResumed(at, "bob"),
                        NoticePublished(at, "dcc"),
                        ExpediteRequested(at, "alice", "urgent fix"),
                        ExpediteApproved(at, rng.choice(("alice", "bob"))),
                        HubVersionReported(at, rng.choice(devices), 0x20),
                        CampaignAborted(at, "carol", "a") if rng.random() < 0.1 else Ticked(at),
                    )
                )
            )
    return items


def check_step(
    engine: Engine, item: Input, before: dict[str, TargetState], out: list[Decision]
) -> None:
    after = {d: engine.target_state(d) for d in before}
    for device, old in before.items():
        new = after[device]
        assert new is old or new in FORWARD[old], (device, old, new)
    everyone = Counter(after.values())
    assert engine.counts() == everyone
    staged: Counter[TargetState] = Counter()
    for stage in ("micro", "pilot", "rollout"):
        shown = engine.counts(stage)
        assert shown == Counter(after[d] for d in engine.stage_members(stage))
        staged += shown
    assert staged == everyone
    for decision in out:
        if decision.kind is K.START_TARGET:
            assert before[decision.device_id] is S.PENDING
        if decision.kind is K.ACTIVATE_TARGET:
            assert before[decision.device_id] in (S.HELD, S.PENDING, S.STARTED, S.DELIVERED)
    if any(d.kind in (K.START_TARGET, K.ACTIVATE_TARGET) for d in out):
        assert engine.state is CampaignState.RUNNING
    if isinstance(item, Ticked) and engine.state in ACTIVE - {CampaignState.ON_HOLD}:
        for index, stage in enumerate(engine._s.stages):  # no crossing outlives a tick
            if stage.started_at is not None:
                assert engine._crossing(index) == "", engine._crossing(index)


@pytest.mark.parametrize("seed", range(15))
def test_targets_only_move_forward_and_counts_are_derived(seed: int) -> None:
    rng = random.Random(seed)
    policies = Policies(
        rate=Rate(per_minute=rng.choice((6.0, 60.0, 600.0))),
        thresholds=Thresholds(category1_limit=rng.randint(0, 3), min_sample=rng.randint(1, 20)),
        auto_gate_soak_s=rng.choice((None, 0.0, 600.0)),
    )
    engine = Engine.create(ch_spec(policies=policies, seed=seed), make_fleet(120))
    twin = Engine.from_data(engine.to_data())  # restored through JSON at random steps
    starts: Counter[str] = Counter()
    activations: Counter[str] = Counter()
    for item in random_inputs(rng, engine, 1500):
        before = {d: engine.target_state(d) for d in engine._s.targets}
        out = engine.handle(item)
        check_step(engine, item, before, out)
        if rng.random() < 0.02:
            twin = Engine.from_data(json.loads(json.dumps(twin.to_data())))
        assert twin.handle(item) == out
        starts.update(d.device_id for d in out if d.kind is K.START_TARGET)
        activations.update(d.device_id for d in out if d.kind is K.ACTIVATE_TARGET)
    assert max(starts.values(), default=1) == 1  # nobody started twice
    assert max(activations.values(), default=1) == 1  # nor activated twice


def scripted_run() -> Run:
    """A campaign through micro-pilot, a category-1 hold in the pilot, a GO and the roll-out,
    with automatic gates, recorded as its journal and its decisions."""
    policies = Policies(
        rate=Rate(per_minute=30.0),
        auto_gate_soak_s=300.0,
        thresholds=Thresholds(failed_rate=0.1),  # one failure in 10 settled is not over it
    )
    run = Run(Engine.create(ch_spec(policies=policies), make_fleet(60)), tick_s=30.0)
    run.activation_faults[run.engine.stage_members("pilot")[2]] = S.LOST
    run.distribution_faults[run.engine.stage_members("rollout")[5]] = S.FAILED
    run.feed(NoticePublished(UnixTime(T0 - 8 * 24 * 3600), "dcc"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.ON_HOLD)
    run.advance(3600)
    run.feed(GateDecided(run.now, "bob", go=True, reason="incident closed"))
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    run.advance(120)
    return run


def test_the_scripted_run_holds_once_and_completes() -> None:
    run = scripted_run()
    kinds = Counter(d.kind for d in run.decisions)
    assert kinds[K.HELD] == 1
    assert kinds[K.GATE_DECIDED] == 3  # micro (auto), bob's GO on hold, pilot (auto)
    assert kinds[K.ACTIVATE_TARGET] == 59
    assert run.engine.counts()[S.CONFIRMED] == 58


def test_a_snapshot_at_every_step_restored_and_continued_gives_the_same_run() -> None:
    run = scripted_run()
    journal = [input_from_data(json.loads(json.dumps(input_to_data(i)))) for i in run.journal]
    assert journal == run.journal
    fresh = Engine.create(run.engine.spec, make_fleet(60))
    engine = fresh
    decisions: list[Decision] = []
    for item in journal:  # every step goes through JSON and a new engine
        engine = Engine.from_data(json.loads(json.dumps(engine.to_data())))
        decisions.extend(engine.handle(item))
    assert decisions == run.decisions
    assert engine.to_data() == run.engine.to_data()


def test_a_crash_after_any_step_loses_and_repeats_nothing() -> None:
    """Snapshot after input k; the process carried out decisions up to input m > k and died.
    The restored engine replays the journal from k: the decisions of k..m come back the same
    (same seq), so an executor that remembers the seqs it did skips them, and the rest follow;
    no gate decision, hold or activation is lost or made twice."""
    run = scripted_run()
    journal = run.journal
    by_seq: dict[int, list[Decision]] = {}
    for d in run.decisions:
        by_seq.setdefault(d.seq, []).append(d)
    rng = random.Random(5)
    snapshots: dict[int, str] = {}
    engine = Engine.create(run.engine.spec, make_fleet(60))
    for k, item in enumerate(journal):
        snapshots[k] = json.dumps(engine.to_data())
        engine.handle(item)
    for k in [*sorted(rng.sample(range(len(journal)), 40)), 0, len(journal) - 1]:
        m = rng.randint(k, len(journal))
        executed = [d for d in run.decisions if d.seq < m]
        restored = Engine.from_data(json.loads(snapshots[k]))
        replayed = restored.replay(journal)
        assert [d for d in replayed if d.seq < m] == [d for d in executed if d.seq >= k]
        carried = executed + [d for d in replayed if d.seq >= m]
        assert carried == run.decisions
        for kind in (K.GATE_DECIDED, K.HELD, K.ACTIVATE_TARGET, K.STAGE_STARTED):
            assert [d for d in carried if d.kind is kind] == [
                d for d in run.decisions if d.kind is kind
            ]
        assert restored.to_data() == run.engine.to_data()
