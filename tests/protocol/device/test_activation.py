"""Activation messages: signed command and alert, device answers, strict decoding, fuzz."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.device.activation import (
    MAX_SIGNED_BYTES,
    ActivationAlert,
    ActivationCancelled,
    ActivationCommand,
    ActivationResponse,
    ActivationScheduled,
    Outcome,
    VersionReport,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, sign1
from protocol.release.trust import TrustStore
from protocol.wire import cbor

OPS_KEY = ec.derive_private_key(0xA11CE, ec.SECP256R1())
DEVICE_KEY = ec.derive_private_key(0xB0B, ec.SECP256R1())
OTHER_KEY = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
OPS_TRUST = TrustStore([OPS_KEY.public_key()])
DEVICE_TRUST = TrustStore([DEVICE_KEY.public_key()])
DEVICE_ID = "0011223344556677"
SHA = bytes(range(32))


def reason(call: Any, *args: Any) -> Reason:
    with pytest.raises(ProtocolError) as info:
        call(*args)
    return info.value.reason


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "command",
    [
        ActivationCommand(DEVICE_ID, SHA, 1),
        ActivationCommand(DEVICE_ID, SHA, 2, execute_at=1_800_000_000),
        ActivationCommand(DEVICE_ID, SHA, 3, cancel=True),
        ActivationCommand(DEVICE_ID, SHA, (1 << 64) - 1, execute_at=(1 << 64) - 1),
    ],
    ids=["immediate", "future-dated", "cancel", "max"],
)
def test_command_sign_verify_round_trip(command: ActivationCommand) -> None:
    signed = command.sign(OPS_KEY)
    assert len(signed) <= MAX_SIGNED_BYTES
    assert ActivationCommand.verify(signed, OPS_TRUST) == command


def test_answers_round_trip() -> None:
    samples: list[Any] = [
        ActivationResponse(DEVICE_ID, 5, Outcome.SUCCESS, 0x01020304),
        ActivationResponse(DEVICE_ID, 6, Outcome.ACTIVATION_FAILED, 7, Reason.SELF_TEST_FAILED),
        ActivationScheduled(DEVICE_ID, 7, 1_800_000_000),
        ActivationCancelled(DEVICE_ID, 8, 7),
        ActivationCancelled(DEVICE_ID, 9, None),
        VersionReport(DEVICE_ID, 0x0200, 3, 9),
    ]
    for sample in samples:
        assert type(sample).decode(sample.encode()) == sample


def test_alert_is_signed_by_the_device_and_verifies_only_with_its_key() -> None:
    alert = ActivationAlert(DEVICE_ID, 0x0300, SHA, 11)
    signed = alert.sign(DEVICE_KEY)
    assert ActivationAlert.verify(signed, DEVICE_TRUST) == alert
    assert reason(ActivationAlert.verify, signed, OPS_TRUST) is Reason.UNKNOWN_KEY_ID


# --------------------------------------------------------------------------- signature checks


def test_command_signed_by_an_untrusted_key_is_refused() -> None:
    signed = ActivationCommand(DEVICE_ID, SHA, 1).sign(OTHER_KEY)
    assert reason(ActivationCommand.verify, signed, OPS_TRUST) is Reason.UNKNOWN_KEY_ID


def test_command_signed_by_a_revoked_key_is_refused() -> None:
    trust = TrustStore([OPS_KEY.public_key()], revoked=[key_id(OPS_KEY.public_key())])
    signed = ActivationCommand(DEVICE_ID, SHA, 1).sign(OPS_KEY)
    assert reason(ActivationCommand.verify, signed, trust) is Reason.REVOKED_KEY


def test_tampered_command_fails_its_signature() -> None:
    signed = bytearray(ActivationCommand(DEVICE_ID, SHA, 1).sign(OPS_KEY))
    position = bytes(signed).index(SHA)  # flip a bit of the image hash inside the payload
    signed[position] ^= 0x01
    assert reason(ActivationCommand.verify, bytes(signed), OPS_TRUST) is Reason.BAD_SIGNATURE


def test_an_alert_is_not_a_command_even_under_a_trusted_key() -> None:
    # cross-type confusion: the "t" field separates what a key signs
    signed = ActivationAlert(DEVICE_ID, 1, SHA, 1).sign(OPS_KEY)
    assert reason(ActivationCommand.verify, signed, OPS_TRUST) is Reason.UNKNOWN_TYPE
    signed = ActivationCommand(DEVICE_ID, SHA, 1).sign(DEVICE_KEY)
    assert reason(ActivationAlert.verify, signed, DEVICE_TRUST) is Reason.UNKNOWN_TYPE


# --------------------------------------------------------------------------- strictness


def command_map(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "t": "activate",
        "device_id": DEVICE_ID,
        "image_sha256": SHA,
        "counter": 1,
        "execute_at": None,
        "cancel": False,
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"extra": 1}, Reason.UNKNOWN_KEY),
        ({"cancel": ...}, Reason.MALFORMED),
        ({"t": "activation_alert"}, Reason.UNKNOWN_TYPE),
        ({"device_id": "0011223344556677/"}, Reason.BAD_IDENTIFIER),
        ({"device_id": "00112233445566zz"}, Reason.BAD_IDENTIFIER),
        ({"device_id": "0011223344556677".lower().replace("0", "a")}, Reason.BAD_IDENTIFIER),
        ({"image_sha256": SHA[:31]}, Reason.MALFORMED),
        ({"counter": -1}, Reason.MALFORMED),
        ({"counter": True}, Reason.MALFORMED),
        ({"execute_at": "soon"}, Reason.MALFORMED),
        ({"cancel": 1}, Reason.MALFORMED),
        ({"cancel": True, "execute_at": 5}, Reason.MALFORMED),
    ],
)
def test_command_decoding_is_strict(changes: dict[str, Any], expected: Reason) -> None:
    signed = sign1(cbor.dumps(command_map(**changes)), OPS_KEY)
    assert reason(ActivationCommand.verify, signed, OPS_TRUST) is expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"outcome": 4}, Reason.MALFORMED),
        ({"outcome": -1}, Reason.MALFORMED),
        ({"reason": 999}, Reason.MALFORMED),
        ({"reason": 12}, Reason.MALFORMED),  # not a defined Reason
        ({"running_fw_version": 1 << 32}, Reason.MALFORMED),
        ({"counter": None}, Reason.MALFORMED),
        ({"more": None}, Reason.UNKNOWN_KEY),
    ],
)
def test_response_decoding_is_strict(changes: dict[str, Any], expected: Reason) -> None:
    raw = cbor.loads(ActivationResponse(DEVICE_ID, 1, Outcome.SUCCESS, 2).encode(), max_size=1024)
    raw.update(changes)
    assert reason(ActivationResponse.decode, cbor.dumps(raw)) is expected


def test_oversized_and_non_canonical_input_is_refused() -> None:
    assert reason(VersionReport.decode, b"\xa0" + bytes(300)) is Reason.TOO_LARGE
    # {"t": 1} with the integer 1 in a non-minimal two-byte head
    assert reason(VersionReport.decode, b"\xa1\x61t\x18\x01") is Reason.NON_CANONICAL


def test_local_construction_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="cancel"):
        ActivationCommand(DEVICE_ID, SHA, 1, execute_at=5, cancel=True)
    with pytest.raises(ValueError, match="EUI-64"):
        ActivationCommand("nope", SHA, 1)
    with pytest.raises(ValueError, match="32 bytes"):
        ActivationCommand(DEVICE_ID, b"short", 1)
    with pytest.raises(ValueError, match="outcome"):
        ActivationResponse(DEVICE_ID, 1, 0, 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzz

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_SCHEMAS: dict[str, list[str]] = {
    "activate": ["device_id", "image_sha256", "counter", "execute_at", "cancel"],
    "activation_response": ["device_id", "counter", "outcome", "running_fw_version", "reason"],
    "activation_scheduled": ["device_id", "counter", "execute_at"],
    "activation_cancelled": ["device_id", "counter", "cancelled_counter"],
    "activation_alert": ["device_id", "fw_version", "image_sha256", "counter"],
    "version_report": ["device_id", "fw_version", "boot_count", "counter"],
}
_PLAIN_DECODERS: list[Any] = [
    ActivationResponse.decode,
    ActivationScheduled.decode,
    ActivationCancelled.decode,
    VersionReport.decode,
]


@st.composite
def near_valid_maps(draw: st.DrawFn) -> dict[str, Any]:
    """Maps with a real type code and (mostly) the right keys, holding arbitrary values."""
    type_code = draw(st.sampled_from(sorted(_SCHEMAS)))
    good: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "image_sha256": SHA,
        "counter": 1,
        "execute_at": None,
        "cancel": False,
        "outcome": 0,
        "running_fw_version": 1,
        "reason": None,
        "cancelled_counter": None,
        "fw_version": 1,
        "boot_count": 1,
    }
    raw: dict[str, Any] = {"t": type_code}
    for key in _SCHEMAS[type_code]:
        choice = draw(st.integers(0, 3))
        if choice == 0:
            continue  # drop the key
        raw[key] = good[key] if choice == 1 else draw(_VALUES)
    if draw(st.booleans()):
        raw[draw(st.text(max_size=6))] = draw(_VALUES)
    return raw


def only_protocol_errors(call: Any, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        call(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    for decode in _PLAIN_DECODERS:
        only_protocol_errors(decode, data)
    only_protocol_errors(lambda d: ActivationCommand.verify(d, OPS_TRUST), data)
    only_protocol_errors(lambda d: ActivationAlert.verify(d, DEVICE_TRUST), data)


@settings(max_examples=300, deadline=None)
@given(raw=near_valid_maps())
def test_fuzz_structured_maps_raise_only_protocol_errors(raw: dict[str, Any]) -> None:
    try:
        payload = cbor.dumps(raw)
    except Exception:
        return
    for decode in _PLAIN_DECODERS:
        only_protocol_errors(decode, payload)
    # a trusted signer producing garbage still only yields ProtocolError
    only_protocol_errors(lambda d: ActivationCommand.verify(d, OPS_TRUST), sign1(payload, OPS_KEY))
    only_protocol_errors(
        lambda d: ActivationAlert.verify(d, DEVICE_TRUST), sign1(payload, DEVICE_KEY)
    )


@settings(max_examples=100, deadline=None)
@given(
    counter=st.integers(0, (1 << 64) - 1),
    execute_at=st.none() | st.integers(0, (1 << 64) - 1),
    outcome=st.sampled_from(Outcome),
    version=st.integers(0, 0xFFFF_FFFF),
    why=st.none() | st.sampled_from(Reason),
)
def test_round_trip_property(
    counter: int, execute_at: int | None, outcome: Outcome, version: int, why: Reason | None
) -> None:
    command = ActivationCommand(DEVICE_ID, SHA, counter, execute_at)
    assert ActivationCommand.decode(command.encode()) == command
    response = ActivationResponse(DEVICE_ID, counter, outcome, version, why)
    assert ActivationResponse.decode(response.encode()) == response
    report = VersionReport(DEVICE_ID, version, version, counter)
    assert VersionReport.decode(report.encode()) == report
