"""COSE_Sign1 / ES256: encoding, strict parsing, verification, and pycose interoperability."""

from __future__ import annotations

import contextlib
import hashlib
from typing import cast

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys.ec2 import EC2Key
from pycose.messages.sign1message import Sign1Message

from protocol.errors import ProtocolError, Reason
from protocol.release.cose import ALG_ES256, Sign1, key_id, parse_sign1, sign1, verify_sign1
from protocol.release.manifest import DeviceType, Manifest

MAX = 4096


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _manifest_payload() -> bytes:
    image = bytes(range(256)) * 5
    return Manifest.for_image(
        image,
        vendor=0x121D,
        image_type=1,
        device_type=DeviceType.ESME,
        hw_min=0x1111,
        hw_max=0x1211,
        fw_version=0xACDCACDC,
        sequence=7,
        block_size=256,
        created=1_700_000_000,
        expires=1_800_000_000,
    ).encode()


def _raw(message: list[object], tag: int | None = 18) -> bytes:
    """Hand-built COSE structures (bypassing protocol.wire.cbor) for hostile inputs."""
    return bytes(cbor2.dumps(cbor2.CBORTag(tag, message) if tag is not None else message))


def _reason(data: bytes) -> Reason:
    with pytest.raises(ProtocolError) as info:
        parse_sign1(data, max_size=MAX)
    return info.value.reason


# --------------------------------------------------------------------------- key id and encoding


def test_key_id_is_sha256_prefix_of_spki(key: ec.EllipticCurvePrivateKey) -> None:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_id(key.public_key()) == hashlib.sha256(spki).digest()[:8]
    assert key_id(ec.generate_private_key(ec.SECP256R1()).public_key()) != key_id(key.public_key())


def test_sign1_wire_bytes_follow_the_profile(key: ec.EllipticCurvePrivateKey) -> None:
    payload = b"hello manifest"
    data = sign1(payload, key)
    kid = key_id(key.public_key())
    # d2 = tag 18, 84 = array(4), 43 a10126 = bstr{1:-7}, a1 04 48 kid, 4e payload, 58 40 sig
    expected_prefix = bytes.fromhex("d28443a10126a10448") + kid + b"\x4e" + payload + b"\x58\x40"
    assert data.startswith(expected_prefix)
    assert len(data) == len(expected_prefix) + 64


def test_signature_is_raw_r_s_over_the_sig_structure(key: ec.EllipticCurvePrivateKey) -> None:
    payload = b"\x01\x02\x03"
    message = parse_sign1(sign1(payload, key), max_size=MAX)
    # Sig_structure by hand: array(4), text(10) "Signature1", bstr(3) a10126, bstr(0), bstr(3)
    tbs = bytes.fromhex("846a") + b"Signature1" + bytes.fromhex("43a1012640") + b"\x43" + payload
    assert message.to_be_signed() == tbs
    r = int.from_bytes(message.signature[:32], "big")
    s = int.from_bytes(message.signature[32:], "big")
    key.public_key().verify(encode_dss_signature(r, s), tbs, ec.ECDSA(hashes.SHA256()))


def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    payload = _manifest_payload()
    message = parse_sign1(sign1(payload, key), max_size=MAX)
    assert message == Sign1(
        protected=bytes.fromhex("a10126"),
        kid=key_id(key.public_key()),
        alg=ALG_ES256,
        payload=payload,
        signature=message.signature,
    )
    verify_sign1(message, key.public_key())


def test_explicit_kid(key: ec.EllipticCurvePrivateKey) -> None:
    message = parse_sign1(sign1(b"x", key, kid=b"release-2025"), max_size=MAX)
    assert message.kid == b"release-2025"
    verify_sign1(message, key.public_key())


