"""Campaigns: staged roll-outs with go/no-go gates, incident holds and a notice period (issue 10).

A pure engine (sans-IO: no asyncio, store, MQTT or clock), in four modules:

* :mod:`otad.campaign.spec` -- what a campaign is: :class:`CampaignSpec` (id, :class:`Payload`
  -- an image, a distribute-then-activate pair, or a credential replacement --, a
  :class:`Selection`, the stage plan of :class:`StageSpec`\\ s, :class:`Policies`);
* :mod:`otad.campaign.targets` -- the selection evaluated against a fleet snapshot (the CHs'
  :class:`~protocol.wire.messages.HubAnnounced`), exclusions with reasons, and the stratified
  random stage membership;
* :mod:`otad.campaign.window` -- the activation window (cron on Europe/London wall time);
* :mod:`otad.campaign.engine` -- :class:`Engine`: inputs in, :class:`Decision`\\ s out.

Wiring it into the daemon (for the session that does)
-----------------------------------------------------

One :class:`Engine` per campaign, owned by one task (one writer)::

    engine = Engine.create(spec, fleet=registry_announcements, active=running_engines)
    # CampaignRefusedError(reasons): a target's component belongs to another active campaign
    store.save(engine.to_data())             # the first snapshot: inputs_applied == 0
    for item in inputs:                      # operator commands, executor reports, Ticked
        journal.append(input_to_data(item))  # durable before it is applied
        for decision in engine.handle(item):
            execute(decision)                # idempotent per (campaign_id, seq, kind, device)
        store.save(engine.to_data())         # a JSON snapshot; inputs_applied in it

After a restart: ``engine = Engine.from_data(snapshot)`` then
``engine.replay([input_from_data(e) for e in journal])`` -- the entries after the snapshot are
applied again and give the very same decisions (same ``seq``), so an executor that records the
``seq`` it carried out skips the repeats and carries out the rest.

What the shell feeds in:

* :class:`Ticked` every evaluation period (a few seconds): reports are only recorded, and
  deadlines, thresholds (a hold takes at most one tick), pacing, the window, gates, notice and
  soak are evaluated on ticks and commands;
* the operator's commands -- :class:`CampaignStarted`, :class:`NoticePublished`,
  :class:`ExpediteRequested`/:class:`ExpediteApproved` (two different actors),
  :class:`GateDecided`, :class:`CampaignPaused`/:class:`CampaignResumed`,
  :class:`CampaignAborted` -- each with the control client's authenticated identity as ``actor``;
  one the engine cannot apply comes back as a ``REFUSED`` decision with the reason;
* the executors' reports as :class:`TargetReported` (the mapping from :mod:`otad.devices`:
  HELD_BY_CH -> DELIVERED, HELD_BY_DEVICE -> HELD (a CH image: the CH holds it), ACTIVATED,
  CONFIRMED, FAILED; a refusal of the offer -> REJECTED; a failed activation with rollback ->
  ROLLED_BACK; a device or CH lost after activation -> LOST), and CHs' announcements of their
  firmware version as :class:`HubVersionReported` (dependencies).

What comes out (:class:`DecisionKind`): ``START_TARGET`` (distribute to it: the path
``distribute`` uses), ``ACTIVATE_TARGET`` (issue its activation), ``CANCEL_TARGET`` and
``TARGET_TIMED_OUT`` (stop what runs for it), and the campaign-level events to publish
(``STAGE_STARTED``, ``GATE_OPENED``, ``GATE_DECIDED``, ``NOTICE_PUBLISHED``, ``NOTICE_WAIT``,
``EXPEDITE_REQUESTED``, ``EXPEDITED``, ``HELD``, ``RESUMED``, ``PAUSED``, ``COMPLETED``,
``ABORTED``; ``REFUSED`` answers a command that could not be applied). :attr:`Engine.audit` is
the audit trail (who decided what, when, why), :meth:`Engine.status` the operator's view,
:meth:`Engine.counts` the counts by state (per stage or overall, derived from the targets),
:meth:`Engine.claims` the (device, component) keys an active campaign holds, :func:`retry_spec`
the spec of a child campaign of the failed and timed-out targets (``parent`` is its lineage).

Choices the shell should know:

* abort cancels every target that has not begun activating: PENDING ones silently, those whose
  distribution runs with a ``CANCEL_TARGET`` (stop the transfer); an activation already issued,
  and everything activated or confirmed, is left alone and its reports still count;
* the 7-day notice applies to stages of kind ROLLOUT (a first stage included), so today's
  ``distribute`` as a one-stage campaign is a PILOT-kind stage, or an expedited roll-out;
* a campaign's rate counts targets (one per premises for a CH image; a HAN-device campaign of a
  type a premises has twice counts both).
"""

from otad.campaign.engine import (
    CampaignAborted,
    CampaignPaused,
    CampaignRefusedError,
    CampaignResumed,
    CampaignStarted,
    CampaignState,
    Decision,
    DecisionKind,
    Engine,
    ExpediteApproved,
    ExpediteRequested,
    GateDecided,
    HubPresenceReported,
    HubVersionReported,
    Input,
    NoticePublished,
    TargetReported,
    TargetState,
    Ticked,
    input_from_data,
    input_to_data,
    retry_spec,
)
from otad.campaign.spec import (
    CampaignSpec,
    Deadlines,
    Dependency,
    Payload,
    PayloadKind,
    Policies,
    Rate,
    Selection,
    StageKind,
    StageSpec,
    Thresholds,
)
from otad.campaign.targets import Exclusion, Target, assign_stages, select
from otad.campaign.window import ActivationWindow

__all__ = [
    "ActivationWindow",
    "CampaignAborted",
    "CampaignPaused",
    "CampaignRefusedError",
    "CampaignResumed",
    "CampaignSpec",
    "CampaignStarted",
    "CampaignState",
    "Deadlines",
    "Decision",
    "DecisionKind",
    "Dependency",
    "Engine",
    "Exclusion",
    "ExpediteApproved",
    "ExpediteRequested",
    "GateDecided",
    "HubPresenceReported",
    "HubVersionReported",
    "Input",
    "NoticePublished",
    "Payload",
    "PayloadKind",
    "Policies",
    "Rate",
    "Selection",
    "StageKind",
    "StageSpec",
    "Target",
    "TargetReported",
    "TargetState",
    "Thresholds",
    "Ticked",
    "assign_stages",
    "input_from_data",
    "input_to_data",
    "retry_spec",
    "select",
]
