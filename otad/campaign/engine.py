"""The campaign engine: state, an input and the time in; decisions out (sans-IO).

One :class:`Engine` runs one campaign. The shell (otad's daemon) feeds it every input as a frozen
dataclass (:data:`Input`: past-tense names, each dated with its wall-clock ``at``) through
:meth:`Engine.handle`, which returns the :data:`Decision`\\ s to carry out: start a target's
distribution, issue an activation, cancel, and the campaign-level events to publish (stage
started, gate opened, gate decided, held, resumed, completed...). Nothing here reads a clock,
arms a timer, touches the store or MQTT; the shell sends :class:`Ticked` every evaluation period
(a few seconds). A report (:class:`TargetReported`, :class:`HubVersionReported`) only records
what happened to its target, in O(1); the evaluation -- deadlines, hold thresholds, pacing, the
window, stage settlement, notice and soak -- runs on each tick and each operator command, in
O(targets of the started stages). So a crossing holds the campaign within one evaluation tick,
and nothing is started or activated between the report that crossed it and the hold (starts and
activations, too, are only decided when the engine evaluates).

Time. Every duration here spans days and restarts (soak times, the 7-day notice, phase deadlines
of hours), so it is measured on the wall clock (:data:`~protocol.clock.UnixTime`): a monotonic
clock starts again at each boot. The engine never lets its time go backwards (``now`` is the
latest ``at`` seen), so a wall clock stepped back by NTP delays a deadline but never repeats or
reorders a decision.

States of the campaign (the edges are :data:`TRANSITIONS`; :meth:`Engine._enter` refuses any
other)::

    CREATED --started--> RUNNING (a stage's targets paced in) --stage settled, last--> COMPLETED
                          |   ^  \\--stage settled--> AWAITING_GATE --GO--> RUNNING (next stage)
                          |   |                          |   \\--GO, roll-out before notice-->
                          |   |                          |     AWAITING_NOTICE --7 days--> RUNNING
              paused/     |   +----- GO (recorded) ----- ON_HOLD <-- threshold crossed, or NO-GO
              resumed     v                                 (from RUNNING, a gate, notice, PAUSED)
                        PAUSED            any state but COMPLETED --aborted--> ABORTED

A roll-out stage never starts less than 7 days after the notice (unless expedited): a campaign
whose first stage is a roll-out goes from CREATED to AWAITING_NOTICE when started.

States of one target (:class:`TargetState`, edges :data:`TARGET_TRANSITIONS`): they only move
forward; a report that is not an edge from where the target stands (a duplicate, a replay, a
report overtaken by a later one) changes nothing::

    PENDING --start--> STARTED --WAN delivered--> DELIVERED --HAN transfer--> HELD --activate-->
    ACTIVATING --success--> ACTIVATED --proof--> CONFIRMED --lost (category 1)--> LOST
      any phase before ACTIVATING --aborted--> CANCELLED; a phase's deadline --> TIMED_OUT;
      FAILED / REJECTED by outcome; ACTIVATING/ACTIVATED --rolled back (category 2)--> ROLLED_BACK

A CH image skips DELIVERED (the CH is the device: STARTED -> HELD); a credential replacement has
no activation (STARTED or DELIVERED -> CONFIRMED; an image is confirmed only after its
activation). Every count (:meth:`Engine.counts`) is derived from the
targets' states; none is kept beside them.

Restart. :meth:`Engine.to_data` is the whole state as JSON-able data and :meth:`Engine.from_data`
its inverse. The shell journals each input before handing it over and snapshots the engine
after; ``inputs_applied`` says how many journal entries a snapshot includes, and
:meth:`Engine.replay` applies the rest. Decisions are a function of (state, input), so the
replay gives exactly the decisions the lost run gave for those inputs, and each decision's
``seq`` (the journal index of its input) lets the executors drop the ones already carried out:
no gate decision, hold or activation is lost or made twice.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from otad.campaign import codec
from otad.campaign.spec import (
    NOTICE_S,
    CampaignSpec,
    PayloadKind,
    StageKind,
    StageSpec,
    Thresholds,
)
from otad.campaign.targets import Exclusion, Fleet, Target, assign_stages, select
from protocol.clock import UnixTime, later
from protocol.transitions import checked

_EPOCH: Final = UnixTime(0.0)
#: The actor recorded for a decision the engine takes itself (an automatic GO, a hold).
ENGINE_ACTOR: Final = "otad"


class CampaignState(enum.StrEnum):
    """Where a campaign stands (see the module docstring)."""

    CREATED = "created"
    RUNNING = "running"
    AWAITING_GATE = "awaiting_gate"
    AWAITING_NOTICE = "awaiting_notice"
    ON_HOLD = "on_hold"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


_C = CampaignState
TRANSITIONS: Final[dict[CampaignState, frozenset[CampaignState]]] = {
    _C.CREATED: frozenset({_C.RUNNING, _C.AWAITING_NOTICE, _C.ABORTED}),
    _C.RUNNING: frozenset({_C.AWAITING_GATE, _C.COMPLETED, _C.ON_HOLD, _C.PAUSED, _C.ABORTED}),
    _C.AWAITING_GATE: frozenset({_C.RUNNING, _C.AWAITING_NOTICE, _C.ON_HOLD, _C.ABORTED}),
    _C.AWAITING_NOTICE: frozenset({_C.RUNNING, _C.ON_HOLD, _C.PAUSED, _C.ABORTED}),
    _C.ON_HOLD: frozenset({_C.RUNNING, _C.AWAITING_NOTICE, _C.ABORTED}),
    _C.PAUSED: frozenset({_C.RUNNING, _C.AWAITING_NOTICE, _C.ON_HOLD, _C.ABORTED}),
    _C.COMPLETED: frozenset(),
    _C.ABORTED: frozenset(),
}
#: States in which a campaign holds its targets' components (one active campaign each).
ACTIVE: Final = frozenset(TRANSITIONS) - {_C.COMPLETED, _C.ABORTED}


class TargetState(enum.StrEnum):
    """Where one target stands (see the module docstring)."""

    PENDING = "pending"
    STARTED = "started"  # its distribution was started (the WAN transfer runs)
    DELIVERED = "delivered"  # its CH holds the image (WAN delivery done)
    HELD = "held"  # the device holds the image (HAN transfer done)
    ACTIVATING = "activating"  # an activation was issued
    ACTIVATED = "activated"  # the device said success; no proof yet
    CONFIRMED = "confirmed"  # proven to run it (or the credentials replaced)
    FAILED = "failed"
    REJECTED = "rejected"  # the CH or device refused it (wrong type, hardware, sequence...)
    TIMED_OUT = "timed_out"  # a phase's deadline passed
    ROLLED_BACK = "rolled_back"  # failed activation with rollback: a category-2 incident
    LOST = "lost"  # device or CH lost after activation: a category-1 incident
    CANCELLED = "cancelled"  # aborted before it activated


_T = TargetState
_OUTCOMES: Final = frozenset({_T.FAILED, _T.REJECTED, _T.TIMED_OUT})
TARGET_TRANSITIONS: Final[dict[TargetState, frozenset[TargetState]]] = {
    _T.PENDING: frozenset({_T.STARTED, _T.CANCELLED}),
    _T.STARTED: frozenset({_T.DELIVERED, _T.HELD, _T.CONFIRMED, _T.CANCELLED} | _OUTCOMES),
    _T.DELIVERED: frozenset({_T.HELD, _T.CONFIRMED, _T.CANCELLED} | _OUTCOMES),
    _T.HELD: frozenset({_T.ACTIVATING, _T.CANCELLED, _T.FAILED}),
    _T.ACTIVATING: frozenset({_T.ACTIVATED, _T.CONFIRMED, _T.ROLLED_BACK} | _OUTCOMES),
    _T.ACTIVATED: frozenset({_T.CONFIRMED, _T.ROLLED_BACK, _T.LOST, _T.FAILED, _T.TIMED_OUT}),
    _T.CONFIRMED: frozenset({_T.LOST}),
    _T.FAILED: frozenset(),
    _T.REJECTED: frozenset(),
    _T.TIMED_OUT: frozenset(),
    _T.ROLLED_BACK: frozenset(),
    _T.LOST: frozenset(),
    _T.CANCELLED: frozenset(),
}
#: States a target rests in: its stage waits for no more of it.
SETTLED: Final = frozenset(
    {_T.CONFIRMED}
    | set(TARGET_TRANSITIONS)
    - {_T.PENDING, _T.STARTED, _T.DELIVERED, _T.HELD, _T.ACTIVATING, _T.ACTIVATED}
)
#: The states a device report may move a target to (the others are the engine's own, but
#: ACTIVATING: the shell re-deriving a target after a restart reports an activation it finds
#: issued in the durable records).
REPORTABLE: Final = frozenset(
    {
        _T.DELIVERED,
        _T.HELD,
        _T.ACTIVATING,
        _T.ACTIVATED,
        _T.CONFIRMED,
        _T.FAILED,
        _T.REJECTED,
        _T.TIMED_OUT,
        _T.ROLLED_BACK,
        _T.LOST,
    }
)
#: The states of a failed target (failures by reason are counted over them).
FAILURES: Final = frozenset(
    {_T.FAILED, _T.REJECTED, _T.TIMED_OUT, _T.ROLLED_BACK, _T.LOST, _T.CANCELLED}
)
#: Which deadline of :class:`~otad.campaign.spec.Deadlines` runs in which state.
_PHASE_DEADLINE: Final = {
    _T.STARTED: "wan_delivery_s",
    _T.DELIVERED: "han_transfer_s",
    _T.ACTIVATING: "activation_s",
    _T.ACTIVATED: "confirmation_s",
}


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CampaignStarted:
    """An operator started the campaign (its first stage begins)."""

    at: UnixTime
    actor: str


@dataclass(frozen=True, slots=True)
class NoticePublished:
    """The roll-out notice was published to the parties (the 7 days run from ``at``)."""

    at: UnixTime
    actor: str


@dataclass(frozen=True, slots=True)
class ExpediteRequested:
    """An operator asks to waive the notice for an urgent security fix, with why."""

    at: UnixTime
    actor: str
    justification: str


@dataclass(frozen=True, slots=True)
class ExpediteApproved:
    """A second approver (not the requester) agreed to waive the notice."""

    at: UnixTime
    actor: str


@dataclass(frozen=True, slots=True)
class GateDecided:
    """A go/no-go decision: at a gate (GO starts the next stage) or on hold (GO resumes)."""

    at: UnixTime
    actor: str
    go: bool
    reason: str


@dataclass(frozen=True, slots=True)
class CampaignPaused:
    """An operator paused the campaign: nothing more is started or activated."""

    at: UnixTime
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class CampaignResumed:
    """An operator resumed a paused campaign (a hold needs a GO instead)."""

    at: UnixTime
    actor: str


@dataclass(frozen=True, slots=True)
class CampaignAborted:
    """An operator aborted: what has not activated is cancelled, the activated are left alone."""

    at: UnixTime
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class TargetReported:
    """What the executors learnt of one target: a state of :data:`REPORTABLE`, and why."""

    at: UnixTime
    device_id: str
    state: TargetState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HubVersionReported:
    """A CH announced the firmware version it runs (for dependencies)."""

    at: UnixTime
    guid: str
    fw_version: int


@dataclass(frozen=True, slots=True)
class HubPresenceReported:
    """A CH went offline or came back (an activated target whose CH stays offline for
    ``lost_after_s`` is LOST: a category-1 incident)."""

    at: UnixTime
    guid: str
    online: bool


@dataclass(frozen=True, slots=True)
class Ticked:
    """The evaluation tick: time passed (deadlines, pacing, windows, notice, soak)."""

    at: UnixTime


Input = (
    CampaignStarted
    | NoticePublished
    | ExpediteRequested
    | ExpediteApproved
    | GateDecided
    | CampaignPaused
    | CampaignResumed
    | CampaignAborted
    | TargetReported
    | HubVersionReported
    | HubPresenceReported
    | Ticked
)
_INPUTS: Final[dict[str, type[Any]]] = {
    cls.__name__: cls
    for cls in (
        CampaignStarted,
        NoticePublished,
        ExpediteRequested,
        ExpediteApproved,
        GateDecided,
        CampaignPaused,
        CampaignResumed,
        CampaignAborted,
        TargetReported,
        HubVersionReported,
        HubPresenceReported,
        Ticked,
    )
}


def input_to_data(item: Input) -> dict[str, Any]:
    """An input as a journal entry (plain data)."""
    return {"type": type(item).__name__, **codec.to_data(item)}


def input_from_data(data: dict[str, Any]) -> Input:
    """The input of a journal entry."""
    body = dict(data)
    cls = _INPUTS[body.pop("type")]
    result: Input = codec.from_data(cls, body)
    return result


# --- decisions ----------------------------------------------------------------------------


class DecisionKind(enum.StrEnum):
    """What a :class:`Decision` asks the shell to do or to publish."""

    START_TARGET = "start_target"  # start distributing to the target
    ACTIVATE_TARGET = "activate_target"  # issue the target's activation
    CANCEL_TARGET = "cancel_target"  # stop what runs for it (abort)
    TARGET_TIMED_OUT = "target_timed_out"  # a phase deadline passed (stop its transfer)
    STAGE_STARTED = "stage_started"
    GATE_OPENED = "gate_opened"  # a stage settled: a go/no-go decision is awaited
    GATE_DECIDED = "gate_decided"
    NOTICE_PUBLISHED = "notice_published"
    NOTICE_WAIT = "notice_wait"  # a roll-out stage waits for the notice to run out
    EXPEDITE_REQUESTED = "expedite_requested"  # a first approver asked to waive the notice
    HELD = "held"
    RESUMED = "resumed"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    EXPEDITED = "expedited"  # the notice was waived (two approvers)
    REFUSED = "refused"  # an operator input could not be applied (reason says why)


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing the engine decided, from the input at journal index ``seq``.

    ``device_id``/``guid`` name the target of a target decision; ``stage`` the stage;
    ``actor`` and ``reason`` who decided and why (the audit trail is the list of these)."""

    kind: DecisionKind
    campaign_id: str
    seq: int
    at: UnixTime
    stage: str = ""
    device_id: str = ""
    guid: str = ""
    actor: str = ""
    reason: str = ""


