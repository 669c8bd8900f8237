"""Monitoring events: one frozen dataclass per kind, their JSON, their topics, and the decoder.

otad tells monitoring tools what happens through JSON events on ``ota/v1/events/...`` (QoS 1),
committed to a durable outbox before they are published (:mod:`otad.outbox`). This module is what
an event *is*; it does no I/O, so tools import it alone (:func:`decode_event`). The schema for
people is ``docs/EVENTS.md``, for programs ``docs/events.schema.json``; both are generated from or
checked against these classes (:mod:`otad.schema`, ``tests/otad/test_event_schema.py``).

Every event, schema version 1 (``v`` changes only with an incompatible change: adding a field is
compatible, so a consumer ignores the fields it does not know)::

    {"v": 1, "kind": "transfer.held", "seq": 42, "key": "transfer.held:0123456789ABCDEF:9f86...:1",
     "time": 1767225600.123, "time_iso": "2026-01-01T00:00:00.123Z", ...the kind's fields...}

* ``seq`` is a monotonic sequence without gaps, assigned when the event is committed to the
  outbox. A monitor that deduplicates by ``seq`` sees every event exactly once, across otad
  restarts (a duplicate may appear on the wire, with the same ``seq``).
* ``key`` is the idempotency key, derived from the event's fields (:meth:`MonitorEvent.key`):
  committing an event whose key is already in the outbox gives the existing ``seq`` and publishes
  nothing new, so re-deriving the same fact after a restart (a CH reporting again that it holds
  an image) makes no second event.
* Times are unix seconds (``time``, to the millisecond) and also ISO 8601 UTC (``time_iso``);
  firmware and hardware versions are integers and also hex strings (``fw_version_hex``:
  ``"0x01020304"``, ``hw_version_hex``: ``"0x0100"``).

Topics: an event about one CH is published on ``<prefix>/<kind>/<guid>``, any other on
``<prefix>/<kind>`` (``prefix`` is ``events.topic_prefix``, by default ``ota/v1/events``), so
``ota/v1/events/#`` is every event, ``ota/v1/events/transfer.held/#`` every ``transfer.held`` and
``ota/v1/events/+/0123456789ABCDEF`` everything about one CH.

Alerts (SECMP0024) go to the supplier that owns the premises, not to every monitor: an event of an
``ALERT`` kind (``device.confirmed``, ``device.failed``) is published on
``ota/v1/alerts/<supplier_topic>/<kind>/<guid>``, where ``supplier_topic`` is
:func:`supplier_topic_id` of the CH's declared supplier (a label of any printable characters,
SPEC §3, made a topic level: a slug and a hash), so one broker ACL line per supplier
(``pattern read ota/v1/alerts/<its id>/#``) gives each supplier its own alerts and no other's.

A class's name is its kind in CamelCase; its ``KIND`` is the kind. A progress report
(``SUPERSEDABLE``) still waiting to be committed is dropped when a newer event about the same
:meth:`~MonitorEvent.subject` (one attempt of one transfer) is emitted.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

__all__ = [
    "ALERTS_PREFIX",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "CampaignAborted",
    "CampaignCompleted",
    "CampaignCreated",
    "CampaignExpediteRequested",
    "CampaignExpedited",
    "CampaignGateDecided",
    "CampaignGateOpened",
    "CampaignHeld",
    "CampaignNoticePublished",
    "CampaignNoticeWait",
    "CampaignPaused",
    "CampaignResumed",
    "CampaignStageStarted",
    "CredentialsFailed",
    "CredentialsReplaced",
    "DeviceConfirmed",
    "DeviceFailed",
    "DistributionResumed",
    "DistributionStalled",
    "EventDecodeError",
    "HubFlapping",
    "HubForgotten",
    "HubOffline",
    "HubOnline",
    "HubRefused",
    "HubSteady",
    "ImageImported",
    "MonitorEvent",
    "TransferFailed",
    "TransferHeld",
    "TransferProgress",
    "TransferStalled",
    "TransferStarted",
    "decode_event",
    "event_topic",
    "iso_time",
    "payload_topic",
    "supplier_topic_id",
]

SCHEMA_VERSION: Final = 1
"""The ``v`` of every event (and of the retained status)."""
ALERTS_PREFIX: Final = "ota/v1/alerts"
"""Where alerts go, under each supplier's own topic level (see the module docstring)."""

