"""Credential replacement (SPEC §8.11): the signed command, the device's confirmation bound to
its old key with the new key's proof of possession, otad's adoption, and the device's checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device.activation import (
    MAX_MESSAGE_BYTES,
    MAX_SIGNED_BYTES,
    ActivationAlert,
    ActivationCommand,
)
from protocol.device.credentials import (
    SPKI_LEN,
    CredentialsCommand,
    CredentialsConfirmation,
    KeyPossession,
    adopt_new_key,
    claimed_command_type,
    spki,
    verify_command,
)
from protocol.device.device import (
    CredentialsConfirmed,
    Device,
    DeviceIdentity,
    FirmwareInfo,
    MemorySlotStore,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, parse_sign1, sign1
from protocol.release.manifest import DeviceType
from protocol.release.trust import TrustStore
from protocol.wire import codec
from protocol.wire.devices import JoinMode

OPS_KEY = ec.derive_private_key(0xA11CE, ec.SECP256R1())  # otad: signs commands
ROGUE_KEY = ec.derive_private_key(0xBAD, ec.SECP256R1())  # a rogue CH's own key
OLD_KEY = ec.derive_private_key(0xB0B, ec.SECP256R1())  # the device's key otad trusts
NEW_KEY = ec.derive_private_key(0xB0B2, ec.SECP256R1())
OPS_TRUST = TrustStore([OPS_KEY.public_key()])
DEVICE_ID = "0011223344556677"
OTHER_ID = "8899AABBCCDDEEFF"
NOW = 1_750_000_000.0
SPEC = (Path(__file__).resolve().parents[3] / "protocol" / "SPEC.md").read_text()


def reason(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Reason:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value.reason


def same(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def keys(*scalars: int) -> Callable[[], ec.EllipticCurvePrivateKey]:
    """A key generator handing out these keys in turn (deterministic tests)."""
    it = iter(scalars)
    return lambda: ec.derive_private_key(next(it), ec.SECP256R1())


def make_device(join_mode: JoinMode = JoinMode.PPMID, **kwargs: Any) -> Device:
    identity = DeviceIdentity(DEVICE_ID, DeviceType.B2, 2, 0x1234, 0x0001, join_mode)
    kwargs.setdefault("key_generator", keys(0xB0B2, 0xB0B3, 0xB0B4))
    return Device(
        identity,
        TrustStore(),
        MemorySlotStore(b"factory"),
        running=FirmwareInfo(0x0100, 5),
        activation_trust=OPS_TRUST,
        signing_key=OLD_KEY if join_mode.can_sign else None,
        **kwargs,
    )


def command(counter: int, trusted: ec.EllipticCurvePrivateKey = OLD_KEY, **kw: Any) -> bytes:
    device_id = kw.pop("device_id", DEVICE_ID)
    signer = kw.pop("signer", OPS_KEY)
    return CredentialsCommand(device_id, counter, key_id(trusted.public_key())).sign(signer)


def confirmation_of(outputs: list[Any]) -> bytes:
    assert len(outputs) == 1
    assert isinstance(outputs[0], CredentialsConfirmed)
    return outputs[0].signed


def alert(device: Device, counter: int = 9) -> bytes:
    assert device.signing_key is not None
    return ActivationAlert(DEVICE_ID, 0x0200, bytes(32), counter).sign(device.signing_key)


# --------------------------------------------------------------------------- records


def test_command_round_trips_and_fits_the_activate_envelope() -> None:
    cmd = CredentialsCommand(DEVICE_ID, (1 << 64) - 1, key_id(OLD_KEY.public_key()))
    signed = cmd.sign(OPS_KEY)
    assert CredentialsCommand.verify(signed, OPS_TRUST) == cmd
    assert verify_command(signed, OPS_TRUST) == cmd
    assert len(signed) <= MAX_SIGNED_BYTES
    assert claimed_command_type(signed) is CredentialsCommand


def test_confirmation_is_signed_by_the_old_key_and_fits_a_device_record() -> None:
    signed = CredentialsConfirmation.create(
        DEVICE_ID, (1 << 64) - 1, old_key=OLD_KEY, new_key=NEW_KEY
    )
    envelope = parse_sign1(signed, max_size=MAX_SIGNED_BYTES)
    assert envelope.kid == key_id(OLD_KEY.public_key())
    assert len(envelope.payload) <= MAX_MESSAGE_BYTES
    assert len(signed) <= 512  # DeviceReported.record's cap (SPEC §3)
    record = CredentialsConfirmation.verify(signed, TrustStore([OLD_KEY.public_key()]))
    assert record.new_key == spki(NEW_KEY.public_key())
    assert len(record.new_key) == SPKI_LEN
    assert same(record.public_key, NEW_KEY.public_key())


def test_adopting_returns_the_new_key_and_then_only_it_verifies_alerts() -> None:
    signed = CredentialsConfirmation.create(DEVICE_ID, 7, old_key=OLD_KEY, new_key=NEW_KEY)
    new = adopt_new_key(signed, trusted_key=OLD_KEY.public_key(), device_id=DEVICE_ID, counter=7)
    assert same(new, NEW_KEY.public_key())
    adopted = TrustStore([new])
    old_alert = ActivationAlert(DEVICE_ID, 2, bytes(32), 8).sign(OLD_KEY)
    new_alert = ActivationAlert(DEVICE_ID, 2, bytes(32), 8).sign(NEW_KEY)
    assert ActivationAlert.verify(new_alert, adopted).counter == 8
    assert reason(ActivationAlert.verify, old_alert, adopted) is Reason.UNKNOWN_KEY_ID


def rogue_substitution() -> bytes:
    """A rogue CH replaces the device's new key with its own, re-signing with its own key."""
    return CredentialsConfirmation.create(DEVICE_ID, 7, old_key=ROGUE_KEY, new_key=ROGUE_KEY)


