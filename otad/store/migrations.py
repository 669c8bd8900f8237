"""Versioned schema of the otad store.

``MIGRATIONS[i]`` is the SQL script that takes a database from ``PRAGMA user_version`` *i* to
*i + 1*. :class:`otad.store.Store` applies every missing script, and sets ``user_version``, in one
``BEGIN IMMEDIATE`` transaction when it opens the database, and refuses a database whose version
is newer than ``len(MIGRATIONS)``. Scripts are append-only: never edit a released one, add the
next. A script must not contain ``BEGIN``/``COMMIT`` (the store wraps them) and must not depend on
``PRAGMA foreign_keys`` being off.

Conventions:

* times are unix seconds as REAL; digests (image ids) are 32-byte BLOBs;
* u64 values that can exceed SQLite's signed 64-bit INTEGER (the manifest ``sequence``) are
  zero-padded 20-digit TEXT, which sorts in numeric order and stays readable in ``sqlite3``;
  the manifest's ``created`` and ``expires`` (u64 unix seconds, informational copies of the
  signed manifest) saturate at 2**63 - 1 instead;
* transfer ``state`` is free TEXT, checked by :class:`otad.store.TransferState` in Python, so a
  new state never needs a table rebuild.
"""

from __future__ import annotations

from typing import Final

V1: Final = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE hubs (
    guid          TEXT PRIMARY KEY,
    fw_version    INTEGER NOT NULL,
    hw_version    INTEGER NOT NULL,
    supplier      TEXT NOT NULL,
    segment       TEXT NOT NULL,
    max_block     INTEGER NOT NULL,
    window_blocks INTEGER NOT NULL,
    buffer_bytes  INTEGER NOT NULL,
    online        INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    first_seen    REAL NOT NULL,
    last_seen     REAL NOT NULL
);
CREATE INDEX hubs_segment ON hubs (segment);
CREATE INDEX hubs_supplier ON hubs (supplier);

CREATE TABLE han_devices (
    guid        TEXT NOT NULL REFERENCES hubs (guid) ON DELETE CASCADE,
    device_id   TEXT NOT NULL,
    device_type TEXT NOT NULL,
    join_mode   TEXT NOT NULL,
    fw_version  INTEGER NOT NULL,
    hw_version  INTEGER NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (guid, device_id)
) WITHOUT ROWID;
CREATE INDEX han_devices_type ON han_devices (device_type);

CREATE TABLE images (
    sha256          BLOB PRIMARY KEY CHECK (length(sha256) = 32),
    vendor          INTEGER NOT NULL,
    image_type      INTEGER NOT NULL,
    device_type     TEXT NOT NULL,
    hw_min          INTEGER NOT NULL,
    hw_max          INTEGER NOT NULL,
    fw_version      INTEGER NOT NULL,
    sequence        TEXT NOT NULL CHECK (length(sequence) = 20),
    size            INTEGER NOT NULL CHECK (size > 0),
    block_size      INTEGER NOT NULL CHECK (block_size > 0),
    block_count     INTEGER NOT NULL CHECK (block_count > 0),
    created         INTEGER NOT NULL,
    expires         INTEGER NOT NULL,
    signed_manifest BLOB NOT NULL,
    path            TEXT NOT NULL,
    imported_at     REAL NOT NULL
);
CREATE INDEX images_target ON images (device_type, sequence);