_AUDITED: Final = frozenset(
    {
        DecisionKind.STAGE_STARTED,
        DecisionKind.GATE_DECIDED,
        DecisionKind.HELD,
        DecisionKind.RESUMED,
        DecisionKind.PAUSED,
        DecisionKind.COMPLETED,
        DecisionKind.ABORTED,
        DecisionKind.EXPEDITED,
        DecisionKind.NOTICE_WAIT,
        DecisionKind.NOTICE_PUBLISHED,
        DecisionKind.EXPEDITE_REQUESTED,
        DecisionKind.REFUSED,
    }
)


# --- state --------------------------------------------------------------------------------


@dataclass(slots=True)
class TargetRecord:
    """One target's state in the campaign."""

    target: Target
    stage: int
    state: TargetState = TargetState.PENDING
    ch_fw_version: int = 0
    deadline: UnixTime | None = None
    reason: str = ""
    updated_at: UnixTime = _EPOCH
    offline_since: UnixTime | None = None  # its CH's, while offline


@dataclass(slots=True)
class StageRecord:
    """One stage: its members (device ids) and when it started and settled."""

    name: str
    kind: StageKind
    members: tuple[str, ...]
    started_at: UnixTime | None = None
    settled_at: UnixTime | None = None
    gate: str = ""  # "go", "no_go" (the last decision), or ""


