"""The campaign engine on virtual time: stages, gates, holds, notice, window, pacing, deadlines,
retries, dependencies, one campaign per component, pause/resume/abort."""

from __future__ import annotations

import datetime as dt

import pytest
from campaignsim import T0, Run, ch_spec, hub, make_fleet

from otad.campaign import (
    ActivationWindow,
    CampaignAborted,
    CampaignPaused,
    CampaignRefusedError,
    CampaignResumed,
    CampaignStarted,
    CampaignState,
    Deadlines,
    DecisionKind,
    Dependency,
    Engine,
    ExpediteApproved,
    ExpediteRequested,
    GateDecided,
    HubVersionReported,
    NoticePublished,
    PayloadKind,
    Policies,
    Rate,
    Selection,
    StageKind,
    StageSpec,
    TargetState,
    Thresholds,
    retry_spec,
)
from otad.campaign.spec import NOTICE_S
from protocol.clock import UnixTime
from protocol.wire.devices import DeviceType

DAY = 24 * 3600.0
FAST = Rate(per_minute=600.0)
K = DecisionKind
S = TargetState


def run_of(n: int = 300, **spec_kwargs: object) -> Run:
    spec_kwargs.setdefault("policies", Policies(rate=FAST))
    engine = Engine.create(ch_spec(**spec_kwargs), make_fleet(n))  # type: ignore[arg-type]
    return Run(engine)


def started(run: Run, stage: str | None = None) -> set[str]:
    return {d.device_id for d in run.kinds(K.START_TARGET) if stage in (None, d.stage)}


def at_gate(run: Run) -> bool:
    return run.engine.state is CampaignState.AWAITING_GATE