def test_deterministic_signing_gives_the_same_bytes_and_verifies(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    payload = _manifest_payload()
    first = sign1(payload, key, deterministic=True)
    assert sign1(payload, key, deterministic=True) == first  # RFC 6979: no random nonce
    assert sign1(payload + b"\x00", key, deterministic=True)[-64:] != first[-64:]
    verify_sign1(parse_sign1(first, max_size=MAX), key.public_key())
    # the default keeps drawing a random nonce: two signatures of one payload differ
    assert sign1(payload, key) != sign1(payload, key)


def test_sign1_refuses_other_curves() -> None:
    with pytest.raises(ValueError, match="P-256"):
        sign1(b"x", ec.generate_private_key(ec.SECP384R1()))


# --------------------------------------------------------------------------- verification


def test_wrong_key_is_bad_signature(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    message = parse_sign1(sign1(b"payload", key), max_size=MAX)
    with pytest.raises(ProtocolError) as info:
        verify_sign1(message, other_key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("field", ["payload", "signature", "protected"])
def test_any_changed_part_is_refused(key: ec.EllipticCurvePrivateKey, field: str) -> None:
    good = parse_sign1(sign1(b"payload", key), max_size=MAX)
    changed = {
        "payload": Sign1(good.protected, good.kid, good.alg, b"paylobd", good.signature),
        "signature": Sign1(
            good.protected, good.kid, good.alg, good.payload, good.signature[:-1] + b"\x00"
        ),
        # the same algorithm with a different (non-canonical) protected encoding is not the same
        # signed bytes: {1: -7} with alg as a 1-byte-argument negative int
        "protected": Sign1(
            bytes.fromhex("a1013806"), good.kid, good.alg, good.payload, good.signature
        ),
    }[field]
    with pytest.raises(ProtocolError) as info:
        verify_sign1(changed, key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_zero_signature_component_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    good = parse_sign1(sign1(b"p", key), max_size=MAX)
    zero_r = Sign1(
        good.protected, good.kid, good.alg, good.payload, bytes(32) + good.signature[32:]
    )
    with pytest.raises(ProtocolError) as info:
        verify_sign1(zero_r, key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_other_algorithm_is_bad_algorithm(key: ec.EllipticCurvePrivateKey) -> None:
    es384 = bytes(cbor2.dumps({1: -35}))
    data = _raw([es384, {4: b"k"}, b"p", bytes(64)])
    message = parse_sign1(data, max_size=MAX)
    assert message.alg == -35
    with pytest.raises(ProtocolError) as info:
        verify_sign1(message, key.public_key())
    assert info.value.reason is Reason.BAD_ALGORITHM


def test_p384_public_key_is_bad_algorithm(key: ec.EllipticCurvePrivateKey) -> None:
    message = parse_sign1(sign1(b"p", key), max_size=MAX)
    with pytest.raises(ProtocolError) as info:
        verify_sign1(message, ec.generate_private_key(ec.SECP384R1()).public_key())
    assert info.value.reason is Reason.BAD_ALGORITHM


# --------------------------------------------------------------------------- strict parsing

PROT = bytes.fromhex("a10126")
SIG = bytes(64)


_PARSE_CASES = [
    ("untagged", _raw([PROT, {4: b"k"}, b"p", SIG], tag=None), Reason.MALFORMED),
    ("COSE_Sign tag 98", _raw([PROT, {4: b"k"}, b"p", SIG], tag=98), Reason.MALFORMED),
    ("three elements", _raw([PROT, {4: b"k"}, b"p"]), Reason.MALFORMED),
    ("five elements", _raw([PROT, {4: b"k"}, b"p", SIG, b""]), Reason.MALFORMED),
    ("map in the tag", bytes(cbor2.dumps(cbor2.CBORTag(18, {1: 2}))), Reason.MALFORMED),
    ("protected not bstr", _raw([{1: -7}, {4: b"k"}, b"p", SIG]), Reason.MALFORMED),
    ("unprotected not map", _raw([PROT, [4, b"k"], b"p", SIG]), Reason.MALFORMED),
    ("detached payload", _raw([PROT, {4: b"k"}, None, SIG]), Reason.MALFORMED),
    ("text payload", _raw([PROT, {4: b"k"}, "p", SIG]), Reason.MALFORMED),
    ("text signature", _raw([PROT, {4: b"k"}, b"p", "sig"]), Reason.MALFORMED),
    ("no kid", _raw([PROT, {}, b"p", SIG]), Reason.MALFORMED),
    ("text kid", _raw([PROT, {4: "k"}, b"p", SIG]), Reason.MALFORMED),
    ("empty kid", _raw([PROT, {4: b""}, b"p", SIG]), Reason.MALFORMED),
    ("33-byte kid", _raw([PROT, {4: bytes(33)}, b"p", SIG]), Reason.MALFORMED),
    ("alg unprotected", _raw([PROT, {4: b"k", 1: -7}, b"p", SIG]), Reason.UNKNOWN_KEY),
    ("crit header", _raw([bytes.fromhex("a2012602a0"), {4: b"k"}, b"p", SIG]), Reason.UNKNOWN_KEY),
    ("empty protected", _raw([b"", {4: b"k"}, b"p", SIG]), Reason.BAD_ALGORITHM),
    ("no alg", _raw([bytes.fromhex("a10263616c67"), {4: b"k"}, b"p", SIG]), Reason.UNKNOWN_KEY),
    (
        "text alg",
        _raw([bytes.fromhex("a101654553323536"), {4: b"k"}, b"p", SIG]),
        Reason.BAD_ALGORITHM,
    ),
    ("protected array", _raw([bytes.fromhex("80"), {4: b"k"}, b"p", SIG]), Reason.MALFORMED),
    (
        "non-minimal alg",
        _raw([bytes.fromhex("a1013806"), {4: b"k"}, b"p", SIG]),
        Reason.NON_CANONICAL,
    ),
    (
        "protected trailing",
        _raw([bytes.fromhex("a10126ff"), {4: b"k"}, b"p", SIG]),
        Reason.MALFORMED,
    ),
    ("63-byte signature", _raw([PROT, {4: b"k"}, b"p", bytes(63)]), Reason.BAD_SIGNATURE),
    ("65-byte signature", _raw([PROT, {4: b"k"}, b"p", bytes(65)]), Reason.BAD_SIGNATURE),
    ("trailing byte", _raw([PROT, {4: b"k"}, b"p", SIG]) + b"\x00", Reason.MALFORMED),
    ("indefinite array", bytes.fromhex("d29f43a10126a1044101417040ff"), Reason.INDEFINITE_LENGTH),
    ("empty input", b"", Reason.MALFORMED),
    ("lone tag", b"\xd2", Reason.MALFORMED),
]


@pytest.mark.parametrize(("data", "reason"), [pytest.param(d, r, id=i) for i, d, r in _PARSE_CASES])
def test_parse_refuses(data: bytes, reason: Reason) -> None:
    assert _reason(data) is reason


def test_parse_caps_size(key: ec.EllipticCurvePrivateKey) -> None:
    data = sign1(bytes(1000), key)
    assert parse_sign1(data, max_size=len(data)).payload == bytes(1000)
    with pytest.raises(ProtocolError) as info:
        parse_sign1(data, max_size=len(data) - 1)
    assert info.value.reason is Reason.TOO_LARGE


def test_parse_refuses_non_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_sign1("d284", max_size=MAX)  # type: ignore[arg-type]
    assert info.value.reason is Reason.MALFORMED


# --------------------------------------------------------------------------- pycose interop


def _pycose_key(key: ec.EllipticCurvePrivateKey, *, private: bool) -> EC2Key:
    if private:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cast(EC2Key, EC2Key.from_pem_private_key(pem.decode()))
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cast(EC2Key, EC2Key.from_pem_public_key(pem.decode()))


def _pycose_decode(data: bytes) -> Sign1Message:
    # pycose 1.1's Sign1Message.decode checks isinstance(value, list); cbor2 6 decodes tag
    # contents as a tuple and maps as frozendict, so hand pycose the structure it expects.
    tagged = cbor2.loads(data)
    assert tagged.tag == 18
    protected, unprotected, payload, signature = tagged.value
    return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


def test_signed_here_verifies_with_pycose(key: ec.EllipticCurvePrivateKey) -> None:
    payload = _manifest_payload()
    message = _pycose_decode(sign1(payload, key))
    message.key = _pycose_key(key, private=False)
    assert message.phdr == {Algorithm: Es256}
    assert message.uhdr == {KID: key_id(key.public_key())}
    assert message.payload == payload
    assert message.verify_signature()


def test_tampered_here_fails_with_pycose(key: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(sign1(b"payload bytes", key))
    data[-1] ^= 1
    message = _pycose_decode(bytes(data))
    message.key = _pycose_key(key, private=False)
    assert not message.verify_signature()


def test_signed_by_pycose_verifies_here(key: ec.EllipticCurvePrivateKey) -> None:
    payload = _manifest_payload()
    kid = key_id(key.public_key())
    message = Sign1Message(
        phdr={Algorithm: Es256},
        uhdr={KID: kid},
        payload=payload,
        key=_pycose_key(key, private=True),
    )
    data = message.encode()
    parsed = parse_sign1(data, max_size=MAX)
    assert (parsed.kid, parsed.alg, parsed.payload) == (kid, ALG_ES256, payload)
    verify_sign1(parsed, key.public_key())
    assert Manifest.decode(parsed.payload).sequence == 7


def test_signed_by_pycose_with_other_key_fails_here(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    message = Sign1Message(
        phdr={Algorithm: Es256},
        uhdr={KID: key_id(key.public_key())},
        payload=b"forged",
        key=_pycose_key(other_key, private=True),
    )
    with pytest.raises(ProtocolError) as info:
        verify_sign1(parse_sign1(message.encode(), max_size=MAX), key.public_key())
    assert info.value.reason is Reason.BAD_SIGNATURE


# --------------------------------------------------------------------------- fuzz

_FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_parse_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_sign1(data, max_size=MAX)


_FUZZ_KEY = ec.generate_private_key(ec.SECP256R1())
_VALID = sign1(b"fuzz payload", _FUZZ_KEY)


@_FUZZ
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255), st.integers(0, len(_VALID) - 1))
def test_fuzz_mutations_never_verify(position: int, xor: int, cut: int) -> None:
    """Every changed or truncated message is refused with a ProtocolError, never accepted.

    The kid (bytes 9..16) is an unprotected hint the signature does not cover: a changed kid
    still verifies against the right key; the trust store refuses it (test_trust).
    """
    mutated = bytearray(_VALID)
    mutated[position] ^= xor
    cases = [_VALID[:cut], bytes(mutated[:cut])]
    if not 9 <= position < 17:
        cases.append(bytes(mutated))
    for data in cases:
        with pytest.raises(ProtocolError):
            verify_sign1(parse_sign1(data, max_size=MAX), _FUZZ_KEY.public_key())


def test_kid_is_not_signed() -> None:
    mutated = bytearray(_VALID)
    mutated[9] ^= 1
    message = parse_sign1(bytes(mutated), max_size=MAX)
    assert message.kid != key_id(_FUZZ_KEY.public_key())
    verify_sign1(message, _FUZZ_KEY.public_key())


@_FUZZ
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**64), 2**64)
        | st.binary(max_size=70)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(st.integers(-3, 5) | st.text(max_size=3), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_fuzz_parse_structured(value: object) -> None:
    with contextlib.suppress(ProtocolError):
        parse_sign1(bytes(cbor2.dumps(cbor2.CBORTag(18, value))), max_size=MAX)