_GUID = re.compile(r"[0-9A-F]{16}")
_TOPIC_LEVEL = re.compile(r"[a-z0-9-]{1,64}")


class EventDecodeError(ValueError):
    """A payload that is not an event of a known kind of this schema version."""


def doc(text: str, *, hex_digits: int | None = None, default: object = dataclasses.MISSING) -> Any:
    """A field's description (the schema's and ``docs/EVENTS.md``'s); ``hex_digits``: the JSON
    also carries it as ``<name>_hex``, ``0x`` and that many digits. A field with a ``default``
    was added after its kind: a payload without it (an older otad's) decodes to the default."""
    metadata: dict[str, object] = {"doc": text}
    if hex_digits is not None:
        metadata["hex"] = hex_digits
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def iso_time(unix: float) -> str:
    """Unix seconds as ISO 8601 UTC to the millisecond: ``2026-01-01T00:00:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorEvent:
    """What every event has (see the module docstring)."""

    KIND: ClassVar[str]
    """The kind, e.g. ``"transfer.held"``."""
    SUPERSEDABLE: ClassVar[bool] = False
    """A newer event about the same subject drops this one while it waits to be committed."""
    ABOUT_A_HUB: ClassVar[bool] = False
    """The event is about one CH: its GUID is the last level of its topic."""
    ALERT: ClassVar[bool] = False
    """An alert for the premises' supplier: published under :data:`ALERTS_PREFIX`, in the
    level ``supplier_topic`` (see the module docstring)."""

    time: float = doc("when it happened, unix seconds (UTC, to the millisecond)")
    seq: int = field(default=0, compare=False, metadata={"doc": "the outbox sequence"})
    """Assigned when the event is committed (0 before); not one of the kind's fields."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "time", round(self.time, 3))

    def key(self) -> str:
        """The idempotency key, from the fields (the same fact gives the same key)."""
        raise NotImplementedError

    def subject(self) -> str | None:
        """What the event is about, for superseding progress reports (None: nothing)."""
        return None

    def fields(self) -> dict[str, Any]:
        """The kind's fields as JSON values, with their ``_hex`` twins (no envelope)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("time", "seq"):
                continue
            value = getattr(self, f.name)
            out[f.name] = value
            digits = f.metadata.get("hex")
            if digits is not None:
                out[f"{f.name}_hex"] = f"0x{value:0{digits}x}"
        return out

    def payload(self) -> dict[str, Any]:
        """What the outbox stores: the envelope without ``seq`` and ``key``, and the fields."""
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "time": self.time,
            "time_iso": iso_time(self.time),
            **self.fields(),
        }

    def topic(self, prefix: str) -> str:
        """The event's topic under ``prefix`` (an alert's: under its supplier's level of
        :data:`ALERTS_PREFIX`; see the module docstring)."""
        return payload_topic(prefix, self.KIND, self.fields())

    def _ms(self) -> int:
        return round(self.time * 1000)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageImported(MonitorEvent):
    """A verified release entered otad's catalogue (``otactl image import``)."""

    KIND: ClassVar[str] = "image.imported"

    image: str = doc("the image's SHA-256, hex")
    device_type: str = doc("the device type its manifest targets (CH, ESME, ..., B4)")
    fw_version: int = doc("the firmware version it installs (u32)", hex_digits=8)
    sequence: int = doc("the manifest's anti-rollback sequence number")
    size: int = doc("bytes of the image")
    block_size: int = doc("bytes per block")
    blocks: int = doc("blocks of the image")

    def key(self) -> str:
        return f"image.imported:{self.image}"


# --------------------------------------------------------------------------- hubs


