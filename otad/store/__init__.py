"""otad's state: one SQLite database (WAL) with one writer task.

* :mod:`otad.store.engine`: the transaction engine (jobs, group commit, the batch, the lock, the
  migrations run at open) and its theory of operation;
* :mod:`otad.store.tables`: :class:`Store`, one method per question or change of the tables;
* :mod:`otad.store.rows`: the rows those methods take and return, and :class:`TransferState`;
* :mod:`otad.store.migrations`: the versioned schema.
"""

from __future__ import annotations

from otad.store.engine import (
    DB_NAME,
    LOCK_NAME,
    ConflictError,
    NotFoundError,
    SchemaTooNewError,
    StoreError,
    StoreLockedError,
    StoreStats,
    Tx,
)
from otad.store.rows import (
    CampaignRow,
    CommandRow,
    CredentialsRow,
    DeviceKeyRow,
    DeviceRow,
    EventRow,
    FinalState,
    HanDeviceRow,
    HubRow,
    ImageRow,
    NewEvent,
    TransferRow,
    TransferState,
)
from otad.store.tables import Store

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "CampaignRow",
    "CommandRow",
    "ConflictError",
    "CredentialsRow",
    "DeviceKeyRow",
    "DeviceRow",
    "EventRow",
    "FinalState",
    "HanDeviceRow",
    "HubRow",
    "ImageRow",
    "NewEvent",
    "NotFoundError",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreStats",
    "TransferRow",
    "TransferState",
    "Tx",
]
