"""Typed errors of the protocol core.

Every way untrusted input can be wrong maps to one :class:`Reason`. Decoders, verifiers and state
machines raise :class:`ProtocolError` (or return the reason in a message) and never any other
exception for bad input. The numeric values go on the wire (``TransferRejected.reason``,
``Cancel.reason``) and in otad's events; SPEC §4 lists them; never renumber them.

A caller's mistake (an argument out of range, a record built with a bad value) is a
``ValueError``; a state machine about to take an edge its transition table does not have is an
:class:`IllegalTransitionError`: a bug in the machine, never the peer's doing.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class Reason(IntEnum):
    """Why something was refused. Values are stable wire codes (SPEC §4, "Error codes")."""

    # 1-19: encoding
    MALFORMED = 1  # not well-formed CBOR, wrong types, missing fields
    TOO_LARGE = 2  # over the size cap for this kind of message
    TOO_DEEP = 3  # nesting over the depth cap
    INDEFINITE_LENGTH = 4  # indefinite-length item (never allowed)
    DUPLICATE_KEY = 5  # a map key appears twice
    UNKNOWN_KEY = 6  # a map key the schema does not define
    UNKNOWN_TYPE = 7  # message type code not known to this version
    UNSUPPORTED_VERSION = 8  # protocol or format version not supported
    NON_CANONICAL = 9  # not the deterministic encoding (non-minimal length, unsorted...)
    BAD_IDENTIFIER = 10  # GUID / device id / topic level with '/', '+', '#', NUL or bad length
    # 20-39: signature and trust
    UNKNOWN_KEY_ID = 20  # signed by a key the trust store does not hold
    REVOKED_KEY = 21  # signed by a revoked key
    BAD_SIGNATURE = 22  # signature does not verify
    BAD_ALGORITHM = 23  # COSE algorithm other than ES256
    # 40-59: manifest policy
    ROLLBACK = 40  # sequence number lower than the one installed/accepted
    REPLAYED = 41  # same sequence/counter seen before (manifest or activation)
    WRONG_DEVICE_TYPE = 42
    HARDWARE_OUT_OF_RANGE = 43
    EXPIRED = 44
    WRONG_VENDOR = 45
    HEADER_MISMATCH = 46  # ZigBee OTA header disagrees with the manifest
    # 60-79: transfer
    WRONG_IMAGE = 60  # block or message for another image digest (mix-and-match)
    BLOCK_OUT_OF_RANGE = 61  # index >= block count
    BLOCK_SIZE = 62  # block longer than manifest block size / wrong last-block size
    BLOCK_HASH = 63  # block bytes do not match the signed per-block hash
    IMAGE_HASH = 64  # assembled image does not match the manifest digest
    TOO_MANY_BYTES = 65  # more bytes than the manifest declares
    LIMITS_EXCEEDED = 66  # sender exceeded the receiver's declared limits
    NO_TRANSFER = 67  # block for an image no transfer was offered for
    TIMED_OUT = 68
    CANCELLED = 69
    STORAGE_FULL = 70
    # 80-99: activation
    NO_IMAGE_HELD = 80
    HASH_MISMATCH = 81
    ACTIVATION_FAILED = 82
    SELF_TEST_FAILED = 83  # new image booted but failed self-test: rolled back
    WRONG_DEVICE = 84  # activation addressed to another device
    NO_CREDENTIALS = 85  # credentials command for a device holding none (CAD-joined, SPEC §8.11)
    # 100-: fleet / daemon
    UNKNOWN_HUB = 100
    UNKNOWN_IMAGE = 101
    HUB_BUSY = 102  # a CH with a transfer or a device activation in progress (fleet.forget)
    UNKNOWN_CAMPAIGN = 103  # control plane: no campaign of that id
    CAMPAIGN_CONFLICT = 104  # a target's component belongs to another active campaign
    CAMPAIGN_REFUSED = 105  # the command does not apply to the campaign as it stands
    INTERNAL = 127


class ProtocolError(Exception):
    """Untrusted input was refused. ``reason`` says why; ``detail`` is for humans and logs."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name.lower()}: {detail}" if detail else reason.name.lower())

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[Reason, str]]:
        return (type(self), (self.reason, self.detail))


class IllegalTransitionError(RuntimeError):
    """A state machine tried to enter ``new`` from ``current``, an edge its table lacks (a bug in
    the machine: untrusted input never gets here, it is refused before any state changes)."""

    def __init__(self, machine: str, current: Enum, new: Enum) -> None:
        self.machine = machine
        self.current = current
        self.new = new
        super().__init__(f"{machine}: no transition {current.name} -> {new.name}")