CREATE TABLE transfers (
    guid         TEXT NOT NULL REFERENCES hubs (guid),
    image        BLOB NOT NULL REFERENCES images (sha256),
    state        TEXT NOT NULL,
    blocks_total INTEGER NOT NULL CHECK (blocks_total > 0),
    blocks_acked INTEGER NOT NULL DEFAULT 0 CHECK (blocks_acked >= 0),
    blocks_sent  INTEGER NOT NULL DEFAULT 0 CHECK (blocks_sent >= 0),
    bytes_sent   INTEGER NOT NULL DEFAULT 0 CHECK (bytes_sent >= 0),
    acked_bitmap BLOB NOT NULL DEFAULT x'',
    reason       TEXT,
    held_sha256  BLOB CHECK (held_sha256 IS NULL OR length(held_sha256) = 32),
    attempts     INTEGER NOT NULL DEFAULT 1,
    started_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL,
    PRIMARY KEY (guid, image)
);
CREATE INDEX transfers_state ON transfers (state);
CREATE INDEX transfers_image ON transfers (image, state);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL UNIQUE,
    payload    TEXT NOT NULL CHECK (json_valid(payload)),
    created_at REAL NOT NULL,
    published  INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1))
);
CREATE INDEX events_unpublished ON events (seq) WHERE published = 0;
CREATE INDEX events_created ON events (created_at) WHERE published = 1;
"""

#: The minor version of protocol 1 each CH declared in its announcement (SPEC §5): 0 for 1.0.
V2: Final = """
ALTER TABLE hubs ADD COLUMN protocol_minor INTEGER NOT NULL DEFAULT 0 CHECK (protocol_minor >= 0);
"""

#: Each HAN device's (and each CH's own) state per image, and every activation command otad
#: signed (otad/devices.py; SPEC §8.10). A command's row, with its counter, is committed durably
#: before the command is published: the highest counter per device is never issued twice.
V3: Final = """
CREATE TABLE devices (
    device_id     TEXT NOT NULL,
    image         BLOB NOT NULL REFERENCES images (sha256),
    guid          TEXT NOT NULL,
    device_type   TEXT NOT NULL,
    join_mode     TEXT NOT NULL,
    state         TEXT NOT NULL,
    bytes_held    INTEGER NOT NULL DEFAULT 0 CHECK (bytes_held >= 0),
    size          INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
    proof         TEXT,
    reason        TEXT,
    counter       INTEGER CHECK (counter IS NULL OR counter > 0),
    execute_at    INTEGER,
    deadline      REAL,
    read_attempts INTEGER NOT NULL DEFAULT 0 CHECK (read_attempts >= 0),
    updated_at    REAL NOT NULL,
    PRIMARY KEY (device_id, image)
) WITHOUT ROWID;
CREATE INDEX devices_state ON devices (state);

CREATE TABLE activation_commands (
    device_id   TEXT NOT NULL,
    counter     INTEGER NOT NULL CHECK (counter > 0),
    image       BLOB NOT NULL CHECK (length(image) = 32),
    guid        TEXT NOT NULL,
    execute_at  INTEGER,
    cancel      INTEGER NOT NULL CHECK (cancel IN (0, 1)),
    signed      BLOB NOT NULL,
    issued_at   REAL NOT NULL,
    answered_at REAL,
    PRIMARY KEY (device_id, counter)
) WITHOUT ROWID;
CREATE INDEX activation_commands_unanswered ON activation_commands (device_id)
    WHERE answered_at IS NULL;
"""

#: Credential replacement (otad/credentials.py; SPEC §8.11): each device's replacement in
#: progress or done (its last credentials command's counter, drawn from the same per-device
#: sequence as activation_commands'), and the device keys otad adopted from confirmations, which
#: take the place of the operator's ``<DEVICE_ID>.pem`` (kept as it was) from then on.
V4: Final = """
CREATE TABLE credentials (
    device_id   TEXT PRIMARY KEY,
    guid        TEXT NOT NULL,
    device_type TEXT NOT NULL,
    state       TEXT NOT NULL,
    counter     INTEGER NOT NULL CHECK (counter > 0),
    current_kid BLOB NOT NULL CHECK (length(current_kid) = 8),
    attempts    INTEGER NOT NULL CHECK (attempts > 0),
    deadline    REAL,
    reason      TEXT,
    new_kid     BLOB CHECK (new_kid IS NULL OR length(new_kid) = 8),
    updated_at  REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE device_keys (
    device_id     TEXT PRIMARY KEY,
    spki          BLOB NOT NULL,
    replaced_spki BLOB NOT NULL,
    counter       INTEGER NOT NULL CHECK (counter > 0),
    adopted_at    REAL NOT NULL
) WITHOUT ROWID;
"""

#: Campaigns (otad/campaigns.py): each campaign's engine snapshot (otad.campaign's JSON, the
#: whole state: targets, stages, audit trail), rewritten after every command and every
#: evaluation that changed it; ``state`` and the times are copies for listing without parsing.
V5: Final = """
CREATE TABLE campaigns (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    parent     TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    snapshot   TEXT NOT NULL
) WITHOUT ROWID;
"""

MIGRATIONS: Final[tuple[str, ...]] = (V1, V2, V3, V4, V5)
"""Script *i* upgrades ``user_version`` *i* to *i + 1*."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The ``user_version`` a fully migrated database has."""