@dataclass(frozen=True, slots=True, kw_only=True)
class HubOnline(MonitorEvent):
    """A CH announced itself and was not online before (its first announcement, or after its
    last will)."""

    KIND: ClassVar[str] = "hub.online"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID (EUI-64, 16 upper-case hex digits)")
    segment: str = doc("the network segment (shared cell) it declared")
    supplier: str = doc("the supplier it declared")
    fw_version: int = doc("the CH's firmware version (u32)", hex_digits=8)
    hw_version: int = doc("the CH's hardware version (u16)", hex_digits=4)

    def key(self) -> str:
        return f"hub.online:{self.guid}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubOffline(MonitorEvent):
    """An online CH's last will arrived: the broker lost its connection."""

    KIND: ClassVar[str] = "hub.offline"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID")

    def key(self) -> str:
        return f"hub.offline:{self.guid}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubForgotten(MonitorEvent):
    """An operator removed a CH from the fleet (``otactl fleet forget``): its announcement, HAN
    inventory, ended transfers and device records are gone from otad. A retained copy of its
    announcement no longer brings it back; a live announcement does."""

    KIND: ClassVar[str] = "hub.forgotten"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID")
    online: bool = doc("whether it was online when it was forgotten")
    transfers: int = doc("its ended transfers removed")
    devices: int = doc("its device records removed (HAN devices, or the CH as its own device)")

    def key(self) -> str:
        return f"hub.forgotten:{self.guid}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubFlapping(MonitorEvent):
    """A CH's presence changes too often to mean anything (:mod:`otad.flapping`): a cloned hub
    (two connections with one GUID taking the session over from each other) or a reconnect
    loop. Once per episode: until ``hub.steady``, its ``hub.online`` / ``hub.offline`` events
    are held back and its transfers are suspended (two clones' acknowledgements would
    interleave)."""

    KIND: ClassVar[str] = "hub.flapping"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID")
    changes: int = doc("presence changes (online, offline) seen within window_s")
    window_s: float = doc("seconds from the first of those changes to the last")

    def key(self) -> str:
        return f"hub.flapping:{self.guid}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubSteady(MonitorEvent):
    """A flapping CH has had no presence change for ``quiet_s``: its episode is over, its
    presence is reported again and its transfers re-synchronise."""

    KIND: ClassVar[str] = "hub.steady"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID")
    online: bool = doc("whether it is online now (hub.online / hub.offline were held back)")
    changes: int = doc("presence changes held back during the episode")
    flapped_s: float = doc("seconds from the episode's start to its last change")
    quiet_s: float = doc("seconds since its last change")

    def key(self) -> str:
        return f"hub.steady:{self.guid}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HubRefused(MonitorEvent):
    """otad refused a message from a CH (SPEC §5.1): it changed nothing. At most one per CH and
    reason a minute (what the limit suppresses is counted in the status's ``refusals``)."""

    KIND: ClassVar[str] = "hub.refused"
    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID (from the topic the message came on)")
    source: str = doc("which of its topics the message came on: state or up")
    of: int = doc("the refused message's type code (0: it did not decode that far)")
    reason: str = doc("why, a reason name (SPEC §4), e.g. MALFORMED")
    detail: str = doc("what was wrong, for people (at most 200 characters)")
    told: bool = doc("a Refused went to the CH (it declared protocol 1.1 or later)")

    def key(self) -> str:
        return f"hub.refused:{self.guid}:{self.reason}:{self._ms()}"


# --------------------------------------------------------------------------- transfers


