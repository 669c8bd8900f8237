"""Activation: the signed per-device command that switches a device to the image it holds.

GBCS splits a firmware update into a non-critical *distribution* (the image, common to many
devices) and a critical, unicast *activation* (CS06 / DUIS SR 11.3). This module is the
activation's wire format; :mod:`protocol.device.device` is what a device does with it.

* :class:`ActivationCommand` -- signed by the party responsible for the device (otad's key, a
  COSE_Sign1 from :mod:`protocol.release.cose`), addressed to exactly one device id, bound to the
  image SHA-256, with an optional future execution time and a monotonic originator counter against
  replay. ``cancel=True`` cancels a future-dated activation of that image.
* :class:`ActivationResponse` -- the outcome (GBCS CS06: 0 success, 1 no image held, 2 hash
  mismatch, 3 activation failure) and the firmware version the device runs afterwards.
* :class:`ActivationScheduled` / :class:`ActivationCancelled` -- the device's immediate answer to
  a future-dated command and to a cancellation (GBCS "future-dated, Device" response pattern);
  the outcome follows as an :class:`ActivationResponse` when the command executes.
* Confirmation evidence, by join mode (SPEC §8.8; DP170 questions 1, 2 and 4):
  :class:`ActivationAlert`, signed by the *device's* own key, for devices that can sign (native
  devices and bridges joined as a PPMID); :class:`VersionReport`, unsigned, for bridges joined as
  a CAD: the CH's own evidence that the device rebooted and now reports the new version.

Every message is a record of :mod:`protocol.wire.codec` (SPEC §8.7): a deterministic CBOR map with
text keys, its type under ``"t"``, exactly its fields and nothing else. Each has ``encode()`` and
a strict ``decode(data)`` that raises :class:`ProtocolError` only; the signed ones add
``sign(key)`` and ``verify(signed, trust)`` (signature first, then decoding). Built locally, a
record checks its fields at once and raises ``ValueError``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import Reason
from protocol.release.cose import sign1
from protocol.release.trust import TrustStore
from protocol.wire import cbor, codec
from protocol.wire.codec import byte_string, eui64, uint
from protocol.wire.limits import HASH_LEN, MAX_U32, MAX_U64

MAX_MESSAGE_BYTES = 256  # any activation message payload (the largest is ~150 bytes)
MAX_SIGNED_BYTES = 512  # a payload plus its COSE_Sign1 envelope


class Outcome(IntEnum):
    """Outcome of an executed activation (GBCS CS06 response codes)."""

    SUCCESS = 0
    NO_IMAGE_HELD = 1
    HASH_MISMATCH = 2
    ACTIVATION_FAILED = 3


_A = typing.TypeVar("_A", bound="ActivationRecord")


@dataclass(frozen=True, slots=True)
class ActivationRecord:
    """Base of the activation messages: ``TYPE`` is the value under ``"t"``."""

    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        codec.validate(self)

    def encode(self) -> bytes:
        """The deterministic CBOR bytes (for the signed records: the payload that is signed)."""
        return codec.encode(self)

    @classmethod
    def decode(cls: type[_A], data: bytes) -> _A:
        """Strictly decode; raises :class:`ProtocolError` only."""
        raw = cbor.loads(data, max_size=MAX_MESSAGE_BYTES, max_depth=1)
        return codec.decode(cls, raw)


# --------------------------------------------------------------------------- command


@dataclass(frozen=True, slots=True)
class ActivationCommand(ActivationRecord):
    """Activate (or cancel the future-dated activation of) image ``image_sha256`` on one device.

    ``counter`` is the originator counter: a device accepts a command only if its counter is
    strictly greater than the last it accepted. ``execute_at`` (unix seconds) defers execution;
    ``None`` means now. A cancel carries no execution time.
    """

    TYPE: ClassVar[str] = "activate"
    device_id: str = field(metadata=eui64())
    image_sha256: bytes = field(metadata=byte_string(HASH_LEN))
    counter: int = field(metadata=uint(MAX_U64))
    execute_at: int | None = field(default=None, metadata=uint(MAX_U64))
    cancel: bool = False

    def __post_init__(self) -> None:
        codec.validate(self)
        if self.cancel and self.execute_at is not None:
            raise ValueError("a cancel has no execution time")

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The COSE_Sign1 of this command under ``private_key`` (P-256)."""
        return sign1(self.encode(), private_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> ActivationCommand:
        """Check the signature against ``trust``, then strictly decode. ``ProtocolError`` only.

        Whether the command is for *this* device and fresh (counter) is the device's check
        (:meth:`protocol.device.device.Device.activation_received`): ``WRONG_DEVICE``, ``REPLAYED``.
        """
        return cls.decode(trust.verify(signed, max_size=MAX_SIGNED_BYTES))


# --------------------------------------------------------------------------- device answers


@dataclass(frozen=True, slots=True)
class ActivationResponse(ActivationRecord):
    """The outcome of an executed activation, and the firmware version running afterwards.

    ``reason`` refines a failure for logs and events (e.g. ``SELF_TEST_FAILED`` with outcome
    ``ACTIVATION_FAILED``: the new image booted, failed its self-test and was rolled back).
    """

    TYPE: ClassVar[str] = "activation_response"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))  # the command's counter
    outcome: Outcome
    running_fw_version: int = field(metadata=uint(MAX_U32))
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class ActivationScheduled(ActivationRecord):
    """A future-dated activation was accepted and will execute at ``execute_at``."""

    TYPE: ClassVar[str] = "activation_scheduled"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))
    execute_at: int = field(metadata=uint(MAX_U64))


