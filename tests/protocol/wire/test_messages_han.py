"""The HAN carried over the WAN (protocol 1.1, SPEC §8.10): Activate, ReadVersion,
DeviceTransferReported and DeviceReported, with real signed activation records inside."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device.activation import (
    MAX_SIGNED_BYTES,
    ActivationAlert,
    ActivationCommand,
    ActivationResponse,
    Outcome,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.trust import TrustStore
from protocol.wire import cbor, messages
from protocol.wire.messages import (
    MAX_DEVICE_RECORD_BYTES,
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    ReadVersion,
)

DEVICE = "00DB1234567890AE"
IMAGE = hashlib.sha256(b"image").digest()


def signed_command(key: ec.EllipticCurvePrivateKey, counter: int = 7) -> bytes:
    return ActivationCommand(DEVICE, IMAGE, counter, None).sign(key)


def test_an_activate_carries_the_signed_command_verbatim() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    trust = TrustStore([key.public_key()])
    command = signed_command(key)
    message = messages.decode(Activate(DEVICE, command).encode())
    assert isinstance(message, Activate)
    assert message.command == command
    assert ActivationCommand.verify(message.command, trust).counter == 7


def test_a_device_report_relays_a_signed_alert_verbatim() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    alert = ActivationAlert(DEVICE, 0x0102_0304, IMAGE, 7).sign(key)
    message = messages.decode(DeviceReported(DEVICE, alert, Evidence.DEVICE).encode())
    assert isinstance(message, DeviceReported)
    assert ActivationAlert.verify(message.record, TrustStore([key.public_key()])).counter == 7


def test_the_record_cap_is_the_signed_activation_cap() -> None:
    assert MAX_DEVICE_RECORD_BYTES == MAX_SIGNED_BYTES
    raw: dict[str, Any] = {"t": 20, "device_id": DEVICE, "record": bytes(513), "evidence": "ch"}
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps(raw))
    assert info.value.reason is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "message",
    [
        Activate(DEVICE, b"\x01" * 100),
        ReadVersion(DEVICE, 2**64 - 1),
        DeviceTransferReported(IMAGE, DEVICE, DeviceTransferState.TRANSFERRING, 4000, 16384, 0),
        DeviceTransferReported(IMAGE, DEVICE, "hardware_mismatch", 0, 16384, 43),
        DeviceReported(
            DEVICE,
            ActivationResponse(DEVICE, 7, Outcome.SUCCESS, 5, None).encode(),
            "ch",
        ),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_and_quality_of_service(message: messages.Message) -> None:
    assert messages.decode(message.encode()) == message
    assert message.QOS == 1


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"state": "done"}, Reason.MALFORMED),
        ({"state": "HELD"}, Reason.MALFORMED),
        ({"device_id": "00db1234567890ae"}, Reason.BAD_IDENTIFIER),
        ({"bytes_held": 2**32}, Reason.MALFORMED),
        ({"reason": 65_536}, Reason.MALFORMED),
        ({"extra": 1}, Reason.UNKNOWN_KEY),
    ],
)
def test_a_transfer_report_is_decoded_strictly(changes: dict[str, Any], expected: Reason) -> None:
    message = DeviceTransferReported(IMAGE, DEVICE, DeviceTransferState.HELD, 10, 10, 0)
    raw = cbor.loads(message.encode(), max_size=4096)
    assert isinstance(raw, dict)
    raw.update(changes)
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps(raw))
    assert info.value.reason is expected


def test_an_unknown_evidence_is_refused() -> None:
    raw = {"t": 20, "device_id": DEVICE, "record": b"", "evidence": "otad"}
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps(raw))
    assert info.value.reason is Reason.MALFORMED
