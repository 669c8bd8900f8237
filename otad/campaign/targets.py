"""Which devices a campaign is for, and in which stage each one is.

The fleet is a snapshot of plain data: the CHs' last announcements
(:class:`~protocol.wire.messages.HubAnnounced`, each with its HAN inventory). :func:`select`
evaluates a :class:`~otad.campaign.spec.Selection` against it and returns every target and, for
every premises left out, the reason. :func:`assign_stages` spreads the targets over the stage
plan: **stratified random**, never registration order. Targets are grouped by the shared
cell their CH declared (its segment), and each cell's members are placed at evenly spaced points
``(i + u) / n`` of one unit line (``u`` a random offset per cell, drawn from the campaign's
seed); within a cell the same is done by supplier, within a supplier by model (hardware
version), within a model by firmware version, and the last groups are shuffled. The stages then
take consecutive runs of that line: every stage gets a share of every cell in proportion to its
size (to within about one target), and of each supplier, model and firmware within it, so the
CHs of one cell never fill one stage (hawkBit #1086).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from otad.campaign.spec import Component, Selection, StageSpec
from protocol.wire.devices import DeviceType
from protocol.wire.messages import ALT_HAN_BRIDGES, HubAnnounced

#: The fleet as the engine sees it: the CHs' last announcements.
Fleet = Sequence[HubAnnounced]


@dataclass(frozen=True, slots=True)
class Target:
    """One device component a campaign changes, and what its stratum is made of."""

    device_id: str  # the CH's GUID for a CH, else the HAN device's EUI-64
    guid: str  # the premises (the CH the device is reached through)
    device_type: DeviceType
    supplier: str
    hw_version: int
    fw_version: int
    segment: str
    ch_fw_version: int  # what the premises' CH runs (for dependencies)

    @property
    def stratum(self) -> tuple[str, int, int, str]:
        """(supplier, hardware version, firmware version, segment)."""
        return (self.supplier, self.hw_version, self.fw_version, self.segment)

    def key(self, component: Component) -> tuple[str, str]:
        """What at most one active campaign may hold: (device, component)."""
        return (self.device_id, component.value)


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A premises (or one of its devices) left out, and why."""

    guid: str
    device_id: str
    reason: str


def _has_alt_han(hub: HubAnnounced) -> bool:
    return any(d.device_type in ALT_HAN_BRIDGES for d in hub.han)


def select(selection: Selection, fleet: Fleet) -> tuple[list[Target], list[Exclusion]]:
    """Every target of ``selection`` in ``fleet`` (in fleet order) and every exclusion."""
    targets: list[Target] = []
    exclusions: list[Exclusion] = []
    for hub in fleet:
        reason = _premises_refusal(selection, hub)
        if reason is not None:
            exclusions.append(Exclusion(hub.guid, hub.guid, reason))
            continue
        if selection.device_type is DeviceType.CH:
            candidates = [(hub.guid, hub.hw_version, hub.fw_version)]
        else:
            candidates = [
                (d.device_id, d.hw_version, d.fw_version)
                for d in hub.han
                if d.device_type is selection.device_type
            ]
            if not candidates:
                exclusions.append(
                    Exclusion(hub.guid, hub.guid, f"no {selection.device_type.value} on the HAN")
                )
        for device_id, hw, fw in candidates:
            why = _device_refusal(selection, device_id, hw, fw)
            if why is not None:
                exclusions.append(Exclusion(hub.guid, device_id, why))
                continue
            targets.append(
                Target(
                    device_id,
                    hub.guid,
                    selection.device_type,
                    hub.supplier,
                    hw,
                    fw,
                    hub.segment,
                    hub.fw_version,
                )
            )
    return targets, exclusions


def _premises_refusal(selection: Selection, hub: HubAnnounced) -> str | None:
    if selection.guids is not None and hub.guid not in selection.guids:
        return "not in the campaign's GUID list"
    if selection.suppliers is not None and hub.supplier not in selection.suppliers:
        return f"supplier {hub.supplier} not selected"
    if selection.segments is not None and hub.segment not in selection.segments:
        return f"segment {hub.segment} not selected"
    if selection.alt_han is not None and _has_alt_han(hub) is not selection.alt_han:
        return "has an Alt HAN bridge" if selection.alt_han is False else "no Alt HAN bridge"
    return None


def _device_refusal(selection: Selection, device_id: str, hw: int, fw: int) -> str | None:
    if selection.device_ids is not None and device_id not in selection.device_ids:
        return "not in the campaign's device list"
    if not selection.hw_min <= hw <= selection.hw_max:
        return f"hardware 0x{hw:04x} outside 0x{selection.hw_min:04x}..0x{selection.hw_max:04x}"
    if selection.fw_versions is not None and fw not in selection.fw_versions:
        return f"runs firmware 0x{fw:08x}, not one the campaign upgrades"
    return None


def stage_sizes(stages: Sequence[StageSpec], total: int) -> list[int]:
    """How many targets each stage takes of ``total``: sizes and shares first, in order, capped
    by what remains; a stage with neither takes the rest, shared equally between such stages
    (when every stage is sized, the last one takes what is left)."""
    sizes: list[int | None] = []
    remaining = total
    for stage in stages:
        if stage.size is not None:
            n = min(stage.size, remaining)
        elif stage.share is not None:
            n = min(round(stage.share * total), remaining)
        else:
            sizes.append(None)
            continue
        sizes.append(n)
        remaining -= n
    open_ended = sizes.count(None)
    result: list[int] = []
    for sized in sizes:
        if sized is None:
            share = remaining // open_ended + (1 if remaining % open_ended else 0)
            share = min(share, remaining)
            open_ended -= 1
            remaining -= share
            result.append(share)
        else:
            result.append(sized)
    if remaining and result:
        result[-1] += remaining  # all stages sized: the last one takes what is left
    return result


def assign_stages(
    targets: Iterable[Target], stages: Sequence[StageSpec], seed: int, campaign_id: str
) -> list[list[Target]]:
    """``targets`` spread over ``stages`` (stratified random, see the module docstring); the
    same seed and campaign id give the same stages."""
    digest = hashlib.sha256(f"{campaign_id}:{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    ordered = _spread(sorted(targets, key=lambda t: t.device_id), 0, rng)
    result: list[list[Target]] = []
    start = 0
    for size in stage_sizes(stages, len(ordered)):
        result.append(ordered[start : start + size])
        start += size
    return result


#: The strata, outermost first: the shared cell, then supplier, model (hardware), firmware.
_LEVELS: Final = (
    lambda t: t.segment,
    lambda t: t.supplier,
    lambda t: str(t.hw_version),
    lambda t: str(t.fw_version),
)


def _spread(targets: list[Target], level: int, rng: random.Random) -> list[Target]:
    """``targets`` in an order where every group of ``_LEVELS[level]`` is spread evenly (each
    group's members at points ``(i + u) / n`` of the line), and so on within each group."""
    if level == len(_LEVELS):
        rng.shuffle(targets)
        return targets
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(_LEVELS[level](target), []).append(target)
    placed: list[tuple[float, float, Target]] = []
    for key in sorted(groups):
        members = _spread(groups[key], level + 1, rng)
        offset, n = rng.random(), len(members)
        placed.extend(((i + offset) / n, rng.random(), t) for i, t in enumerate(members))
    placed.sort(key=lambda p: (p[0], p[1]))
    return [p[2] for p in placed]
