"""JSON as otad puts it on MQTT: compact, keys sorted, never NaN."""

from __future__ import annotations

import json
from typing import Any


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (sorted keys, no NaN): events, the status, control responses."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
