"""Bounds and identifier formats that more than one part of the protocol uses, defined once.

What each bound means on the wire is SPEC.md's to say (§3 for the messages, §6 for releases,
§8.7 for activation); this module only gives every shared number and check one home, so a
module that needs a cap does not import another module's internals for it.
"""

from __future__ import annotations

import re
import unicodedata

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


#: Longest label (``HubAnnounced.supplier`` and ``segment``, SPEC §3), in characters.
MAX_LABEL_CHARS = 64
_LABEL_CATEGORIES = frozenset("LMNPS")


def check_label(value: object, what: str) -> str:
    """Return ``value`` if it is a label (SPEC §3 "Labels"): 1 to :data:`MAX_LABEL_CHARS`
    characters, each a letter, mark, number, punctuation, symbol or the space, not starting or
    ending with a space. Otherwise raise ``ProtocolError(MALFORMED)`` naming ``what``."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL_CHARS:
        raise ProtocolError(
            Reason.MALFORMED, f"{what} must be 1 to {MAX_LABEL_CHARS} characters: {value!r:.80}"
        )
    if value[0] == " " or value[-1] == " ":
        raise ProtocolError(Reason.MALFORMED, f"{what} starts or ends with a space: {value!r}")
    for char in value:
        if char != " " and unicodedata.category(char)[0] not in _LABEL_CATEGORIES:
            raise ProtocolError(
                Reason.MALFORMED,
                f"{what} has the character U+{ord(char):04X}, which is not printable: {value!r}",
            )
    return value