@dataclass(frozen=True, slots=True, kw_only=True)
class _TransferEvent(MonitorEvent):
    """An event about one attempt of one (CH, image) transfer."""

    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the CH's GUID")
    image: str = doc("the image's SHA-256, hex")
    attempt: int = doc("which attempt of this transfer (1 the first time)")
    campaign: str = doc("the campaign it belongs to ('' if none)", default="")

    def _transfer(self) -> str:
        return f"{self.guid}:{self.image}:{self.attempt}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferStarted(_TransferEvent):
    """otad began (or, after a restart, resumed) sending an image to a CH; emitted again on
    resume with the same key, so it is stored once."""

    KIND: ClassVar[str] = "transfer.started"

    blocks_total: int = doc("blocks of the image")

    def key(self) -> str:
        return f"transfer.started:{self._transfer()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferProgress(_TransferEvent):
    """A transfer's acknowledged blocks, at most one every ``events.progress_interval_s`` per
    transfer and none at the end (``transfer.held`` or ``transfer.failed`` closes it)."""

    KIND: ClassVar[str] = "transfer.progress"
    SUPERSEDABLE: ClassVar[bool] = True

    blocks_acked: int = doc("blocks the CH has acknowledged")
    blocks_total: int = doc("blocks of the image")
    bytes_sent: int = doc("block payload bytes published for this transfer, repeats included")

    def key(self) -> str:
        return f"transfer.progress:{self._transfer()}:{self.blocks_acked}"

    def subject(self) -> str:
        return self._transfer()


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferHeld(_TransferEvent):
    """The CH reports it holds the whole image, with the digest it computed."""

    KIND: ClassVar[str] = "transfer.held"

    sha256: str = doc("the SHA-256 the CH computed over what it stored, hex")
    matches: bool = doc("whether that is the manifest's digest")
    blocks_total: int = doc("blocks of the image")
    bytes_sent: int = doc("block payload bytes published for this transfer, repeats included")
    retransmissions: int = doc("blocks published again within a sender's life")

    def key(self) -> str:
        return f"transfer.held:{self._transfer()}"

    def subject(self) -> str:
        return self._transfer()


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferFailed(_TransferEvent):
    """A transfer ended without the CH holding the image (refused, timed out, cancelled...)."""

    KIND: ClassVar[str] = "transfer.failed"

    reason: str = doc("the reason's name (protocol.errors.Reason, SPEC 4)")
    code: int = doc("the reason's number")
    detail: str = doc("what happened, for people (at most 200 characters)")

    def key(self) -> str:
        return f"transfer.failed:{self._transfer()}"

    def subject(self) -> str:
        return self._transfer()


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferStalled(_TransferEvent):
    """A scheduled transfer made no progress for ``transfer.stall_after_s`` (once per episode;
    its next progress or its end closes the episode)."""

    KIND: ClassVar[str] = "transfer.stalled"

    idle_s: float = doc("seconds since its last progress")
    phase: str = doc("the sender's state (offering, streaming, verifying)")
    scheduler: str = doc("its place with the scheduler (pending, running, queued, throttled)")
    blocks_acked: int = doc("blocks the CH has acknowledged")
    blocks_total: int = doc("blocks of the image")

    def key(self) -> str:
        return f"transfer.stalled:{self._transfer()}:{self._ms()}"


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributionStalled(MonitorEvent):
    """No transfer of an image progressed for ``transfer.stall_after_s`` while some are active;
    the active transfers by where they wait."""

    KIND: ClassVar[str] = "distribution.stalled"

    image: str = doc("the image's SHA-256, hex")
    active: int = doc("transfers of it in progress")
    idle_s: float = doc("seconds since any of them progressed")
    blocks_acked: int = doc("blocks acknowledged over the active transfers")
    blocks_total: int = doc("blocks wanted over the active transfers")
    offline: int = doc("active transfers whose CH is offline")
    pending: int = doc("... waiting for admission (an ask)")
    running: int = doc("... admitted and sending")
    queued: int = doc("... waiting in turn for the global budget")
    throttled: int = doc("... waiting for their segment's tokens")

    def key(self) -> str:
        return f"distribution.stalled:{self.image}:{self._ms()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributionResumed(MonitorEvent):
    """A stalled distribution moves again (or has nothing left in progress)."""

    KIND: ClassVar[str] = "distribution.resumed"

    image: str = doc("the image's SHA-256, hex")
    active: int = doc("transfers of it in progress")
    stalled_s: float = doc("seconds it was stalled")

    def key(self) -> str:
        return f"distribution.resumed:{self.image}:{self._ms()}"


# --------------------------------------------------------------------------- device alerts