def test_stages_run_one_after_another_and_only_a_recorded_go_opens_the_next() -> None:
    run = run_of()
    run.feed(NoticePublished(T0, "dcc-ops"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: at_gate(run))
    micro = set(run.engine.stage_members("micro"))
    assert len(micro) == 15
    assert started(run) == micro
    assert run.engine.counts("micro")[S.CONFIRMED] == 15
    assert [d.stage for d in run.kinds(K.GATE_OPENED)] == ["micro"]
    run.advance(3 * DAY)  # no decision: nothing more starts, ever
    assert started(run) == micro
    assert run.engine.state is CampaignState.AWAITING_GATE

    run.feed(GateDecided(run.now, "alice", go=True, reason="micro-pilot clean"))
    run.until(lambda: at_gate(run))
    assert started(run, "pilot") == set(run.engine.stage_members("pilot"))
    assert len(started(run, "pilot")) == 60
    run.feed(GateDecided(run.now, "bob", go=True, reason="no incidents in pilot"))
    assert run.engine.state is CampaignState.AWAITING_NOTICE  # 3 days after the notice
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    first_rollout = min(d.at for d in run.kinds(K.START_TARGET) if d.stage == "rollout")
    assert first_rollout >= T0 + NOTICE_S
    assert run.engine.counts()[S.CONFIRMED] == 300
    gates = [(d.stage, d.actor, d.reason) for d in run.engine.audit if d.kind is K.GATE_DECIDED]
    assert gates == [
        ("micro", "alice", "GO: micro-pilot clean"),
        ("pilot", "bob", "GO: no incidents in pilot"),
    ]
    assert all(d.at > 0 for d in run.engine.audit)
    status = run.engine.status()
    assert status["state"] == "completed"
    assert [(st["name"], st["targets"], st["gate"], st["counts"]) for st in status["stages"]] == [
        ("micro", 15, "go", {"confirmed": 15}),
        ("pilot", 60, "go", {"confirmed": 60}),
        ("rollout", 225, "", {"confirmed": 225}),
    ]


def test_automatic_go_after_the_soak_when_thresholds_hold() -> None:
    soak = 2 * 3600.0
    run = run_of(policies=Policies(rate=FAST, auto_gate_soak_s=soak))
    run.feed(NoticePublished(UnixTime(T0 - NOTICE_S), "dcc-ops"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    gates = list(run.kinds(K.GATE_DECIDED))
    assert [(g.stage, g.actor) for g in gates] == [("micro", "otad"), ("pilot", "otad")]
    opened = {d.stage: d.at for d in run.kinds(K.GATE_OPENED)}
    for gate in gates:
        assert gate.at - opened[gate.stage] >= soak
        assert gate.at - opened[gate.stage] < soak + run.tick_s * 2


def test_a_category_1_incident_in_the_pilot_holds_within_a_tick_and_a_go_resumes() -> None:
    run = run_of(policies=Policies(rate=Rate(per_minute=60.0), auto_gate_soak_s=600.0))
    lost = run.engine.stage_members("pilot")[3]
    run.activation_faults[lost] = S.LOST
    run.feed(NoticePublished(UnixTime(T0 - NOTICE_S), "dcc-ops"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.ON_HOLD)
    lost_at = max(d.at for d in run.kinds(K.ACTIVATE_TARGET) if d.device_id == lost)
    held = run.kinds(K.HELD)
    assert len(held) == 1
    assert 0 <= held[0].at - (lost_at + run.confirm_s) <= run.tick_s  # the next tick
    assert held[0].reason == "stage pilot: 1 category-1 incidents (limit 0)"
    starts_at_hold = len(run.kinds(K.START_TARGET))
    activations_at_hold = len(run.kinds(K.ACTIVATE_TARGET))
    run.advance(5 * DAY)  # in-flight targets settle; nothing new starts or activates
    assert len(run.kinds(K.START_TARGET)) == starts_at_hold
    assert len(run.kinds(K.ACTIVATE_TARGET)) == activations_at_hold
    assert started(run, "rollout") == set()
    run.feed(ExpediteApproved(run.now, "bob"))  # nothing to approve: refused, recorded
    assert run.kinds(K.REFUSED)[-1].reason == "no expedite request to approve"
    run.feed(GateDecided(run.now, "carol", go=True, reason="incident 42 understood"))
    assert run.kinds(K.RESUMED)[-1].actor == "carol"
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    assert run.engine.counts()[S.CONFIRMED] == 299
    assert run.engine.counts()[S.LOST] == 1
    assert len(run.kinds(K.HELD)) == 1  # the accepted incident does not hold again


def test_a_no_go_holds_and_a_later_go_opens_the_next_stage() -> None:
    run = run_of()
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: at_gate(run))
    run.feed(GateDecided(run.now, "bob", go=False, reason="wait for the CSP's report"))
    assert run.engine.state is CampaignState.ON_HOLD
    assert run.kinds(K.HELD)[0].reason == "NO-GO by bob: wait for the CSP's report"
    run.advance(DAY)
    assert started(run, "pilot") == set()
    run.feed(GateDecided(run.now, "bob", go=True, reason="report received"))
    assert run.engine.state is CampaignState.RUNNING
    assert run.engine.current_stage == "pilot"
    assert started(run, "pilot")
    audit = [(d.kind, d.actor, d.reason) for d in run.engine.audit][-5:]
    assert audit == [
        (K.GATE_DECIDED, "bob", "NO-GO: wait for the CSP's report"),
        (K.HELD, "otad", "NO-GO by bob: wait for the CSP's report"),
        (K.GATE_DECIDED, "bob", "GO: report received"),
        (K.RESUMED, "bob", "report received"),
        (K.STAGE_STARTED, "bob", "60 targets"),
    ]


def test_category_2_limit_and_failure_rates_with_a_minimum_sample() -> None:
    thresholds = Thresholds(category2_limit=1, failed_rate=0.2, min_sample=10)
    run = run_of(policies=Policies(rate=FAST, thresholds=thresholds))
    micro = run.engine.stage_members("micro")
    run.activation_faults[micro[0]] = S.ROLLED_BACK
    run.feed(NoticePublished(T0, "x"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: at_gate(run))  # one rollback is within the limit of 1
    assert run.kinds(K.HELD) == []
    run.activation_faults.update(
        dict.fromkeys(run.engine.stage_members("pilot")[:2], S.ROLLED_BACK)
    )
    run.feed(GateDecided(run.now, "alice", go=True, reason="ok"))
    run.until(lambda: run.engine.state is CampaignState.ON_HOLD)
    assert run.kinds(K.HELD)[0].reason == "stage pilot: 2 category-2 incidents (limit 1)"

    # FAILED: 3 of 9 settled is no hold (below the sample), the 10th settled makes it 3/10 > 20%
    run = run_of(policies=Policies(rate=Rate(per_minute=6.0), thresholds=thresholds))
    micro = run.engine.stage_members("micro")
    run.distribution_faults.update(dict.fromkeys(micro[:3], S.FAILED))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.counts("micro")[S.FAILED] == 3)
    assert run.kinds(K.HELD) == []
    run.until(lambda: run.engine.state is CampaignState.ON_HOLD)
    settled = sum(n for s, n in run.engine.counts("micro").items() if s in (S.CONFIRMED, S.FAILED))
    assert settled == 10
    assert run.kinds(K.HELD)[0].reason == "stage micro: 3 of 10 settled failed (threshold 20%)"


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (S.REJECTED, "stage micro: 2 of 15 settled rejected (threshold 5%)"),
        (S.TIMED_OUT, "stage micro: 2 of 15 settled timed_out (threshold 10%)"),
    ],
)
def test_rejected_and_timed_out_rates_hold_by_their_own_thresholds(
    outcome: TargetState, reason: str
) -> None:
    deadlines = Deadlines(wan_delivery_s=600.0)
    run = run_of(policies=Policies(rate=FAST, deadlines=deadlines))
    micro = run.engine.stage_members("micro")
    for device in micro[-2:]:
        if outcome is S.TIMED_OUT:
            run.silent.add(device)
        else:
            run.distribution_faults[device] = outcome
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.ON_HOLD)
    assert [d.reason for d in run.kinds(K.HELD)] == [reason]