def key_swapped_inside() -> bytes:
    """The old key's signature kept, the new key swapped for the rogue's: cannot re-sign."""
    genuine = parse_sign1(
        CredentialsConfirmation.create(DEVICE_ID, 7, old_key=OLD_KEY, new_key=NEW_KEY),
        max_size=MAX_SIGNED_BYTES,
    )
    record = CredentialsConfirmation.decode(genuine.payload)
    forged = CredentialsConfirmation(
        DEVICE_ID, 7, spki(ROGUE_KEY.public_key()), record.possession
    ).encode()
    return sign1(forged, ROGUE_KEY, kid=genuine.kid)  # claims the old key's id


def possession_by_another_key() -> bytes:
    """Signed by the old key, but the new key it names never signed (a key the device lacks)."""
    statement = KeyPossession(DEVICE_ID, 7, spki(NEW_KEY.public_key())).encode()
    wrong = parse_sign1(sign1(statement, ROGUE_KEY), max_size=MAX_SIGNED_BYTES).signature
    record = CredentialsConfirmation(DEVICE_ID, 7, spki(NEW_KEY.public_key()), wrong)
    return sign1(record.encode(), OLD_KEY)


def possession_for_another_counter() -> bytes:
    statement = KeyPossession(DEVICE_ID, 6, spki(NEW_KEY.public_key())).encode()
    other = parse_sign1(sign1(statement, NEW_KEY), max_size=MAX_SIGNED_BYTES).signature
    record = CredentialsConfirmation(DEVICE_ID, 7, spki(NEW_KEY.public_key()), other)
    return sign1(record.encode(), OLD_KEY)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (rogue_substitution, Reason.UNKNOWN_KEY_ID),
        (key_swapped_inside, Reason.BAD_SIGNATURE),
        (possession_by_another_key, Reason.BAD_SIGNATURE),
        (possession_for_another_counter, Reason.BAD_SIGNATURE),
        (
            lambda: CredentialsConfirmation.create(OTHER_ID, 7, old_key=OLD_KEY, new_key=NEW_KEY),
            Reason.WRONG_DEVICE,
        ),
        (
            lambda: CredentialsConfirmation.create(DEVICE_ID, 6, old_key=OLD_KEY, new_key=NEW_KEY),
            Reason.REPLAYED,
        ),
        (
            lambda: CredentialsConfirmation.create(DEVICE_ID, 7, old_key=OLD_KEY, new_key=OLD_KEY),
            Reason.MALFORMED,
        ),
        (
            lambda: ActivationAlert(DEVICE_ID, 2, bytes(32), 7).sign(OLD_KEY),
            Reason.UNKNOWN_TYPE,
        ),
    ],
    ids=[
        "rogue-ch-own-key",
        "key-swapped-under-old-signature",
        "no-possession-of-new-key",
        "possession-of-another-command",
        "another-device",
        "earlier-command",
        "same-key",
        "an-alert-is-no-confirmation",
    ],
)
def test_adoption_refuses(make: Callable[[], bytes], expected: Reason) -> None:
    signed = make()
    assert (
        reason(
            adopt_new_key, signed, trusted_key=OLD_KEY.public_key(), device_id=DEVICE_ID, counter=7
        )
        is expected
    )


