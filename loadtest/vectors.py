"""``python -m loadtest vectors [--out DIR]``: the test vectors of ``protocol/vectors/``.

Files a CH vendor checks an implementation against, in any language (SPEC §3, "Test vectors";
the folder's README.md, written by :func:`generate` too, explains each file). Everything is
deterministic: the same bytes on every run. The signing key is a fixed, publicly known TEST key,
signatures use RFC 6979 nonces (:func:`protocol.release.cose.sign1` with
``deterministic=True``), times are the constants below, and payload bytes come from seeded
PRNGs. A change to an encoding therefore changes these files, and
``tests/protocol/test_vectors.py`` fails until they are regenerated with
``python -m loadtest vectors``.

The valid message vectors come from the codec's field specs (:class:`protocol.wire.codec.FieldSpec`)
of every type in :data:`protocol.wire.messages.MESSAGE_TYPES`, so a type added there gets its
``min``, ``max`` and ``seeded`` vectors, and its per-field invalid ones, on regeneration with no
code here. The encoding-level invalid vectors, the manifest cases and the transcript are
written out by hand below.

The generator asserts that the decoder agrees with every vector it writes: a disagreement is a
defect of the spec, the codec or this file, reported here rather than written down.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Final

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from protocol.clock import Monotonic, UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release import cose, otaimg, zigbee_ota
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import Target, TrustStore, verify_manifest
from protocol.wan.receiver import DiscardImage, Receiver, ReceiverAction, Reply, StoreBlock
from protocol.wan.receiver import VerifyImage as VerifyImageAction
from protocol.wan.sender import SendBlock, SendCancel, Sender, SenderState, SendOffer, SendPoll
from protocol.wire import cbor, codec
from protocol.wire.codec import FieldSpec
from protocol.wire.devices import JoinMode
from protocol.wire.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    Block,
    Cancel,
    HanDevice,
    Limits,
    Message,
    Offer,
    Poll,
    TransferAcked,
    decode,
)

DEFAULT_OUT: Final = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
REGENERATE: Final = "python -m loadtest vectors"

#: Signing time of every manifest here (2026-01-01T00:00:00Z), its expiry (ten years on), and
#: the fixed update-start time ``now`` at which the valid ones verify (a day after signing).
CREATED: Final = 1_767_225_600
EXPIRES: Final = CREATED + 3_652 * 86_400
NOW: Final = CREATED + 86_400

#: Longest byte string written out in a vector: a 64 KiB block (whose length needs a 4-byte
#: CBOR head) fits, a 2 MiB manifest does not (its ``max`` vector carries this many bytes).
MAX_INLINE_BYTES: Final = 70_000

#: The seeds of the PRNGs: payload bytes and field values. Changing one changes every file.
SEED: Final = 8

_TEST_KEY_LABEL = b"otad protocol/vectors TEST KEY: publicly known, never trust it"
_OTHER_KEY_LABEL = b"otad protocol/vectors second TEST KEY: in no trust store"


# --------------------------------------------------------------------------- JSON forms


def json_value(value: Any) -> Any:
    """A wire value in the JSON form of the vectors: bytes as hex, maps and arrays recursively,
    text (enums included: they are text on the wire), integers, booleans and null as they are."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, Enum):
        return value.value
    return value


def fields_of(record: Any) -> dict[str, Any]:
    """The JSON form of a record's fields, in declaration order (nested records too), without
    its tag (``t``, ``v``)."""
    built = codec.schema(type(record))
    wire = built.to_wire(record)
    out: dict[str, Any] = {}
    for spec in built.fields:
        value = getattr(record, spec.name)
        if spec.kind == "record":
            out[spec.name] = fields_of(value)
        elif spec.kind == "array":
            out[spec.name] = [fields_of(item) for item in value]
        else:
            out[spec.name] = json_value(wire[spec.name])
    return out