def test_notice_seven_days_or_expedited_with_a_second_approver() -> None:
    plan = (
        StageSpec("micro", StageKind.MICRO_PILOT, size=10),
        StageSpec("rollout", StageKind.ROLLOUT),
    )
    run = run_of(40, stages=plan)
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: at_gate(run))
    run.feed(GateDecided(run.now, "alice", go=True, reason="ok"))
    assert run.engine.state is CampaignState.AWAITING_NOTICE
    assert run.kinds(K.NOTICE_WAIT)[0].reason == "the roll-out waits for its notice to be published"
    run.advance(10 * DAY)
    assert started(run, "rollout") == set()  # no notice published: never
    notice = run.now
    run.feed(NoticePublished(notice, "dcc-ops"))
    run.advance(NOTICE_S - 60)
    assert started(run, "rollout") == set()
    run.advance(120)
    assert min(d.at for d in run.kinds(K.START_TARGET) if d.stage == "rollout") >= notice + NOTICE_S

    run = run_of(40, stages=plan)
    run.feed(NoticePublished(T0, "dcc-ops"))
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: at_gate(run))
    run.feed(ExpediteRequested(run.now, "alice", justification="  "))
    run.feed(ExpediteRequested(run.now, "alice", justification="CVE-2026-1234, actively exploited"))
    run.feed(ExpediteApproved(run.now, "alice"))
    assert [d.reason for d in run.kinds(K.REFUSED)] == [
        "an expedited roll-out needs a justification",
        "the second approver must not be the requester",
    ]
    run.feed(GateDecided(run.now, "alice", go=True, reason="ok"))
    assert run.engine.state is CampaignState.AWAITING_NOTICE
    run.feed(ExpediteApproved(run.now, "bob"))
    assert run.engine.state is CampaignState.RUNNING
    assert started(run, "rollout")
    assert run.now < T0 + DAY
    expedited = [d for d in run.engine.audit if d.kind is K.EXPEDITED]
    assert [(d.actor, d.reason) for d in expedited] == [
        ("bob", "requested by alice: CVE-2026-1234, actively exploited")
    ]


