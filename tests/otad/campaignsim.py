"""A fleet snapshot and virtual executors for the campaign engine's tests (virtual time).

:func:`make_fleet` builds announcements with a known mix of suppliers, hardware, firmware and
segments; :class:`Run` drives an :class:`~otad.campaign.Engine` on a virtual wall clock: it ticks,
carries out the engine's decisions as the executors would (a started target is delivered, held,
and an activated one confirmed, after fixed virtual delays) and injects the faults a test names.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from otad.campaign import (
    CampaignSpec,
    Decision,
    DecisionKind,
    Engine,
    Input,
    Payload,
    PayloadKind,
    Policies,
    Selection,
    StageKind,
    StageSpec,
    TargetReported,
    TargetState,
    Ticked,
)
from protocol.clock import UnixTime
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.messages import HanDevice, HubAnnounced

#: 2026-06-01 12:00 UTC: a Monday, BST (the window tests choose their own dates).
T0 = UnixTime(1780315200.0)
SUPPLIERS = ("S-A", "S-B", "S-C")
HW = (0x0100, 0x0200)
FW = (0x10, 0x11)


def hub(
    i: int,
    *,
    supplier: str = "S-A",
    hw: int = 0x0100,
    fw: int = 0x10,
    segment: str = "cell-0",
    bridge: bool = False,
) -> HubAnnounced:
    """CH number ``i`` with an ESME (and a B2 Alt HAN bridge if ``bridge``)."""
    han = [HanDevice(f"{0xE000_0000 + i:016X}", DeviceType.ESME, JoinMode.NATIVE, fw, hw)]
    if bridge:
        han.append(HanDevice(f"{0xB000_0000 + i:016X}", DeviceType.B2, JoinMode.CAD, fw, hw))
    return HubAnnounced(
        guid=f"{i:016X}",
        fw_version=fw,
        hw_version=hw,
        supplier=supplier,
        segment=segment,
        han=tuple(han),
    )


def make_fleet(n: int, segments: int = 10) -> list[HubAnnounced]:
    """``n`` CHs registered in cell order: CH i is on segment ``i * segments // n`` (so the
    first CHs registered share one cell), suppliers, hardware and firmware cycling."""
    return [
        hub(
            i,
            supplier=SUPPLIERS[i % 3],
            hw=HW[(i // 3) % 2],
            fw=FW[(i // 7) % 2],
            segment=f"cell-{i * segments // n}",
            bridge=i % 20 == 0,
        )
        for i in range(n)
    ]


def ch_spec(
    campaign_id: str = "c1",
    *,
    stages: tuple[StageSpec, ...] | None = None,
    policies: Policies | None = None,
    kind: PayloadKind = PayloadKind.IMAGE,
    selection: Selection | None = None,
    seed: int = 7,
    created_at: UnixTime = T0,
) -> CampaignSpec:
    """A CH-firmware campaign: micro-pilot 15, pilot 20%, roll-out the rest (by default)."""
    return CampaignSpec(
        campaign_id,
        Payload(kind, "ab" * 32, 0x20),
        selection or Selection(DeviceType.CH),
        stages
        or (
            StageSpec("micro", StageKind.MICRO_PILOT, size=15),
            StageSpec("pilot", StageKind.PILOT, share=0.2),
            StageSpec("rollout", StageKind.ROLLOUT),
        ),
        policies or Policies(),
        seed=seed,
        created_at=created_at,
    )


Fault = Callable[[str], TargetState | None]


@dataclass
class Run:
    """An engine on a virtual clock with virtual executors (see the module docstring)."""

    engine: Engine
    now: UnixTime = T0
    tick_s: float = 5.0
    deliver_s: float = 30.0
    hold_s: float = 30.0
    confirm_s: float = 20.0
    #: device id -> the state it ends in instead of the next step (after its distribution)
    distribution_faults: dict[str, TargetState] = field(default_factory=dict)
    #: device id -> the state it ends in after its activation (ROLLED_BACK, FAILED, LOST...)
    activation_faults: dict[str, TargetState] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)  # never answer after a start
    decisions: list[Decision] = field(default_factory=list)
    journal: list[Input] = field(default_factory=list)
    _queue: list[tuple[float, int, Input]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def feed(self, item: Input) -> list[Decision]:
        """Hand one input to the engine and carry out its decisions."""
        self.journal.append(item)
        out = self.engine.handle(item)
        self.decisions.extend(out)
        for decision in out:
            self._execute(decision)
        return out

    def at(self, delay: float, item_of: Callable[[UnixTime], Input]) -> None:
        """Schedule an input ``delay`` seconds from now."""
        when = UnixTime(self.now + delay)
        heapq.heappush(self._queue, (when, next(self._order), item_of(when)))

    def advance(self, seconds: float) -> None:
        """Run ``seconds`` of virtual time: queued reports in order, a tick every ``tick_s``."""
        end = self.now + seconds
        next_tick = self.now + self.tick_s
        while True:
            due = self._queue[0][0] if self._queue else None
            if due is not None and due <= next_tick and due <= end:
                _, _, item = heapq.heappop(self._queue)
                self.now = UnixTime(due)
                self.feed(item)
            elif next_tick <= end:
                self.now = UnixTime(next_tick)
                self.feed(Ticked(self.now))
                next_tick += self.tick_s
            else:
                self.now = UnixTime(end)
                return

    def until(self, done: Callable[[], bool], limit_s: float = 30 * 24 * 3600.0) -> None:
        """Advance a tick at a time until ``done()`` (or fail after ``limit_s``)."""
        spent = 0.0
        while not done():
            assert spent < limit_s, f"not done after {limit_s} s: {self.engine.state}"
            self.advance(self.tick_s)
            spent += self.tick_s

    def kinds(self, kind: DecisionKind) -> list[Decision]:
        """The decisions of one kind so far."""
        return [d for d in self.decisions if d.kind is kind]

    def _report(self, delay: float, device_id: str, state: TargetState) -> None:
        self.at(delay, lambda when: TargetReported(when, device_id, state))

    def _execute(self, decision: Decision) -> None:
        device = decision.device_id
        if device in self.silent:
            return
        if decision.kind is DecisionKind.START_TARGET:
            fault = self.distribution_faults.get(device)
            if fault is not None:
                self._report(self.deliver_s, device, fault)
                return
            self._report(self.deliver_s, device, TargetState.DELIVERED)
            if self.engine.spec.payload.kind is PayloadKind.CREDENTIALS:
                self._report(self.deliver_s + self.hold_s, device, TargetState.CONFIRMED)
            else:
                self._report(self.deliver_s + self.hold_s, device, TargetState.HELD)
        elif decision.kind is DecisionKind.ACTIVATE_TARGET:
            fault = self.activation_faults.get(device)
            if fault is TargetState.LOST:
                self._report(self.confirm_s / 2, device, TargetState.ACTIVATED)
                self._report(self.confirm_s, device, TargetState.LOST)
            elif fault is not None:
                self._report(self.confirm_s, device, fault)
            else:
                self._report(self.confirm_s / 2, device, TargetState.ACTIVATED)
                self._report(self.confirm_s, device, TargetState.CONFIRMED)