def test_a_new_key_that_is_no_p256_spki_is_refused_on_decoding() -> None:
    valid = CredentialsConfirmation(DEVICE_ID, 1, spki(NEW_KEY.public_key()), bytes(64)).encode()
    bad = valid.replace(spki(NEW_KEY.public_key()), bytes(SPKI_LEN))
    assert reason(CredentialsConfirmation.decode, bad) is Reason.MALFORMED
    with pytest.raises(ValueError):
        CredentialsConfirmation(DEVICE_ID, 1, bytes(SPKI_LEN), bytes(64))


def test_the_t_inside_the_signature_tells_commands_apart() -> None:
    activation = ActivationCommand(DEVICE_ID, bytes(32), 3).sign(OPS_KEY)
    credentials = command(3)
    assert isinstance(verify_command(activation, OPS_TRUST), ActivationCommand)
    assert isinstance(verify_command(credentials, OPS_TRUST), CredentialsCommand)
    assert reason(ActivationCommand.verify, credentials, OPS_TRUST) is Reason.UNKNOWN_TYPE
    assert reason(CredentialsCommand.verify, activation, OPS_TRUST) is Reason.UNKNOWN_TYPE
    alert_by_ops = ActivationAlert(DEVICE_ID, 1, bytes(32), 3).sign(OPS_KEY)
    assert reason(verify_command, alert_by_ops, OPS_TRUST) is Reason.UNKNOWN_TYPE
    assert claimed_command_type(activation) is ActivationCommand
    assert claimed_command_type(alert_by_ops) is None
    assert claimed_command_type(b"\x00junk") is None


# --------------------------------------------------------------------------- the device


def test_device_replaces_its_key_and_signs_later_alerts_with_the_new_one() -> None:
    device = make_device()
    signed = confirmation_of(device.command_received(command(1), NOW))
    new = adopt_new_key(signed, trusted_key=OLD_KEY.public_key(), device_id=DEVICE_ID, counter=1)
    assert device.signing_key is not None
    assert same(device.signing_key.public_key(), new)
    assert device.last_counter == 1
    later = alert(device)
    assert ActivationAlert.verify(later, TrustStore([new])).counter == 9
    assert reason(ActivationAlert.verify, later, TrustStore([OLD_KEY.public_key()])) is (
        Reason.UNKNOWN_KEY_ID
    )


def test_a_replayed_credentials_command_is_refused_and_changes_nothing() -> None:
    device = make_device()
    first = command(5)
    device.command_received(first, NOW)
    key = device.signing_key
    assert reason(device.command_received, first, NOW) is Reason.REPLAYED
    assert reason(device.credentials_received, command(4), NOW) is Reason.REPLAYED
    assert device.signing_key is key
    assert device.last_counter == 5


def test_credentials_and_activation_share_one_counter() -> None:
    device = make_device()
    device.command_received(ActivationCommand(DEVICE_ID, bytes(32), 10).sign(OPS_KEY), NOW)
    assert reason(device.command_received, command(10), NOW) is Reason.REPLAYED
    device.command_received(command(11), NOW)
    replayed = ActivationCommand(DEVICE_ID, bytes(32), 11).sign(OPS_KEY)
    assert reason(device.activation_received, replayed, NOW) is Reason.REPLAYED


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: command(1, signer=ROGUE_KEY), Reason.UNKNOWN_KEY_ID),
        (lambda: command(1, signer=OLD_KEY), Reason.UNKNOWN_KEY_ID),  # a device key is not otad
        (lambda: command(1, device_id=OTHER_ID), Reason.WRONG_DEVICE),
        (lambda: command(1, trusted=ROGUE_KEY), Reason.UNKNOWN_KEY_ID),  # names a key not held
    ],
    ids=["forged", "signed-by-a-device-key", "another-device", "unknown-current-key"],
)
def test_device_refuses(make: Callable[[], bytes], expected: Reason) -> None:
    device = make_device()
    assert reason(device.command_received, make(), NOW) is expected
    assert device.signing_key is OLD_KEY
    assert device.last_counter == 0


def test_a_forged_signature_over_a_genuine_command_is_a_bad_signature() -> None:
    genuine = parse_sign1(command(1), max_size=MAX_SIGNED_BYTES)
    forged = sign1(genuine.payload, ROGUE_KEY, kid=genuine.kid)
    device = make_device()
    assert reason(device.credentials_received, forged, NOW) is Reason.BAD_SIGNATURE


def test_a_cad_joined_device_holds_no_credentials() -> None:
    device = make_device(JoinMode.CAD)
    assert reason(device.command_received, command(1), NOW) is Reason.NO_CREDENTIALS
    assert device.signing_key is None
    assert device.last_counter == 0
    assert reason(device.command_received, command(0), NOW) is Reason.REPLAYED  # checked first


