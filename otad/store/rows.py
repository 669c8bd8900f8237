"""The store's rows: what each table holds, as frozen dataclasses, and the state of a transfer.

:class:`TransferState` is the one home of a transfer's state as otad records it (the sender's own
phases are :class:`protocol.wan.sender.SenderState`, the scheduler's :class:`otad.scheduler.
SlotState`), including which final state each failure reason ends in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from protocol.errors import Reason
from protocol.wire.messages import Limits


class TransferState(enum.StrEnum):
    """State of one (CH, image) transfer as otad records it. Every state but ``ACTIVE`` is final;
    :meth:`for_reason` says which final state a failure reason ends in."""

    ACTIVE = "active"  # being sent (or waiting: for its turn, for its CH to come back)
    HELD = "held"  # the CH verified the whole image and holds it (ImageHeld)
    REJECTED = "rejected"  # the CH refused the offer or aborted (TransferRejected's reason)
    CANCELLED = "cancelled"  # otad abandoned it
    # cannot complete as things are: the CH's declared limits cannot carry the image's blocks
    # (LIMITS_EXCEEDED), what the CH holds does not hash to the manifest digest (IMAGE_HASH), or
    # otad cannot go on with it (INTERNAL; its image or hub unknown when otad resumed)
    FAILED = "failed"
    # no progress after transfer.max_rto_without_progress retransmission timeouts in a row (the
    # sender's momentum limit, SPEC 7.7): the CH stopped answering; not a fault of the image
    TIMED_OUT = "timed_out"

    @classmethod
    def for_reason(cls, reason: Reason) -> TransferState:
        """The final state of a transfer that ended for ``reason`` (SPEC 7.11): one of
        ``TIMED_OUT``, ``CANCELLED``, ``FAILED``; every other reason is the CH's refusal,
        ``REJECTED``."""
        return _FINAL_STATE_OF.get(reason, cls.REJECTED)


_FINAL_STATE_OF: dict[Reason, TransferState] = {
    Reason.TIMED_OUT: TransferState.TIMED_OUT,
    Reason.CANCELLED: TransferState.CANCELLED,
    Reason.IMAGE_HASH: TransferState.FAILED,
    Reason.LIMITS_EXCEEDED: TransferState.FAILED,
    Reason.INTERNAL: TransferState.FAILED,
}
"""Final state by failure reason where it is not ``REJECTED`` (see ``TransferState.for_reason``)."""


@dataclass(frozen=True, slots=True)
class HubRow:
    """A Communications Hub as it last announced itself."""

    guid: str
    fw_version: int
    hw_version: int
    supplier: str
    segment: str
    limits: Limits
    online: bool
    first_seen: float
    last_seen: float
    protocol_minor: int = 0
    """The minor version of protocol 1 it declared (SPEC §5): 0 for 1.0."""


@dataclass(frozen=True, slots=True)
class HanDeviceRow:
    """One device on a CH's home area network, as the CH last reported it."""

    guid: str
    device_id: str
    device_type: str
    join_mode: str
    fw_version: int
    hw_version: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class ImageRow:
    """An imported firmware image: the fields of its manifest, the signed manifest, its file."""

    sha256: bytes
    vendor: int
    image_type: int
    device_type: str
    hw_min: int
    hw_max: int
    fw_version: int
    sequence: int
    size: int
    block_size: int
    block_count: int
    # unix seconds, saturated at 2**63 - 1 (SQLite's INTEGER; a manifest's are u64): a copy for
    # reading the database by hand, exact below year 292 billion; the signed manifest is the truth
    created: int
    expires: int
    signed_manifest: bytes
    path: str
    imported_at: float


@dataclass(frozen=True, slots=True)
class TransferRow:
    """Distribution of one image to one CH. ``acked_bitmap`` is opaque to the store."""

    guid: str
    image: bytes
    state: TransferState
    blocks_total: int
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int
    acked_bitmap: bytes
    reason: str | None
    held_sha256: bytes | None
    attempts: int
    started_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One HAN device's (or a CH's own) state for one image (:mod:`otad.devices` says what each
    field means; ``state`` and ``proof`` are free text checked there)."""

    device_id: str
    image: bytes
    guid: str
    device_type: str
    join_mode: str
    state: str
    bytes_held: int
    size: int
    proof: str | None
    reason: str | None
    counter: int | None  # the activation command in progress (or last issued)
    execute_at: int | None  # its execution time (unix s), None: at once
    deadline: float | None  # unix s: when otad acts if nothing arrives (None: it waits)
    read_attempts: int  # firmware-version read-backs sent for the current command
    updated_at: float


@dataclass(frozen=True, slots=True)
class CommandRow:
    """One signed activation command (or cancel) as issued, before it was published."""

    device_id: str
    counter: int
    image: bytes
    guid: str
    execute_at: int | None
    cancel: bool
    signed: bytes  # the COSE_Sign1 published in an ``Activate``
    issued_at: float
    answered_at: float | None


@dataclass(frozen=True, slots=True)
class CampaignRow:
    """One campaign: its engine's snapshot (JSON text, :meth:`otad.campaign.Engine.to_data`)
    and the fields listed without parsing it."""

    id: str
    state: str
    parent: str | None
    created_at: float
    updated_at: float
    snapshot: str


@dataclass(frozen=True, slots=True)
class CredentialsRow:
    """One device's credential replacement (:mod:`otad.credentials` says what each field
    means; ``state`` is free text checked there)."""

    device_id: str
    guid: str
    device_type: str
    state: str
    counter: int  # the last credentials command issued (the device's activation sequence)
    current_kid: bytes  # the key id that command named: the key otad trusted then
    attempts: int  # commands issued for this replacement (retries included)
    deadline: float | None  # unix s: when otad retries or gives up (None: final)
    reason: str | None
    new_kid: bytes | None  # the adopted key's id, once replaced
    updated_at: float


@dataclass(frozen=True, slots=True)
class DeviceKeyRow:
    """A device key otad adopted from a credentials confirmation (SPEC §8.11)."""

    device_id: str
    spki: bytes  # the key otad trusts for the device's alerts now (SubjectPublicKeyInfo DER)
    replaced_spki: bytes  # the key it replaced (the one the confirmation was signed by)
    counter: int  # the credentials command it confirmed
    adopted_at: float


@dataclass(frozen=True, slots=True)
class FinalState:
    """A transfer's end, with its last progress: one row of :meth:`Store.finish_transfers`."""

    guid: str
    image: bytes
    state: TransferState
    reason: str | None
    held_sha256: bytes | None
    finished_at: float
    acked_bitmap: bytes
    blocks_acked: int
    blocks_sent: int
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event for :meth:`Store.append_events`."""

    kind: str
    key: str
    payload: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class EventRow:
    """One monitoring event of the outbox; ``seq`` is the monotonic event sequence."""

    seq: int
    kind: str
    key: str
    payload: dict[str, Any]
    created_at: float
    published: bool