@dataclass(frozen=True, slots=True, kw_only=True)
class _DeviceAlert(MonitorEvent):
    """An alert about one device (a HAN device, or a CH itself) of one premises."""

    ABOUT_A_HUB: ClassVar[bool] = True
    ALERT: ClassVar[bool] = True

    guid: str = doc("the premises: its CH's GUID")
    supplier: str = doc("the supplier the CH declared (it owns the premises)")
    supplier_topic: str = doc("the supplier's topic level under ota/v1/alerts (slug-hash)")
    device_id: str = doc("the device's EUI-64 (the CH's GUID when the CH itself is meant)")
    device_type: str = doc("the device's type: CH, ESME, GSME, PPMID, HCALCS, B1-B4")
    image: str = doc("the image's SHA-256, hex")
    counter: int = doc("the activation command's counter (0: none was issued)")
    campaign: str = doc("the campaign it belongs to ('' if none)", default="")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfirmed(_DeviceAlert):
    """A device proved it runs the new firmware (SECMP0024): it counts as upgraded."""

    KIND: ClassVar[str] = "device.confirmed"

    fw_version: int = doc("the firmware version it now runs (u32)", hex_digits=8)
    proof: str = doc("how it was proven: signed_alert, ch_evidence or read_back")

    def key(self) -> str:
        return f"device.confirmed:{self.device_id}:{self.image}:{self.counter}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceFailed(_DeviceAlert):
    """A device will not run the image: its HAN transfer or its activation failed, it rolled
    back after a failed self-test, or it stopped answering (``TIMED_OUT``)."""

    KIND: ClassVar[str] = "device.failed"

    fw_version: int = doc("the firmware version it runs (u32; 0: unknown)", hex_digits=8)
    state: str = doc("where it ended: failed or timed_out")
    reason: str = doc("why, a reason name (SPEC §4), e.g. SELF_TEST_FAILED, HASH_MISMATCH")
    rolled_back: bool = doc("the new image booted, failed its self-test, and was rolled back")

    def key(self) -> str:
        return f"device.failed:{self.device_id}:{self.image}:{self.counter}:{self.reason}"


# --------------------------------------------------------------------------- device credentials


@dataclass(frozen=True, slots=True, kw_only=True)
class _CredentialsEvent(MonitorEvent):
    """About one device's credential replacement (SPEC §8.11; ``otactl credentials replace``).
    On the feed, not a supplier alert: which key otad trusts for a device is the operator's."""

    ABOUT_A_HUB: ClassVar[bool] = True

    guid: str = doc("the premises: its CH's GUID")
    device_id: str = doc("the device's EUI-64")
    device_type: str = doc("the device's type: ESME, GSME, PPMID, HCALCS, B1-B4")
    counter: int = doc("the last credentials command's counter (the device's command sequence)")
    attempts: int = doc("credentials commands sent for this replacement, retries included")
    old_kid: str = doc("the key id (hex, 8 bytes) of the key the commands named (trusted before)")
    campaign: str = doc("the campaign it belongs to ('' if none)", default="")


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialsReplaced(_CredentialsEvent):
    """A device generated a new key pair and confirmed it under its old key: otad trusts only
    the new key for its alerts from now on."""

    KIND: ClassVar[str] = "credentials.replaced"

    new_kid: str = doc("the key id (hex, 8 bytes) of the key otad trusts for the device now")

    def key(self) -> str:
        return f"credentials.replaced:{self.device_id}:{self.counter}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialsFailed(_CredentialsEvent):
    """A replacement ended without a confirmation otad could adopt: otad still trusts the old
    key (``old_kid``)."""

    KIND: ClassVar[str] = "credentials.failed"

    reason: str = doc("why, a reason name (SPEC §4): TIMED_OUT after every attempt")

    def key(self) -> str:
        return f"credentials.failed:{self.device_id}:{self.counter}:{self.reason}"


# --------------------------------------------------------------------------- campaigns


