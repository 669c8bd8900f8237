"""The virtual CH's HAN side: between its WAN (MQTT) and its premises (SPEC §8.10, protocol 1.1).

:class:`HanSide` is what a virtual CH (:class:`loadtest.hub.VirtualHub`) hands its HAN work to.
It owns the CH's :class:`~loadtest.premises.Premises` (created on first use: a premises derives
its devices' signing keys, which a fleet of thousands of CHs that only ever hold images should
not pay for) and translates both ways:

* in, from otad on the CH's down topic: :class:`~protocol.wire.messages.Activate` (a signed
  activation command, relayed verbatim to its device) and
  :class:`~protocol.wire.messages.ReadVersion` (a read-back); and, from the CH itself, every image
  it now holds (:meth:`HanSide.image_held`), relayed to the devices it is for;
* out, on the CH's up topic: :class:`~protocol.wire.messages.DeviceTransferReported` for each
  relay's progress (rate-limited by the premises) and outcome, and
  :class:`~protocol.wire.messages.DeviceReported` for each device activation record: the device's
  own answers, signed alerts and credential confirmations (SPEC §8.11; evidence ``device``), and
  the CH's version reports (evidence
  ``ch``: a CAD bridge's reboot and next query, or the answer to a read-back).

A refused activation command (replayed, forged, for another device) gets no answer on the WAN:
the device refused it before acting on it, and otad's read-back finds out what runs. The premises
runs on the wall clock (:data:`~protocol.clock.UnixTime`, the HAN's time); its one timer is put on
the event loop as a delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loadtest.premises import (
    ActivationAnswered,
    ActivationRefused,
    AlertReceived,
    CredentialsRefused,
    CredentialsReplaced,
    Premises,
    PremisesConfig,
    TransferEnded,
    TransferProgressed,
    VersionReported,
)
from protocol.clock import UnixTime
from protocol.errors import ProtocolError
from protocol.release.manifest import Manifest
from protocol.release.trust import TrustStore
from protocol.wire.messages import (
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    HanDevice,
    Message,
    ReadVersion,
)

if TYPE_CHECKING:
    from loadtest.hub import HubIdentity

log = logging.getLogger("loadtest.chhan")


@dataclass(slots=True)
class HanStats:
    """What the HAN side relayed (for the virtual CH's statistics)."""

    relayed: int = 0  # images handed to the premises for relay
    commands: int = 0  # activation commands relayed to a device
    reads: int = 0  # version reads relayed
    reports: int = 0  # DeviceTransferReported and DeviceReported sent up
    refused_commands: dict[str, int] = field(default_factory=dict)  # by the device, by reason
    not_here: int = 0  # commands or reads for a device not on this premises


class HanSide:
    """One virtual CH's HAN: its premises and the WAN messages that carry it (module doc)."""

    def __init__(
        self,
        identity: HubIdentity,
        *,
        trust: TrustStore,
        activation_trust: TrustStore,
        send: Callable[[Message], None],
        loop: asyncio.AbstractEventLoop,
        config: PremisesConfig | None = None,
        on_ch_reboot: Callable[[int], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``send(message)`` publishes on the CH's up topic; ``on_ch_reboot(fw_version)`` is
        called when the CH's own firmware was activated (or rolled back)."""
        self._identity = identity
        self._trust = trust
        self._activation_trust = activation_trust
        self._send = send
        self._loop = loop
        self._config = config
        self._on_ch_reboot = on_ch_reboot
        self._wall_clock = wall_clock
        self._premises: Premises | None = None
        self._sizes: dict[bytes, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.stats = HanStats()

    @property
    def premises(self) -> Premises:
        """The premises (created on first use)."""
        if self._premises is None:
            self._premises = Premises(
                self._identity,
                trust=self._trust,
                activation_trust=self._activation_trust,
                now=self._now(),
                config=self._config,
                on_ch_reboot=self._on_ch_reboot,
            )
        return self._premises

    def inventory(self) -> tuple[HanDevice, ...]:
        """The HAN inventory with the firmware versions the devices run now, for the CH's next
        announcement (the identity's own before the premises exists: nothing ran anything new)."""
        if self._premises is None:
            return self._identity.han
        return self._premises.inventory()

    def _now(self) -> UnixTime:
        return UnixTime(self._wall_clock())

    # ------------------------------------------------------------------ inputs

    def image_held(self, manifest: Manifest, signed_manifest: bytes, image: bytes) -> None:
        """The CH verified and holds ``image``: relay it to the devices it is for."""
        self._sizes[manifest.sha256] = manifest.size
        try:
            self.premises.image_held(manifest, signed_manifest, image, self._now())
        except ProtocolError as exc:  # no device of its type here: nothing to relay
            log.debug("%s: not relayed: %s", self._identity.guid, exc)
            return
        self.stats.relayed += 1
        self._after()

    def down_received(self, message: Activate | ReadVersion) -> None:
        """An :class:`Activate` or :class:`ReadVersion` from otad."""
        try:
            if isinstance(message, Activate):
                self.stats.commands += 1
                self.premises.activation_received(message.device_id, message.command, self._now())
            else:
                self.stats.reads += 1
                self.premises.version_read(message.device_id, self._now())
        except ProtocolError as exc:  # WRONG_DEVICE: not on this premises
            self.stats.not_here += 1
            log.warning("%s: %s for %s: %s", self._identity.guid, type(message).__name__,
                        message.device_id, exc)  # fmt: skip
        self._after()

    def resumed(self) -> None:
        """The CH runs again after a stop or a power cut: its HAN carries on from where it was
        (the devices kept their state; what fell due meanwhile happens now). Without this a
        HAN transfer cut by a flap waited for ever at its last block."""
        if self._premises is not None:
            self._premises.handle_timer(self._now())
        self._after()

    def close(self) -> None:
        """Stop the timer (the CH stops or restarts)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ outputs

    def _after(self) -> None:
        premises = self._premises
        if premises is None:
            return
        for event in premises.events():
            message = self._report(event)
            if message is not None:
                self.stats.reports += 1
                self._send(message)
        self._arm(premises.next_deadline())

    def _report(self, event: object) -> Message | None:
        if isinstance(event, TransferProgressed):
            return DeviceTransferReported(
                image=event.image_sha256,
                device_id=event.device_id,
                state=DeviceTransferState.TRANSFERRING,
                bytes_held=event.bytes_done,
                size=event.size,
                reason=0,
            )
        if isinstance(event, TransferEnded):
            size = self._sizes.get(event.image_sha256, 0)
            state = DeviceTransferState(event.outcome.value)
            return DeviceTransferReported(
                image=event.image_sha256,
                device_id=event.device_id,
                state=state,
                bytes_held=size if state is DeviceTransferState.HELD else 0,
                size=size,
                reason=0 if event.reason is None else int(event.reason),
            )
        if isinstance(event, ActivationAnswered):
            return DeviceReported(event.device_id, event.answer.encode(), Evidence.DEVICE)
        if isinstance(event, (AlertReceived, CredentialsReplaced)):
            return DeviceReported(event.device_id, event.signed, Evidence.DEVICE)
        if isinstance(event, VersionReported):
            return DeviceReported(event.device_id, event.report.encode(), Evidence.CH)
        if isinstance(event, (ActivationRefused, CredentialsRefused)):
            name = event.reason.name
            self.stats.refused_commands[name] = self.stats.refused_commands.get(name, 0) + 1
        return None

    def _arm(self, deadline: UnixTime | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(0.0, deadline - self._wall_clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._premises is not None:
            self._premises.handle_timer(self._now())
        self._after()
