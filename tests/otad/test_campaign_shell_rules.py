"""Engine rules the daemon's shell relies on: a distribution-only campaign (what ``distribute``
is), unpaced stages, reported time-outs, a CH lost after activation, derived failure counts."""

from __future__ import annotations

from campaignsim import T0, Run, ch_spec, make_fleet

from otad.campaign import (
    CampaignStarted,
    CampaignState,
    DecisionKind,
    Engine,
    HubPresenceReported,
    PayloadKind,
    Policies,
    Rate,
    StageKind,
    StageSpec,
    TargetReported,
    TargetState,
    Ticked,
)
from protocol.clock import UnixTime

K = DecisionKind
S = TargetState
ONE_STAGE = (StageSpec("distribute", StageKind.PILOT),)


def test_a_distribution_only_campaign_is_done_when_every_target_holds_the_image() -> None:
    engine = Engine.create(ch_spec(kind=PayloadKind.DISTRIBUTE, stages=ONE_STAGE), make_fleet(40))
    run = Run(engine)
    run.feed(CampaignStarted(T0, "ops"))
    run.until(lambda: engine.state is CampaignState.COMPLETED)
    assert engine.counts() == {S.HELD: 40}
    assert run.kinds(K.ACTIVATE_TARGET) == []
    assert engine.claims() == set()  # nothing held once it completed


def test_rate_zero_starts_a_whole_stage_at_once() -> None:
    spec = ch_spec(
        kind=PayloadKind.DISTRIBUTE,
        stages=ONE_STAGE,
        policies=Policies(rate=Rate(per_minute=0.0)),
    )
    engine = Engine.create(spec, make_fleet(2500))
    out = engine.handle(CampaignStarted(T0, "ops"))
    assert sum(d.kind is K.START_TARGET for d in out) == 2500
    assert engine.status()["rate_per_minute"] == 0.0


def test_a_reported_time_out_is_its_own_outcome_and_counted_by_reason() -> None:
    engine = Engine.create(
        ch_spec(kind=PayloadKind.DISTRIBUTE, stages=ONE_STAGE, policies=Policies(rate=Rate(0))),
        make_fleet(12),
    )
    engine.handle(CampaignStarted(T0, "ops"))
    ids = sorted(engine.stage_members("distribute"))
    engine.handle(TargetReported(UnixTime(T0 + 1), ids[0], S.TIMED_OUT, "TIMED_OUT"))
    engine.handle(TargetReported(UnixTime(T0 + 1), ids[1], S.FAILED, "IMAGE_HASH"))
    engine.handle(TargetReported(UnixTime(T0 + 1), ids[2], S.REJECTED, "WRONG_DEVICE_TYPE"))
    engine.handle(TargetReported(UnixTime(T0 + 2), ids[2], S.FAILED, "late"))  # final: ignored
    status = engine.status()
    assert status["counts"] == {"started": 9, "failed": 1, "rejected": 1, "timed_out": 1}
    assert status["failures"] == {"IMAGE_HASH": 1, "TIMED_OUT": 1, "WRONG_DEVICE_TYPE": 1}
    assert status["last_change_at"] == T0 + 1


def test_a_ch_offline_after_activation_for_lost_after_s_is_a_category_1_incident() -> None:
    policies = Policies(rate=Rate(per_minute=0.0), lost_after_s=600.0)
    stages = (StageSpec("pilot", StageKind.PILOT, size=30), StageSpec("wave", StageKind.PILOT))
    engine = Engine.create(ch_spec(stages=stages, policies=policies), make_fleet(40))
    run = Run(engine)
    run.feed(CampaignStarted(T0, "ops"))
    run.until(lambda: engine.state is CampaignState.AWAITING_GATE)
    away, back = sorted(engine.stage_members("pilot"))[:2]
    run.feed(HubPresenceReported(run.now, away, online=False))
    run.feed(HubPresenceReported(run.now, back, online=False))
    run.advance(300)
    run.feed(HubPresenceReported(run.now, back, online=True))  # a reboot, not a loss
    run.advance(200)
    assert engine.target_state(away) is S.CONFIRMED  # 500 s: not yet
    run.advance(200)
    assert engine.target_state(away) is S.LOST
    assert engine.target_state(back) is S.CONFIRMED
    assert engine.state is CampaignState.ON_HOLD
    assert "1 category-1 incidents" in engine.hold_reason
    engine.handle(Ticked(UnixTime(run.now + 1)))
    assert engine.status()["hold_reason"] == engine.hold_reason


def test_presence_of_a_premises_outside_the_campaign_changes_nothing() -> None:
    engine = Engine.create(ch_spec(kind=PayloadKind.DISTRIBUTE, stages=ONE_STAGE), make_fleet(10))
    before = engine.to_data()
    assert engine.handle(HubPresenceReported(T0, "FFFFFFFFFFFFFFFF", online=False)) == []
    after = engine.to_data()
    before["inputs_applied"] = after["inputs_applied"]
    before["now"] = after["now"]
    assert before == after


def test_a_target_behind_its_records_is_brought_forward_by_the_chain_they_imply() -> None:
    """After a crash the snapshot may say STARTED while the device was activated and confirmed:
    the shell reports HELD, ACTIVATING (a command was issued) and CONFIRMED, in order."""
    stages = (StageSpec("pilot", StageKind.PILOT),)
    engine = Engine.create(ch_spec(stages=stages, policies=Policies(rate=Rate(0))), make_fleet(12))
    engine.handle(CampaignStarted(T0, "ops"))
    device = sorted(engine.stage_members("pilot"))[0]
    at = UnixTime(T0 + 5)
    engine.handle(TargetReported(at, device, S.CONFIRMED, "read_back"))
    assert engine.target_state(device) is S.STARTED  # no confirmation without an activation
    for state in (S.HELD, S.ACTIVATING, S.CONFIRMED, S.HELD, S.ACTIVATING):
        engine.handle(TargetReported(at, device, state))
    assert engine.target_state(device) is S.CONFIRMED  # forward only: the repeats change nothing


def test_an_activation_reported_to_a_distribution_only_campaign_changes_nothing() -> None:
    engine = Engine.create(
        ch_spec(kind=PayloadKind.DISTRIBUTE, stages=ONE_STAGE, policies=Policies(rate=Rate(0))),
        make_fleet(10),
    )
    engine.handle(CampaignStarted(T0, "ops"))
    device = sorted(engine.stage_members("distribute"))[0]
    engine.handle(TargetReported(T0, device, S.HELD))
    engine.handle(TargetReported(T0, device, S.ACTIVATING))  # an operator's own activate
    assert engine.target_state(device) is S.HELD