@dataclass(slots=True)
class State:
    """All an engine knows: what :meth:`Engine.to_data` writes."""

    spec: CampaignSpec
    stages: list[StageRecord]
    targets: dict[str, TargetRecord]
    exclusions: tuple[Exclusion, ...] = ()
    state: CampaignState = CampaignState.CREATED
    stage: int = 0  # the current stage
    waiting_stage: int = 0  # the roll-out stage AWAITING_NOTICE starts
    now: UnixTime = _EPOCH
    inputs_applied: int = 0
    notice_at: UnixTime | None = None
    expedite_requested_by: str = ""
    expedite_justification: str = ""
    expedite_approved_by: str = ""
    resume_to: CampaignState | None = None
    tokens: float = 0.0
    rate_per_minute: float = 0.0
    ramps: int = 0
    paced_at: UnixTime | None = None
    #: Incident and outcome counts a GO accepted, per stage and kind: only more hold again.
    accepted: dict[str, int] = field(default_factory=dict)
    audit: list[Decision] = field(default_factory=list)
    last_change_at: UnixTime = _EPOCH  # a target last changed state


class CampaignRefusedError(Exception):
    """A campaign cannot be created: ``reasons`` says why (one line per conflict)."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = tuple(reasons)


class Engine:
    """One campaign's engine (see the module docstring)."""

    def __init__(self, state: State) -> None:
        self._s = state
        self._out: list[Decision] = []
        self._seq = 0
        self._by_guid: dict[str, list[TargetRecord]] = {}
        for record in state.targets.values():
            self._by_guid.setdefault(record.target.guid, []).append(record)

    # --- construction and persistence ---

    @classmethod
    def create(cls, spec: CampaignSpec, fleet: Fleet, active: Iterable[Engine] = ()) -> Engine:
        """A new campaign of ``spec`` over ``fleet``: targets selected and spread over the stage
        plan. Raise :class:`CampaignRefusedError` if a target's component already belongs to an
        ``active`` campaign (one active campaign per device component)."""
        targets, exclusions = select(spec.selection, fleet)
        component = spec.payload.component
        held: dict[tuple[str, str], str] = {}
        for other in active:
            for key in other.claims():
                held[key] = other.campaign_id
        conflicts = [
            f"{t.device_id} ({component.value}) belongs to active campaign {held[t.key(component)]}"
            for t in targets
            if t.key(component) in held
        ]
        if conflicts:
            raise CampaignRefusedError(conflicts)
        staged = assign_stages(targets, spec.stages, spec.seed, spec.campaign_id)
        stages = [
            StageRecord(s.name, s.kind, tuple(t.device_id for t in members))
            for s, members in zip(spec.stages, staged, strict=True)
        ]
        records = {
            t.device_id: TargetRecord(t, i, ch_fw_version=t.ch_fw_version)
            for i, members in enumerate(staged)
            for t in members
        }
        return cls(
            State(
                spec,
                stages,
                records,
                tuple(exclusions),
                now=spec.created_at,
                rate_per_minute=spec.policies.rate.per_minute,
            )
        )

    def to_data(self) -> dict[str, Any]:
        """The engine's whole state as JSON-able data."""
        data: dict[str, Any] = codec.to_data(self._s)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Engine:
        """The engine :meth:`to_data` saved."""
        return cls(codec.from_data(State, data))

    def replay(self, journal: Sequence[Input]) -> list[Decision]:
        """Apply the journal's entries this state does not include yet (from
        ``inputs_applied``); return their decisions."""
        out: list[Decision] = []
        for item in journal[self._s.inputs_applied :]:
            out.extend(self.handle(item))
        return out

    # --- views ---

    @property
    def campaign_id(self) -> str:
        """The campaign's id."""
        return self._s.spec.campaign_id

    @property
    def state(self) -> CampaignState:
        """Where the campaign stands."""
        return self._s.state

    @property
    def spec(self) -> CampaignSpec:
        """The campaign as created."""
        return self._s.spec

    @property
    def current_stage(self) -> str:
        """The name of the stage running, awaiting its gate, or last run."""
        return self._s.stages[self._s.stage].name

    @property
    def exclusions(self) -> tuple[Exclusion, ...]:
        """The fleet's premises and devices left out, with the reason."""
        return self._s.exclusions

    @property
    def audit(self) -> tuple[Decision, ...]:
        """The audit trail: who decided what, when, why (stages, gates, holds, refusals...)."""
        return tuple(self._s.audit)

    def target_state(self, device_id: str) -> TargetState:
        """Where one target stands."""
        return self._s.targets[device_id].state

    def stage_members(self, stage: str) -> tuple[str, ...]:
        """The device ids of one stage."""
        return next(s.members for s in self._s.stages if s.name == stage)

    def counts(self, stage: str | None = None) -> Counter[TargetState]:
        """Targets by state (of one stage, or all): derived from the targets, never stored."""
        records: Iterable[TargetRecord] = self._s.targets.values()
        if stage is not None:
            members = self.stage_members(stage)
            records = (self._s.targets[m] for m in members)
        return Counter(r.state for r in records)

    def status(self) -> dict[str, Any]:
        """What an operator is shown (JSON-able): the campaign's state and, per stage, its size,
        when it started and settled, its gate and its targets by state (all derived)."""
        s = self._s
        return {
            "campaign_id": s.spec.campaign_id,
            "parent": s.spec.parent,
            "state": s.state.value,
            "stage": self.current_stage,
            "stages": [
                {
                    "name": stage.name,
                    "kind": stage.kind.value,
                    "targets": len(stage.members),
                    "started_at": stage.started_at,
                    "settled_at": stage.settled_at,
                    "gate": stage.gate,
                    "counts": {k.value: n for k, n in sorted(self.counts(stage.name).items())},
                }
                for stage in s.stages
            ],
            "counts": {k.value: n for k, n in sorted(self.counts().items())},
            "failures": dict(
                sorted(
                    Counter(
                        r.reason or r.state.value for r in s.targets.values() if r.state in FAILURES
                    ).items()
                )
            ),
            "targets": len(s.targets),
            "excluded": len(s.exclusions),
            "blocked": len(self.blocked()),
            "rate_per_minute": s.rate_per_minute,
            "last_change_at": s.last_change_at,
            "notice_at": s.notice_at,
            "rollout_not_before": None if s.notice_at is None else s.notice_at + NOTICE_S,
            "expedited": bool(s.expedite_approved_by),
            "hold_reason": self.hold_reason,
        }

    @property
    def hold_reason(self) -> str:
        """Why the campaign is ON_HOLD (the hold's recorded reason), else ""."""
        if self._s.state is not _C.ON_HOLD:
            return ""
        for decision in reversed(self._s.audit):
            if decision.kind is DecisionKind.HELD:
                return decision.reason
        return ""

    def blocked(self) -> frozenset[str]:
        """PENDING targets that wait for their CH's firmware (the campaign's dependency)."""
        dependency = self._s.spec.policies.dependency
        if dependency is None:
            return frozenset()
        return frozenset(
            d
            for d, r in self._s.targets.items()
            if r.state is _T.PENDING and r.ch_fw_version < dependency.ch_fw_version
        )

    @property
    def target_count(self) -> int:
        """How many targets the campaign has."""
        return len(self._s.targets)

    def target(self, device_id: str) -> Target:
        """One target (KeyError if it is none of this campaign's)."""
        return self._s.targets[device_id].target

    def target_devices(self) -> list[tuple[str, str]]:
        """Every target as (device id, premises GUID)."""
        return [(d, r.target.guid) for d, r in self._s.targets.items()]

    @property
    def unsettled_states(self) -> frozenset[TargetState]:
        """The states of a target its stage still waits for."""
        return frozenset(TargetState) - self.settled_states

    def claims(self) -> set[tuple[str, str]]:
        """The (device, component) keys this campaign holds: its unsettled targets while it is
        active."""
        if self._s.state not in ACTIVE:
            return set()
        component = self._s.spec.payload.component
        done = self.settled_states
        return {r.target.key(component) for r in self._s.targets.values() if r.state not in done}

    def retry_targets(self) -> frozenset[str]:
        """The targets a retry campaign takes: those FAILED or TIMED_OUT."""
        return frozenset(
            d for d, r in self._s.targets.items() if r.state in (_T.FAILED, _T.TIMED_OUT)
        )

    # --- the one entry ---

    def handle(self, item: Input) -> list[Decision]:
        """Apply one input; return the decisions it led to (see the module docstring)."""
        s = self._s
        self._seq = s.inputs_applied
        s.inputs_applied += 1
        s.now = max(s.now, item.at)
        self._out = []
        self._apply(item)
        if not isinstance(item, (TargetReported, HubVersionReported, HubPresenceReported)):
            self._evaluate()
        out, self._out = self._out, []
        return out

    # --- inputs ---

    def _apply(self, item: Input) -> None:
        s = self._s
        match item:
            case CampaignStarted(actor=actor):
                if s.state is not _C.CREATED:
                    self._refuse(actor, f"start: the campaign is {s.state.value}")
                    return
                self._begin(0, actor)
            case NoticePublished(at=at, actor=actor):
                if s.notice_at is not None:
                    self._refuse(actor, "notice already published")
                    return
                s.notice_at = at
                self._emit(DecisionKind.NOTICE_PUBLISHED, actor=actor, reason=self._notice_reason())
            case ExpediteRequested(actor=actor, justification=why):
                if not why.strip():
                    self._refuse(actor, "an expedited roll-out needs a justification")
                    return
                s.expedite_requested_by, s.expedite_justification = actor, why
                s.expedite_approved_by = ""
                self._emit(DecisionKind.EXPEDITE_REQUESTED, actor=actor, reason=why)
            case ExpediteApproved(actor=actor):
                if not s.expedite_requested_by:
                    self._refuse(actor, "no expedite request to approve")
                elif actor == s.expedite_requested_by:
                    self._refuse(actor, "the second approver must not be the requester")
                else:
                    s.expedite_approved_by = actor
                    self._emit(
                        DecisionKind.EXPEDITED,
                        actor=actor,
                        reason=f"requested by {s.expedite_requested_by}:"
                        f" {s.expedite_justification}",
                    )
            case GateDecided():
                self._gate(item)
            case CampaignPaused(actor=actor, reason=why):
                if s.state not in (_C.RUNNING, _C.AWAITING_NOTICE):
                    self._refuse(actor, f"pause: the campaign is {s.state.value}")
                    return
                s.resume_to = s.state
                self._enter(_C.PAUSED)
                self._emit(DecisionKind.PAUSED, actor=actor, reason=why)
            case CampaignResumed(actor=actor):
                if s.state is not _C.PAUSED or s.resume_to is None:
                    self._refuse(actor, f"resume: the campaign is {s.state.value}")
                    return
                self._enter(s.resume_to)
                s.resume_to = None
                self._emit(DecisionKind.RESUMED, actor=actor, reason="resumed from pause")
            case CampaignAborted(actor=actor, reason=why):
                if s.state not in ACTIVE:
                    self._refuse(actor, f"abort: the campaign is {s.state.value}")
                    return
                self._abort(actor, why)
            case TargetReported(device_id=device_id, state=new, reason=why):
                record = s.targets.get(device_id)
                if record is None or new not in REPORTABLE:
                    return
                if new is _T.ACTIVATING and not s.spec.payload.activates:
                    return  # an operator's own activation of a distributed image
                if (
                    new is _T.CONFIRMED
                    and s.spec.payload.activates
                    and record.state not in (_T.ACTIVATING, _T.ACTIVATED)
                ):
                    return  # an image is confirmed only after its activation
                self._move(record, new, why)
            case HubVersionReported(guid=guid, fw_version=version):
                for record in self._at(guid):
                    record.ch_fw_version = version
            case HubPresenceReported(at=at, guid=guid, online=online):
                for record in self._at(guid):
                    record.offline_since = None if online else (record.offline_since or at)
            case Ticked():
                pass

    def _gate(self, item: GateDecided) -> None:
        s = self._s
        if s.state not in (_C.AWAITING_GATE, _C.ON_HOLD):
            self._refuse(item.actor, f"gate decision: the campaign is {s.state.value}")
            return
        stage = s.stages[s.stage]
        stage.gate = "go" if item.go else "no_go"
        self._emit(
            DecisionKind.GATE_DECIDED,
            stage=stage.name,
            actor=item.actor,
            reason=("GO: " if item.go else "NO-GO: ") + item.reason,
        )
        if not item.go:
            if s.state is not _C.ON_HOLD:
                self._hold(f"NO-GO by {item.actor}: {item.reason}")
            return
        self._accept_incidents()
        if s.state is _C.ON_HOLD:
            self._emit(DecisionKind.RESUMED, stage=stage.name, actor=item.actor, reason=item.reason)
        self._go(item.actor)

    def _go(self, actor: str) -> None:
        """After a GO: the next stage if this one has settled, else carry on with this one."""
        s = self._s
        if not self._settled(s.stage) or s.stage + 1 >= len(s.stages):
            self._enter(_C.RUNNING)
            return
        self._begin(s.stage + 1, actor)

    def _begin(self, index: int, actor: str) -> None:
        """Start stage ``index``, or wait for the notice if it is a roll-out stage."""
        s = self._s
        if s.stages[index].kind is StageKind.ROLLOUT and not self._notice_over():
            s.waiting_stage = index
            self._enter(_C.AWAITING_NOTICE)
            self._emit(
                DecisionKind.NOTICE_WAIT,
                stage=s.stages[index].name,
                actor=actor,
                reason=self._notice_reason(),
            )
            return
        self._enter(_C.RUNNING)
        self._start_stage(index, actor)

    # --- evaluation (after every input) ---

    def _evaluate(self) -> None:
        s = self._s
        if s.state not in ACTIVE or s.state is _C.CREATED:
            return
        self._deadlines()
        self._thresholds()
        if s.state is _C.AWAITING_NOTICE and self._notice_over():
            self._enter(_C.RUNNING)
            self._start_stage(s.waiting_stage, ENGINE_ACTOR)
        if s.state is _C.RUNNING:
            self._pace()
            self._activate()
            if self._settled(s.stage):
                s.stages[s.stage].settled_at = s.now
                if s.stage + 1 >= len(s.stages):
                    self._enter(_C.COMPLETED)
                    self._emit(
                        DecisionKind.COMPLETED,
                        stage=s.stages[s.stage].name,
                        actor=ENGINE_ACTOR,
                        reason="every stage settled",
                    )
                    return
                self._enter(_C.AWAITING_GATE)
                self._emit(DecisionKind.GATE_OPENED, stage=s.stages[s.stage].name)
        if s.state is _C.AWAITING_GATE:
            self._auto_gate()

    def _deadlines(self) -> None:
        lost_after = self._s.spec.policies.lost_after_s
        for record in self._s.targets.values():
            if (
                record.offline_since is not None
                and record.state in (_T.ACTIVATED, _T.CONFIRMED)
                and self._s.now >= later(record.offline_since, lost_after)
            ):
                self._move(
                    record, _T.LOST, f"its CH offline for {lost_after:.0f} s after activation"
                )
                continue
            if record.deadline is not None and self._s.now >= record.deadline:
                phase = _PHASE_DEADLINE[record.state].removesuffix("_s")
                self._move(record, _T.TIMED_OUT, f"{phase} deadline passed")
                self._emit(
                    DecisionKind.TARGET_TIMED_OUT,
                    stage=self._stage_name(record),
                    device_id=record.target.device_id,
                    guid=record.target.guid,
                    reason=record.reason,
                )

    def _thresholds(self) -> None:
        s = self._s
        if s.state in (_C.ON_HOLD,):
            return
        for index in range(s.stage + 1):
            if s.stages[index].started_at is None:
                continue
            crossed = self._crossing(index)
            if crossed:
                self._hold(crossed)
                return

    def _crossing(self, index: int) -> str:
        """Why stage ``index`` crossed a threshold (not accepted by a GO yet), or ""."""
        s = self._s
        limits: Thresholds = s.spec.policies.thresholds
        stage = s.stages[index]
        counts = Counter(s.targets[m].state for m in stage.members)
        done = self.settled_states
        settled = sum(n for state, n in counts.items() if state in done)
        checks: list[tuple[str, int, bool, str]] = [
            (
                "category1",
                counts[_T.LOST],
                counts[_T.LOST] > limits.category1_limit,
                f"{counts[_T.LOST]} category-1 incidents (limit {limits.category1_limit})",
            ),
            (
                "category2",
                counts[_T.ROLLED_BACK],
                counts[_T.ROLLED_BACK] > limits.category2_limit,
                f"{counts[_T.ROLLED_BACK]} category-2 incidents (limit {limits.category2_limit})",
            ),
        ]
        for outcome, rate in (
            (_T.FAILED, limits.failed_rate),
            (_T.REJECTED, limits.rejected_rate),
            (_T.TIMED_OUT, limits.timed_out_rate),
        ):
            n = counts[outcome]
            over = settled >= limits.min_sample and n > rate * settled
            checks.append(
                (
                    outcome.value,
                    n,
                    over,
                    f"{n} of {settled} settled {outcome.value} (threshold {rate:.0%})",
                )
            )
        for kind, n, over, why in checks:
            if over and n > s.accepted.get(f"{stage.name}:{kind}", 0):
                return f"stage {stage.name}: {why}"
        return ""

    def _accept_incidents(self) -> None:
        """A GO accepts every incident and outcome counted so far."""
        s = self._s
        for stage in s.stages:
            counts = Counter(s.targets[m].state for m in stage.members)
            for kind, state in (
                ("category1", _T.LOST),
                ("category2", _T.ROLLED_BACK),
                ("failed", _T.FAILED),
                ("rejected", _T.REJECTED),
                ("timed_out", _T.TIMED_OUT),
            ):
                s.accepted[f"{stage.name}:{kind}"] = counts[state]

    def _hold(self, reason: str) -> None:
        self._enter(_C.ON_HOLD)
        self._s.resume_to = None
        self._emit(DecisionKind.HELD, stage=self.current_stage, actor=ENGINE_ACTOR, reason=reason)

    def _pace(self) -> None:
        """Start pending targets of the running stage at the rollout rate (a token bucket)."""
        s = self._s
        policies = s.spec.policies
        rate = policies.rate
        while (
            rate.ramp_every
            and rate.ramp_factor > 1
            and self.counts()[_T.CONFIRMED] >= (s.ramps + 1) * rate.ramp_every
        ):
            s.ramps += 1
            s.rate_per_minute = min(rate.max_per_minute, s.rate_per_minute * rate.ramp_factor)
        burst = max(1.0, s.rate_per_minute / 6)  # ten seconds' worth
        if s.rate_per_minute <= 0:  # no pacing
            s.tokens = burst = float(len(s.stages[s.stage].members))
        elif s.paced_at is not None:
            s.tokens = min(burst, s.tokens + (s.now - s.paced_at) * s.rate_per_minute / 60)
        s.paced_at = s.now
        blocked = self.blocked()
        for device_id in s.stages[s.stage].members:
            if s.tokens < 1:
                break
            record = s.targets[device_id]
            if record.state is not _T.PENDING or device_id in blocked:
                continue
            s.tokens -= 1
            self._move(record, _T.STARTED, "")
            self._emit(
                DecisionKind.START_TARGET,
                stage=self._stage_name(record),
                device_id=device_id,
                guid=record.target.guid,
            )

    def _activate(self) -> None:
        s = self._s
        payload = s.spec.payload
        if not payload.activates or not s.spec.policies.window.is_open(s.now):
            return
        members = [s.targets[m] for m in s.stages[s.stage].members]
        if payload.kind is PayloadKind.DISTRIBUTE_THEN_ACTIVATE and any(
            r.state in (_T.PENDING, _T.STARTED, _T.DELIVERED) for r in members
        ):
            return  # the whole stage is distributed before any activation
        for record in members:
            if record.state is _T.HELD:
                self._move(record, _T.ACTIVATING, "")
                self._emit(
                    DecisionKind.ACTIVATE_TARGET,
                    stage=self._stage_name(record),
                    device_id=record.target.device_id,
                    guid=record.target.guid,
                )

    def _auto_gate(self) -> None:
        s = self._s
        soak = s.spec.policies.auto_gate_soak_s
        settled_at = s.stages[s.stage].settled_at
        if soak is None or settled_at is None or s.now < later(settled_at, soak):
            return
        stage = s.stages[s.stage]
        stage.gate = "go"
        self._emit(
            DecisionKind.GATE_DECIDED,
            stage=stage.name,
            actor=ENGINE_ACTOR,
            reason=f"GO: automatic, thresholds held for a soak of {soak:.0f} s",
        )
        self._accept_incidents()
        self._go(ENGINE_ACTOR)
        if s.state is _C.RUNNING:
            self._evaluate()

    # --- helpers ---

    def _start_stage(self, index: int, actor: str) -> None:
        s = self._s
        s.stage = index
        stage = s.stages[index]
        stage.started_at = s.now
        s.paced_at = s.now
        s.tokens = 1.0  # the first target starts at once
        self._emit(
            DecisionKind.STAGE_STARTED,
            stage=stage.name,
            actor=actor,
            reason=f"{len(stage.members)} targets",
        )

    def _abort(self, actor: str, reason: str) -> None:
        s = self._s
        for record in s.targets.values():
            if _T.CANCELLED in TARGET_TRANSITIONS[record.state]:
                was_running = record.state is not _T.PENDING
                self._move(record, _T.CANCELLED, f"aborted by {actor}")
                if was_running:
                    self._emit(
                        DecisionKind.CANCEL_TARGET,
                        stage=self._stage_name(record),
                        device_id=record.target.device_id,
                        guid=record.target.guid,
                        reason=record.reason,
                    )
        self._enter(_C.ABORTED)
        self._emit(DecisionKind.ABORTED, stage=self.current_stage, actor=actor, reason=reason)

    def _move(self, record: TargetRecord, new: TargetState, reason: str) -> None:
        """Move a target along an edge; anything else (a duplicate, a replay) is ignored."""
        if new not in TARGET_TRANSITIONS[record.state]:
            return
        record.state = new
        record.updated_at = self._s.now
        self._s.last_change_at = self._s.now
        if reason:
            record.reason = reason
        name = _PHASE_DEADLINE.get(new)
        seconds = None if name is None else getattr(self._s.spec.policies.deadlines, name)
        if new is _T.HELD or new in SETTLED:
            record.deadline = None
        elif seconds is not None:
            record.deadline = later(self._s.now, seconds)
        elif name is not None:
            record.deadline = None

    @property
    def settled_states(self) -> frozenset[TargetState]:
        """The states a target of this campaign rests in: :data:`SETTLED`, and HELD for a
        distribution-only campaign (holding the image is all it asks)."""
        if self._s.spec.payload.kind is PayloadKind.DISTRIBUTE:
            return SETTLED | {_T.HELD}
        return SETTLED

    def _settled(self, index: int) -> bool:
        s = self._s
        done = self.settled_states
        return all(s.targets[m].state in done for m in s.stages[index].members)

    def _notice_over(self) -> bool:
        s = self._s
        if s.expedite_approved_by:
            return True
        return s.notice_at is not None and s.now >= later(s.notice_at, NOTICE_S)

    def _notice_reason(self) -> str:
        s = self._s
        if s.notice_at is None:
            return "the roll-out waits for its notice to be published"
        return f"the roll-out starts 7 days after the notice, at {s.notice_at + NOTICE_S:.0f}"

    def _at(self, guid: str) -> list[TargetRecord]:
        """The targets on premises ``guid``."""
        return self._by_guid.get(guid, [])

    def targets_at(self, guid: str) -> list[str]:
        """The device ids of this campaign's targets on premises ``guid``."""
        return [r.target.device_id for r in self._at(guid)]

    def _stage_name(self, record: TargetRecord) -> str:
        return self._s.stages[record.stage].name

    def _enter(self, state: CampaignState) -> None:
        self._s.state = checked(TRANSITIONS, "Campaign", self._s.state, state)

    def _refuse(self, actor: str, reason: str) -> None:
        self._emit(DecisionKind.REFUSED, actor=actor, reason=reason)

    def _emit(self, kind: DecisionKind, **fields: str) -> None:
        decision = Decision(kind, self._s.spec.campaign_id, self._seq, self._s.now, **fields)
        self._out.append(decision)
        if kind in _AUDITED:
            self._s.audit.append(decision)


def retry_spec(parent: Engine, campaign_id: str, at: UnixTime) -> CampaignSpec:
    """A child campaign of ``parent``'s FAILED and TIMED_OUT targets: same payload and policies,
    one stage, lineage in ``parent``; its selection names exactly those devices."""
    spec = parent.spec
    return replace(
        spec,
        campaign_id=campaign_id,
        selection=replace(spec.selection, device_ids=parent.retry_targets()),
        stages=(StageSpec("retry", StageKind.PILOT),),
        parent=spec.campaign_id,
        created_at=at,
    )


__all__ = [
    "ACTIVE",
    "FAILURES",
    "SETTLED",
    "TARGET_TRANSITIONS",
    "TRANSITIONS",
    "CampaignAborted",
    "CampaignPaused",
    "CampaignRefusedError",
    "CampaignResumed",
    "CampaignStarted",
    "CampaignState",
    "Decision",
    "DecisionKind",
    "Engine",
    "ExpediteApproved",
    "ExpediteRequested",
    "GateDecided",
    "HubPresenceReported",
    "HubVersionReported",
    "Input",
    "NoticePublished",
    "TargetReported",
    "TargetState",
    "Ticked",
    "input_from_data",
    "input_to_data",
    "retry_spec",
]
