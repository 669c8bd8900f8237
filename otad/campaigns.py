"""Campaigns in the daemon: the campaign engines (:mod:`otad.campaign`) fed, persisted and obeyed.

:class:`Campaigns` owns one :class:`~otad.campaign.Engine` per campaign and is their only
writer. It feeds each engine

* the operator's commands (``otactl campaign ...``), with the control client's authenticated
  identity as the actor (:func:`otad.control.current_actor`);
* what the executors learn, as :class:`~otad.campaign.TargetReported`: every device record
  :mod:`otad.devices` commits (:meth:`device_changed`: mapped by :func:`target_state_of`) and
  every credential replacement (:meth:`credentials_changed`); CHs going offline and coming back
  and the firmware they announce (:meth:`hub_changed`);
* a :class:`~otad.campaign.Ticked` every ``[campaigns] tick_s`` (:meth:`run`).

and carries out its decisions: ``START_TARGET`` through the path ``distribute`` uses (one
:meth:`Distribution.distribute <otad.distribution.Distribution.distribute>` per tick for all the
CHs started, then :meth:`Devices.offered <otad.devices.Devices.offered>`) or a credential
replacement; ``ACTIVATE_TARGET`` through :meth:`Devices.activate
<otad.devices.Devices.activate>`; ``CANCEL_TARGET``/``TARGET_TIMED_OUT`` by stopping the WAN
transfer; the campaign-level steps as events (:mod:`otad.events`, ``campaign.*``) and a
retained status per campaign (``ota/v1/campaigns/<id>/status``). ``distribute`` itself is a
one-stage, unpaced, distribution-only campaign (:meth:`distribute`).

Durability (what survives kill -9). The engine's snapshot is committed (durably) after every
command, before it is answered, and after every evaluation that took a campaign-level step (a
stage started, a gate opened or decided, a hold, the end), after its decisions were carried out.
Target-level decisions (starts, activations) and reports are committed with the next snapshot,
at most ``snapshot_s`` later: at 10,000 targets a snapshot costs about 0.1 s of the loop, and
none of them needs one, because the executors are *level-triggered*: whatever a crash loses
between a decision and the snapshot is made good at the next start (:meth:`start`): every
target's state
is re-derived from the durable device and transfer records (reports only move a target
forward, so a replayed one changes nothing), a target the engine started but whose transfer does
not exist is started again, one it activated whose device has no command yet is activated
again. A repeated start finds its transfer (``already``) and a repeated activation finds its
device ACTIVATION_PENDING and is refused (no device is activated twice); a step re-decided after
a lost snapshot has the same campaign event key (kind, stage, ordinal), so it is stored once.
A gate decision, hold, pause or abort is durable before otactl hears it was made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import secrets
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from mqttio import MqttClient, NotConnected
from otad.campaign import (
    CampaignAborted,
    CampaignPaused,
    CampaignRefusedError,
    CampaignResumed,
    CampaignSpec,
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
    Payload,
    PayloadKind,
    Policies,
    Rate,
    Selection,
    StageKind,
    StageSpec,
    TargetReported,
    TargetState,
    Ticked,
    retry_spec,
)
from otad.campaign.engine import ACTIVE, FAILURES
from otad.campaign.estimate import ImageSize, PacingModel, estimate
from otad.campaign.request import (
    ImageFacts,
    check_campaign_id,
    payload_of,
    spec_from_request,
)
from otad.campaign.spec import Component, Deadlines
from otad.catalogue import Catalogue, Image
from otad.config import CampaignsConfig
from otad.credentials import Credentials, CredentialsState, Replacement
from otad.devices import DeviceRecord, Devices, DeviceState
from otad.distribution import Distribution
from otad.events import (
    CampaignAborted as CampaignAbortedEvent,
)
from otad.events import (
    CampaignCompleted,
    CampaignCreated,
    CampaignExpedited,
    CampaignExpediteRequested,
    CampaignGateDecided,
    CampaignGateOpened,
    CampaignHeld,
    CampaignNoticePublished,
    CampaignNoticeWait,
    CampaignStageStarted,
    MonitorEvent,
)
from otad.events import (
    CampaignPaused as CampaignPausedEvent,
)
from otad.events import (
    CampaignResumed as CampaignResumedEvent,
)
from otad.jsonwire import dumps
from otad.outbox import EventPublisher
from otad.registry import Hub, Registry
from otad.store import CampaignRow, Store, StoreError
from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.wire import topics
from protocol.wire.devices import DeviceType

log = logging.getLogger("otad.campaigns")

#: Status schema version (``ota/v1/campaigns/<id>/status``, ``campaign.status``).
STATUS_VERSION: Final = 1
#: Running with no target changing this long: the status says ``stalled_s``.
STALLED_AFTER_S: Final = 60.0
#: The window over which ``confirmed_per_minute`` is measured.
RATE_WINDOW_S: Final = 300.0
#: Targets measured before the pacing model uses a measured figure instead of the configured.
MIN_SAMPLES: Final = 5
#: A transfer of fewer blocks says how long the handshake takes, not a rate: not a sample.
MIN_RATE_BLOCKS: Final = 64
#: How often the executors' effects are checked against the durable records (:meth:`_repair`).
REPAIR_S: Final = 30.0
_ARTIFACT_CREDENTIALS: Final = "credentials"
#: Reasons of a refusal by the CH or device of what was offered (REJECTED, not FAILED).
_REJECTIONS: Final = frozenset(
    {
        Reason.WRONG_DEVICE_TYPE.name,
        Reason.HARDWARE_OUT_OF_RANGE.name,
        Reason.ROLLBACK.name,
        Reason.REPLAYED.name,
        Reason.EXPIRED.name,
        Reason.WRONG_VENDOR.name,
        Reason.HEADER_MISMATCH.name,
        Reason.UNSUPPORTED_VERSION.name,
        Reason.NO_CREDENTIALS.name,
        Reason.WRONG_DEVICE.name,
        Reason.UNKNOWN_HUB.name,
    }
)
_EVENT_OF: Final[dict[DecisionKind, type[MonitorEvent]]] = {
    DecisionKind.STAGE_STARTED: CampaignStageStarted,
    DecisionKind.GATE_OPENED: CampaignGateOpened,
    DecisionKind.GATE_DECIDED: CampaignGateDecided,
    DecisionKind.NOTICE_PUBLISHED: CampaignNoticePublished,
    DecisionKind.NOTICE_WAIT: CampaignNoticeWait,
    DecisionKind.EXPEDITE_REQUESTED: CampaignExpediteRequested,
    DecisionKind.EXPEDITED: CampaignExpedited,
    DecisionKind.HELD: CampaignHeld,
    DecisionKind.RESUMED: CampaignResumedEvent,
    DecisionKind.PAUSED: CampaignPausedEvent,
    DecisionKind.COMPLETED: CampaignCompleted,
    DecisionKind.ABORTED: CampaignAbortedEvent,
}


def target_state_of(record: DeviceRecord) -> tuple[TargetState, str] | None:
    """What a committed device record means for the campaign target it is (None: a step the
    engine takes itself, or progress)."""
    state = record.state
    if state is DeviceState.HELD_BY_CH:
        return (TargetState.HELD if record.is_ch else TargetState.DELIVERED), ""
    if state is DeviceState.HELD_BY_DEVICE:
        return TargetState.HELD, ""
    if state is DeviceState.ACTIVATED:
        return TargetState.ACTIVATED, ""
    if state is DeviceState.CONFIRMED:
        return TargetState.CONFIRMED, record.proof.value if record.proof else ""
    if state is DeviceState.TIMED_OUT:
        return TargetState.TIMED_OUT, record.reason or Reason.TIMED_OUT.name
    if state is DeviceState.FAILED:
        reason = record.reason or "FAILED"
        if reason == Reason.SELF_TEST_FAILED.name:
            return TargetState.ROLLED_BACK, reason
        if reason == Reason.TIMED_OUT.name:
            return TargetState.TIMED_OUT, reason
        if reason in _REJECTIONS:
            return TargetState.REJECTED, reason
        return TargetState.FAILED, reason
    return None  # OFFERED, HAN_TRANSFER, ACTIVATION_PENDING


def target_states_of(record: DeviceRecord) -> list[tuple[TargetState, str]]:
    """Every target state a committed device record implies, in order: a HAN device past its
    CH's delivery was DELIVERED, one holding (or past holding) the image was HELD, one issued a
    command was ACTIVATING, then where it is (:func:`target_state_of`). Fed one after the other,
    they bring a target that missed steps (a snapshot older than the records, after a crash) to
    where the records are; the steps it already took change nothing."""
    state = record.state
    chain: list[tuple[TargetState, str]] = []
    past_delivery = state in (
        DeviceState.HAN_TRANSFER,
        DeviceState.HELD_BY_DEVICE,
        DeviceState.ACTIVATION_PENDING,
        DeviceState.ACTIVATED,
        DeviceState.CONFIRMED,
    ) or (state in (DeviceState.FAILED, DeviceState.TIMED_OUT) and record.counter is not None)
    if past_delivery and not record.is_ch:
        chain.append((TargetState.DELIVERED, ""))
    if past_delivery and state is not DeviceState.HAN_TRANSFER:
        chain.append((TargetState.HELD, ""))
    if record.counter is not None:
        chain.append((TargetState.ACTIVATING, ""))
    final = target_state_of(record)
    if final is not None:
        chain.append(final)
    return chain


def _replacement_state_of(rec: Replacement) -> tuple[TargetState, str] | None:
    if rec.state is CredentialsState.REPLACED:
        return TargetState.CONFIRMED, "credentials replaced"
    if rec.state is CredentialsState.FAILED:
        reason = rec.reason or "FAILED"
        return (TargetState.TIMED_OUT if reason == Reason.TIMED_OUT.name else TargetState.FAILED), (
            reason
        )
    return None


@dataclass(slots=True)
class _Live:
    """What the shell keeps beside one active engine (not persisted)."""

    engine: Engine
    image: Image | None
    reported: bool = False  # reports recorded since the last snapshot
    saved_at: float = 0.0
    status_at: float = 0.0
    status_dirty: bool = True
    confirmed: collections.deque[tuple[float, int]] | None = None


class Campaigns:
    """Every campaign's engine, fed and obeyed (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        registry: Registry,
        catalogue: Catalogue,
        distribution: Distribution,
        devices: Devices,
        credentials: Credentials,
        events: EventPublisher,
        client: MqttClient,
        config: CampaignsConfig,
        wall_clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._registry = registry
        self._catalogue = catalogue
        self._distribution = distribution
        self._devices = devices
        self._credentials = credentials
        self._events = events
        self._client = client
        self._config = config
        self._wall = wall_clock
        self._live: dict[str, _Live] = {}  # active campaigns
        self._rows: dict[str, CampaignRow] = {}  # every campaign's last committed row
        self._routes: dict[tuple[str, str], str] = {}  # (device id, artifact) -> campaign
        self._hub_routes: dict[tuple[str, str], str] = {}  # (guid, artifact) -> campaign
        self._at_guid: dict[str, set[str]] = collections.defaultdict(set)  # guid -> campaigns
        self._lock = asyncio.Lock()
        self._started_at: dict[tuple[str, str], float] = {}  # (campaign, device) -> start time
        self._samples: dict[str, collections.deque[float]] = {
            name: collections.deque(maxlen=1000)
            for name in ("transfer_blocks_per_s", "han_bytes_per_s", "activation_s:ch",
                         "activation_s:han")
        }  # measured on this deployment: the pacing model's figures  # fmt: skip
        self.commands = 0

    # ------------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read every campaign; rebuild the active ones' engines (before :meth:`start`)."""
        for row in await self._store.campaigns():
            self._rows[row.id] = row
            if CampaignState(row.state) not in ACTIVE:
                continue
            engine = Engine.from_data(json.loads(row.snapshot))
            self._adopt(engine)

    async def start(self) -> None:
        """Reconcile every active campaign with the durable device records (see the module
        docstring), once devices, credentials and transfers are loaded."""
        async with self._lock:
            for live in list(self._live.values()):
                await self._reconcile(live)

    async def run(self) -> None:
        """The evaluation tick, for ever (task ``otad.campaigns``); every ``REPAIR_S`` the
        executors' effects are checked against the durable records (:meth:`_repair`). A tick
        that fails is logged and the next one goes on: what it decided and did not carry out
        is found by the repair."""
        repaired_at = self._wall()
        while True:
            await asyncio.sleep(self._config.tick_s)
            try:
                await self.tick()
                if self._wall() - repaired_at >= REPAIR_S:
                    repaired_at = self._wall()
                    async with self._lock:
                        for live in list(self._live.values()):
                            await self._repair(live, "(a decision not carried out)")
            except (StoreError, ProtocolError) as exc:
                log.error("campaign evaluation not carried out: %s; retried", exc)

    async def tick(self) -> None:
        """Evaluate every active campaign now; commit and publish what changed."""
        async with self._lock:
            now = UnixTime(self._wall())
            for live in list(self._live.values()):
                steps = len(live.engine.audit)
                decisions = live.engine.handle(Ticked(now))
                await self._carry_out(live, decisions)
                self._sample_confirmed(live, now)
                if len(live.engine.audit) != steps:
                    await self._save(live)  # a stage, gate, hold or end: durable at once
                elif (
                    decisions or live.reported
                ) and now - live.saved_at >= self._config.snapshot_s:
                    await self._save(live)  # starts, activations, reports: re-derivable
                self._publish_status(live, now, force=bool(decisions))

    def shutdown(self) -> None:
        """Nothing runs after this (the daemon stops sending first)."""
        self._live.clear()

    # ------------------------------------------------------------------ reports

    def device_changed(self, record: DeviceRecord) -> None:
        """:attr:`otad.devices.Devices.changed`: a committed device record."""
        key = (record.device_id, record.image.hex())
        campaign = self._routes.get(key)
        if campaign is None:
            return
        live = self._live.get(campaign)
        if live is None:
            return
        now = UnixTime(self._wall())
        engine = live.engine
        for state, reason in target_states_of(record):
            if state is TargetState.ACTIVATING:
                continue  # live, the engine decided it (only a re-derivation reports it)
            before = engine.target_state(record.device_id)
            if before is state:
                continue
            self._report(live, TargetReported(now, record.device_id, state, reason))
            if engine.target_state(record.device_id) is not before:
                self._sample(live, record, state)

    def credentials_changed(self, rec: Replacement) -> None:
        """:attr:`otad.credentials.Credentials.changed`: a committed replacement."""
        campaign = self._routes.get((rec.device_id, _ARTIFACT_CREDENTIALS))
        live = None if campaign is None else self._live.get(campaign)
        mapped = _replacement_state_of(rec)
        if live is None or mapped is None:
            return
        state, reason = mapped
        self._report(live, TargetReported(UnixTime(self._wall()), rec.device_id, state, reason))

    def hub_changed(self, hub: Hub, was_online: bool, announced: bool) -> None:
        """A CH's presence or announcement changed (the registry's callback)."""
        campaigns = self._at_guid.get(hub.guid)
        if not campaigns:
            return
        now = UnixTime(self._wall())
        for campaign in list(campaigns):
            live = self._live.get(campaign)
            if live is None:
                continue
            if hub.online != was_online:
                self._report(live, HubPresenceReported(now, hub.guid, hub.online))
            if announced:
                self._report(live, HubVersionReported(now, hub.guid, hub.announcement.fw_version))

    def campaign_of_device(self, device_id: str, artifact: str) -> str:
        """The campaign of a (device, image hex or ``credentials``), for its events."""
        return self._routes.get((device_id, artifact), "")

    def campaign_of_transfer(self, guid: str, image: str) -> str:
        """The campaign of a (CH, image hex) transfer, for its events."""
        return self._hub_routes.get((guid, image), "")

    def _report(self, live: _Live, item: Input) -> None:
        live.engine.handle(item)  # a report only records (O(1)); decisions come on ticks
        live.reported = True
        live.status_dirty = True

    def _sample(self, live: _Live, record: DeviceRecord, state: TargetState) -> None:
        """What the pacing model learns from one target's step: its WAN transfer's rate
        (started -> its CH holds the image), its HAN relay's (CH -> device) and its activation's
        time (issued -> confirmed)."""
        key = (live.engine.campaign_id, record.device_id)
        stamp = self._started_at.get(key)
        image = live.image
        if stamp is None or image is None:
            return
        now = self._wall()
        took = max(now - stamp, 1e-3)
        wan_done = state is TargetState.DELIVERED or (state is TargetState.HELD and record.is_ch)
        if wan_done:
            if image.manifest.block_count >= MIN_RATE_BLOCKS:
                self._samples["transfer_blocks_per_s"].append(image.manifest.block_count / took)
            self._started_at[key] = now  # the HAN relay's clock
        elif state is TargetState.HELD:
            self._samples["han_bytes_per_s"].append(image.manifest.size / took)
        elif state is TargetState.CONFIRMED:
            self._samples["activation_s:ch" if record.is_ch else "activation_s:han"].append(took)
            self._started_at.pop(key, None)

    # ------------------------------------------------------------------ commands

    async def plan(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """``campaign.plan``: the campaign a request would create, nothing created."""
        spec, image = self._spec(args, self._new_id(args))
        engine = self._create(spec)
        return self._plan_of(engine, image)

    async def create(self, args: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """``campaign.create``: a new campaign (CREATED: nothing started)."""
        campaign_id = self._new_id(args)
        spec, image = self._spec(args, campaign_id)
        async with self._lock:
            if campaign_id in self._rows:
                raise ProtocolError(Reason.CAMPAIGN_REFUSED, f"campaign {campaign_id} exists")
            engine = self._create(spec)
            live = self._adopt(engine, image)
            await self._save(live)
            self._emit_created(live, actor)
            self._publish_status(live, self._wall(), force=True)
        log.info("campaign %s created by %s: %d targets", campaign_id, actor, engine.target_count)
        return self.status(campaign_id)

    async def command(self, campaign_id: str, item: Input) -> dict[str, Any]:
        """Apply an operator's command to an active campaign: its decisions carried out and
        its snapshot committed before the answer; ``CAMPAIGN_REFUSED`` if it did not apply."""
        async with self._lock:
            live = self._live.get(campaign_id)
            if live is None:
                if campaign_id in self._rows:
                    state = self._rows[campaign_id].state
                    raise ProtocolError(
                        Reason.CAMPAIGN_REFUSED, f"campaign {campaign_id} is {state}"
                    )
                raise ProtocolError(Reason.UNKNOWN_CAMPAIGN, f"no campaign {campaign_id}")
            decisions = live.engine.handle(item)
            await self._carry_out(live, decisions)
            await self._save(live)
            self._publish_status(live, self._wall(), force=True)
        self.commands += 1
        refused = [d for d in decisions if d.kind is DecisionKind.REFUSED]
        log.info(
            "campaign %s: %s by %s -> %s",
            campaign_id,
            type(item).__name__,
            getattr(item, "actor", "?"),
            ", ".join(d.kind.value for d in decisions) or "nothing",
        )
        if refused:
            raise ProtocolError(Reason.CAMPAIGN_REFUSED, refused[0].reason)
        return {
            "id": campaign_id,
            "state": live.engine.state.value,
            "decisions": [_decision_json(d) for d in decisions if d.kind in _EVENT_OF],
        }

    async def start_campaign(self, campaign_id: str, actor: str) -> dict[str, Any]:
        """``campaign.start``."""
        return await self.command(campaign_id, CampaignStarted(self._now(), actor))

    async def approve(self, campaign_id: str, actor: str, reason: str) -> dict[str, Any]:
        """``campaign.approve``: a recorded GO (at a gate, or on hold)."""
        return await self.command(campaign_id, GateDecided(self._now(), actor, True, reason))

    async def hold(self, campaign_id: str, actor: str, reason: str) -> dict[str, Any]:
        """``campaign.hold``: a NO-GO at a gate, or a pause while it runs or awaits notice."""
        live = self._live.get(campaign_id)
        if live is not None and live.engine.state in (
            CampaignState.AWAITING_GATE,
            CampaignState.ON_HOLD,
        ):
            return await self.command(campaign_id, GateDecided(self._now(), actor, False, reason))
        return await self.command(campaign_id, CampaignPaused(self._now(), actor, reason))

    async def resume(self, campaign_id: str, actor: str) -> dict[str, Any]:
        """``campaign.resume``: a paused campaign runs again (a hold needs ``approve``)."""
        live = self._live.get(campaign_id)
        if live is not None and live.engine.state is CampaignState.ON_HOLD:
            raise ProtocolError(
                Reason.CAMPAIGN_REFUSED,
                f"campaign {campaign_id} is on hold ({live.engine.hold_reason}): only a recorded"
                " GO resumes it (otactl campaign approve)",
            )
        return await self.command(campaign_id, CampaignResumed(self._now(), actor))

    async def abort(self, campaign_id: str, actor: str, reason: str) -> dict[str, Any]:
        """``campaign.abort``."""
        return await self.command(campaign_id, CampaignAborted(self._now(), actor, reason))

    async def notice(self, campaign_id: str, actor: str) -> dict[str, Any]:
        """``campaign.notice``: the roll-out notice was published to the parties now."""
        return await self.command(campaign_id, NoticePublished(self._now(), actor))

    async def expedite(self, campaign_id: str, actor: str, justification: str) -> dict[str, Any]:
        """``campaign.expedite``: ask to waive the notice (an urgent security fix)."""
        return await self.command(campaign_id, ExpediteRequested(self._now(), actor, justification))

    async def expedite_approve(self, campaign_id: str, actor: str) -> dict[str, Any]:
        """``campaign.expedite.approve``: the second approver agrees."""
        return await self.command(campaign_id, ExpediteApproved(self._now(), actor))

    async def retry(self, campaign_id: str, new_id: str | None, actor: str) -> dict[str, Any]:
        """``campaign.retry``: a child campaign of the FAILED and TIMED_OUT targets."""
        parent = self._engine(campaign_id)
        if not parent.retry_targets():
            raise ProtocolError(
                Reason.CAMPAIGN_REFUSED, f"campaign {campaign_id} has no failed targets"
            )
        child_id = check_campaign_id(new_id) if new_id else self._generated_id()
        spec = retry_spec(parent, child_id, self._now())
        image = None if spec.payload.kind is PayloadKind.CREDENTIALS else self._image(spec)
        async with self._lock:
            if child_id in self._rows:
                raise ProtocolError(Reason.CAMPAIGN_REFUSED, f"campaign {child_id} exists")
            live = self._adopt(self._create(spec), image)
            await self._save(live)
            self._emit_created(live, actor)
            self._publish_status(live, self._wall(), force=True)
        return self.status(child_id)

    async def distribute(
        self, ref: str, guids: Sequence[str], *, all_matching: bool, actor: str
    ) -> dict[str, Any]:
        """``distribute``: start sending an image to CHs, as a one-stage, unpaced,
        distribution-only campaign. The result is the distribution's (``started``, ``already``,
        ``refused`` with typed reasons, ``devices``) and the ``campaign`` it made (absent when
        nothing started). A CH whose device belongs to another active campaign is refused
        ``CAMPAIGN_CONFLICT``; one already in a campaign of this image counts as ``already``."""
        image = self._catalogue.resolve(ref)
        async with self._lock:
            claims = self._claims()
            blocked: list[dict[str, str]] = []
            already_claimed: list[str] = []
            wanted = list(dict.fromkeys(guids))
            if all_matching:
                wanted = []  # the distribution chooses; claimed CHs are taken out below
            free: list[str] = []
            for guid in wanted:
                owner = self._owner(claims, guid, image)
                if owner is None:
                    free.append(guid)
                elif owner[1] == image.hex:
                    already_claimed.append(guid)
                else:
                    blocked.append(_conflict(guid, owner[0]))
            campaign_id = self._generated_id(prefix="d")
            # the transfers' first events (transfer.started) are emitted as they start: name
            # the campaign on them from the first, and give back what it did not start
            candidates = list(self._registry.hubs) if all_matching else free
            before = {g: self._hub_routes.get((g, image.hex)) for g in candidates}
            for guid in candidates:
                self._hub_routes[(guid, image.hex)] = campaign_id
            result: dict[str, Any] = {"image": image.hex, "started": [], "already": [],
                                      "refused": []}  # fmt: skip
            try:
                if all_matching:
                    result = await self._distribution.distribute(image.hex, (), all_matching=True)
                elif free:
                    result = await self._distribution.distribute(image.hex, free)
            finally:
                began = set(result["started"])
                for guid, route in before.items():
                    if guid in began:
                        continue
                    if route is None:
                        self._hub_routes.pop((guid, image.hex), None)
                    else:
                        self._hub_routes[(guid, image.hex)] = route
            result["already"] = list(dict.fromkeys([*result["already"], *already_claimed]))
            result["refused"] = [*result["refused"], *blocked]
            started: list[str] = result["started"]
            result["devices"] = await self._devices.offered(image, started, result["already"])
            if started:
                spec = CampaignSpec(
                    campaign_id,
                    Payload(PayloadKind.DISTRIBUTE, image.hex, image.manifest.fw_version),
                    Selection(
                        image.manifest.device_type,
                        image.manifest.hw_min,
                        image.manifest.hw_max,
                        guids=frozenset(started),
                    ),
                    (StageSpec("distribute", StageKind.PILOT),),
                    Policies(
                        rate=Rate(per_minute=0.0),
                        deadlines=Deadlines(None, None, None, None),
                        lost_after_s=float("inf"),
                    ),
                    created_at=self._now(),
                )
                live = self._adopt(self._create(spec), image)
                self._emit_created(live, actor)
                decisions = live.engine.handle(CampaignStarted(self._now(), actor))
                await self._carry_out(live, decisions, distributed=True)
                await self._save(live)
                self._publish_status(live, self._wall(), force=True)
                result["campaign"] = spec.campaign_id
        return result

    # ------------------------------------------------------------------ views

    def status(self, campaign_id: str) -> dict[str, Any]:
        """``campaign.status``: one campaign's status (also its retained status)."""
        live = self._live.get(campaign_id)
        if live is not None:
            return self._status_of(live, self._wall())
        engine = self._engine(campaign_id)
        return self._status_of(_Live(engine, None), self._wall())

    def listing(self) -> list[dict[str, Any]]:
        """``campaign.list``: every campaign, oldest first."""
        out: list[dict[str, Any]] = []
        for campaign_id, row in self._rows.items():
            live = self._live.get(campaign_id)
            if live is not None:
                status = live.engine.status()
                counts = status["counts"]
                spec = live.engine.spec
            else:
                data = json.loads(row.snapshot)
                engine = Engine.from_data(data)
                status = engine.status()
                counts = status["counts"]
                spec = engine.spec
            out.append(
                {
                    "id": campaign_id,
                    "parent": row.parent,
                    "state": row.state if live is None else live.engine.state.value,
                    "stage": status["stage"],
                    "payload": _payload_json(spec.payload),
                    "targets": status["targets"],
                    "confirmed": counts.get(TargetState.CONFIRMED.value, 0)
                    + (
                        counts.get(TargetState.HELD.value, 0)
                        if spec.payload.kind is PayloadKind.DISTRIBUTE
                        else 0
                    ),
                    "failed": sum(counts.get(s.value, 0) for s in FAILURES),
                    "created_at": row.created_at,
                    "updated_at": row.updated_at,
                }
            )
        return out

    def history(self, campaign_id: str) -> list[dict[str, Any]]:
        """``campaign.history``: the audit trail (who decided what, when, why)."""
        engine = self._engine(campaign_id)
        return [
            {
                "seq": d.seq,
                "at": d.at,
                "at_iso": _iso(d.at),
                "kind": d.kind.value,
                "stage": d.stage,
                "actor": d.actor,
                "reason": d.reason,
            }
            for d in engine.audit
        ]

    def counts_by_state(self) -> dict[str, int]:
        """Campaigns by state (the status and /metrics)."""
        counts = collections.Counter(row.state for row in self._rows.values())
        for campaign_id, live in self._live.items():
            counts[self._rows[campaign_id].state] -= 1
            counts[live.engine.state.value] += 1
        return {state.value: counts.get(state.value, 0) for state in CampaignState}

    def pacing_model(self, *, for_ch: bool = True) -> PacingModel:
        """The fleet's speeds: measured medians where there are samples, else configured.
        ``for_ch``: the payload is a CH's own image (its activation is a CH reboot), else a HAN
        device's (an activation over the HAN): each is measured on its own kind."""
        config = self._config
        measured: list[str] = []

        def median(name: str, sampled: str | None = None) -> float:
            samples = self._samples[sampled or name]
            default: float = getattr(config, name)
            if len(samples) < MIN_SAMPLES:
                return default
            measured.append(f"{name} (median of {len(samples)} targets)")
            return statistics.median(samples)

        return PacingModel(
            median("transfer_blocks_per_s"),
            config.fleet_blocks_per_s,
            median("han_bytes_per_s"),
            median("activation_s", "activation_s:ch" if for_ch else "activation_s:han"),
            config.tick_s,
            tuple(measured),
        )

    def _plan_of(self, engine: Engine, image: Image | None) -> dict[str, Any]:
        status = engine.status()
        members: list[dict[str, Any]] = []
        stage_rows: list[dict[str, Any]] = []
        for stage in status["stages"]:
            hubs: set[str] = set()
            for device_id in engine.stage_members(stage["name"]):
                target = engine.target(device_id)
                hubs.add(target.guid)
                members.append(
                    {
                        "device_id": device_id,
                        "guid": target.guid,
                        "stage": stage["name"],
                        "supplier": target.supplier,
                        "segment": target.segment,
                        "hw_version": target.hw_version,
                        "fw_version": target.fw_version,
                    }
                )
            stage_rows.append(
                {"name": stage["name"], "kind": stage["kind"], "targets": stage["targets"],
                 "hubs": len(hubs)}
            )  # fmt: skip
        all_hubs = {m["guid"] for m in members}
        size = None if image is None else image_size(image)
        wan_bytes = 0
        if image is not None:
            wan_bytes = len(all_hubs) * (image.manifest.size + len(image.offer))
        return {
            "id": engine.campaign_id,
            "payload": _payload_json(engine.spec.payload),
            "targets": len(members),
            "hubs": len(all_hubs),
            "stages": stage_rows,
            "exclusions": [
                {"guid": e.guid, "device_id": e.device_id, "reason": e.reason}
                for e in engine.exclusions
            ],
            "members": members,
            "wan_bytes": wan_bytes,
            "estimate": estimate(
                engine.spec,
                [row["targets"] for row in stage_rows],
                size,
                self.pacing_model(for_ch=size is None or size.for_ch),
                now=self._wall(),
            ),
        }

    # ------------------------------------------------------------------ internals

    def _now(self) -> UnixTime:
        return UnixTime(self._wall())

    def _engine(self, campaign_id: str) -> Engine:
        live = self._live.get(campaign_id)
        if live is not None:
            return live.engine
        row = self._rows.get(campaign_id)
        if row is None:
            raise ProtocolError(Reason.UNKNOWN_CAMPAIGN, f"no campaign {campaign_id}")
        return Engine.from_data(json.loads(row.snapshot))

    def _new_id(self, args: Mapping[str, Any]) -> str:
        if "id" in args:
            return check_campaign_id(args["id"])
        return self._generated_id()

    def _generated_id(self, prefix: str = "c") -> str:
        day = datetime.datetime.fromtimestamp(self._wall(), datetime.UTC).strftime("%Y%m%d")
        return f"{prefix}-{day}-{secrets.token_hex(3)}"

    def _spec(self, args: Mapping[str, Any], campaign_id: str) -> tuple[CampaignSpec, Image | None]:
        _kind, ref = payload_of(args)
        image = None if ref is None else self._catalogue.resolve(ref)
        facts = None
        if image is not None:
            m = image.manifest
            if self._wall() >= m.expires:
                raise ProtocolError(Reason.EXPIRED, f"image {image.hex} expired at {m.expires}")
            facts = ImageFacts(image.hex, m.device_type, m.hw_min, m.hw_max, m.fw_version)
        spec = spec_from_request(args, campaign_id=campaign_id, image=facts, created_at=self._now())
        if spec.payload.activates and not self._devices.can_activate:
            raise ProtocolError(
                Reason.UNKNOWN_KEY_ID, "no activation key: set [activation] key (or distribute)"
            )
        return spec, image

    def _image(self, spec: CampaignSpec) -> Image:
        return self._catalogue.resolve(spec.payload.artifact)

    def _create(self, spec: CampaignSpec) -> Engine:
        fleet = [hub.announcement for hub in self._registry.hubs.values()]
        try:
            return Engine.create(spec, fleet, [live.engine for live in self._live.values()])
        except CampaignRefusedError as exc:
            shown = "; ".join(exc.reasons[:5])
            more = f" (and {len(exc.reasons) - 5} more)" if len(exc.reasons) > 5 else ""
            raise ProtocolError(Reason.CAMPAIGN_CONFLICT, shown + more) from None

    def _adopt(self, engine: Engine, image: Image | None = None) -> _Live:
        spec = engine.spec
        artifact = spec.payload.artifact
        if image is None and spec.payload.kind is not PayloadKind.CREDENTIALS:
            image = self._catalogue.images.get(bytes.fromhex(artifact))
        live = _Live(engine, image, confirmed=collections.deque(maxlen=600))
        self._live[engine.campaign_id] = live
        for device_id, guid in engine.target_devices():
            self._routes[(device_id, artifact)] = engine.campaign_id
            self._hub_routes[(guid, artifact)] = engine.campaign_id
            self._at_guid[guid].add(engine.campaign_id)
        return live

    def _retire(self, live: _Live) -> None:
        """A campaign that ended: its routes stay (late events still name it), it leaves the
        presence index and the set of active engines."""
        campaign_id = live.engine.campaign_id
        for _device_id, guid in live.engine.target_devices():
            campaigns = self._at_guid.get(guid)
            if campaigns is not None:
                campaigns.discard(campaign_id)
                if not campaigns:
                    del self._at_guid[guid]
        self._live.pop(campaign_id, None)

    def _claims(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(device, component) -> (campaign, artifact) over the active campaigns."""
        claims: dict[tuple[str, str], tuple[str, str]] = {}
        for live in self._live.values():
            engine = live.engine
            for key in engine.claims():
                claims[key] = (engine.campaign_id, engine.spec.payload.artifact)
        return claims

    def _owner(
        self, claims: Mapping[tuple[str, str], tuple[str, str]], guid: str, image: Image
    ) -> tuple[str, str] | None:
        hub = self._registry.get(guid)
        if hub is None:
            return None
        device_type = image.manifest.device_type
        if device_type is DeviceType.CH:
            ids = [guid]
        else:
            ids = [d.device_id for d in hub.announcement.han if d.device_type is device_type]
        for device_id in ids:
            owner = claims.get((device_id, Component.FIRMWARE.value))
            if owner is not None:
                return owner
        return None

    async def _save(self, live: _Live) -> None:
        engine = live.engine
        data = engine.to_data()
        snapshot = await asyncio.to_thread(json.dumps, data, separators=(",", ":"))
        now = self._wall()
        old = self._rows.get(engine.campaign_id)
        row = CampaignRow(
            engine.campaign_id,
            engine.state.value,
            engine.spec.parent,
            engine.spec.created_at if old is None else old.created_at,
            now,
            snapshot,
        )
        await self._store.save_campaign(row)
        self._rows[engine.campaign_id] = row
        live.reported = False
        live.saved_at = now
        if engine.state not in ACTIVE:
            self._retire(live)

    async def _carry_out(
        self, live: _Live, decisions: Sequence[Decision], *, distributed: bool = False
    ) -> None:
        """Carry out ``decisions`` (``distributed``: the starts were made by the caller)."""
        if not decisions:
            return
        starts = [d for d in decisions if d.kind is DecisionKind.START_TARGET]
        activations = [d for d in decisions if d.kind is DecisionKind.ACTIVATE_TARGET]
        stops = [
            d
            for d in decisions
            if d.kind in (DecisionKind.CANCEL_TARGET, DecisionKind.TARGET_TIMED_OUT)
        ]
        if starts:
            await self._start(live, starts, distributed=distributed)
        if activations:
            await self._activate(live, [d.device_id for d in activations])
        if stops:
            self._stop(live, stops)
        for decision in decisions:
            cls = _EVENT_OF.get(decision.kind)
            if cls is not None:
                self._emit_step(live.engine, cls, decision)
        live.status_dirty = True

    async def _start(self, live: _Live, starts: Sequence[Decision], *, distributed: bool) -> None:
        engine = live.engine
        now = self._wall()
        for d in starts:
            self._started_at[(engine.campaign_id, d.device_id)] = now
        if engine.spec.payload.kind is PayloadKind.CREDENTIALS:
            result = await self._credentials.replace([d.device_id for d in starts])
            for refusal in result["refused"]:
                self._refused(live, refusal["device_id"], refusal["reason"], refusal["detail"])
            return
        image = live.image
        if image is None:
            for d in starts:
                self._refused(live, d.device_id, Reason.UNKNOWN_IMAGE.name, "image not held")
            return
        if not distributed:
            guids = list(dict.fromkeys(d.guid for d in starts))
            try:
                result = await self._distribution.distribute(image.hex, guids)
            except ProtocolError as exc:  # the image expired, or similar: every start fails
                for d in starts:
                    self._refused(live, d.device_id, exc.reason.name, exc.detail)
                return
            await self._devices.offered(image, result["started"], result["already"])
            by_guid = {r["guid"]: r for r in result["refused"]}
            for d in starts:
                refusal = by_guid.get(d.guid)
                if refusal is not None:
                    self._refused(live, d.device_id, refusal["reason"], refusal["detail"])
        for d in starts:
            self._resync(live, d.device_id)

    async def _activate(self, live: _Live, device_ids: Sequence[str]) -> None:
        image = live.image
        if image is None:
            return
        try:
            result = await self._devices.activate(
                image, device_ids, all_held=False, execute_at=None
            )
        except ProtocolError as exc:
            for device_id in device_ids:
                self._refused(live, device_id, exc.reason.name, exc.detail)
            return
        now = self._wall()
        for issued in result["issued"]:
            self._started_at[(live.engine.campaign_id, issued["device_id"])] = now
        for refusal in result["refused"]:
            device_id = refusal["device_id"]
            record = self._devices.records.get((device_id, image.sha256))
            if record is not None and record.state in (
                DeviceState.ACTIVATION_PENDING,
                DeviceState.ACTIVATED,
                DeviceState.CONFIRMED,
            ):
                continue  # issued before (a decision made again after a restart): not twice
            self._refused(live, device_id, refusal["reason"], refusal["detail"])
        for device_id in device_ids:
            self._resync(live, device_id)

    def _stop(self, live: _Live, stops: Sequence[Decision]) -> None:
        image = live.image
        if image is None:
            return
        for d in stops:
            reason = (
                Reason.TIMED_OUT if d.kind is DecisionKind.TARGET_TIMED_OUT else Reason.CANCELLED
            )
            self._distribution.cancel(image.sha256, [d.guid], reason)

    def _refused(self, live: _Live, device_id: str, reason: str, detail: str) -> None:
        state = TargetState.REJECTED if reason in _REJECTIONS else TargetState.FAILED
        log.info("campaign %s: %s %s: %s", live.engine.campaign_id, device_id, reason, detail)
        self._report(live, TargetReported(self._now(), device_id, state, reason))

    def _resync(self, live: _Live, device_id: str) -> None:
        """Feed the engine the target's durable state (a report it may already have had)."""
        engine = live.engine
        chain: list[tuple[TargetState, str]] = []
        if engine.spec.payload.kind is PayloadKind.CREDENTIALS:
            rec = self._credentials.records.get(device_id)
            mapped = None if rec is None else _replacement_state_of(rec)
            chain = [] if mapped is None else [mapped]
        else:
            image = live.image
            record = None if image is None else self._devices.records.get((device_id, image.sha256))
            chain = [] if record is None else target_states_of(record)
        now = self._now()
        for state, reason in chain:
            self._report(live, TargetReported(now, device_id, state, reason))

    async def _reconcile(self, live: _Live) -> None:
        """After a restart: every target's durable state re-derived; a start or an activation
        the crash lost carried out again (see the module docstring)."""
        await self._repair(live, "after a restart")
        await self._save(live)
        self._publish_status(live, self._wall(), force=True)

    async def _repair(self, live: _Live, when: str) -> None:
        """Level-triggered executors: every target re-derived from the durable records; one the
        engine started whose transfer does not exist is started, one it activated whose device
        was never issued a command is activated (a decision a crash or a failed store write
        lost). A device that was issued one is never sent a second."""
        engine = live.engine
        restart: list[Decision] = []
        reactivate: list[str] = []
        image = live.image
        for device_id, guid in engine.target_devices():
            self._resync(live, device_id)
            state = engine.target_state(device_id)
            if image is None:
                continue
            record = self._devices.records.get((device_id, image.sha256))
            if state is TargetState.STARTED and record is None:
                restart.append(
                    Decision(DecisionKind.START_TARGET, engine.campaign_id, 0, self._now(),
                             device_id=device_id, guid=guid)
                )  # fmt: skip
            elif (
                state is TargetState.ACTIVATING
                and record is not None
                and record.counter is None
                and record.state in (DeviceState.HELD_BY_DEVICE, DeviceState.HELD_BY_CH)
            ):
                reactivate.append(device_id)
        if restart:
            log.info("campaign %s: %d started again %s", engine.campaign_id, len(restart), when)
            await self._start(live, restart, distributed=False)
        if reactivate:
            log.info(
                "campaign %s: %d activated again %s", engine.campaign_id, len(reactivate), when
            )
            await self._activate(live, reactivate)

    # ------------------------------------------------------------------ events and status

    def _emit_created(self, live: _Live, actor: str) -> None:
        engine = live.engine
        stages = ", ".join(f"{s['name']} {s['targets']}" for s in engine.status()["stages"])
        self._events.emit(
            CampaignCreated(
                time=self._wall(),
                campaign=engine.campaign_id,
                stage="",
                actor=actor,
                reason=f"{engine.spec.payload.kind.value} {engine.spec.payload.artifact[:16]}:"
                f" {stages}; {len(engine.exclusions)} excluded",
                ordinal=1,
            )
        )

    def _emit_step(self, engine: Engine, cls: type[MonitorEvent], d: Decision) -> None:
        ordinal = 0
        for step in engine.audit:
            if step.kind is d.kind and step.stage == d.stage:
                ordinal += 1
            if step is d:
                break
        self._events.emit(
            cls(  # type: ignore[call-arg]
                time=d.at,
                campaign=d.campaign_id,
                stage=d.stage,
                actor=d.actor,
                reason=d.reason,
                ordinal=max(1, ordinal),
            )
        )

    @staticmethod
    def _confirmed_count(engine: Engine) -> int:
        """Targets done: confirmed (or, of a distribution-only campaign, held)."""
        counts = engine.counts()
        done = TargetState.HELD if engine.spec.payload.kind is PayloadKind.DISTRIBUTE else None
        return counts.get(TargetState.CONFIRMED, 0) + (counts.get(done, 0) if done else 0)

    def _sample_confirmed(self, live: _Live, now: float) -> None:
        """On each tick (never on a status request: how often someone asks must not change
        the figure), the count behind ``confirmed_per_minute``."""
        samples = live.confirmed
        if samples is None:
            return
        samples.append((now, self._confirmed_count(live.engine)))
        while samples and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()

    def _status_of(self, live: _Live, now: float) -> dict[str, Any]:
        engine = live.engine
        status = engine.status()
        samples = live.confirmed
        rate = 0.0
        if samples:
            confirmed = self._confirmed_count(engine)
            first_at, first = samples[0]
            if now - first_at >= 10:
                rate = (confirmed - first) * 60.0 / (now - first_at)
        eta = None
        current = next((s for s in status["stages"] if s["name"] == status["stage"]), None)
        if current is not None and rate > 0 and engine.state is CampaignState.RUNNING:
            counts = current["counts"]
            unsettled = sum(counts.get(s.value, 0) for s in engine.unsettled_states)
            eta = round(unsettled * 60.0 / rate, 1)
        idle = now - status["last_change_at"] if status["last_change_at"] else 0.0
        # its WAN transfers count as movement: thousands of them share the fleet's rate and end
        # together, minutes in which no target changes state and nothing is stuck
        wan = None if live.image is None else self._distribution.progress_of(live.image.sha256)
        if wan is not None:
            idle = min(idle, wan[2])
        stalled = (
            round(idle, 1)
            if engine.state is CampaignState.RUNNING and idle >= STALLED_AFTER_S
            else None
        )
        row = self._rows.get(engine.campaign_id)
        return {
            "v": STATUS_VERSION,
            "id": engine.campaign_id,
            **{k: v for k, v in status.items() if k != "campaign_id"},
            "payload": _payload_json(engine.spec.payload),
            "created_at": engine.spec.created_at,
            "updated_at": row.updated_at if row is not None else now,
            "confirmed_per_minute": round(rate, 2),
            "eta_s": eta,
            "stalled_s": stalled,
            "wan": None if wan is None else {"blocks_acked": wan[0], "blocks_total": wan[1]},
            "published_at": now,
        }

    def _publish_status(self, live: _Live, now: float, *, force: bool) -> None:
        """The retained status, on a change at most once a second, at least every 10 s."""
        due = force or (live.status_dirty and now - live.status_at >= 1.0)
        if not due and now - live.status_at < self._config.status_every_s:
            return
        live.status_at, live.status_dirty = now, False
        body = self._status_of(live, now)
        with contextlib.suppress(NotConnected):
            self._client.publish(
                topics.campaign_status(live.engine.campaign_id), dumps(body), 1, True
            )


def _conflict(guid: str, campaign: str) -> dict[str, str]:
    return {
        "guid": guid,
        "reason": Reason.CAMPAIGN_CONFLICT.name,
        "detail": f"its device belongs to active campaign {campaign}",
    }


def _payload_json(payload: Payload) -> dict[str, Any]:
    return {
        "kind": payload.kind.value,
        "image": None if payload.kind is PayloadKind.CREDENTIALS else payload.artifact,
        "fw_version": payload.fw_version,
    }


def _decision_json(d: Decision) -> dict[str, Any]:
    return {"kind": d.kind.value, "stage": d.stage, "actor": d.actor, "reason": d.reason,
            "at": d.at}  # fmt: skip


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat(timespec="seconds")


def image_size(image: Image) -> ImageSize:
    """The payload size the estimate needs."""
    m = image.manifest
    return ImageSize(m.block_count, m.block_size, m.size, m.device_type is DeviceType.CH)
