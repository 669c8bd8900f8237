"""Bounds and identifier formats that more than one part of the protocol uses, defined once.

What each bound means on the wire is SPEC.md's to say (§3 for the messages, §6 for releases,
§8.7 for activation); this module only gives every shared number and check one home, so a
module that needs a cap does not import another module's internals for it.
"""

from __future__ import annotations

import re

from protocol.errors import ProtocolError, Reason

# Fixed-width unsigned integers (CBOR fields and ZigBee frame fields alike).
MAX_U8 = 0xFF
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF
MAX_U64 = (1 << 64) - 1

#: SHA-256 digest length: image ids on the wire, manifest digests, per-block hashes.
HASH_LEN = 32

#: Largest ZigBee OTA file (the image): manifest ``size`` (§6.2), OTA header total size (§6.5),
#: the image part of an ``.otaimg`` (§6.6).
MAX_IMAGE_BYTES = 64 * 1024 * 1024

#: Largest signed manifest, COSE envelope included (§6.1): also the cap on the manifest payload
#: (§6.2), on ``Offer.manifest`` (§3) and on the manifest part of an ``.otaimg`` (§6.6).
MAX_SIGNED_MANIFEST_BYTES = 2 * 1024 * 1024

#: Largest WAN block payload: ``Block.data`` and ``Limits.max_block`` (§3), the manifest's
#: ``block_size`` (§6.2).
MAX_BLOCK_BYTES = 64 * 1024

#: Longest SACK bitmap in a ``TransferAcked`` (§3, §7.3): it names blocks up to 65,536 past its
#: base, the farthest a sender may run ahead of the lowest unacknowledged block.
MAX_BITMAP_BYTES = 8 * 1024

_EUI64 = re.compile(r"[0-9A-F]{16}")


def check_eui64(value: object, what: str) -> str:
    """Return ``value`` if it is an EUI-64 as exactly 16 upper-case hexadecimal digits.

    Otherwise raise ``ProtocolError(BAD_IDENTIFIER)``, naming ``what`` was checked ("GUID",
    "device id"). A CH's GUID and every HAN device id are EUI-64s in this form (SPEC §2, §3,
    §8.7).
    """
    if not isinstance(value, str) or not _EUI64.fullmatch(value):
        raise ProtocolError(
            Reason.BAD_IDENTIFIER,
            f"{what} {value!r:.40} is not an EUI-64 (16 upper-case hex digits)",
        )
    return value
