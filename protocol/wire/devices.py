"""Who is on a premises: the device types and the ways a HAN device joins.

Both are wire values: a ``HubAnnounced`` lists each HAN device with its type and join mode
(SPEC §3), a manifest names the device type it is for (§6.2), and the join mode decides which
confirmation a device can give after an activation (§8.8).
"""

from __future__ import annotations

from enum import StrEnum

from protocol.errors import ProtocolError, Reason


class DeviceType(StrEnum):
    """Device types of a GB smart-metering premises (B1-B4: Alt HAN point-to-point bridges)."""

    CH = "CH"
    ESME = "ESME"
    GSME = "GSME"
    PPMID = "PPMID"
    HCALCS = "HCALCS"
    B1 = "B1"
    B2 = "B2"
    B3 = "B3"
    B4 = "B4"

    @classmethod
    def parse(cls, value: object) -> DeviceType:
        """Return the member named ``value`` or raise ``ProtocolError(MALFORMED)``."""
        try:
            return cls(str(value)) if isinstance(value, str) else cls("\0")
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"unknown device type {value!r}") from None


class JoinMode(StrEnum):
    """How a device joined the HAN (DP170 question 4); decides what confirmation it can give."""

    CAD = "CAD"  # consumer access device: no credentials, cannot sign
    PPMID = "PPMID"  # joined like a PPMID: holds a key, can sign an alert
    NATIVE = "NATIVE"  # ESME, GSME, PPMID, HCALCS, CH: SMKI credentials

    @property
    def can_sign(self) -> bool:
        """Whether a device joined this way can sign its activation alert."""
        return self is not JoinMode.CAD
