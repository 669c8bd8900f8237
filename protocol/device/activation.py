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
* Confirmation evidence, by join mode (DESIGN.md section 1, DP170 questions 1, 2 and 4):
  :class:`ActivationAlert`, signed by the *device's* own key, for devices that can sign (native
  devices and bridges joined as a PPMID); :class:`VersionReport`, unsigned, for bridges joined as
  a CAD: the CH's own evidence that the device rebooted and now reports the new version.

Every message is a deterministic CBOR map with text keys, the type under ``"t"``, exactly the
fields below and nothing else. Decoding is strict and raises :class:`ProtocolError` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import ProtocolError, Reason
from protocol.release.cose import sign1
from protocol.release.trust import TrustStore
from protocol.wire import cbor
from protocol.wire.limits import HASH_LEN, MAX_U32, MAX_U64, check_eui64

MAX_MESSAGE_BYTES = 256  # any activation message payload (the largest is ~150 bytes)
MAX_SIGNED_BYTES = 512  # a payload plus its COSE_Sign1 envelope

T_COMMAND = "activate"
T_RESPONSE = "activation_response"
T_SCHEDULED = "activation_scheduled"
T_CANCELLED = "activation_cancelled"
T_ALERT = "activation_alert"
T_VERSION_REPORT = "version_report"


class Outcome(IntEnum):
    """Outcome of an executed activation (GBCS CS06 response codes)."""

    SUCCESS = 0
    NO_IMAGE_HELD = 1
    HASH_MISMATCH = 2
    ACTIVATION_FAILED = 3


def check_device_id(value: object) -> str:
    """Return ``value`` if it is an EUI-64 as 16 upper-case hex digits, else ``BAD_IDENTIFIER``."""
    return check_eui64(value, "device id")


# --------------------------------------------------------------------------- field checks


def _load(data: bytes, type_code: str, keys: frozenset[str]) -> dict[str, Any]:
    raw = cbor.loads(data, max_size=MAX_MESSAGE_BYTES, max_depth=1)
    if not isinstance(raw, dict):
        raise ProtocolError(Reason.MALFORMED, "activation message is not a map")
    if raw.get("t") != type_code:
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"expected type {type_code!r}")
    unknown = set(raw) - keys - {"t"}
    if unknown:
        raise ProtocolError(Reason.UNKNOWN_KEY, f"keys {sorted(map(str, unknown))}")
    missing = keys - set(raw)
    if missing:
        raise ProtocolError(Reason.MALFORMED, f"missing {sorted(missing)}")
    return raw


def _uint(raw: dict[str, Any], key: str, top: int) -> int:
    value = raw[key]
    if type(value) is not int or not 0 <= value <= top:
        raise ProtocolError(Reason.MALFORMED, f"{key} is not an integer in 0..{top}")
    return value


def _opt_uint(raw: dict[str, Any], key: str, top: int) -> int | None:
    return None if raw[key] is None else _uint(raw, key, top)


def _digest(raw: dict[str, Any], key: str) -> bytes:
    value = raw[key]
    if not isinstance(value, bytes) or len(value) != HASH_LEN:
        raise ProtocolError(Reason.MALFORMED, f"{key} is not a {HASH_LEN}-byte string")
    return value


def _check_local(name: str, value: object, top: int) -> None:
    if type(value) is not int or not 0 <= value <= top:
        raise ValueError(f"{name}={value!r} is not an integer in 0..{top}")


