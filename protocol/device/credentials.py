"""Credential replacement: a device that signs replaces its own key pair (SPEC §8.11; DP170 q. 3).

A device that holds credentials (a native device, an Alt HAN bridge joined as a PPMID: SPEC
§8.8) signs its activation alerts with its own P-256 key. otad (the party responsible for the
device) can have that key replaced over the air:

* :class:`CredentialsCommand` -- signed by otad like an :class:`~protocol.device.activation.
  ActivationCommand` and carried the same way (the WAN's ``Activate``, relayed verbatim by the
  CH), counter-protected by the *same* originator counter, and naming (``current_kid``) the
  device key otad trusts now. The device **generates the new key pair itself**: its private key
  never leaves the device, and nothing secret crosses the HAN or the WAN.
* :class:`CredentialsConfirmation` -- the device's answer, a COSE_Sign1 under the key otad named
  (the old key, which otad trusts) over the device id, the command's counter and the new public
  key (SubjectPublicKeyInfo DER), carrying as ``possession`` the new key's signature over a
  :class:`KeyPossession` of the same three values (a COSE_Sign1 with detached payload). A rogue
  CH cannot substitute a key of its own: it holds neither the old key (to sign the statement)
  nor, for a key it did not make, the new one (to prove possession).
* :func:`adopt_new_key` -- otad's side: given the key it trusts for the device and the command it
  issued, the new key from a confirmation, or :class:`~protocol.errors.ProtocolError`.

:func:`verify_command` is the device's one entry for everything otad signs for it (the ``"t"``
inside the signed payload tells an activation from a credentials command, SPEC §8.7); a CH
routing or logging a command may read which it claims to be with :func:`claimed_command_type`,
unverified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device.activation import (
    MAX_MESSAGE_BYTES,
    MAX_SIGNED_BYTES,
    ActivationCommand,
    ActivationRecord,
)
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import (
    ALG_ES256,
    HEADER_ALG,
    KID_LEN,
    SIGNATURE_LEN,
    Sign1,
    key_id,
    parse_sign1,
    sign1,
    verify_sign1,
)
from protocol.release.trust import TrustStore
from protocol.wire import cbor, codec
from protocol.wire.codec import byte_string, eui64, uint
from protocol.wire.limits import MAX_U64

SPKI_LEN = 91  # DER SubjectPublicKeyInfo of a P-256 public key (uncompressed point)
_PROTECTED_ES256 = cbor.dumps({HEADER_ALG: ALG_ES256})  # h'a10126', SPEC §6.1


def spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``public_key`` (what :func:`~protocol.release.cose.
    key_id` hashes, and what a confirmation carries)."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_spki(data: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of SubjectPublicKeyInfo DER ``data``; ``ValueError`` unless it is one,
    encoded exactly as :func:`spki` encodes it (uncompressed point, no other form)."""
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 public key")
    if spki(key) != data:
        raise ValueError("not the canonical SubjectPublicKeyInfo encoding")
    return key


# --------------------------------------------------------------------------- command


@dataclass(frozen=True, slots=True)
class CredentialsCommand(ActivationRecord):
    """Replace your signing key: generate a new P-256 key pair and confirm it.

    ``counter`` is the originator counter the device shares with activation commands (strictly
    greater than the last it accepted, of either kind). ``current_kid`` is the key id of the
    device key otad trusts now: the device signs its confirmation with that key (its current
    one, or the one before it if otad never received the last confirmation).
    """

    TYPE: ClassVar[str] = "replace_credentials"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))
    current_kid: bytes = field(metadata=byte_string(KID_LEN))

    def sign(self, private_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The COSE_Sign1 of this command under otad's key (P-256)."""
        return sign1(self.encode(), private_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> CredentialsCommand:
        """Check the signature against ``trust``, then strictly decode. ``ProtocolError`` only."""
        return cls.decode(trust.verify(signed, max_size=MAX_SIGNED_BYTES))


DeviceCommand = ActivationCommand | CredentialsCommand
"""What otad signs for a device (SPEC §8.7, §8.11)."""

_COMMANDS: dict[str, type[ActivationCommand] | type[CredentialsCommand]] = {
    ActivationCommand.TYPE: ActivationCommand,
    CredentialsCommand.TYPE: CredentialsCommand,
}


def verify_command(signed: bytes, trust: TrustStore) -> DeviceCommand:
    """Verify a command otad signed for a device, then decode it as the type its ``"t"`` names.

    Signature first (the trust store's reasons), then decoding: ``UNKNOWN_TYPE`` for a ``"t"``
    that is no command (an alert or a confirmation signed by a trusted key is still no command).
    """
    payload = trust.verify(signed, max_size=MAX_SIGNED_BYTES)
    raw = cbor.loads(payload, max_size=MAX_MESSAGE_BYTES, max_depth=1)
    kind = raw.get("t") if isinstance(raw, dict) else None
    cls = _COMMANDS.get(kind) if isinstance(kind, str) else None
    return codec.decode(cls or ActivationCommand, raw)  # no command type: decoding says why


def claimed_command_type(
    signed: bytes,
) -> type[ActivationCommand] | type[CredentialsCommand] | None:
    """Which command ``signed`` claims to be, **without verifying it** (for routing and logs:
    never a reason to trust it); ``None`` when it is no COSE_Sign1 of a known command."""
    try:
        raw = cbor.loads(
            parse_sign1(signed, max_size=MAX_SIGNED_BYTES).payload,
            max_size=MAX_MESSAGE_BYTES,
            max_depth=1,
        )
    except ProtocolError:
        return None
    kind = raw.get("t") if isinstance(raw, dict) else None
    return _COMMANDS.get(kind) if isinstance(kind, str) else None


# --------------------------------------------------------------------------- confirmation


@dataclass(frozen=True, slots=True)
class KeyPossession(ActivationRecord):
    """What the *new* key signs to prove the device holds it (never sent on its own: its
    signature travels as :attr:`CredentialsConfirmation.possession`, a detached payload)."""

    TYPE: ClassVar[str] = "key_possession"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))
    new_key: bytes = field(metadata=byte_string(SPKI_LEN))