def test_a_lost_confirmation_is_recovered_with_the_key_otad_still_trusts() -> None:
    """otad never got the first confirmation: it still trusts the old key and names it again;
    the device signs the new confirmation with that key and drops the key otad never saw."""
    device = make_device()
    device.command_received(command(1), NOW)  # confirmation lost on the way
    unseen = device.signing_key
    signed = confirmation_of(device.command_received(command(2, trusted=OLD_KEY), NOW))
    new = adopt_new_key(signed, trusted_key=OLD_KEY.public_key(), device_id=DEVICE_ID, counter=2)
    assert device.signing_key is not None
    assert same(device.signing_key.public_key(), new)
    assert unseen is not None
    assert not same(unseen.public_key(), new)
    assert device.previous_signing_key is OLD_KEY
    # the key that was never adopted is gone: naming it is refused
    assert reason(device.command_received, command(3, trusted=unseen), NOW) is (
        Reason.UNKNOWN_KEY_ID
    )


def test_after_adoption_the_next_replacement_names_the_new_key_and_drops_the_old() -> None:
    device = make_device()
    first = confirmation_of(device.command_received(command(1), NOW))
    k1 = adopt_new_key(first, trusted_key=OLD_KEY.public_key(), device_id=DEVICE_ID, counter=1)
    current = device.signing_key
    assert current is not None
    second = confirmation_of(device.command_received(command(2, trusted=current), NOW))
    k2 = adopt_new_key(second, trusted_key=k1, device_id=DEVICE_ID, counter=2)
    assert device.previous_signing_key is current
    assert device.signing_key is not None
    assert same(device.signing_key.public_key(), k2)
    assert reason(device.command_received, command(3, trusted=OLD_KEY), NOW) is (
        Reason.UNKNOWN_KEY_ID
    )


def test_the_default_generator_makes_a_fresh_key_per_replacement() -> None:
    identity = DeviceIdentity(DEVICE_ID, DeviceType.ESME, 1, 0x1234, 1, JoinMode.NATIVE)
    device = Device(
        identity,
        TrustStore(),
        MemorySlotStore(),
        running=FirmwareInfo(1, 0),
        activation_trust=OPS_TRUST,
        signing_key=OLD_KEY,
    )
    seen = {spki(OLD_KEY.public_key())}
    trusted = OLD_KEY
    for counter in (1, 2, 3):
        device.command_received(command(counter, trusted=trusted), NOW)
        assert device.signing_key is not None
        trusted = device.signing_key
        seen.add(spki(trusted.public_key()))
    assert len(seen) == 4


# --------------------------------------------------------------------------- SPEC §8.11


def credentials_table_problems(text: str) -> list[str]:
    """How §8.11's record table differs from the code (t, class, fields, byte lengths)."""
    body = text.split("### 8.11", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in body.splitlines()
        if line.startswith("| `") and line.count("|") == 5
    ][1:]  # below the header "| `t` | class | fields | signed by |"
    classes = {
        cls.__name__: cls for cls in (CredentialsCommand, KeyPossession, CredentialsConfirmation)
    }
    problems: list[str] = []
    for code_cell, class_cell, fields_cell, _signer in rows:
        names = re.findall(r"`([^`]+)`", class_cell)
        cls = classes.pop(names[0], None) if names else None
        if cls is None:
            problems.append(f"no credentials record {class_cell}")
            continue
        if re.findall(r"`([^`]+)`", code_cell) != [cls.TYPE]:
            problems.append(f"{cls.__name__}: t {code_cell}, code {cls.TYPE}")
        schema = codec.schema(cls)
        listed = re.findall(r"`([a-z_]+)`(?: \((\d+) B)?", fields_cell)
        if [name for name, _ in listed] != [spec.name for spec in schema.fields]:
            problems.append(f"{cls.__name__}: fields {fields_cell}")
        lengths = {spec.name: spec.length for spec in schema.fields}
        for name, length in listed:
            if length and lengths.get(name) != int(length):
                problems.append(f"{cls.__name__}.{name}: {length} B, code {lengths.get(name)}")
    return problems + [f"{name} not in SPEC §8.11" for name in classes]


def test_the_credentials_table_of_spec_is_the_code() -> None:
    assert credentials_table_problems(SPEC) == []


@pytest.mark.parametrize(
    ("line", "doctored"),
    [
        ("| `replace_credentials` |", "| `replace_credential` |"),
        ("`current_kid` (8 B)", "`current_kid` (16 B)"),
        ("`new_key` (91 B), `possession` (64 B)", "`new_key` (91 B)"),
        ("| `key_possession` | `KeyPossession` |", "| `key_possession` | `KeyProof` |"),
    ],
)
def test_a_wrong_credentials_line_is_noticed(line: str, doctored: str) -> None:
    assert line in SPEC
    assert credentials_table_problems(SPEC.replace(line, doctored))
