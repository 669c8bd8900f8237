"""COSE_Sign1 (RFC 9052) with ES256 (RFC 9053): the signature envelope of a manifest.

One profile only (SPEC §6.1), so a verifier has nothing to negotiate: tagged 18, the protected
header exactly ``h'a10126'`` (alg ES256), the unprotected ``{4: kid}`` (:func:`key_id` of the
signer's public key), the payload attached, and the signature ECDSA P-256 over SHA-256 of the
``Sig_structure`` as the 64 bytes ``r || s`` (RFC 9053 2.1), not DER.

:func:`parse_sign1` only takes the envelope apart (strictly, through :mod:`protocol.wire.cbor`); the
payload stays opaque bytes until :func:`verify_sign1` has checked the signature over exactly those
bytes (verify before decode, SPEC §6.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor

ALG_ES256 = -7
COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
KID_LEN = 8
MAX_KID_LEN = 32
SIGNATURE_LEN = 64
_COORD_LEN = 32
_MAX_HEADER_BYTES = 64
# tag -> array -> element -> (unprotected map value): four levels are all a Sign1 needs.
_MAX_DEPTH = 4


def key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Key id of ``public_key``: first 8 bytes of SHA-256 of its SubjectPublicKeyInfo DER."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:KID_LEN]


def _protected_es256() -> bytes:
    return cbor.dumps({HEADER_ALG: ALG_ES256})


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor.dumps(["Signature1", protected, b"", payload])


def _require_p256(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError(Reason.BAD_ALGORITHM, f"ES256 needs a P-256 key, not {key.curve.name}")


def sign1(
    payload: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    kid: bytes | None = None,
    deterministic: bool = False,
) -> bytes:
    """Sign ``payload`` and return the tagged COSE_Sign1 bytes.

    ``kid`` defaults to :func:`key_id` of the matching public key. ``deterministic`` derives the
    ECDSA nonce from the key and the message (RFC 6979), so the same payload and key always give
    the same bytes (the test vectors, ``protocol/vectors/``); the default draws a random nonce.
    Either verifies the same way. Raises ``ValueError`` for a key that is not P-256 (a caller
    error, not untrusted input).
    """
    if not isinstance(private_key.curve, ec.SECP256R1):
        raise ValueError(f"ES256 needs a P-256 key, not {private_key.curve.name}")
    if kid is None:
        kid = key_id(private_key.public_key())
    if not 1 <= len(kid) <= MAX_KID_LEN:
        raise ValueError(f"kid must be 1..{MAX_KID_LEN} bytes")
    payload = bytes(payload)
    protected = _protected_es256()
    algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=deterministic)
    der = private_key.sign(_sig_structure(protected, payload), algorithm)
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(_COORD_LEN, "big") + s.to_bytes(_COORD_LEN, "big")
    message = cbor2.CBORTag(
        COSE_SIGN1_TAG, [protected, {HEADER_KID: bytes(kid)}, payload, signature]
    )
    return cbor.dumps(message)


@dataclass(frozen=True, slots=True)
class Sign1:
    """A parsed, not yet verified COSE_Sign1. ``payload`` is the exact signed bytes."""

    protected: bytes  # the protected header exactly as received (a bstr-wrapped map)
    kid: bytes
    alg: int
    payload: bytes
    signature: bytes  # r || s, 64 bytes

    def to_be_signed(self) -> bytes:
        """The ``Sig_structure`` ``["Signature1", protected, h'', payload]`` that is signed."""
        return _sig_structure(self.protected, self.payload)


def parse_sign1(data: bytes, *, max_size: int) -> Sign1:
    """Take a tagged COSE_Sign1 apart without trusting it.

    Raises :class:`ProtocolError` only: ``TOO_LARGE`` over ``max_size``; ``MALFORMED`` (and the
    other encoding reasons of :func:`protocol.wire.cbor.loads`) for anything but the profile above;
    ``UNKNOWN_KEY`` for a header parameter the profile does not use; ``BAD_ALGORITHM`` when the
    protected header names no integer algorithm; ``BAD_SIGNATURE`` for a signature that is not
    64 bytes. The algorithm value itself is checked by :func:`verify_sign1`.
    """
    top = cbor.loads(
        data, max_size=max_size, max_depth=_MAX_DEPTH, allowed_tags=frozenset({COSE_SIGN1_TAG})
    )
    if not isinstance(top, cbor2.CBORTag) or top.tag != COSE_SIGN1_TAG:
        raise ProtocolError(Reason.MALFORMED, "not a tagged COSE_Sign1")
    body = top.value
    if not isinstance(body, (list, tuple)) or len(body) != 4:
        raise ProtocolError(Reason.MALFORMED, "COSE_Sign1 is not an array of four")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes):
        raise ProtocolError(Reason.MALFORMED, "protected header is not a byte string")
    if not isinstance(unprotected, Mapping):
        raise ProtocolError(Reason.MALFORMED, "unprotected header is not a map")
    if not isinstance(payload, bytes):
        raise ProtocolError(Reason.MALFORMED, "payload is not an attached byte string")
    if not isinstance(signature, bytes):
        raise ProtocolError(Reason.MALFORMED, "signature is not a byte string")
    alg = _parse_protected(protected)
    kid = _parse_unprotected(unprotected)
    if len(signature) != SIGNATURE_LEN:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"signature is {len(signature)} bytes, not 64")
    return Sign1(protected=protected, kid=kid, alg=alg, payload=payload, signature=signature)


def _parse_protected(protected: bytes) -> int:
    if not protected:  # RFC 9052: an empty bstr is an empty map, so no algorithm at all
        raise ProtocolError(Reason.BAD_ALGORITHM, "no algorithm in the protected header")
    header: Any = cbor.loads(protected, max_size=_MAX_HEADER_BYTES, max_depth=1)
    if not isinstance(header, Mapping):
        raise ProtocolError(Reason.MALFORMED, "protected header is not a map")
    extra = set(header) - {HEADER_ALG}
    if extra:
        raise ProtocolError(
            Reason.UNKNOWN_KEY, f"protected header parameters {sorted(map(repr, extra))}"
        )
    alg = header.get(HEADER_ALG)
    if type(alg) is not int:
        raise ProtocolError(Reason.BAD_ALGORITHM, "no integer algorithm in the protected header")
    return alg


def _parse_unprotected(unprotected: Mapping[Any, Any]) -> bytes:
    extra = set(unprotected) - {HEADER_KID}
    if extra:
        raise ProtocolError(
            Reason.UNKNOWN_KEY, f"unprotected header parameters {sorted(map(repr, extra))}"
        )
    kid = unprotected.get(HEADER_KID)
    if kid is None:
        raise ProtocolError(Reason.MALFORMED, "no kid in the unprotected header")
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= MAX_KID_LEN:
        raise ProtocolError(Reason.MALFORMED, f"kid is not a byte string of 1..{MAX_KID_LEN}")
    return kid


def verify_sign1(message: Sign1, public_key: ec.EllipticCurvePublicKey) -> None:
    """Check ``message`` was signed by ``public_key``.

    Raises ``ProtocolError(BAD_ALGORITHM)`` unless the algorithm is ES256 and the key P-256, and
    ``ProtocolError(BAD_SIGNATURE)`` when the signature does not verify. Returns ``None`` if good.
    """
    if message.alg != ALG_ES256:
        raise ProtocolError(Reason.BAD_ALGORITHM, f"COSE algorithm {message.alg}, not ES256 (-7)")
    _require_p256(public_key)
    if len(message.signature) != SIGNATURE_LEN:
        raise ProtocolError(Reason.BAD_SIGNATURE, "signature is not 64 bytes")
    r = int.from_bytes(message.signature[:_COORD_LEN], "big")
    s = int.from_bytes(message.signature[_COORD_LEN:], "big")
    if r == 0 or s == 0:
        raise ProtocolError(Reason.BAD_SIGNATURE, "signature component is zero")
    try:
        public_key.verify(
            encode_dss_signature(r, s), message.to_be_signed(), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise ProtocolError(Reason.BAD_SIGNATURE, "signature does not verify") from None