def test_a_campaign_of_one_rollout_stage_waits_for_the_notice_too() -> None:
    run = run_of(30, stages=(StageSpec("all", StageKind.ROLLOUT),))
    run.feed(CampaignStarted(T0, "alice"))
    assert run.engine.state is CampaignState.AWAITING_NOTICE
    run.advance(DAY)
    run.feed(NoticePublished(run.now, "dcc-ops"))
    run.advance(NOTICE_S - 10)
    assert run.kinds(K.START_TARGET) == []
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    assert min(d.at for d in run.kinds(K.START_TARGET)) >= T0 + DAY + NOTICE_S
    assert [d.kind for d in run.engine.audit][:3] == [
        K.NOTICE_WAIT,
        K.NOTICE_PUBLISHED,
        K.STAGE_STARTED,
    ]


def test_activations_only_inside_the_window_distribution_any_time() -> None:
    window = ActivationWindow("* 0-3 * * *")  # 00:00-03:59 Europe/London
    # 28 March 2026 12:00 UTC: the window opens at midnight GMT, spring-forward night
    start = UnixTime(dt.datetime(2026, 3, 28, 12, tzinfo=dt.UTC).timestamp())
    plan = (StageSpec("all", StageKind.ROLLOUT),)
    spec = ch_spec(
        stages=plan,
        policies=Policies(rate=Rate(per_minute=1.0), window=window),
        created_at=start,
    )
    run = Run(Engine.create(spec, make_fleet(300)), now=start)
    run.feed(NoticePublished(UnixTime(start - NOTICE_S), "x"))
    run.feed(CampaignStarted(start, "alice"))
    run.advance(36 * 3600)
    starts = run.kinds(K.START_TARGET)
    assert len(starts) == 300  # one a minute, distributed from noon, outside the window
    assert max(d.at for d in starts) < start + 301 * 60
    activations = run.kinds(K.ACTIVATE_TARGET)
    assert activations
    for activation in activations:
        assert window.is_open(activation.at)
        local = dt.datetime.fromtimestamp(activation.at, dt.UTC)
        assert (
            dt.datetime(2026, 3, 29, 0, tzinfo=dt.UTC)
            <= local
            < dt.datetime(2026, 3, 29, 3, tzinfo=dt.UTC)
        )  # 00:00 GMT to 04:00 BST: three real hours, not four
    held_before = [d for d in run.kinds(K.START_TARGET) if d.at < start + 10 * 3600]
    assert {run.engine.target_state(d.device_id) for d in held_before} == {S.CONFIRMED}


def test_rollout_rate_and_its_ramp_on_success() -> None:
    plan = (StageSpec("all", StageKind.ROLLOUT),)
    run = run_of(300, stages=plan, policies=Policies(rate=Rate(per_minute=12.0)))
    run.feed(NoticePublished(UnixTime(T0 - NOTICE_S), "x"))
    run.feed(CampaignStarted(T0, "alice"))
    for minute in range(1, 11):
        run.advance(60)
        assert len(run.kinds(K.START_TARGET)) <= 1 + 12 * minute + 2
    assert len(run.kinds(K.START_TARGET)) >= 12 * 10 - 2

    ramp = Rate(per_minute=6.0, ramp_factor=2.0, ramp_every=10, max_per_minute=48.0)
    run = run_of(1000, stages=plan, policies=Policies(rate=ramp))
    run.feed(NoticePublished(UnixTime(T0 - NOTICE_S), "x"))
    run.feed(CampaignStarted(T0, "alice"))
    run.advance(60)
    first_minute = len(run.kinds(K.START_TARGET))
    run.advance(8 * 60)
    before = len(run.kinds(K.START_TARGET))
    run.advance(60)
    late_minute = len(run.kinds(K.START_TARGET)) - before
    assert first_minute <= 8
    assert 44 <= late_minute <= 50  # ramped to its cap of 48 a minute