@dataclass(frozen=True, slots=True)
class ActivationCancelled(ActivationRecord):
    """Answer to a cancel: which scheduled activation (by counter) it removed, if any."""

    TYPE: ClassVar[str] = "activation_cancelled"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))  # the cancel command's counter
    # None: nothing matching was scheduled
    cancelled_counter: int | None = field(metadata=uint(MAX_U64))


# --------------------------------------------------------------------------- confirmation


@dataclass(frozen=True, slots=True)
class ActivationAlert(ActivationRecord):
    """Signed by the device: "I now run ``fw_version``, the image ``image_sha256``".

    ``counter`` is the activation command's counter, so an alert from an earlier cycle cannot be
    replayed as confirmation of a later one (SPEC §8.8).
    """

    TYPE: ClassVar[str] = "activation_alert"
    device_id: str = field(metadata=eui64())
    fw_version: int = field(metadata=uint(MAX_U32))
    image_sha256: bytes = field(metadata=byte_string(HASH_LEN))
    counter: int = field(metadata=uint(MAX_U64))

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The COSE_Sign1 of this alert under the device's key."""
        return sign1(self.encode(), private_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> ActivationAlert:
        """Check the device's signature against ``trust``, then decode. ``ProtocolError`` only.

        The caller checks that the signing key belongs to ``device_id`` (a per-device trust
        store, or the kid it registered for that device).
        """
        return cls.decode(trust.verify(signed, max_size=MAX_SIGNED_BYTES))


@dataclass(frozen=True, slots=True)
class VersionReport(ActivationRecord):
    """Unsigned evidence from the CH: the device rebooted (``boot_count``) and reports a version.

    The only confirmation a CAD-joined bridge can give (it holds no credentials). Weaker than an
    alert: it proves what the CH saw, not what the device signed.
    """

    TYPE: ClassVar[str] = "version_report"
    device_id: str = field(metadata=eui64())
    fw_version: int = field(metadata=uint(MAX_U32))
    boot_count: int = field(metadata=uint(MAX_U32))
    counter: int = field(metadata=uint(MAX_U64))  # the activation command this follows


for _cls in (
    ActivationCommand,
    ActivationResponse,
    ActivationScheduled,
    ActivationCancelled,
    ActivationAlert,
    VersionReport,
):
    codec.register(_cls, codec.Tag("t", _cls.TYPE, Reason.UNKNOWN_TYPE))
del _cls
