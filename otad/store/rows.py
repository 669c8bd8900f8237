"""The store's rows: what each table holds, as frozen dataclasses, and the state of a transfer.

:class:`TransferState` is a transfer's state as otad records it (the sender's own phases are
:class:`protocol.wan.sender.SenderState`, the scheduler's :class:`otad.scheduler.SlotState`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from protocol.wire.messages import Limits


class TransferState(enum.StrEnum):
    """State of one (CH, image) transfer. Every state but ``ACTIVE`` is final."""

    ACTIVE = "active"  # blocks are being sent
    HELD = "held"  # the CH verified and holds the whole image
    REJECTED = "rejected"  # the CH refused the offer or aborted
    CANCELLED = "cancelled"  # otad abandoned it
    FAILED = "failed"  # gave up (e.g. no progress after many RTOs)
    TIMED_OUT = "timed_out"  # a phase deadline passed (not a failure of the CH)


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