def test_phase_deadlines_end_targets_timed_out_distinct_from_failed() -> None:
    plan = (StageSpec("all", StageKind.PILOT),)
    deadlines = Deadlines(
        wan_delivery_s=100.0, han_transfer_s=200.0, activation_s=300.0, confirmation_s=400.0
    )
    permissive = Thresholds(failed_rate=1.0, rejected_rate=1.0, timed_out_rate=1.0)
    spec = ch_spec(
        stages=plan, policies=Policies(rate=FAST, deadlines=deadlines, thresholds=permissive)
    )
    fleet = make_fleet(20)
    run = Run(Engine.create(spec, fleet))
    ids = [h.guid for h in fleet]
    run.silent.add(ids[0])  # never delivered
    run.distribution_faults[ids[1]] = S.DELIVERED  # delivered, never held
    run.distribution_faults[ids[2]] = S.FAILED
    run.activation_faults[ids[3]] = S.ACTIVATING  # not a report: the activation unanswered
    run.activation_faults[ids[4]] = S.ACTIVATED  # activated, never proven
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    timeouts = {d.device_id: (d.reason, d.at) for d in run.kinds(K.TARGET_TIMED_OUT)}
    start = {d.device_id: d.at for d in run.kinds(K.START_TARGET)}
    assert timeouts[ids[0]][0] == "wan_delivery deadline passed"
    assert timeouts[ids[0]][1] - start[ids[0]] == pytest.approx(100.0, abs=run.tick_s)
    assert timeouts[ids[1]][0] == "han_transfer deadline passed"
    assert timeouts[ids[3]][0] == "activation deadline passed"
    assert timeouts[ids[4]][0] == "confirmation deadline passed"
    activated = {d.device_id: d.at for d in run.kinds(K.ACTIVATE_TARGET)}
    assert timeouts[ids[4]][1] - activated[ids[4]] == pytest.approx(
        run.confirm_s + 400.0, abs=run.tick_s
    )
    assert run.engine.target_state(ids[0]) is S.TIMED_OUT
    assert run.engine.target_state(ids[2]) is S.FAILED
    assert set(timeouts) == {ids[0], ids[1], ids[3], ids[4]}
    assert run.engine.counts()[S.CONFIRMED] == 15


def test_retry_is_a_child_campaign_of_exactly_the_failed_and_timed_out() -> None:
    plan = (StageSpec("all", StageKind.PILOT),)
    permissive = Thresholds(failed_rate=1.0, rejected_rate=1.0, timed_out_rate=1.0)
    spec = ch_spec(
        stages=plan,
        policies=Policies(
            rate=FAST, thresholds=permissive, deadlines=Deadlines(wan_delivery_s=100.0)
        ),
    )
    fleet = make_fleet(30)
    parent = Run(Engine.create(spec, fleet))
    ids = [h.guid for h in fleet]
    parent.distribution_faults.update({ids[1]: S.FAILED, ids[2]: S.REJECTED})
    parent.silent.add(ids[3])
    parent.feed(CampaignStarted(T0, "alice"))
    parent.until(lambda: parent.engine.state is CampaignState.COMPLETED)
    child_spec = retry_spec(parent.engine, "c1-retry-1", parent.now)
    assert child_spec.parent == "c1"
    child = Engine.create(child_spec, fleet, active=[parent.engine])
    assert set(child.stage_members("retry")) == {ids[1], ids[3]}  # REJECTED is not retried
    assert child.spec.payload == spec.payload


def test_a_bridge_campaign_waits_for_its_ch_firmware() -> None:
    fleet = [hub(i, bridge=True, fw=0x10) for i in range(12)]
    spec = ch_spec(
        "bridges",
        selection=Selection(DeviceType.B2),
        stages=(StageSpec("all", StageKind.PILOT),),
        policies=Policies(rate=FAST, dependency=Dependency(ch_fw_version=0x20)),
    )
    run = Run(Engine.create(spec, fleet))
    run.feed(CampaignStarted(T0, "alice"))
    run.advance(3600)
    assert run.kinds(K.START_TARGET) == []
    assert run.engine.status()["blocked"] == 12
    run.feed(HubVersionReported(run.now, fleet[4].guid, 0x20))
    run.advance(60)
    assert run.engine.status()["blocked"] == 11
    assert [d.guid for d in run.kinds(K.START_TARGET)] == [fleet[4].guid]
    assert run.kinds(K.START_TARGET)[0].device_id == fleet[4].han[1].device_id


