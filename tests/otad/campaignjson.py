"""Recorded answers of otad's campaign control API, shaped exactly as the issue-10 contract says
(for otactl's rendering and exit-code tests)."""

from __future__ import annotations

import copy
from typing import Any

IMAGE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
T0 = 1796176800.0  # 2026-12-02T02:00:00Z
GUIDS = [f"00DB12345678{i:04X}" for i in range(6)]


def counts(**given: int) -> dict[str, int]:
    """Every count key of the contract, zero unless given."""
    keys = (
        "pending", "started", "delivered", "held", "activating", "activated", "confirmed",
        "failed", "rejected", "timed_out", "rolled_back", "lost", "cancelled",
    )  # fmt: skip
    return {k: given.get(k, 0) for k in keys}


def status(**overrides: Any) -> dict[str, Any]:
    """A running campaign in its pilot stage (``campaign.status`` / the retained status)."""
    body: dict[str, Any] = {
        "v": 1,
        "id": "fw-2026-12-ch",
        "parent": None,
        "state": "running",
        "stage": "pilot",
        "payload": {"kind": "image", "image": IMAGE, "fw_version": 0x01020304},
        "created_at": T0 - 86400,
        "updated_at": T0,
        "targets": 5015,
        "excluded": 12,
        "blocked": 0,
        "hold_reason": None,
        "notice_at": None,
        "rollout_not_before": None,
        "stages": [
            {
                "name": "micro-pilot",
                "kind": "micro_pilot",
                "targets": 15,
                "started_at": T0 - 7200,
                "settled_at": T0 - 3600,
                "gate": "go",
                "counts": counts(confirmed=15),
            },
            {
                "name": "pilot",
                "kind": "pilot",
                "targets": 5000,
                "started_at": T0 - 3000,
                "settled_at": None,
                "gate": "",
                "counts": counts(
                    pending=2000,
                    started=400,
                    held=80,
                    activating=20,
                    confirmed=2490,
                    failed=6,
                    timed_out=4,
                ),
            },
            {
                "name": "roll-out",
                "kind": "rollout",
                "targets": 0,
                "started_at": None,
                "settled_at": None,
                "gate": "",
                "counts": counts(),
            },
        ],
        "counts": counts(
            pending=2000,
            started=400,
            held=80,
            activating=20,
            confirmed=2505,
            failed=6,
            timed_out=4,
        ),
        "failures": {"HAN_TIMEOUT": 4, "BAD_SIGNATURE": 6},
        "rate_per_minute": 60.0,
        "confirmed_per_minute": 48.5,
        "eta_s": 3720.0,
        "last_change_at": T0 - 2,
        "stalled_s": None,
    }
    body.update(copy.deepcopy(overrides))
    return body


def plan() -> dict[str, Any]:
    """A ``campaign.plan`` answer: 4 targets, 3 exclusions (two reasons)."""
    return {
        "id": "fw-2026-12-ch",
        "payload": {"kind": "image", "image": IMAGE, "fw_version": 0x01020304},
        "targets": 4,
        "hubs": 4,
        "stages": [
            {"name": "pilot", "kind": "pilot", "targets": 2, "hubs": 2},
            {"name": "roll-out", "kind": "rollout", "targets": 2, "hubs": 2},
        ],
        "exclusions": [
            {"guid": GUIDS[4], "device_id": GUIDS[4], "reason": "supplier S3 not selected"},
            {
                "guid": "00DB1234567800AA",
                "device_id": "00DB1234567800AA",
                "reason": "supplier S3 not selected",
            },
            {
                "guid": GUIDS[5],
                "device_id": GUIDS[5],
                "reason": "hardware 0x0009 outside 0x0001..0x0004",
            },
        ],
        "members": [
            {
                "device_id": g,
                "guid": g,
                "stage": "pilot" if i < 2 else "roll-out",
                "supplier": "S1",
                "segment": "north",
                "hw_version": 1,
                "fw_version": 0x01020300,
            }
            for i, g in enumerate(GUIDS[:4])
        ],
        "wan_bytes": 3 * 1024 * 1024 * 4,
        "estimate": {
            "total_s": 9 * 86400 + 3600.0,
            "stages": [
                {
                    "name": "pilot",
                    "start_s": 0.0,
                    "distribute_s": 120.0,
                    "activate_s": 3600.0,
                    "soak_s": 86400.0,
                    "total_s": 90120.0,
                },
                {
                    "name": "roll-out",
                    "start_s": 90120.0,
                    "distribute_s": 120.0,
                    "activate_s": 3600.0,
                    "soak_s": 0.0,
                    "total_s": 3720.0,
                },
            ],
            "assumptions": ["60 CHs started a minute", "activation window 01:00-04:00"],
        },
    }


def decisions(state: str = "running", kind: str = "gate_decided") -> dict[str, Any]:
    """What an operator command led to."""
    return {
        "id": "fw-2026-12-ch",
        "state": state,
        "decisions": [
            {"kind": kind, "stage": "micro-pilot", "actor": "alice", "reason": "15/15", "at": T0}
        ],
    }


def history() -> list[dict[str, Any]]:
    """A ``campaign.history`` answer."""
    return [
        {"seq": 0, "at": T0 - 7200, "kind": "stage_started", "stage": "micro-pilot",
         "actor": "alice", "reason": ""},
        {"seq": 7, "at": T0 - 3600, "kind": "gate_decided", "stage": "micro-pilot",
         "actor": "bob", "reason": "15 of 15 confirmed"},
    ]  # fmt: skip


def event(seq: int, kind: str = "campaign.held", campaign: str = "fw-2026-12-ch") -> dict[str, Any]:
    """A campaign event as published on ``ota/v1/events/<kind>``."""
    return {
        "v": 1,
        "kind": kind,
        "seq": seq,
        "key": f"{kind}:{campaign}:{seq}",
        "time": T0 + seq,
        "time_iso": "2026-12-02T02:00:00.000Z",
        "campaign": campaign,
        "stage": "pilot",
        "actor": "otad",
        "reason": "failed_rate 0.06 > 0.05",
    }