@dataclass(frozen=True, slots=True, kw_only=True)
class _CampaignEvent(MonitorEvent):
    """A step of a campaign (otad/campaign: its engine's decisions), with who took it and why;
    the same steps are the campaign's audit trail (``otactl campaign history``)."""

    campaign: str = doc("the campaign's id")
    stage: str = doc("the stage it is about ('' if none)")
    actor: str = doc("who decided: the control client's authenticated identity, or otad")
    reason: str = doc("why, for people")
    ordinal: int = doc(
        "how many steps of this kind (and stage) the campaign has taken, this one included"
    )

    def key(self) -> str:
        return f"{self.KIND}:{self.campaign}:{self.stage}:{self.ordinal}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignCreated(_CampaignEvent):
    """A campaign was created: its targets chosen and spread over its stages (nothing started);
    ``reason`` gives the payload, the targets per stage and the exclusions."""

    KIND: ClassVar[str] = "campaign.created"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignStageStarted(_CampaignEvent):
    """A stage began: its targets are started at the campaign's rate."""

    KIND: ClassVar[str] = "campaign.stage.started"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignGateOpened(_CampaignEvent):
    """A stage settled: a go/no-go decision is awaited (or an automatic GO after the soak)."""

    KIND: ClassVar[str] = "campaign.gate.opened"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignGateDecided(_CampaignEvent):
    """A go/no-go decision was recorded (``reason`` starts ``GO:`` or ``NO-GO:``)."""

    KIND: ClassVar[str] = "campaign.gate.decided"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignHeld(_CampaignEvent):
    """The campaign is ON HOLD (an incident or failure threshold crossed, or a NO-GO): nothing
    more is started or activated until a recorded GO."""

    KIND: ClassVar[str] = "campaign.held"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignResumed(_CampaignEvent):
    """A held or paused campaign runs again."""

    KIND: ClassVar[str] = "campaign.resumed"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignPaused(_CampaignEvent):
    """An operator paused the campaign (``otactl campaign hold`` while it runs)."""

    KIND: ClassVar[str] = "campaign.paused"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignNoticePublished(_CampaignEvent):
    """The roll-out notice was published: the roll-out stage may start 7 days later."""

    KIND: ClassVar[str] = "campaign.notice.published"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignNoticeWait(_CampaignEvent):
    """A roll-out stage waits for its notice period (``reason`` says until when)."""

    KIND: ClassVar[str] = "campaign.notice.wait"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignExpediteRequested(_CampaignEvent):
    """An operator asked to waive the notice for an urgent security fix (with why)."""

    KIND: ClassVar[str] = "campaign.expedite.requested"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignExpedited(_CampaignEvent):
    """A second approver agreed: the notice is waived."""

    KIND: ClassVar[str] = "campaign.expedited"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignCompleted(_CampaignEvent):
    """Every stage settled."""

    KIND: ClassVar[str] = "campaign.completed"


@dataclass(frozen=True, slots=True, kw_only=True)
class CampaignAborted(_CampaignEvent):
    """An operator aborted the campaign: what had not begun activating was cancelled."""

    KIND: ClassVar[str] = "campaign.aborted"


EVENT_TYPES: Final[dict[str, type[MonitorEvent]]] = {
    cls.KIND: cls
    for cls in (
        ImageImported,
        HubOnline,
        HubOffline,
        HubForgotten,
        HubFlapping,
        HubSteady,
        HubRefused,
        TransferStarted,
        TransferProgress,
        TransferHeld,
        TransferFailed,
        TransferStalled,
        DistributionStalled,
        DistributionResumed,
        DeviceConfirmed,
        DeviceFailed,
        CredentialsReplaced,
        CredentialsFailed,
        CampaignCreated,
        CampaignStageStarted,
        CampaignGateOpened,
        CampaignGateDecided,
        CampaignHeld,
        CampaignResumed,
        CampaignPaused,
        CampaignNoticePublished,
        CampaignNoticeWait,
        CampaignExpediteRequested,
        CampaignExpedited,
        CampaignCompleted,
        CampaignAborted,
    )
}
"""Every kind, in the order the documentation lists them."""


# --------------------------------------------------------------------------- topics and decoding


def event_topic(prefix: str, kind: str, guid: object = None) -> str:
    """The topic of an event of ``kind`` (about the CH ``guid``, if it is one's)."""
    cls = EVENT_TYPES.get(kind)
    if cls is not None and cls.ABOUT_A_HUB and isinstance(guid, str) and _GUID.fullmatch(guid):
        return f"{prefix}/{kind}/{guid}"
    return f"{prefix}/{kind}"


