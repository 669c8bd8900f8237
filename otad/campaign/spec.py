"""What a campaign is: its payload, its target selection, its stage plan and its policies.

Everything here is a frozen dataclass of plain values, given by the operator (``otactl campaign
create``) and serialised whole into the engine's snapshot (:mod:`otad.campaign.codec`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from otad.campaign.window import ActivationWindow
from protocol.clock import UnixTime
from protocol.wire.devices import DeviceType

_EPOCH: Final = UnixTime(0.0)
#: The SEC's minimum notice before a CH firmware roll-out (SEC Appendix AB; SECMP0024).
NOTICE_S: Final = 7 * 24 * 3600.0
#: The size of a micro-pilot, in target devices (SECMP0024: "around 10-20 GUIDs").
MICRO_PILOT_SIZES: Final = range(10, 21)


class PayloadKind(enum.StrEnum):
    """What a campaign puts on its targets."""

    IMAGE = "image"  # one signed image: distributed, then activated as each target holds it
    DISTRIBUTE = "distribute"  # distributed only: a target that holds the image is done
    DISTRIBUTE_THEN_ACTIVATE = "distribute_then_activate"  # a stage is distributed whole first
    CREDENTIALS = "credentials"  # a credential replacement: one phase, no activation


class Component(enum.StrEnum):
    """The part of a device a campaign changes: at most one active campaign per component."""

    FIRMWARE = "firmware"
    CREDENTIALS = "credentials"


@dataclass(frozen=True, slots=True)
class Payload:
    """The image (its id in the catalogue, hex digest) or the credential set a campaign installs,
    and the firmware version a confirmed target runs (0 for credentials)."""

    kind: PayloadKind
    artifact: str
    fw_version: int = 0

    @property
    def component(self) -> Component:
        """The device component this payload changes."""
        if self.kind is PayloadKind.CREDENTIALS:
            return Component.CREDENTIALS
        return Component.FIRMWARE

    @property
    def activates(self) -> bool:
        """Whether targets are activated after they hold the payload."""
        return self.kind in (PayloadKind.IMAGE, PayloadKind.DISTRIBUTE_THEN_ACTIVATE)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which devices of the fleet a campaign is for; None (or empty) selects all."""

    device_type: DeviceType
    hw_min: int = 0
    hw_max: int = 0xFFFF
    fw_versions: frozenset[int] | None = None  # the versions targets run now
    suppliers: frozenset[str] | None = None
    segments: frozenset[str] | None = None
    guids: frozenset[str] | None = None  # an explicit list of premises (CH GUIDs)
    device_ids: frozenset[str] | None = None  # explicit devices (a retry campaign's)
    alt_han: bool | None = None  # premises with (True) or without (False) an Alt HAN bridge


class StageKind(enum.StrEnum):
    """The stages of a GB roll-out (SECMP0024)."""

    MICRO_PILOT = "micro_pilot"
    PILOT = "pilot"
    ROLLOUT = "rollout"


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: ``size`` targets, or ``share`` of all targets, or (neither) all that remain."""

    name: str
    kind: StageKind
    size: int | None = None
    share: float | None = None


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a stage is held: more incidents than the limits, or a failure rate above a
    threshold once ``min_sample`` targets of the stage have settled."""

    category1_limit: int = 0  # devices or CHs lost after activation
    category2_limit: int = 0  # failed activations with rollback
    failed_rate: float = 0.05
    rejected_rate: float = 0.05
    timed_out_rate: float = 0.10
    min_sample: int = 10


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds each phase of one target may take before it ends TIMED_OUT (None: no deadline)."""

    wan_delivery_s: float | None = 6 * 3600.0
    han_transfer_s: float | None = 24 * 3600.0
    activation_s: float | None = 3600.0
    confirmation_s: float | None = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class Rate:
    """CHs (targets) started per minute (0: no pacing, every target of a stage at once); after
    every ``ramp_every`` confirmations the rate is multiplied by ``ramp_factor``, up to
    ``max_per_minute`` (no ramp: factor 1)."""

    per_minute: float = 60.0
    ramp_factor: float = 1.0
    ramp_every: int = 0
    max_per_minute: float = 1000.0


@dataclass(frozen=True, slots=True)
class Dependency:
    """Targets wait until their CH runs at least ``ch_fw_version`` (SECMP0007: a HAN device's
    or a bridge's campaign follows the CH's upgrade)."""

    ch_fw_version: int


@dataclass(frozen=True, slots=True)
class Policies:
    """How a campaign runs."""

    window: ActivationWindow = field(default_factory=ActivationWindow)
    rate: Rate = field(default_factory=Rate)
    deadlines: Deadlines = field(default_factory=Deadlines)
    thresholds: Thresholds = field(default_factory=Thresholds)
    auto_gate_soak_s: float | None = None  # automatic GO after this soak, if thresholds hold
    #: An activated or confirmed target whose CH stays offline this long is LOST (category 1).
    lost_after_s: float = 3600.0
    dependency: Dependency | None = None


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """A campaign as the operator created it; ``parent`` is the campaign it retries."""

    campaign_id: str
    payload: Payload
    selection: Selection
    stages: tuple[StageSpec, ...]
    policies: Policies = field(default_factory=Policies)
    seed: int = 0
    parent: str | None = None
    created_at: UnixTime = _EPOCH

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a campaign has at least one stage")
        for stage in self.stages:
            if stage.size is not None and stage.share is not None:
                raise ValueError(f"stage {stage.name}: a size or a share, not both")
            if stage.kind is StageKind.MICRO_PILOT and (
                stage.size is None or stage.size not in MICRO_PILOT_SIZES
            ):
                raise ValueError(f"stage {stage.name}: a micro-pilot has 10-20 targets")
        if len({s.name for s in self.stages}) != len(self.stages):
            raise ValueError("stage names must differ")
