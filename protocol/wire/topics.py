"""Topic grammar: versioned, one subtree per CH so one ACL pattern line isolates each hub.

``ota/v1/ch/{guid}/down``   otad -> CH (offers, blocks, cancel, poll)
``ota/v1/ch/{guid}/up``     CH -> otad (acks, image held, rejections)
``ota/v1/ch/{guid}/state``  CH -> otad, retained (announce; the last will says offline)
``ota/v1/events/{kind}``    otad -> monitoring tools, JSON
``ota/v1/otad/status``      otad -> anyone, retained JSON snapshot
``ota/v1/ctl/{client}/req`` and ``.../resp``  operator tool <-> otad, request/response

A GUID is the CH's EUI-64: exactly 16 upper-case hex digits. Any identifier that becomes a topic
level is validated so it can never contain ``/``, ``+``, ``#`` or NUL (broker ACL patterns expand
``%u``/``%c`` into topics, and Mosquitto 2.0 does not refuse ``/`` in client ids).
"""

from __future__ import annotations

import re

from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import check_eui64

ROOT = "ota/v1"
_LEVEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def check_guid(guid: str) -> str:
    """Return ``guid`` if it is an EUI-64 (16 upper-case hex digits), else ``BAD_IDENTIFIER``."""
    return check_eui64(guid, "GUID")


def check_level(value: str) -> str:
    """Return ``value`` if it is safe as one topic level (no ``/ + #`` NUL, 1-64 chars)."""
    if not isinstance(value, str) or not _LEVEL.fullmatch(value):
        raise ProtocolError(Reason.BAD_IDENTIFIER, f"{value!r} is not a safe topic level")
    return value


def down(guid: str) -> str:
    """Topic otad publishes to a CH on."""
    return f"{ROOT}/ch/{check_guid(guid)}/down"


def up(guid: str) -> str:
    """Topic a CH publishes its acknowledgements and reports on."""
    return f"{ROOT}/ch/{check_guid(guid)}/up"


def state(guid: str) -> str:
    """Retained topic of a CH's announcement (and its last will)."""
    return f"{ROOT}/ch/{check_guid(guid)}/state"


UP_WILDCARD = f"{ROOT}/ch/+/up"
STATE_WILDCARD = f"{ROOT}/ch/+/state"
OTAD_STATUS = f"{ROOT}/otad/status"
CAMPAIGN_STATUS_WILDCARD = f"{ROOT}/campaigns/+/status"


def campaign_status(campaign_id: str) -> str:
    """The retained status topic of one campaign (its id is checked as a topic level)."""
    return f"{ROOT}/campaigns/{check_level(campaign_id)}/status"


EVENTS_WILDCARD = f"{ROOT}/events/#"


def otad_probe(client: str) -> str:
    """Root of the topics otad's broker check publishes to itself on (SPEC §1.1)."""
    return f"{ROOT}/otad/probe/{check_level(client)}"


def event(kind: str) -> str:
    """Topic of one kind of monitoring event, e.g. ``transfer.progress``."""
    return f"{ROOT}/events/{check_level(kind)}"


def ctl_request(client: str) -> str:
    """Topic an operator tool sends requests on."""
    return f"{ROOT}/ctl/{check_level(client)}/req"


def ctl_response(client: str) -> str:
    """Topic otad answers an operator tool on."""
    return f"{ROOT}/ctl/{check_level(client)}/resp"


CTL_REQUEST_WILDCARD = f"{ROOT}/ctl/+/req"


def parse_ch_topic(topic: str) -> tuple[str, str]:
    """Split ``ota/v1/ch/{guid}/{leaf}`` into (guid, leaf); raise ``BAD_IDENTIFIER`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "ota" or parts[1] != "v1" or parts[2] != "ch":
        raise ProtocolError(Reason.BAD_IDENTIFIER, f"not a CH topic: {topic[:80]!r}")
    if parts[4] not in ("down", "up", "state"):
        raise ProtocolError(Reason.BAD_IDENTIFIER, f"unknown CH topic leaf {parts[4][:16]!r}")
    return check_guid(parts[3]), parts[4]