def payload_topic(prefix: str, kind: str, fields: Mapping[str, Any]) -> str:
    """The topic of an event of ``kind`` with ``fields`` (its payload, or just its fields):
    an alert's under its ``supplier_topic``, any other's by :func:`event_topic`."""
    cls = EVENT_TYPES.get(kind)
    if cls is not None and cls.ALERT:
        level = fields.get("supplier_topic")
        guid = fields.get("guid")
        if isinstance(level, str) and _TOPIC_LEVEL.fullmatch(level):
            tail = f"/{guid}" if isinstance(guid, str) and _GUID.fullmatch(guid) else ""
            return f"{ALERTS_PREFIX}/{level}/{kind}{tail}"
    return event_topic(prefix, kind, fields.get("guid"))


def supplier_topic_id(supplier: str) -> str:
    """The topic level of a supplier's alerts: a lower-case ASCII slug of the label (at most 32
    characters; ``supplier`` when nothing is left) and the first 8 hex digits of the label's
    SHA-256, so two labels that slug alike (``"Acme Ltd"``, ``"ACME-LTD"``, ``"Åcme"``) still
    get different levels. Only ``a-z 0-9 -`` appear: never ``/ + #`` or NUL."""
    slug = re.sub(r"[^a-z0-9]+", "-", supplier.lower()).strip("-")[:32].strip("-") or "supplier"
    digest = hashlib.sha256(supplier.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


def decode_event(payload: bytes | str | Mapping[str, Any]) -> MonitorEvent:
    """The event in a published payload (JSON text or bytes, or already parsed).

    Raises :class:`EventDecodeError` for anything that is not an event of a known kind of schema
    version 1 with every field of its kind, each of the right JSON type. Fields it does not know
    are ignored (they are compatible additions); the ``_iso`` and ``_hex`` twins are not read.
    """
    if isinstance(payload, Mapping):
        data: object = payload
    else:
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventDecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise EventDecodeError("not a JSON object")
    if data.get("v") != SCHEMA_VERSION or type(data.get("v")) is not int:
        raise EventDecodeError(f"schema version {data.get('v')!r}, not {SCHEMA_VERSION}")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventDecodeError(f"unknown kind {str(kind)[:40]!r}")
    values: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        if name == "seq":
            seq = data.get("seq", 0)
            if type(seq) is not int or seq < 0:
                raise EventDecodeError(f"{kind}: seq must be a non-negative integer")
            values[name] = seq
            continue
        if name not in data:
            if name in _optional(cls):
                continue  # added later: its default
            raise EventDecodeError(f"{kind}: no {name!r}")
        value = data[name]
        if not _fits(value, hint):
            raise EventDecodeError(f"{kind}: {name!r} must be {hint}, got {value!r}"[:200])
        values[name] = float(value) if hint == "float" else value
    return cls(**values)


def _hints(cls: type[MonitorEvent]) -> dict[str, str]:
    """Field name -> its annotation's text (``int``, ``float``, ``str``, ``bool``)."""
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = _HINTS[cls] = {
            f.name: getattr(resolved[f.name], "__name__", str(resolved[f.name]))
            for f in dataclasses.fields(cls)
        }
    return hints


_HINTS: dict[type[MonitorEvent], dict[str, str]] = {}


def _optional(cls: type[MonitorEvent]) -> frozenset[str]:
    """The fields of ``cls`` added after its kind (they have a default)."""
    names = _OPTIONAL.get(cls)
    if names is None:
        names = _OPTIONAL[cls] = frozenset(
            f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
        )
    return names


_OPTIONAL: dict[type[MonitorEvent], frozenset[str]] = {}


def _fits(value: object, hint: str) -> bool:
    if hint == "bool":
        return type(value) is bool
    if hint == "int":
        return type(value) is int
    if hint == "float":
        return type(value) in (int, float)
    if hint == "str":
        return isinstance(value, str)
    raise TypeError(f"unsupported event field type {hint}")  # a bug, never input