def _check_digest_local(value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_LEN:
        raise ValueError("image_sha256 must be 32 bytes")


def _check_id_local(value: object) -> None:
    try:
        check_device_id(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- command


@dataclass(frozen=True, slots=True)
class ActivationCommand:
    """Activate (or cancel the future-dated activation of) image ``image_sha256`` on one device.

    ``counter`` is the originator counter: a device accepts a command only if its counter is
    strictly greater than the last it accepted. ``execute_at`` (unix seconds) defers execution;
    ``None`` means now. A cancel carries no execution time.
    """

    device_id: str
    image_sha256: bytes
    counter: int
    execute_at: int | None = None
    cancel: bool = False

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_digest_local(self.image_sha256)
        _check_local("counter", self.counter, MAX_U64)
        if self.execute_at is not None:
            _check_local("execute_at", self.execute_at, MAX_U64)
        if not isinstance(self.cancel, bool):
            raise ValueError("cancel must be a bool")
        if self.cancel and self.execute_at is not None:
            raise ValueError("a cancel has no execution time")

    def to_cbor(self) -> bytes:
        """The deterministic CBOR payload that gets signed."""
        return cbor.dumps(
            {
                "t": T_COMMAND,
                "device_id": self.device_id,
                "image_sha256": self.image_sha256,
                "counter": self.counter,
                "execute_at": self.execute_at,
                "cancel": self.cancel,
            }
        )

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The COSE_Sign1 of this command under ``private_key`` (P-256)."""
        return sign1(self.to_cbor(), private_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> ActivationCommand:
        """Check the signature against ``trust``, then strictly decode. ``ProtocolError`` only.

        Whether the command is for *this* device and fresh (counter) is the device's check
        (:meth:`protocol.device.device.Device.activation_received`): ``WRONG_DEVICE``, ``REPLAYED``.
        """
        return cls._from_cbor(trust.verify(signed, max_size=MAX_SIGNED_BYTES))

    @classmethod
    def _from_cbor(cls, payload: bytes) -> ActivationCommand:
        raw = _load(
            payload,
            T_COMMAND,
            frozenset({"device_id", "image_sha256", "counter", "execute_at", "cancel"}),
        )
        device_id = check_device_id(raw["device_id"])
        digest = _digest(raw, "image_sha256")
        counter = _uint(raw, "counter", MAX_U64)
        execute_at = _opt_uint(raw, "execute_at", MAX_U64)
        cancel = raw["cancel"]
        if not isinstance(cancel, bool):
            raise ProtocolError(Reason.MALFORMED, "cancel is not a bool")
        if cancel and execute_at is not None:
            raise ProtocolError(Reason.MALFORMED, "a cancel carries no execution time")
        return cls(device_id, digest, counter, execute_at, cancel)


# --------------------------------------------------------------------------- device answers


@dataclass(frozen=True, slots=True)
class ActivationResponse:
    """The outcome of an executed activation, and the firmware version running afterwards.

    ``reason`` refines a failure for logs and events (e.g. ``SELF_TEST_FAILED`` with outcome
    ``ACTIVATION_FAILED``: the new image booted, failed its self-test and was rolled back).
    """

    device_id: str
    counter: int  # the command's counter
    outcome: Outcome
    running_fw_version: int
    reason: Reason | None = None

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_local("counter", self.counter, MAX_U64)
        _check_local("running_fw_version", self.running_fw_version, MAX_U32)
        if not isinstance(self.outcome, Outcome):
            raise ValueError("outcome must be an Outcome")
        if self.reason is not None and not isinstance(self.reason, Reason):
            raise ValueError("reason must be a Reason or None")

    def encode(self) -> bytes:
        """Deterministic CBOR bytes."""
        return cbor.dumps(
            {
                "t": T_RESPONSE,
                "device_id": self.device_id,
                "counter": self.counter,
                "outcome": int(self.outcome),
                "running_fw_version": self.running_fw_version,
                "reason": None if self.reason is None else int(self.reason),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ActivationResponse:
        """Strictly decode; raises :class:`ProtocolError` only."""
        raw = _load(
            data,
            T_RESPONSE,
            frozenset({"device_id", "counter", "outcome", "running_fw_version", "reason"}),
        )
        device_id = check_device_id(raw["device_id"])
        counter = _uint(raw, "counter", MAX_U64)
        outcome = _uint(raw, "outcome", 255)
        if outcome not in Outcome._value2member_map_:
            raise ProtocolError(Reason.MALFORMED, f"unknown outcome {outcome}")
        version = _uint(raw, "running_fw_version", MAX_U32)
        reason = _opt_uint(raw, "reason", 255)
        if reason is not None and reason not in Reason._value2member_map_:
            raise ProtocolError(Reason.MALFORMED, f"unknown reason {reason}")
        return cls(
            device_id,
            counter,
            Outcome(outcome),
            version,
            None if reason is None else Reason(reason),
        )


@dataclass(frozen=True, slots=True)
class ActivationScheduled:
    """A future-dated activation was accepted and will execute at ``execute_at``."""

    device_id: str
    counter: int
    execute_at: int

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_local("counter", self.counter, MAX_U64)
        _check_local("execute_at", self.execute_at, MAX_U64)

    def encode(self) -> bytes:
        """Deterministic CBOR bytes."""
        return cbor.dumps(
            {
                "t": T_SCHEDULED,
                "device_id": self.device_id,
                "counter": self.counter,
                "execute_at": self.execute_at,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ActivationScheduled:
        """Strictly decode; raises :class:`ProtocolError` only."""
        raw = _load(data, T_SCHEDULED, frozenset({"device_id", "counter", "execute_at"}))
        return cls(
            check_device_id(raw["device_id"]),
            _uint(raw, "counter", MAX_U64),
            _uint(raw, "execute_at", MAX_U64),
        )


@dataclass(frozen=True, slots=True)
class ActivationCancelled:
    """Answer to a cancel: which scheduled activation (by counter) it removed, if any."""

    device_id: str
    counter: int  # the cancel command's counter
    cancelled_counter: int | None  # None: nothing matching was scheduled

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_local("counter", self.counter, MAX_U64)
        if self.cancelled_counter is not None:
            _check_local("cancelled_counter", self.cancelled_counter, MAX_U64)

    def encode(self) -> bytes:
        """Deterministic CBOR bytes."""
        return cbor.dumps(
            {
                "t": T_CANCELLED,
                "device_id": self.device_id,
                "counter": self.counter,
                "cancelled_counter": self.cancelled_counter,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ActivationCancelled:
        """Strictly decode; raises :class:`ProtocolError` only."""
        raw = _load(data, T_CANCELLED, frozenset({"device_id", "counter", "cancelled_counter"}))
        return cls(
            check_device_id(raw["device_id"]),
            _uint(raw, "counter", MAX_U64),
            _opt_uint(raw, "cancelled_counter", MAX_U64),
        )


# --------------------------------------------------------------------------- confirmation


@dataclass(frozen=True, slots=True)
class ActivationAlert:
    """Signed by the device: "I now run ``fw_version``, the image ``image_sha256``".

    ``counter`` is the activation command's counter, so an alert from an earlier cycle cannot be
    replayed as confirmation of a later one (A13).
    """

    device_id: str
    fw_version: int
    image_sha256: bytes
    counter: int

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_local("fw_version", self.fw_version, MAX_U32)
        _check_digest_local(self.image_sha256)
        _check_local("counter", self.counter, MAX_U64)

    def to_cbor(self) -> bytes:
        """The deterministic CBOR payload that gets signed."""
        return cbor.dumps(
            {
                "t": T_ALERT,
                "device_id": self.device_id,
                "fw_version": self.fw_version,
                "image_sha256": self.image_sha256,
                "counter": self.counter,
            }
        )

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The COSE_Sign1 of this alert under the device's key."""
        return sign1(self.to_cbor(), private_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> ActivationAlert:
        """Check the device's signature against ``trust``, then decode. ``ProtocolError`` only.

        The caller checks that the signing key belongs to ``device_id`` (a per-device trust
        store, or the kid it registered for that device).
        """
        return cls._from_cbor(trust.verify(signed, max_size=MAX_SIGNED_BYTES))

    @classmethod
    def _from_cbor(cls, payload: bytes) -> ActivationAlert:
        raw = _load(
            payload, T_ALERT, frozenset({"device_id", "fw_version", "image_sha256", "counter"})
        )
        return cls(
            check_device_id(raw["device_id"]),
            _uint(raw, "fw_version", MAX_U32),
            _digest(raw, "image_sha256"),
            _uint(raw, "counter", MAX_U64),
        )


@dataclass(frozen=True, slots=True)
class VersionReport:
    """Unsigned evidence from the CH: the device rebooted (``boot_count``) and reports a version.

    The only confirmation a CAD-joined bridge can give (it holds no credentials). Weaker than an
    alert: it proves what the CH saw, not what the device signed.
    """

    device_id: str
    fw_version: int
    boot_count: int
    counter: int  # the activation command this follows

    def __post_init__(self) -> None:
        _check_id_local(self.device_id)
        _check_local("fw_version", self.fw_version, MAX_U32)
        _check_local("boot_count", self.boot_count, MAX_U32)
        _check_local("counter", self.counter, MAX_U64)

    def encode(self) -> bytes:
        """Deterministic CBOR bytes."""
        return cbor.dumps(
            {
                "t": T_VERSION_REPORT,
                "device_id": self.device_id,
                "fw_version": self.fw_version,
                "boot_count": self.boot_count,
                "counter": self.counter,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> VersionReport:
        """Strictly decode; raises :class:`ProtocolError` only."""
        raw = _load(
            data, T_VERSION_REPORT, frozenset({"device_id", "fw_version", "boot_count", "counter"})
        )
        return cls(
            check_device_id(raw["device_id"]),
            _uint(raw, "fw_version", MAX_U32),
            _uint(raw, "boot_count", MAX_U32),
            _uint(raw, "counter", MAX_U64),
        )