@dataclass(frozen=True, slots=True)
class CredentialsConfirmation(ActivationRecord):
    """Signed by the device's old key: "for command ``counter`` I, ``device_id``, now sign with
    ``new_key``" (SubjectPublicKeyInfo DER), with ``possession``, the new key's ES256 signature
    (64 bytes, r || s) of the :class:`KeyPossession` of the same values (SPEC §8.11)."""

    TYPE: ClassVar[str] = "credentials_replaced"
    device_id: str = field(metadata=eui64())
    counter: int = field(metadata=uint(MAX_U64))  # the command's
    new_key: bytes = field(metadata=byte_string(SPKI_LEN))
    possession: bytes = field(metadata=byte_string(SIGNATURE_LEN))

    def __post_init__(self) -> None:
        codec.validate(self)
        load_spki(self.new_key)  # ValueError: decoding refuses it MALFORMED

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The new public key."""
        return load_spki(self.new_key)

    def possession_statement(self) -> KeyPossession:
        """The record the new key signed."""
        return KeyPossession(self.device_id, self.counter, self.new_key)

    @classmethod
    def create(
        cls,
        device_id: str,
        counter: int,
        *,
        old_key: ec.EllipticCurvePrivateKey,
        new_key: ec.EllipticCurvePrivateKey,
    ) -> bytes:
        """The signed confirmation (COSE_Sign1 under ``old_key``) of replacing ``old_key`` by
        ``new_key`` for command ``counter``: what the device sends back."""
        new_spki = spki(new_key.public_key())
        statement = KeyPossession(device_id, counter, new_spki).encode()
        possession = parse_sign1(sign1(statement, new_key), max_size=MAX_SIGNED_BYTES).signature
        return sign1(cls(device_id, counter, new_spki, possession).encode(), old_key)

    @classmethod
    def verify(cls, signed: bytes, trust: TrustStore) -> CredentialsConfirmation:
        """Check the old key's signature against ``trust``, decode, then check the new key's
        proof of possession (``BAD_SIGNATURE``). ``ProtocolError`` only."""
        confirmation = cls.decode(trust.verify(signed, max_size=MAX_SIGNED_BYTES))
        new = confirmation.public_key
        detached = Sign1(
            protected=_PROTECTED_ES256,
            kid=key_id(new),
            alg=ALG_ES256,
            payload=confirmation.possession_statement().encode(),
            signature=confirmation.possession,
        )
        try:
            verify_sign1(detached, new)
        except ProtocolError as exc:
            raise ProtocolError(exc.reason, f"proof of possession: {exc.detail}") from None
        return confirmation


def adopt_new_key(
    signed: bytes,
    *,
    trusted_key: ec.EllipticCurvePublicKey,
    device_id: str,
    counter: int,
) -> ec.EllipticCurvePublicKey:
    """otad's check of a confirmation: the device's new public key, or ``ProtocolError``.

    ``trusted_key`` is the device key otad trusts now (the one its command named as
    ``current_kid``), ``counter`` the counter of the command it issued. Refused: a signature not
    by ``trusted_key`` (``UNKNOWN_KEY_ID``, ``BAD_SIGNATURE``: e.g. a CH that signed a key of its
    own), not a confirmation (``UNKNOWN_TYPE``), another device's (``WRONG_DEVICE``), another
    command's (``REPLAYED``: a confirmation from an earlier cycle), a new key equal to the old
    (``MALFORMED``), a proof of possession that does not verify (``BAD_SIGNATURE``). Once
    adopted, only the new key verifies the device's alerts: trust exactly it from then on.
    """
    confirmation = CredentialsConfirmation.verify(signed, TrustStore([trusted_key]))
    if confirmation.device_id != device_id:
        raise ProtocolError(
            Reason.WRONG_DEVICE, f"confirmation of {confirmation.device_id}, not {device_id}"
        )
    if confirmation.counter != counter:
        raise ProtocolError(
            Reason.REPLAYED, f"confirmation of command {confirmation.counter}, not {counter}"
        )
    if confirmation.new_key == spki(trusted_key):
        raise ProtocolError(Reason.MALFORMED, "the new key is the old key")
    return confirmation.public_key


for _cls in (CredentialsCommand, KeyPossession, CredentialsConfirmation):
    codec.register(_cls, codec.Tag("t", _cls.TYPE, Reason.UNKNOWN_TYPE))
del _cls