def test_one_active_campaign_per_device_component() -> None:
    fleet = make_fleet(40)
    first = Engine.create(ch_spec("c1", stages=(StageSpec("all", StageKind.PILOT),)), fleet)
    with pytest.raises(CampaignRefusedError) as refused:
        Engine.create(
            ch_spec("c2", stages=(StageSpec("all", StageKind.PILOT),)), fleet, active=[first]
        )
    assert len(refused.value.reasons) == 40
    assert refused.value.reasons[0] == f"{fleet[0].guid} (firmware) belongs to active campaign c1"
    credentials = Engine.create(
        ch_spec("k1", kind=PayloadKind.CREDENTIALS, stages=(StageSpec("all", StageKind.PILOT),)),
        fleet,
        active=[first],
    )  # another component of the same devices
    assert len(credentials.stage_members("all")) == 40
    run = Run(first)
    run.feed(CampaignAborted(T0, "alice", "wrong image"))
    Engine.create(ch_spec("c3", stages=(StageSpec("all", StageKind.PILOT),)), fleet, active=[first])


def test_pause_resume_and_abort() -> None:
    plan = (StageSpec("all", StageKind.PILOT),)
    run = run_of(300, stages=plan, policies=Policies(rate=Rate(per_minute=60.0)))
    run.feed(CampaignStarted(T0, "alice"))
    run.advance(120)
    run.feed(CampaignPaused(run.now, "alice", "CSP maintenance"))
    starts, activations = len(run.kinds(K.START_TARGET)), len(run.kinds(K.ACTIVATE_TARGET))
    run.advance(3600)
    assert len(run.kinds(K.START_TARGET)) == starts
    assert len(run.kinds(K.ACTIVATE_TARGET)) == activations
    run.feed(GateDecided(run.now, "alice", go=True, reason="?"))  # not at a gate: refused
    assert run.kinds(K.REFUSED)[-1].reason == "gate decision: the campaign is paused"
    run.feed(CampaignResumed(run.now, "bob"))
    run.advance(120)
    assert len(run.kinds(K.START_TARGET)) > starts
    activated = {d.device_id for d in run.kinds(K.ACTIVATE_TARGET)}
    run.feed(CampaignAborted(run.now, "carol", "bad batch"))
    assert run.engine.state is CampaignState.ABORTED
    counts = run.engine.counts()
    assert counts[S.PENDING] == counts[S.STARTED] == counts[S.DELIVERED] == counts[S.HELD] == 0
    cancels = {d.device_id for d in run.kinds(K.CANCEL_TARGET)}
    assert cancels  # transfers in flight were stopped
    assert activated  # and some had been activated
    assert cancels.isdisjoint(activated)  # the activated are left alone
    assert {run.engine.target_state(d) for d in activated} <= {
        S.ACTIVATING,
        S.ACTIVATED,
        S.CONFIRMED,
    }
    run.advance(600)  # their reports still count; nothing new
    assert {run.engine.target_state(d) for d in activated} == {S.CONFIRMED}
    assert run.kinds(K.ABORTED)[0].actor == "carol"


def test_distribute_then_activate_waits_for_the_whole_stage() -> None:
    plan = (StageSpec("all", StageKind.PILOT),)
    run = run_of(
        60,
        stages=plan,
        kind=PayloadKind.DISTRIBUTE_THEN_ACTIVATE,
        policies=Policies(rate=Rate(per_minute=6.0)),
    )
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: bool(run.kinds(K.ACTIVATE_TARGET)))
    first = min(d.at for d in run.kinds(K.ACTIVATE_TARGET))
    assert first >= max(d.at for d in run.kinds(K.START_TARGET)) + run.deliver_s + run.hold_s
    assert len(run.kinds(K.ACTIVATE_TARGET)) == 60
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)


def test_a_credential_replacement_has_no_activation() -> None:
    plan = (StageSpec("all", StageKind.PILOT),)
    run = run_of(30, stages=plan, kind=PayloadKind.CREDENTIALS)
    run.feed(CampaignStarted(T0, "alice"))
    run.until(lambda: run.engine.state is CampaignState.COMPLETED)
    assert run.kinds(K.ACTIVATE_TARGET) == []
    assert run.engine.counts()[S.CONFIRMED] == 30


def test_a_micro_pilot_has_10_to_20_targets() -> None:
    with pytest.raises(ValueError, match="10-20"):
        ch_spec(stages=(StageSpec("m", StageKind.MICRO_PILOT, size=50),))