def _dump(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- keys


def _derived_key(label: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose scalar is SHA-256 of ``label`` (reduced into range): fixed forever."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    scalar = int.from_bytes(hashlib.sha256(label).digest(), "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def test_key() -> ec.EllipticCurvePrivateKey:
    """The vectors' signing key. A TEST key: its private half is published in manifest.json."""
    return _derived_key(_TEST_KEY_LABEL)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _pem_public(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


# --------------------------------------------------------------------------- valid messages

VARIANTS: Final = ("min", "max", "seeded")
_TEXT_MAX_PATTERN = "AbÜ9"  # characters, not bytes: Ü takes two bytes in UTF-8
_TEXT_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789-éü "


def _uint(maximum: int, variant: str, rng: random.Random) -> int:
    if variant == "min":
        return 0
    if variant == "max":
        return maximum
    # a random width, so that every CBOR head size (immediate, 1, 2, 4, 8 bytes) turns up
    top = rng.choice([23, 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1])
    return rng.randint(0, min(top, maximum))


def _text(maximum: int, variant: str, rng: random.Random) -> str:
    if variant == "min":
        return ""
    if variant == "max":
        return (_TEXT_MAX_PATTERN * maximum)[:maximum]
    length = rng.randint(1, min(maximum, 24))
    ends = _TEXT_ALPHABET.strip()  # printable, and no leading or trailing space
    if length == 1:
        return rng.choice(ends)
    middle = "".join(rng.choice(_TEXT_ALPHABET) for _ in range(length - 2))
    return rng.choice(ends) + middle + rng.choice(ends)


def value_for(spec: FieldSpec, variant: str, rng: random.Random) -> Any:
    """A value of field ``spec`` for ``variant``: ``min`` (every bound at its lowest: 0, empty,
    null, false, the first enum member), ``max`` (at its highest) or ``seeded`` (drawn from
    ``rng`` within the bounds)."""
    if spec.optional and variant == "min":
        return None
    kind = spec.kind
    if kind == "uint":
        assert spec.maximum is not None
        return _uint(spec.maximum, variant, rng)
    if kind == "bool":
        return {"min": False, "max": True}[variant] if variant != "seeded" else rng.random() < 0.5
    if kind == "bytes":
        if spec.length is not None:
            length = spec.length
        else:
            assert spec.maximum is not None
            longest = min(spec.maximum, MAX_INLINE_BYTES)
            bounds = {"min": 0, "max": longest}
            length = bounds[variant] if variant in bounds else rng.randint(1, min(longest, 300))
        if variant == "min":
            return bytes(length)
        return rng.randbytes(length)
    if kind == "text":
        assert spec.maximum is not None
        return _text(spec.maximum, variant, rng)
    if kind == "eui64":
        if variant == "seeded":
            return f"{rng.getrandbits(64):016X}"
        return {"min": "0" * 16, "max": "F" * 16}[variant]
    if kind == "enum":
        assert spec.enum is not None
        members = list(spec.enum)
        ends = {"min": members[0], "max": members[-1]}
        return ends[variant] if variant in ends else rng.choice(members)
    if kind == "record":
        assert spec.record is not None
        return build_record(spec.record, variant, rng)
    if kind == "array":
        assert spec.record is not None
        assert spec.maximum is not None
        count = {"min": 0, "max": spec.maximum}.get(variant)
        if count is None:
            count = rng.randint(1, min(spec.maximum, 3))
        return tuple(build_record(spec.record, variant, rng) for _ in range(count))
    raise RuntimeError(f"{spec.name}: field kind {kind!r} has no vector rule in {__name__}")


@dataclass(frozen=True)
class Drawn:
    """One vector's values for a message type; ``record`` is ``None`` when the type's own
    consistency rules (its ``__post_init__``) refuse values its field bounds allow, and
    ``refusal`` then says why: such a draw becomes an invalid vector (``MALFORMED``)."""

    name: str
    values: dict[str, Any]
    record: Message | None
    refusal: str = ""


def draw(cls: type[Message]) -> list[Drawn]:
    """The vectors of message type ``cls``: one per :data:`VARIANTS`, then its :data:`EXAMPLES`
    (which must be valid). The same values on every call."""
    rng = random.Random(f"{SEED}:{cls.__name__}")
    out = []
    for variant in VARIANTS:
        name = f"{cls.__name__}.{variant}"
        values = {spec.name: value_for(spec, variant, rng) for spec in codec.schema(cls).fields}
        try:
            out.append(Drawn(name, values, cls(**values)))
        except ValueError as exc:
            out.append(Drawn(name, values, None, str(exc)))
    for label, example in EXAMPLES.get(cls.__name__, {}).items():
        values = example()
        out.append(Drawn(f"{cls.__name__}.{label}", values, cls(**values)))
    return out


def _valid_draws(cls: type[Message]) -> list[tuple[str, Message]]:
    valid = [(drawn.name, drawn.record) for drawn in draw(cls) if drawn.record is not None]
    if not valid:
        raise RuntimeError(
            f"{cls.__name__}: its own rules refuse every generated vector; "
            "give it an example in EXAMPLES"
        )
    return valid


def _wire_of(cls: type[Any], values: dict[str, Any]) -> dict[str, Any]:
    """The map a record of ``cls`` with ``values`` would encode to, built without constructing
    it (its own rules may refuse the values), its tag included."""
    built = codec.schema(cls)
    wire: dict[str, Any] = {}
    for spec in built.fields:
        value = values[spec.name]
        if spec.kind == "enum" and value is not None:
            value = value.value
        elif spec.kind == "record":
            value = codec.schema(type(value)).to_wire(value)
        elif spec.kind == "array":
            value = [codec.schema(type(item)).to_wire(item) for item in value]
        wire[spec.name] = value
    if built.tag is not None:
        wire[built.tag.key] = built.tag.value
    return wire


def _members_from(spec: FieldSpec, drawn: Any) -> list[Any]:
    """The members of ``spec``'s enum, starting at ``drawn`` and wrapping around."""
    assert spec.enum is not None
    members = list(spec.enum)
    start = members.index(drawn)
    return members[start:] + members[:start]


def build_record(cls: type[Any], variant: str, rng: random.Random) -> Any:
    """A record of ``cls`` with every field from :func:`value_for` (nested records)."""
    specs = codec.schema(cls).fields
    values = {spec.name: value_for(spec, variant, rng) for spec in specs}
    try:
        return cls(**values)
    except ValueError as exc:
        # a rule across enum fields (a B4 joins CAD or PPMID, never NATIVE): the nearest
        # combination that the record accepts, searched from the drawn one in a fixed order
        enums = [spec for spec in specs if spec.kind == "enum"]
        orders = [_members_from(spec, values[spec.name]) for spec in enums]
        for combination in itertools.product(*orders):
            values.update(zip((spec.name for spec in enums), combination, strict=True))
            try:
                return cls(**values)
            except ValueError:
                continue
        raise RuntimeError(
            f"{cls.__name__}.{variant}: the record's own rules refuse what its field bounds "
            f"allow ({exc}); give it an example in EXAMPLES and say why in SPEC"
        ) from None


def _hub_example() -> dict[str, Any]:
    return {
        "guid": "00DB1234567890AB",
        "fw_version": 0x0102_0304,
        "hw_version": 0x0002,
        "supplier": "Acme Ltd",
        "segment": "Süd-Netz",
        "limits": Limits(max_block=1024, window=8, buffer=65_536),
        "han": (
            HanDevice("00DB1234567890AC", DeviceType.ESME, JoinMode.NATIVE, 0x0001_0002, 0x0010),
            HanDevice("00DB1234567890AD", DeviceType.GSME, JoinMode.NATIVE, 0x0001_0000, 0x0011),
            HanDevice("00DB1234567890AE", DeviceType.B2, JoinMode.CAD, 0x0000_0007, 0x0001),
        ),
    }


#: Realistic vectors, by message class name, beside the generated ones (a type without an entry
#: has only those). Each maps a vector name to the constructor's arguments.
EXAMPLES: Final[dict[str, dict[str, Callable[[], dict[str, Any]]]]] = {
    "HubAnnounced": {"example": _hub_example},
    "TransferAcked": {
        # base 3 held below; bitmap 0b101: blocks 4 and 6 held, 5 missing
        "gap": lambda: {
            "image": hashlib.sha256(b"image").digest(),
            "base": 3,
            "bitmap": b"\x05",
            "credit": 8,
        },
    },
    "Cancel": {
        "operator": lambda: {
            "image": hashlib.sha256(b"image").digest(),
            "reason": int(Reason.CANCELLED),
        }
    },
}


def _nested_records() -> list[type[Any]]:
    """Every record nested in a message, in the order first met (Limits, HanDevice...)."""
    found: list[type[Any]] = []

    def visit(cls: type[Any]) -> None:
        for spec in codec.schema(cls).fields:
            if spec.record is not None and spec.record not in found:
                found.append(spec.record)
                visit(spec.record)

    for cls in _message_types():
        visit(cls)
    return found


def _message_types() -> list[type[Message]]:
    return [MESSAGE_TYPES[t] for t in sorted(MESSAGE_TYPES)]


def message_vectors() -> dict[str, Any]:
    """messages.json: valid vectors of every message type and nested record."""
    messages = []
    seeded: list[tuple[str, Message]] = []
    for cls in _message_types():
        records = _valid_draws(cls)
        seeded.append(_base_draw(cls))
        for name, message in records:
            data = message.encode()
            if len(data) > cls.MAX_BYTES:
                raise RuntimeError(f"{name}: {len(data)} bytes over its cap {cls.MAX_BYTES}")
            if decode(data) != message:
                raise RuntimeError(f"{name} does not decode to itself")
            messages.append(
                {
                    "name": name,
                    "type": cls.__name__,
                    "t": cls.TYPE,
                    "fields": fields_of(message),
                    "hex": data.hex(),
                }
            )
    records_out = []
    for record_cls in _nested_records():
        rng = random.Random(f"{SEED}:{record_cls.__name__}")
        for variant in VARIANTS:
            record = build_record(record_cls, variant, rng)
            data = codec.encode(record)
            raw = cbor.loads(data, max_size=MAX_MESSAGE_BYTES, max_depth=4)
            if codec.decode(record_cls, raw) != record:
                raise RuntimeError(f"{record_cls.__name__}.{variant} does not decode to itself")
            records_out.append(
                {
                    "name": f"{record_cls.__name__}.{variant}",
                    "record": record_cls.__name__,
                    "fields": fields_of(record),
                    "hex": data.hex(),
                }
            )
    # decoders take map keys in any order; encoders write the deterministic order (SPEC §3)
    reordered = []
    for name, message in seeded:
        wire = codec.schema(type(message)).to_wire(message)
        data = bytes(cbor2.dumps(dict(reversed(list(wire.items())))))
        if decode(data) != message:
            raise RuntimeError(f"{name} with its keys reversed decodes differently")
        reordered.append({"name": name, "hex": data.hex(), "canonical": message.encode().hex()})
    return {
        "description": "valid encodings: each decodes to its fields and re-encodes to its hex",
        "messages": messages,
        "records": records_out,
        "reordered": reordered,
    }


# --------------------------------------------------------------------------- invalid messages


@dataclass(frozen=True)
class Invalid:
    """One encoding every decoder must refuse, with the reason it is refused with."""

    name: str
    data: bytes
    reason: Reason
    why: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reason": self.reason.name,
            "code": int(self.reason),
            "why": self.why,
            "hex": self.data.hex(),
        }


def _poll(nonce_item: bytes, extra: bytes = b"", entries: int = 2) -> bytes:
    """A Poll map built byte by byte: ``{"t": 4, "nonce": <nonce_item>, <extra>}``."""
    return bytes([0xA0 + entries]) + b"\x61t\x04" + b"\x65nonce" + nonce_item + extra


def encoding_invalids() -> list[Invalid]:
    """The CBOR policy and the envelope of a message (SPEC §3 steps 1-3), written by hand."""
    good = Poll(nonce=5).encode()
    deep = bytes(cbor2.dumps({"t": 4, "nonce": [[[[0]]]]}))
    return [
        Invalid("empty", b"", Reason.MALFORMED, "no bytes at all"),
        Invalid("truncated", good[:-1], Reason.MALFORMED, "the map's last value is missing"),
        Invalid("trailing-byte", good + b"\x00", Reason.MALFORMED, "a second item after the map"),
        Invalid("not-a-map", bytes(cbor2.dumps([4, 5])), Reason.MALFORMED, "a message is a map"),
        Invalid(
            "non-minimal-uint",
            _poll(b"\x18\x05"),
            Reason.NON_CANONICAL,
            "5 in a one-byte head (18 05) instead of the immediate 05",
        ),
        Invalid(
            "non-minimal-map-length",
            b"\xb8\x02" + _poll(b"\x05")[1:],
            Reason.NON_CANONICAL,
            "map length 2 in a one-byte head (b8 02) instead of a2",
        ),
        Invalid(
            "non-minimal-text-length",
            b"\xa2\x78\x01t\x04" + _poll(b"\x05")[4:],
            Reason.NON_CANONICAL,
            'key "t" with its length in a one-byte head (78 01)',
        ),
        Invalid(
            "indefinite-map",
            b"\xbf" + _poll(b"\x05")[1:] + b"\xff",
            Reason.INDEFINITE_LENGTH,
            "an indefinite-length map (bf ... ff)",
        ),
        Invalid(
            "indefinite-bytes",
            b"\xa3\x61t\x03\x65image\x5f\x58\x20" + bytes(32) + b"\xff\x66reason\x01",
            Reason.INDEFINITE_LENGTH,
            "Cancel.image as an indefinite-length byte string (5f ... ff)",
        ),
        Invalid(
            "duplicate-key",
            _poll(b"\x05", b"\x65nonce\x06", entries=3),
            Reason.DUPLICATE_KEY,
            '"nonce" twice in one map',
        ),
        Invalid(
            "unknown-key",
            _poll(b"\x05", b"\x65extra\x00", entries=3),
            Reason.UNKNOWN_KEY,
            'a key Poll does not define ("extra")',
        ),
        Invalid(
            "integer-key",
            _poll(b"\x05", b"\x01\x00", entries=3),
            Reason.UNKNOWN_KEY,
            "an integer key is well-formed CBOR, but no message defines one",
        ),
        Invalid(
            "byte-string-key",
            _poll(b"\x05", b"\x41x\x00", entries=3),
            Reason.MALFORMED,
            "map keys are integers or text only",
        ),
        Invalid("missing-key", b"\xa1\x61t\x04", Reason.MALFORMED, 'Poll without its "nonce"'),
        Invalid("missing-type", b"\xa1\x65nonce\x05", Reason.MALFORMED, 'no "t" at all'),
        Invalid("text-type", b"\xa2\x61t\x614\x65nonce\x05", Reason.MALFORMED, '"t" is text'),
        Invalid(
            "unknown-type",
            b"\xa2\x61t\x18\x63\x65nonce\x05",
            Reason.UNKNOWN_TYPE,
            "t = 99 is no message type of this version",
        ),
        Invalid(
            "wrong-field-type",
            _poll(b"\x615"),
            Reason.MALFORMED,
            'Poll.nonce as the text "5"',
        ),
        Invalid("negative-int", _poll(b"\x20"), Reason.MALFORMED, "Poll.nonce = -1"),
        Invalid(
            "bignum",
            _poll(b"\xc2\x49\x01" + bytes(8)),
            Reason.MALFORMED,
            "Poll.nonce = 2^64 as a bignum (tag 2): no tags in messages",
        ),
        Invalid("float", _poll(b"\xf9\x3c\x00"), Reason.MALFORMED, "Poll.nonce = 1.0 (half float)"),
        Invalid("tag", _poll(b"\xc1\x05"), Reason.MALFORMED, "Poll.nonce wrapped in tag 1"),
        Invalid("undefined", _poll(b"\xf7"), Reason.MALFORMED, "the simple value undefined"),
        Invalid("simple-value", _poll(b"\xe0"), Reason.MALFORMED, "simple value 0"),
        Invalid("break", _poll(b"\xff"), Reason.MALFORMED, "a break outside indefinite items"),
        Invalid(
            "reserved-info",
            _poll(b"\x1c"),
            Reason.MALFORMED,
            "additional information 28 is reserved",
        ),
        Invalid(
            "string-past-end",
            _poll(b"\x59\xff\xff\x00"),
            Reason.MALFORMED,
            "a byte string declaring 65,535 bytes, with one left",
        ),
        Invalid("invalid-utf8", _poll(b"\x61\xff"), Reason.MALFORMED, "text that is not UTF-8"),
        Invalid(
            "too-deep",
            deep,
            Reason.TOO_DEEP,
            "five nested containers (map, four arrays): messages nest at most 4 deep",
        ),
        Invalid(
            "over-type-cap",
            bytes(cbor2.dumps({"t": 4, "nonce": 5, "pad": bytes(4100)})),
            Reason.TOO_LARGE,
            "a Poll of 4,118 bytes: over Poll's 4,096-byte cap, refused before its keys are read",
        ),
    ]


def _mutations(spec: FieldSpec) -> Iterator[tuple[str, Any, Reason, str]]:
    """Wrong wire values for one field, each with its reason (SPEC §3's table, codec rules)."""
    name = spec.name
    if spec.kind == "uint":
        assert spec.maximum is not None
        over = spec.maximum + 1
        why = f"{name} = {over:,}, one over its maximum {spec.maximum:,}"
        if over >= 1 << 64:
            why += " (a bignum, tag 2: no tags)"
        yield "over-maximum", over, Reason.MALFORMED, why
        yield "negative", -1, Reason.MALFORMED, f"{name} = -1: integers are unsigned"
        yield "text", "1", Reason.MALFORMED, f"{name} as text"
    elif spec.kind == "bool":
        yield "integer", 1, Reason.MALFORMED, f"{name} as the integer 1, not true"
    elif spec.kind == "bytes":
        yield "text", "00", Reason.MALFORMED, f"{name} as text, not a byte string"
        if spec.length is not None:
            short = spec.length - 1
            yield (
                "short",
                bytes(short),
                Reason.MALFORMED,
                f"{name} of {short} bytes, not {short + 1}",
            )
        elif spec.maximum is not None and spec.maximum + 1 <= MAX_INLINE_BYTES:
            over = spec.maximum + 1
            why = f"{name} of {over:,} bytes, over its {spec.maximum:,}"
            yield "too-long", bytes(over), Reason.TOO_LARGE, why
    elif spec.kind == "text":
        assert spec.maximum is not None
        over = spec.maximum + 1
        yield "too-long", "a" * over, Reason.MALFORMED, f"{name} of {over} characters"
        yield "bytes", b"a", Reason.MALFORMED, f"{name} as a byte string, not text"
    elif spec.kind == "eui64":
        why = f"{name} must be 16 upper-case hex digits"
        yield "lower-case", "00db1234567890ab", Reason.BAD_IDENTIFIER, f"{why}: lower-case"
        yield "15-digits", "00DB1234567890A", Reason.BAD_IDENTIFIER, f"{why}: 15 digits"
        yield "17-digits", "00DB1234567890ABC", Reason.BAD_IDENTIFIER, f"{why}: 17 digits"
        yield "not-hex", "00DB1234567890AG", Reason.BAD_IDENTIFIER, f"{why}: G"
    elif spec.kind == "enum":
        assert spec.enum is not None
        if issubclass(spec.enum, IntEnum):
            unknown: Any = max(member.value for member in spec.enum) + 1
        else:
            unknown = "XX"
            first = next(iter(spec.enum)).value
            lower = first.lower()
            if lower != first:
                why = f"{name} {lower!r}: {spec.enum.__name__} values are case-sensitive"
                yield "lower-case", lower, Reason.MALFORMED, why
        why = f"{name} {unknown!r} is no {spec.enum.__name__}"
        yield "unknown", unknown, Reason.MALFORMED, why
    elif spec.kind == "record":
        yield "not-a-map", 0, Reason.MALFORMED, f"{name} as an integer, not a map"
    elif spec.kind == "array":
        yield "not-an-array", 0, Reason.MALFORMED, f"{name} as an integer, not an array"


def _field_invalids(
    cls: type[Any], wire: dict[str, Any], prefix: str, rebuild: Callable[[dict[str, Any]], Any]
) -> Iterator[tuple[str, Any, Reason, str]]:
    """Every mutation of every field of ``wire`` (a record's map), nested records included;
    ``rebuild`` puts a mutated map of this record back into the whole message."""
    built = codec.schema(cls)
    for spec in built.fields:
        where = f"{prefix}{spec.name}"
        for label, bad, reason, why in _mutations(spec):
            yield f"{where}.{label}", rebuild({**wire, spec.name: bad}), reason, why
        if spec.kind == "record":
            assert spec.record is not None
            inner = wire[spec.name]

            def put(mutated: dict[str, Any], name: str = spec.name) -> Any:
                return rebuild({**wire, name: mutated})

            yield from _record_shape_invalids(spec.record, inner, where, put)
            yield from _field_invalids(spec.record, inner, f"{where}.", put)
        elif spec.kind == "array" and wire[spec.name]:
            assert spec.record is not None
            assert spec.maximum is not None
            items = list(wire[spec.name])
            over = [items[0]] * (spec.maximum + 1)
            why = f"{spec.maximum + 1} items in {spec.name}, at most {spec.maximum}"
            yield f"{where}.too-many", rebuild({**wire, spec.name: over}), Reason.MALFORMED, why

            def put_item(
                mutated: dict[str, Any], name: str = spec.name, rest: list[Any] = items[1:]
            ) -> Any:
                return rebuild({**wire, name: [mutated, *rest]})

            yield from _record_shape_invalids(spec.record, items[0], f"{where}[0]", put_item)
            yield from _field_invalids(spec.record, items[0], f"{where}[0].", put_item)


def _record_shape_invalids(
    cls: type[Any], wire: dict[str, Any], where: str, rebuild: Callable[[dict[str, Any]], Any]
) -> Iterator[tuple[str, Any, Reason, str]]:
    first = codec.schema(cls).fields[0].name
    missing = {key: value for key, value in wire.items() if key != first}
    yield f"{where}.missing-key", rebuild(missing), Reason.MALFORMED, f"{where} without {first}"
    extra = {**wire, "extra": 0}
    yield f"{where}.unknown-key", rebuild(extra), Reason.UNKNOWN_KEY, f"{where} with a key extra"


def _base_draw(cls: type[Message]) -> tuple[str, Message]:
    """The vector the per-field invalid ones mutate: ``seeded``, or the first valid one."""
    valid = _valid_draws(cls)
    return next((drawn for drawn in valid if drawn[0].endswith(".seeded")), valid[0])


def rule_invalids() -> list[Invalid]:
    """Generated vectors whose fields are in range but which a type's own rules refuse."""
    out = []
    for cls in _message_types():
        for drawn in draw(cls):
            if drawn.record is None:
                data = cbor.dumps(_wire_of(cls, drawn.values))
                reason = Reason.TOO_LARGE if len(data) > cls.MAX_BYTES else Reason.MALFORMED
                why = f"every field in range, but {cls.__name__} refuses it: {drawn.refusal}"
                out.append(Invalid(f"{drawn.name}.refused", data, reason, why))
    return out


def field_invalids() -> list[Invalid]:
    """Per message type, every field made wrong in each way its spec allows, in the type's
    ``seeded`` vector (generated from the field specs: new types get these too)."""
    out: list[Invalid] = []
    for cls in _message_types():
        wire = codec.schema(cls).to_wire(_base_draw(cls)[1])
        cases = list(_record_shape_invalids(cls, wire, cls.__name__, lambda m: m))
        cases += _field_invalids(cls, wire, f"{cls.__name__}.", lambda m: m)
        for name, mutated, reason, why in cases:
            data = cbor.dumps(mutated)
            if len(data) > cls.MAX_BYTES:  # the type's cap is checked first (SPEC §3 step 1)
                reason = Reason.TOO_LARGE
                why += f"; {len(data):,} bytes is over {cls.__name__}'s cap of {cls.MAX_BYTES:,}"
            out.append(Invalid(name, data, reason, why))
    return out


def invalid_vectors() -> dict[str, Any]:
    """invalid.json: encodings the decoder must refuse, each with its reason."""
    encoding = encoding_invalids()
    fields = field_invalids()
    rules = rule_invalids()
    for case in (*encoding, *fields, *rules):
        try:
            decode(case.data)
        except ProtocolError as exc:
            if exc.reason is not case.reason:
                raise RuntimeError(
                    f"invalid vector {case.name}: decode says {exc.reason.name}, "
                    f"the vector {case.reason.name} ({exc.detail})"
                ) from None
        else:
            raise RuntimeError(f"invalid vector {case.name} decodes")
    return {
        "description": (
            "encodings protocol.wire.messages.decode refuses, each with its Reason (SPEC §3-4); "
            "decoder-level checks only: state-level ones are listed in README.md"
        ),
        "encoding": [case.as_json() for case in encoding],
        "fields": [case.as_json() for case in fields],
        "rules": [case.as_json() for case in rules],
    }


# --------------------------------------------------------------------------- release

IMAGE_BLOCK_SIZE: Final = 512
IMAGE_FIRMWARE_BYTES: Final = 3_500
VENDOR: Final = 0x1234
IMAGE_TYPE: Final = 0x0001
FW_VERSION: Final = 0x0102_0304
SEQUENCE: Final = 10
HW_MIN, HW_MAX = 0x0001, 0x0009
#: The CH the image is for, as it checks the manifest (SPEC §6.4 target checks).
TARGET: Final = Target(DeviceType.CH, hw_version=0x0002, installed_sequence=SEQUENCE - 1)


def signed_image() -> otaimg.SignedImage:
    """image.otaimg: a few KiB of seeded firmware in a ZigBee OTA file, signed."""
    firmware = random.Random(f"{SEED}:firmware").randbytes(IMAGE_FIRMWARE_BYTES)
    ota = zigbee_ota.wrap(
        firmware,
        manufacturer_code=VENDOR,
        image_type=IMAGE_TYPE,
        file_version=FW_VERSION,
        hw_min=HW_MIN,
        hw_max=HW_MAX,
        header_string="otad test vector image",
    )
    return otaimg.build(
        ota,
        test_key(),
        device_type=DeviceType.CH,
        sequence=SEQUENCE,
        block_size=IMAGE_BLOCK_SIZE,
        created=CREATED,
        expires=EXPIRES,
        deterministic=True,
    )


def _trust(revoked: tuple[bytes, ...] = ()) -> TrustStore:
    return TrustStore([test_key().public_key()], revoked)


def _target_json(target: Target | None) -> dict[str, Any] | None:
    if target is None:
        return None
    return {
        "device_type": target.device_type.value,
        "hw_version": target.hw_version,
        "installed_sequence": target.installed_sequence,
        "vendor": target.vendor,
    }


def _sign_with_header(payload: bytes, protected: bytes) -> bytes:
    """A COSE_Sign1 of ``payload`` under another protected header than the profile's (which
    :func:`protocol.release.cose.sign1` will not write), validly signed by the test key."""
    key = test_key()
    tbs = cbor.dumps(["Signature1", protected, b"", payload])
    der = key.sign(tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    kid = cose.key_id(key.public_key())
    return cbor.dumps(cbor2.CBORTag(18, [protected, {4: kid}, payload, signature]))


def manifest_vectors(image: otaimg.SignedImage) -> dict[str, Any]:
    """manifest.json: the test key, the signed manifest, and signed manifests verify refuses."""
    key = test_key()
    kid = cose.key_id(key.public_key())
    signed = image.signed_manifest
    manifest = verify_manifest(signed, _trust(), now=UnixTime(NOW), target=TARGET)
    payload = manifest.encode()
    wire = codec.schema(Manifest).to_wire(manifest)
    flipped = bytearray(signed)
    flipped[-1] ^= 0x01
    other = _derived_key(_OTHER_KEY_LABEL)
    newer = replace(TARGET, installed_sequence=SEQUENCE + 1)
    hostile = b"\xff\xff\xff"  # not CBOR at all, under a signature that does not verify
    bad_sig_hostile = bytearray(cose.sign1(hostile, key, deterministic=True))
    bad_sig_hostile[-1] ^= 0x01
    v3 = cbor.dumps({**wire, "v": 3})  # v 2 exists (SPEC §6.2): the next one does not
    swapped_hw = cbor.dumps({**wire, "hw_min": HW_MAX, "hw_max": HW_MIN})
    cases: list[dict[str, Any]] = []

    def case(
        name: str,
        data: bytes | bytearray,
        reason: Reason,
        why: str,
        *,
        now: int = NOW,
        target: Target | None = TARGET,
        revoked: tuple[bytes, ...] = (),
    ) -> None:
        try:
            verify_manifest(bytes(data), _trust(revoked), now=UnixTime(now), target=target)
        except ProtocolError as exc:
            if exc.reason is not reason:
                raise RuntimeError(
                    f"manifest case {name}: {exc.reason.name}, not {reason.name}"
                ) from None
        else:
            raise RuntimeError(f"manifest case {name} verifies")
        cases.append(
            {
                "name": name,
                "reason": reason.name,
                "code": int(reason),
                "why": why,
                "now": now,
                "target": _target_json(target),
                "revoked_kids": [kid.hex() for kid in revoked],
                "signed_hex": bytes(data).hex(),
            }
        )

    case(
        "bad-signature", flipped, Reason.BAD_SIGNATURE, "the signature's last bit flipped (§6.4 #6)"
    )
    case(
        "unknown-kid",
        cose.sign1(payload, other, deterministic=True),
        Reason.UNKNOWN_KEY_ID,
        "signed by a second test key, whose kid the trust store does not hold (#4)",
    )
    case(
        "revoked-kid",
        signed,
        Reason.REVOKED_KEY,
        "the test key's kid is on the revocation list: revocation wins (#3)",
        revoked=(kid,),
    )
    case(
        "expired",
        signed,
        Reason.EXPIRED,
        "now = expires: refused at or after the expiry instant (#8)",
        now=EXPIRES,
    )
    case(
        "expired-before-target",
        signed,
        Reason.EXPIRED,
        "expired AND for another device type: expiry (#8) is checked before the target (#10)",
        now=EXPIRES,
        target=replace(TARGET, device_type=DeviceType.ESME),
    )
    case(
        "wrong-device-type",
        signed,
        Reason.WRONG_DEVICE_TYPE,
        "a CH image offered to an ESME (#10)",
        target=replace(TARGET, device_type=DeviceType.ESME),
    )
    case(
        "wrong-vendor",
        signed,
        Reason.WRONG_VENDOR,
        "the verifier's vendor is 0x4321 (#9)",
        target=replace(TARGET, vendor=0x4321),
    )
    case(
        "hardware-out-of-range",
        signed,
        Reason.HARDWARE_OUT_OF_RANGE,
        f"hardware 0x0010 outside 0x{HW_MIN:04x}..0x{HW_MAX:04x} (#11)",
        target=replace(TARGET, hw_version=0x0010),
    )
    case(
        "rollback",
        signed,
        Reason.ROLLBACK,
        f"sequence {SEQUENCE} < installed {SEQUENCE + 1} (#12)",
        target=newer,
    )
    case(
        "replayed",
        signed,
        Reason.REPLAYED,
        f"sequence {SEQUENCE} = installed {SEQUENCE} (#13)",
        target=replace(TARGET, installed_sequence=SEQUENCE),
    )
    case(
        "bad-signature-over-garbage",
        bad_sig_hostile,
        Reason.BAD_SIGNATURE,
        "a payload that is not CBOR under a bad signature: verify before decode (§6.1)",
    )
    case(
        "bad-algorithm",
        _sign_with_header(payload, cbor.dumps({1: -35})),
        Reason.BAD_ALGORITHM,
        "protected header {1: -35} (ES384), validly signed with the P-256 key (#5)",
    )
    case(
        "unsupported-manifest-version",
        cose.sign1(v3, key, deterministic=True),
        Reason.UNSUPPORTED_VERSION,
        "a validly signed manifest with v = 3 (#7)",
    )
    case(
        "inconsistent-manifest",
        cose.sign1(swapped_hw, key, deterministic=True),
        Reason.MALFORMED,
        "a validly signed manifest with hw_min > hw_max (#7, §6.2 consistency)",
    )
    return {
        "description": "the TEST signing key, a signed manifest, and ones verify_manifest refuses",
        "test_key": {
            "warning": "TEST KEY: its private half is published here; never trust it",
            "private_pem": _pem_private(key),
            "public_pem": _pem_public(key),
            "kid": kid.hex(),
        },
        "valid": {
            "now": NOW,
            "target": _target_json(TARGET),
            "signed_hex": signed.hex(),
            "payload_hex": payload.hex(),
            "fields": fields_of(manifest),
        },
        "invalid": cases,
    }


def image_vectors(image: otaimg.SignedImage) -> dict[str, Any]:
    """image.json: what image.otaimg holds."""
    manifest, ota = otaimg.verify(image, _trust(), now=UnixTime(NOW), target=TARGET)
    header = ota.header
    data = image.image
    size = manifest.block_size
    return {
        "description": "image.otaimg (SPEC §6.6): the signed manifest and the ZigBee OTA file",
        "file": "image.otaimg",
        "file_sha256": hashlib.sha256(image.encode()).hexdigest(),
        "now": NOW,
        "target": _target_json(TARGET),
        "signed_manifest_length": len(image.signed_manifest),
        "image_sha256": manifest.sha256.hex(),
        "image_size": manifest.size,
        "block_size": size,
        "block_count": manifest.block_count,
        "blocks": [
            {
                "index": index,
                "offset": index * size,
                "length": manifest.block_length(index),
                "sha256": manifest.block_hash(index).hex(),
            }
            for index in range(manifest.block_count)
        ],
        "ota_header": {
            "manufacturer_code": header.manufacturer_code,
            "image_type": header.image_type,
            "file_version": header.file_version,
            "stack_version": header.stack_version,
            "header_string": header.header_string.hex(),
            "total_image_size": header.total_image_size,
            "field_control": header.field_control,
            "header_length": header.header_length,
            "hw_min": header.hw_min,
            "hw_max": header.hw_max,
        },
        "upgrade_image_sha256": hashlib.sha256(ota.upgrade_image or b"").hexdigest(),
        "ota_file_prefix_hex": data[: header.header_length].hex(),
    }


# --------------------------------------------------------------------------- the transcript

LATENCY: Final = 0.05  # one way, both directions, seconds
DUPLICATE_AFTER: Final = 0.02  # a redelivered copy arrives this long after the first
REORDER_HOLD: Final = 0.03  # a held-back message arrives this long late
CH_LIMITS: Final = Limits(max_block=IMAGE_BLOCK_SIZE, window=4, buffer=4 * IMAGE_BLOCK_SIZE)
ACK_DELAY: Final = 0.05
ACK_EVERY: Final = 2


@dataclass(frozen=True)
class Impairment:
    """What the scripted link does to one message: matched by direction, type, block index
    (blocks only) and which copy of that match it is (1: the first one sent)."""

    direction: str
    type: type[Message]
    fate: str  # "dropped", "duplicated" or "held back"
    why: str
    index: int | None = None
    occurrence: int = 1


#: The link's script: everything else is delivered once, ``LATENCY`` after it was sent.
IMPAIRMENTS: Final = (
    Impairment("down", Block, "dropped", "lost: the sender must find and repair the hole", 1),
    Impairment("down", Block, "duplicated", "redelivered: the CH acknowledges, stores once", 3),
    Impairment("down", Block, "held back", "reordered: block 5 overtakes it", 4),
    Impairment("up", TransferAcked, "dropped", "a lost SACK: later ones cover it", occurrence=2),
)


class _ScriptedLink:
    """Both directions on virtual time; FIFO except where the script says otherwise."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._queue: list[tuple[float, int, int, str, bytes]] = []
        self._seen: dict[tuple[str, str, int | None], int] = {}

    def send(self, direction: str, message: Message, now: float) -> None:
        data = message.encode()
        index = message.index if isinstance(message, Block) else None
        key = (direction, type(message).__name__, index)
        self._seen[key] = occurrence = self._seen.get(key, 0) + 1
        fate, why = "delivered", ""
        for rule in IMPAIRMENTS:
            if (
                rule.direction,
                rule.type.__name__,
                rule.index,
            ) == key and rule.occurrence == occurrence:
                fate, why = rule.fate, rule.why
        arrivals = {
            "delivered": [now + LATENCY],
            "dropped": [],
            "duplicated": [now + LATENCY, now + LATENCY + DUPLICATE_AFTER],
            "held back": [now + LATENCY + REORDER_HOLD],
        }[fate]
        n = len(self.entries)
        entry = {
            "n": n,
            "direction": direction,
            "type": type(message).__name__,
            "sent_at": now,
            "fate": fate,
            "arrives_at": arrivals,
        }
        if why:
            entry["why"] = why
        entry["fields"] = fields_of(message)
        entry["hex"] = data.hex()
        self.entries.append(entry)
        for copy, at in enumerate(arrivals):
            heapq.heappush(self._queue, (at, n, copy, direction, data))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop(self) -> tuple[float, str, bytes]:
        at, _n, _copy, direction, data = heapq.heappop(self._queue)
        return at, direction, data


class ReferenceHub:
    """The CH's side of the transcript: a :class:`Receiver` and an in-memory block store, as a CH
    shell drives one (SPEC §7): store verified blocks, re-hash the stored image when asked."""

    def __init__(self) -> None:
        def verify(data: bytes, at: UnixTime) -> Manifest:
            return verify_manifest(data, _trust(), now=at, target=TARGET)

        self.receiver = Receiver(CH_LIMITS, verify, ack_every=ACK_EVERY, ack_delay=ACK_DELAY)
        self.blocks: dict[int, bytes] = {}

    def apply(self, actions: list[ReceiverAction], now: Monotonic) -> list[Message]:
        """Carry out ``actions``; return the messages to publish up, in order."""
        out: list[Message] = []
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, StoreBlock):
                self.blocks[action.index] = action.data
            elif isinstance(action, VerifyImageAction):
                stored = b"".join(self.blocks[i] for i in sorted(self.blocks))[: action.size]
                digest = hashlib.sha256(stored).digest()
                queue.extend(self.receiver.image_hashed(action.image, digest, now))
            elif isinstance(action, DiscardImage):
                self.blocks.clear()
            else:
                assert isinstance(action, Reply)
                out.append(action.message)
        return out


def transcript_vectors(image: otaimg.SignedImage) -> dict[str, Any]:
    """transcript.json: a whole WAN transfer of image.otaimg over the scripted lossy link."""
    manifest = verify_manifest(image.signed_manifest, _trust(), now=UnixTime(NOW))
    link = _ScriptedLink()
    hub = ReferenceHub()
    sender = Sender(manifest, CH_LIMITS, now=Monotonic(0.0), max_ack_delay=ACK_DELAY)
    size = manifest.block_size
    nonces = itertools.count(1)
    now = Monotonic(0.0)
    outcome: list[str] = []

    def pump() -> None:
        for action in sender.next_actions(now, 1_000):
            message: Message
            if isinstance(action, SendOffer):
                message = Offer(image=action.image, manifest=image.signed_manifest)
            elif isinstance(action, SendPoll):
                message = Poll(nonce=next(nonces))
            elif isinstance(action, SendCancel):
                message = Cancel(image=action.image, reason=int(action.reason))
            else:
                assert isinstance(action, SendBlock)
                data = image.image[action.index * size : (action.index + 1) * size]
                message = Block(
                    image=action.image, index=action.index, data=data, ack_now=action.ack_now
                )
            link.send("down", message, now)
        outcome.extend(type(event).__name__ for event in sender.events())

    pump()
    while True:
        link_at, hub_at, sender_at = link.next_time(), hub.receiver.next_deadline(), None
        if sender.state not in (SenderState.COMPLETE, SenderState.FAILED):
            sender_at = sender.next_deadline()
        times = [t for t in (link_at, hub_at, sender_at) if t is not None]
        if not times:
            break
        now = Monotonic(max(now, min(times)))
        if link_at is not None and link_at <= now:  # ties: the link first, then the CH's timer
            _, direction, data = link.pop()
            message = decode(data)
            if direction == "down":
                if isinstance(message, Offer):  # the CH's wall clock is the vectors' fixed NOW
                    actions = hub.receiver.offer_received(message, UnixTime(NOW), now)
                else:
                    actions = hub.receiver.message_received(message, now)
                for reply in hub.apply(actions, now):
                    link.send("up", reply, now)
            elif sender.state not in (SenderState.COMPLETE, SenderState.FAILED):
                sender.message_received(message, now)
        elif hub_at is not None and hub_at <= now:
            for reply in hub.apply(hub.receiver.handle_timer(now), now):
                link.send("up", reply, now)
        else:
            sender.handle_timer(now)
        pump()
        if now > 600:
            raise RuntimeError("the transcript's transfer did not finish in 600 s")
    if sender.state is not SenderState.COMPLETE:
        raise RuntimeError(f"the transcript's transfer ended {sender.state.name}")
    stored = b"".join(hub.blocks[i] for i in sorted(hub.blocks))
    if stored != image.image:
        raise RuntimeError("the CH's stored image differs from the one sent")
    return {
        "description": (
            "a whole WAN transfer of image.otaimg between protocol.wan.sender.Sender (otad, "
            "down) and protocol.wan.receiver.Receiver (the CH, up) on virtual time"
        ),
        "image": manifest.sha256.hex(),
        "ch": {
            "limits": fields_of(CH_LIMITS),
            "ack_every": ACK_EVERY,
            "ack_delay": ACK_DELAY,
            "now": NOW,
            "target": _target_json(TARGET),
        },
        "link": {
            "latency": LATENCY,
            "duplicate_after": DUPLICATE_AFTER,
            "reorder_hold": REORDER_HOLD,
            "impairments": [
                {
                    "direction": rule.direction,
                    "type": rule.type.__name__,
                    "index": rule.index,
                    "occurrence": rule.occurrence,
                    "fate": rule.fate,
                    "why": rule.why,
                }
                for rule in IMPAIRMENTS
            ],
        },
        "outcome": {
            "sender_state": sender.state.name,
            "sender_events": outcome,
            "blocks_sent": sender.blocks_sent,
            "retransmissions": sender.retransmissions,
        },
        "messages": link.entries,
    }


# --------------------------------------------------------------------------- the folder


def generate(out: Path) -> list[Path]:
    """Write every vector file into ``out`` (created if needed); return their paths."""
    image = signed_image()
    contents: dict[str, bytes] = {
        "messages.json": _dump(message_vectors()),
        "invalid.json": _dump(invalid_vectors()),
        "manifest.json": _dump(manifest_vectors(image)),
        "image.otaimg": image.encode(),
        "image.json": _dump(image_vectors(image)),
        "transcript.json": _dump(transcript_vectors(image)),
    }
    contents["README.md"] = readme(contents).encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in contents.items():
        path = out / name
        path.write_bytes(data)
        written.append(path)
    return written


#: Every file :func:`generate` writes (the test checks the folder holds exactly these).
FILES: Final = (
    "README.md",
    "messages.json",
    "invalid.json",
    "manifest.json",
    "image.otaimg",
    "image.json",
    "transcript.json",
)


def readme(contents: dict[str, bytes]) -> str:
    """README.md of the folder, with the counts of what the other files hold."""
    messages = json.loads(contents["messages.json"])
    invalid = json.loads(contents["invalid.json"])
    manifest = json.loads(contents["manifest.json"])
    transcript = json.loads(contents["transcript.json"])
    types = ", ".join(f"`{cls.__name__}` (t={cls.TYPE})" for cls in _message_types())
    kid = manifest["test_key"]["kid"]
    return _README.format(
        regenerate=REGENERATE,
        n_messages=len(messages["messages"]),
        n_records=len(messages["records"]),
        n_reordered=len(messages["reordered"]),
        types=types,
        n_encoding=len(invalid["encoding"]),
        n_fields=len(invalid["fields"]),
        n_rules=len(invalid["rules"]),
        n_manifest=len(manifest["invalid"]),
        kid=kid,
        now=NOW,
        created=CREATED,
        expires=EXPIRES,
        max_inline=MAX_INLINE_BYTES,
        n_transcript=len(transcript["messages"]),
        block_size=IMAGE_BLOCK_SIZE,
        blocks=json.loads(contents["image.json"])["block_count"],
        latency=LATENCY,
        ack_every=ACK_EVERY,
        ack_delay=ACK_DELAY,
    )


_README = """\
# Test vectors of the otad wire protocol

Files a Communications Hub vendor checks an implementation against, in any language. They are
generated (never edit them by hand) by `{regenerate}` from `loadtest/vectors.py`, and
`tests/protocol/test_vectors.py` checks both that regenerating gives these exact bytes and that
otad's own code agrees with every vector. SPEC.md is the normative text; these files are
examples of it, and where they disagree SPEC.md is right and this folder has a bug.

Conventions in every JSON file: byte strings are lower-case hex; enumerations (`DeviceType`,
`JoinMode`) are their text, as on the wire; nested records are JSON objects; `fields` never
includes the tag (`t` of a message, `v` of a manifest), which is given beside them; times are
unix seconds (manifests) or seconds of virtual time (the transcript); reasons are given as the
`Reason` name and its code (SPEC §4).

**The signing key in `manifest.json` is a TEST KEY** (kid `{kid}`). Its private half is
published here so that anyone can make new test manifests: never put it in a production trust
store. Signatures are deterministic (RFC 6979), so the vectors are the same bytes on every run;
an implementation's own ECDSA signatures need not be (both verify the same way).

## messages.json: valid encodings

`messages`: {n_messages} vectors covering every message type: {types}. Each is
`{{name, type, t, fields, hex}}`: decoding `hex` must give `fields` (and type code `t`), and
encoding `fields` must give exactly `hex` (SPEC §3: RFC 8949 core deterministic encoding).
Per type, generated from the field bounds of SPEC §3's table:

* `<Type>.min`: every field at its lowest (0, empty byte string or text, `false`, the first
  enumeration value, no HAN devices, fixed-length byte strings all zero);
* `<Type>.max`: every field at its highest (maximum integers, the longest texts, counted in
  characters: the pattern `AbÜ9` makes them longer in bytes, 16 HAN devices, the longest
  bitmap, a 65,536-byte block). A byte string whose cap is over {max_inline:,} bytes
  (`Offer.manifest`) carries {max_inline:,} bytes instead: build the 2 MiB case yourself;
* `<Type>.seeded`: values drawn by a seeded PRNG within the bounds, integers of every head size;
* a few hand-picked examples (`HubAnnounced.example` with supplier "Acme Ltd", segment
  "Süd-Netz" and three HAN devices; `TransferAcked.gap`; `Cancel.operator`).

`records`: {n_records} vectors of the nested records (`Limits`, `HanDevice`) on their own, by the
same rules. `reordered`: {n_reordered} encodings of each `seeded` message with its map keys in
reverse order: a decoder must accept them (key order is not checked) and re-encode them to
`canonical`.

Valid here means the encoding decodes; it does not mean otad accepts the message in every state
(see "State-level checks" below): `HubAnnounced.min` declares `window` 0, limits no transfer
can use (SPEC §7.4), and is still a well-formed `HubAnnounced`.

## invalid.json: encodings a decoder must refuse

Each is `{{name, reason, code, why, hex}}`; decoding `hex` must fail with exactly `reason`.

* `encoding` ({n_encoding}, written by hand): the CBOR policy and the message envelope of SPEC §3
  steps 1-3: empty and truncated input, trailing bytes, non-minimal heads (`NON_CANONICAL`),
  indefinite lengths (`INDEFINITE_LENGTH`), duplicate keys (`DUPLICATE_KEY`), unknown keys
  (`UNKNOWN_KEY`), a missing key, a missing/text/unknown type code (`UNKNOWN_TYPE` for t = 99),
  wrong field types, negative integers and bignums, floats, tags, `undefined` and other simple
  values, reserved heads, strings past the end of input, invalid UTF-8, nesting deeper than 4
  (`TOO_DEEP`) and a message over its type's cap (`TOO_LARGE`: the cap is checked before the
  keys).
* `fields` ({n_fields}, generated from the field specs): in each type's `seeded` vector, each
  field made wrong in each way its type allows: one over its maximum, negative, of the wrong
  CBOR type, a fixed-length byte string one byte short, a byte string one over its cap
  (`TOO_LARGE`), a text one character over its cap, an EUI-64 (`HanDevice.device_id`) in lower
  case or of 15 or 17 digits or with a non-hex digit (`BAD_IDENTIFIER`), an unknown or
  lower-case enumeration value, a nested record that is not a map or lacks a key or has an
  extra one, an array with one item too many. A mutation that pushes the message over its
  type's cap is `TOO_LARGE` instead, as the cap is checked first.
* `rules` ({n_rules}): generated vectors whose every field is in range but which the type's own
  consistency rules refuse (`MALFORMED`, SPEC §3 step 3); empty while no message type has such
  a rule.

### State-level checks (not in invalid.json)

These are refused by the receiving state machine or otad, not by the decoder: a message that
fails them decodes, and must, so that the receiver can answer with the right reason.

* a `TransferAcked` whose `base` is past the image's block count, or whose bitmap names a block
  at or past it: refused `MALFORMED` by the sender, which knows the count (SPEC §7.3);
* every check on a `Block` (SPEC §7.9: a transfer for the image, else `NO_TRANSFER`; index in
  range; length; per-block hash; limits);
* the GUID of a `HubAnnounced` or `HubWentOffline` against its topic (SPEC §2: a lower-case or
  15-digit GUID in the payload decodes, and is refused `BAD_IDENTIFIER` because it cannot
  equal the topic's GUID), and the announcement rules otad applies to `supplier`, `segment`
  and `limits` (SPEC §3, §7.4);
* everything of a manifest (it is opaque bytes in `Offer.manifest` until verified, SPEC §6.4):
  see manifest.json.

## manifest.json: the key, a signed manifest, and refusals

* `test_key`: the TEST key as PKCS#8 PEM (private) and SubjectPublicKeyInfo PEM (public), and
  its kid (the first 8 bytes of SHA-256 of the public key's DER, SPEC §6.1).
* `valid`: the signed manifest of image.otaimg (COSE_Sign1, `signed_hex`), its payload, and its
  decoded `fields`. It verifies with a trust store holding the test key at `now` = {now}
  (signed at {created}, expires at {expires}) for the `target` given (a CH, hardware 0x0002,
  installed sequence 9).
* `invalid`: {n_manifest} signed manifests with the `reason` SPEC §6.4's verification gives, the
  `now`, `target` and revoked kids to verify them with (the trust store always holds the test
  key, and nothing else): a bad signature, an unknown kid, a revoked kid, expired (and expired
  *and* for another device type: expiry is checked first), wrong device type, wrong vendor,
  hardware out of range, rollback, replay, a bad signature over a payload that is not CBOR
  (`BAD_SIGNATURE`, not `MALFORMED`: verify before decode), another algorithm, another manifest
  version, and an inconsistent manifest.

## image.otaimg and image.json: a small signed image

image.otaimg is an `.otaimg` file (SPEC §6.6): the signed manifest above and a ZigBee OTA file
(SPEC §6.5) of a few KiB of seeded firmware, in {blocks} blocks of {block_size} bytes (the last
shorter). image.json gives the file's SHA-256, the image's digest (its id on the wire), size,
block size, every block's offset, length and SHA-256, and the OTA header's fields. It verifies
completely (SPEC §6.4 checks 1-17) with the test key at `now` for the `target`.

## transcript.json: a whole transfer with loss

A WAN transfer of image.otaimg between otad's `Sender` (messages `down`) and the reference CH
receiver (`up`), on virtual time, over a link that delivers every message {latency} s after it
is sent, in order, except what its script (`link.impairments`) says: one block is dropped, one
duplicated (the copy arrives later), one held back so the next overtakes it, and one SACK is
dropped. `messages` ({n_transcript}) lists every message in the order it was sent:
`{{n, direction, type, sent_at, fate, arrives_at, why?, fields, hex}}`; `arrives_at` is empty for
a dropped message and has two times for a duplicated one.

To check a CH against it: give the CH the limits, `now` and target of `ch`, a trust store with
the test key, and deliver every down copy at its `arrives_at` time, in order of arrival (equal
times: lower `n` first). With the acknowledgement policy of SPEC §7.5 at `ack_every` =
{ack_every} and `ack_delay` = {ack_delay} s (a delayed acknowledgement due at the instant a message
arrives is sent after that message is handled), the CH sends exactly the up messages listed, at
their `sent_at` times, and ends holding the image. A CH with another ack policy sends its SACKs at
other times, but every one must be consistent with the blocks it was given, and it must end with
the same `ImageHeld`. `tests/protocol/test_vectors.py` replays the down messages into a fresh
receiver this way.
"""


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m loadtest vectors``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where to write the files (default: {DEFAULT_OUT})",
    )


def main(args: argparse.Namespace) -> int:
    """The ``vectors`` command."""
    for path in generate(args.out):
        print(f"vectors: wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
