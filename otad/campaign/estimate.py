"""How long a campaign will take: the pacing model behind ``otactl campaign plan``.

Pure arithmetic on the plan (stage sizes, rate, soak, notice) and a :class:`PacingModel` of the
fleet: the shell fills the model from what it measured on this deployment (median phase times
of the targets it followed, the distribution's aggregate block rate) and falls back on the
configured defaults (``[campaigns]``) where it has measured nothing yet. Per stage::

    starts     (targets - 1) / rate            the rollout rate's spread (0: unpaced)
    WAN        max(starts + one transfer,      one CH's transfer (its window-limited rate),
                   blocks of all / fleet rate) or the fleet's shared throughput, if slower
    HAN        the device image at the HAN rate (0 for a CH image)
    activate   activation to confirmation
    soak       the automatic gate's soak (not after the last stage)
    tick       one evaluation tick (a settled stage is seen on the next)

A roll-out stage also waits for the notice (7 days after it, unless expedited). A manual gate
waits for people: the estimate counts none of that time and says so in its assumptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otad.campaign.spec import NOTICE_S, CampaignSpec, PayloadKind, StageKind


@dataclass(frozen=True, slots=True)
class PacingModel:
    """The fleet's speeds, measured or configured (``measured`` says which)."""

    transfer_blocks_per_s: float  # one CH's WAN transfer
    fleet_blocks_per_s: float  # every transfer together (the broker and otad's budget)
    han_bytes_per_s: float  # a CH relaying to one HAN device
    activation_s: float  # an activation issued -> the device confirmed
    tick_s: float
    measured: tuple[str, ...] = ()  # which of the above come from measurements


@dataclass(frozen=True, slots=True)
class ImageSize:
    """The payload's size on the WAN (blocks) and on the HAN (bytes)."""

    blocks: int
    block_size: int
    size: int
    for_ch: bool


def estimate(
    spec: CampaignSpec,
    stage_targets: Sequence[int],
    image: ImageSize | None,
    model: PacingModel,
    *,
    now: float,
    notice_at: float | None = None,
) -> dict[str, Any]:
    """The estimate of ``spec`` whose stages have ``stage_targets`` targets (JSON-ready)."""
    policies = spec.policies
    rate = policies.rate.per_minute
    soak = policies.auto_gate_soak_s
    blocks = image.blocks if image is not None else 0
    han_s = 0.0  # a HAN device's image is relayed by its CH before it is held
    if image is not None and not image.for_ch:
        han_s = image.size / model.han_bytes_per_s
    activates = spec.payload.activates
    stages: list[dict[str, Any]] = []
    clock = 0.0
    notice_over = None if notice_at is None else notice_at + NOTICE_S - now
    for index, (stage, n) in enumerate(zip(spec.stages, stage_targets, strict=True)):
        start_s = clock
        if stage.kind is StageKind.ROLLOUT and notice_over is not None:
            clock = max(clock, notice_over)
        starts = (n - 1) * 60.0 / rate if rate > 0 and n > 1 else 0.0
        one = blocks / model.transfer_blocks_per_s if blocks else 0.0
        shared = n * blocks / model.fleet_blocks_per_s if blocks else 0.0
        wan = max(starts + one, shared) if n else 0.0
        if spec.payload.kind is PayloadKind.CREDENTIALS:
            wan = starts + model.activation_s  # one command and its confirmation
        activate = model.activation_s if activates and n else 0.0
        last = index == len(spec.stages) - 1
        stage_soak = soak if soak is not None and not last else 0.0
        total = wan + (han_s if n else 0.0) + activate + stage_soak + model.tick_s
        clock += total
        stages.append(
            {
                "name": stage.name,
                "start_s": round(start_s, 1),
                "distribute_s": round(wan, 1),
                "han_s": round(han_s if n else 0.0, 1),
                "activate_s": round(activate, 1),
                "soak_s": round(stage_soak, 1),
                "total_s": round(total, 1),
            }
        )
    assumptions = [
        f"one CH's transfer at {model.transfer_blocks_per_s:.0f} blocks/s, all together at"
        f" {model.fleet_blocks_per_s:.0f} blocks/s",
        f"HAN relay at {model.han_bytes_per_s:.0f} B/s, activation to confirmation"
        f" {model.activation_s:.0f} s",
        "measured here: " + (", ".join(model.measured) if model.measured else "nothing yet"),
    ]
    if soak is None and len(spec.stages) > 1:
        assumptions.append("manual gates: the time until each GO is not counted")
    if rate > 0 and spec.policies.rate.ramp_factor > 1:
        assumptions.append("the ramp is not counted (the base rate throughout)")
    if policies.window.cron.split()[:2] != ["*", "*"]:
        assumptions.append(f"activation window {policies.window.cron}: waits for it not counted")
    if any(s.kind is StageKind.ROLLOUT for s in spec.stages) and notice_at is None:
        assumptions.append("the roll-out waits 7 days from the notice (not published yet)")
    figures = {
        "transfer_blocks_per_s": round(model.transfer_blocks_per_s, 3),
        "fleet_blocks_per_s": round(model.fleet_blocks_per_s, 3),
        "han_bytes_per_s": round(model.han_bytes_per_s, 3),
        "activation_s": round(model.activation_s, 3),
        "tick_s": model.tick_s,
        "measured": list(model.measured),
    }
    return {"total_s": round(clock, 1), "stages": stages, "assumptions": assumptions,
            "model": figures}  # fmt: skip
