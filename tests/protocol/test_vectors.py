"""protocol/vectors/: the committed files are what the generator writes, and otad's code agrees
with every one of them (SPEC §3, "Test vectors").

The checks here read the JSON files as a vendor would, and compare them with what this
repository's decoder, verifier and receiver do; the generator (:mod:`loadtest.vectors`) is only
imported to regenerate the files and to show that its own checks can fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from loadtest import vectors
from protocol.clock import Monotonic, UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release import otaimg
from protocol.release.cose import key_id
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import Target, TrustStore, verify_manifest
from protocol.wan.receiver import DiscardImage, Receiver, Reply, StoreBlock, VerifyImage
from protocol.wire import cbor, codec, messages
from protocol.wire.codec import byte_string, eui64, text, uint
from protocol.wire.devices import JoinMode
from protocol.wire.messages import MESSAGE_TYPES, Limits, Message, Offer, decode

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
STALE = f"run `{vectors.REGENERATE}` and commit protocol/vectors/"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def json_form(value: Any) -> Any:
    """A decoded value (record or wire value) in the vectors' JSON form, written independently
    of the generator: bytes as hex, enums as their value, records as objects of their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_form(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {key: json_form(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_form(item) for item in value]
    return value


# --------------------------------------------------------------------------- regeneration


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    vectors.generate(tmp_path)
    committed = sorted(path.name for path in VECTORS.iterdir())
    assert committed == sorted(vectors.FILES), f"protocol/vectors/ holds {committed}: {STALE}"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(vectors.FILES)
    stale = [
        name
        for name in vectors.FILES
        if (tmp_path / name).read_bytes() != (VECTORS / name).read_bytes()
    ]
    assert not stale, f"{', '.join(stale)} differ from what the code now writes: {STALE}"


def test_the_command_writes_into_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.__main__ import main

    assert main(["vectors", "--out", str(tmp_path / "v")]) == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted(vectors.FILES)
    assert "transcript.json" in capsys.readouterr().out


# --------------------------------------------------------------------------- messages


MESSAGES = load("messages.json")
INVALID = load("invalid.json")


def test_every_message_type_has_vectors() -> None:
    covered = {entry["t"] for entry in MESSAGES["messages"]}
    missing = sorted(set(MESSAGE_TYPES) - covered)
    assert not missing, f"message types {missing} have no vectors: {STALE}"
    valid = {e["name"] for e in MESSAGES["messages"]}
    refused = {e["name"].removesuffix(".refused") for e in INVALID["rules"]}
    for cls in MESSAGE_TYPES.values():
        for variant in ("min", "max", "seeded"):  # valid, or refused by the type's own rules
            assert f"{cls.__name__}.{variant}" in valid | refused, STALE


@pytest.mark.parametrize("entry", MESSAGES["messages"], ids=lambda e: e["name"])
def test_valid_message_decodes_to_its_fields_and_encodes_to_its_hex(entry: dict[str, Any]) -> None:
    data = bytes.fromhex(entry["hex"])
    message = decode(data)
    assert entry["t"] == type(message).TYPE
    assert type(message).__name__ == entry["type"]
    assert json_form(message) == entry["fields"]
    assert message.encode() == data
    # the JSON fields are the CBOR map itself (read here without the codec), minus "t"
    raw = cbor2.loads(data)
    assert raw.pop("t") == entry["t"]
    assert json_form(raw) == entry["fields"]
    assert cbor.dumps(raw | {"t": entry["t"]}) == data  # deterministic: canonical key order


def test_the_edges_are_at_the_bounds() -> None:
    by_name = {e["name"]: e["fields"] for e in MESSAGES["messages"]}
    assert by_name["Poll.max"]["nonce"] == 2**64 - 1
    assert by_name["TransferAcked.min"]["bitmap"] == ""
    assert len(bytes.fromhex(by_name["TransferAcked.max"]["bitmap"])) == 8192
    assert len(bytes.fromhex(by_name["Block.max"]["data"])) == 65_536
    hub = by_name["HubAnnounced.max"]
    assert len(hub["han"]) == 16
    assert hub["limits"] == {"max_block": 65_536, "window": 65_535, "buffer": 2**32 - 1}
    assert len(hub["supplier"]) == 64 < len(hub["supplier"].encode())  # characters, not bytes
    assert by_name["HubAnnounced.example"]["supplier"] == "Acme Ltd"


@pytest.mark.parametrize("entry", MESSAGES["records"], ids=lambda e: e["name"])
def test_nested_record_vectors(entry: dict[str, Any]) -> None:
    cls = {"Limits": Limits, "HanDevice": messages.HanDevice}[entry["record"]]
    data = bytes.fromhex(entry["hex"])
    record = codec.decode(cls, cbor.loads(data, max_size=4096, max_depth=4))
    assert json_form(record) == entry["fields"]
    assert codec.encode(record) == data


@pytest.mark.parametrize("entry", MESSAGES["reordered"], ids=lambda e: e["name"])
def test_keys_in_any_order_decode(entry: dict[str, Any]) -> None:
    data = bytes.fromhex(entry["hex"])
    assert data != bytes.fromhex(entry["canonical"])
    assert decode(data).encode().hex() == entry["canonical"]


# --------------------------------------------------------------------------- invalid


@pytest.mark.parametrize(
    "entry", INVALID["encoding"] + INVALID["fields"] + INVALID["rules"], ids=lambda e: e["name"]
)
def test_invalid_encoding_is_refused_with_its_reason(entry: dict[str, Any]) -> None:
    assert Reason[entry["reason"]] == entry["code"]
    with pytest.raises(ProtocolError) as refused:
        decode(bytes.fromhex(entry["hex"]))
    assert refused.value.reason is Reason[entry["reason"]], refused.value.detail


def test_invalid_vectors_cover_the_brief() -> None:
    reasons = {e["reason"] for e in INVALID["encoding"] + INVALID["fields"]}
    assert {
        "MALFORMED",
        "TOO_LARGE",
        "TOO_DEEP",
        "INDEFINITE_LENGTH",
        "DUPLICATE_KEY",
        "UNKNOWN_KEY",
        "UNKNOWN_TYPE",
        "NON_CANONICAL",
        "BAD_IDENTIFIER",
    } <= reasons
    names = {e["name"] for e in INVALID["fields"]}
    assert "HubAnnounced.han[0].device_id.lower-case" in names
    assert "HubAnnounced.han[0].device_id.15-digits" in names
    for cls in MESSAGE_TYPES.values():
        assert f"{cls.__name__}.unknown-key" in names, STALE


def test_the_generator_refuses_a_vector_the_decoder_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = vectors.Invalid("not-invalid", messages.Poll(nonce=1).encode(), Reason.MALFORMED, "")
    monkeypatch.setattr(vectors, "encoding_invalids", lambda: [wrong])
    with pytest.raises(RuntimeError, match="not-invalid decodes"):
        vectors.invalid_vectors()
    mislabelled = dataclasses.replace(wrong, data=b"", reason=Reason.TOO_DEEP)
    monkeypatch.setattr(vectors, "encoding_invalids", lambda: [mislabelled])
    with pytest.raises(RuntimeError, match="decode says MALFORMED"):
        vectors.invalid_vectors()


# --------------------------------------------------------------------------- a type added later


@dataclass(frozen=True, slots=True)
class Gauge(Message):
    """A message type the registry does not have: what the generator makes of a new one."""

    TYPE: ClassVar[int] = 120
    QOS: ClassVar[int] = 1
    level: int = field(metadata=uint(255))
    label: str = field(metadata=text(8))
    tag: bytes = field(metadata=byte_string(4))
    device: str = field(metadata=eui64())
    mode: JoinMode
    limits: Limits

    def __post_init__(self) -> None:
        if self.level < 1:  # a rule of its own, narrower than the field's bound
            raise ValueError("level is at least 1")


codec.register(Gauge, codec.Tag("t", Gauge.TYPE, Reason.UNKNOWN_TYPE))


def test_a_new_message_type_gets_vectors_from_its_field_specs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(messages._REGISTRY, Gauge.TYPE, Gauge)
    valid = {e["name"]: e for e in vectors.message_vectors()["messages"]}
    assert valid["Gauge.max"]["fields"]["level"] == 255
    assert valid["Gauge.max"]["fields"]["label"] == "AbÜ9AbÜ9"
    assert valid["Gauge.max"]["fields"]["device"] == "F" * 16
    seeded = bytes.fromhex(valid["Gauge.seeded"]["hex"])
    assert decode(seeded).encode() == seeded
    # level 0 is in the field's range but not the type's rule: an invalid vector, not a valid one
    assert "Gauge.min" not in valid
    generated = vectors.invalid_vectors()  # checks each vector against decode itself
    rules = {e["name"]: e for e in generated["rules"]}
    assert rules["Gauge.min.refused"]["reason"] == "MALFORMED"
    assert "level is at least 1" in rules["Gauge.min.refused"]["why"]
    with pytest.raises(ProtocolError) as refused:
        decode(bytes.fromhex(rules["Gauge.min.refused"]["hex"]))
    assert refused.value.reason is Reason.MALFORMED
    invalid = {e["name"]: e["reason"] for e in generated["fields"]}
    assert invalid["Gauge.level.over-maximum"] == "MALFORMED"
    assert invalid["Gauge.label.too-long"] == "MALFORMED"
    assert invalid["Gauge.tag.short"] == "MALFORMED"
    assert invalid["Gauge.device.lower-case"] == "BAD_IDENTIFIER"
    assert invalid["Gauge.mode.unknown"] == "MALFORMED"
    assert invalid["Gauge.limits.window.over-maximum"] == "MALFORMED"
    assert invalid["Gauge.limits.unknown-key"] == "UNKNOWN_KEY"


# --------------------------------------------------------------------------- manifest, image

MANIFEST = load("manifest.json")


def trust_store(revoked: list[str] = ()) -> TrustStore:  # type: ignore[assignment]
    public = serialization.load_pem_public_key(MANIFEST["test_key"]["public_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return TrustStore([public], [bytes.fromhex(kid) for kid in revoked])


def target(data: dict[str, Any] | None) -> Target | None:
    if data is None:
        return None
    return Target(
        DeviceType(data["device_type"]),
        data["hw_version"],
        data["installed_sequence"],
        data["vendor"],
    )


def test_the_test_key_is_one_key_and_says_it_is_a_test_key() -> None:
    key = MANIFEST["test_key"]
    private = serialization.load_pem_private_key(key["private_pem"].encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public = private.public_key()
    assert key_id(public).hex() == key["kid"]
    assert (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        == key["public_pem"]
    )
    assert "TEST KEY" in key["warning"]
    assert "TEST KEY" in (VECTORS / "README.md").read_text(encoding="utf-8")


def test_the_signed_manifest_verifies_at_the_stated_time() -> None:
    valid = MANIFEST["valid"]
    manifest = verify_manifest(
        bytes.fromhex(valid["signed_hex"]),
        trust_store(),
        now=UnixTime(valid["now"]),
        target=target(valid["target"]),
    )
    assert json_form(manifest) == valid["fields"]
    assert manifest.encode().hex() == valid["payload_hex"]
    assert Manifest.decode(bytes.fromhex(valid["payload_hex"])) == manifest


@pytest.mark.parametrize("case", MANIFEST["invalid"], ids=lambda c: c["name"])
def test_invalid_signed_manifest_is_refused_with_its_reason(case: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as refused:
        verify_manifest(
            bytes.fromhex(case["signed_hex"]),
            trust_store(case["revoked_kids"]),
            now=UnixTime(case["now"]),
            target=target(case["target"]),
        )
    assert refused.value.reason is Reason[case["reason"]], refused.value.detail
    assert int(refused.value.reason) == case["code"]


def test_the_manifest_cases_cover_the_brief() -> None:
    reasons = {case["reason"] for case in MANIFEST["invalid"]}
    assert {
        "BAD_SIGNATURE",
        "UNKNOWN_KEY_ID",
        "EXPIRED",
        "ROLLBACK",
        "WRONG_DEVICE_TYPE",
    } <= reasons


IMAGE = load("image.json")


def test_the_image_verifies_and_matches_image_json() -> None:
    data = (VECTORS / IMAGE["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == IMAGE["file_sha256"]
    signed = otaimg.SignedImage.decode(data)
    assert signed.signed_manifest.hex() == MANIFEST["valid"]["signed_hex"]
    manifest, ota = otaimg.verify(
        signed, trust_store(), now=UnixTime(IMAGE["now"]), target=target(IMAGE["target"])
    )
    image = signed.image
    assert hashlib.sha256(image).hexdigest() == IMAGE["image_sha256"] == manifest.sha256.hex()
    assert len(image) == IMAGE["image_size"]
    assert IMAGE["block_count"] == len(IMAGE["blocks"]) >= 4  # several blocks
    assert IMAGE["block_size"] <= 1024
    for block in IMAGE["blocks"]:
        piece = image[block["offset"] : block["offset"] + block["length"]]
        assert len(piece) == block["length"]
        assert hashlib.sha256(piece).hexdigest() == block["sha256"]
    assert sum(block["length"] for block in IMAGE["blocks"]) == len(image)
    assert ota.header.manufacturer_code == IMAGE["ota_header"]["manufacturer_code"]
    assert ota.header.file_version == IMAGE["ota_header"]["file_version"]
    assert ota.header.total_image_size == IMAGE["ota_header"]["total_image_size"] == len(image)


# --------------------------------------------------------------------------- transcript

TRANSCRIPT = load("transcript.json")


def test_the_transcript_is_lossy_as_its_script_says() -> None:
    entries = TRANSCRIPT["messages"]
    fates = {(e["direction"], e["type"], e["fate"]) for e in entries}
    assert ("down", "Block", "dropped") in fates
    assert ("up", "TransferAcked", "dropped") in fates
    assert ("down", "Block", "duplicated") in fates
    assert ("down", "Block", "held back") in fates
    for entry in entries:
        count = {"dropped": 0, "duplicated": 2}.get(entry["fate"], 1)
        assert len(entry["arrives_at"]) == count
        message = decode(bytes.fromhex(entry["hex"]))
        assert type(message).__name__ == entry["type"]
        assert json_form(message) == entry["fields"]
    held_back = next(e for e in entries if e["fate"] == "held back")
    overtaking = [
        e
        for e in entries
        if e["n"] > held_back["n"]
        and e["arrives_at"]
        and e["arrives_at"][0] < held_back["arrives_at"][0]
    ]
    assert overtaking, "nothing overtook the held-back block"
    assert TRANSCRIPT["outcome"]["sender_state"] == "COMPLETE"
    assert TRANSCRIPT["outcome"]["retransmissions"] >= 1


def test_replaying_the_down_messages_reproduces_the_up_messages() -> None:
    """A fresh Receiver, fed every delivered down copy at its arrival time (ties: lower n
    first), with its delayed-ack timer fired when due (after an arrival at the same instant),
    sends exactly the transcript's up messages at their times and ends holding the image."""
    ch = TRANSCRIPT["ch"]
    trust = trust_store()
    ch_target = target(ch["target"])

    def verify(data: bytes, at: UnixTime) -> Manifest:
        return verify_manifest(data, trust, now=at, target=ch_target)

    receiver = Receiver(
        Limits(**ch["limits"]), verify, ack_every=ch["ack_every"], ack_delay=ch["ack_delay"]
    )
    arrivals: list[tuple[float, int, int, bytes]] = []
    for entry in TRANSCRIPT["messages"]:
        if entry["direction"] == "down":
            for copy, at in enumerate(entry["arrives_at"]):
                heapq.heappush(arrivals, (at, entry["n"], copy, bytes.fromhex(entry["hex"])))
    stored: dict[int, bytes] = {}
    sent: list[tuple[float, str]] = []

    def carry_out(actions: list[Any], now: float) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, StoreBlock):
                stored[action.index] = action.data
            elif isinstance(action, VerifyImage):
                image = b"".join(stored[i] for i in sorted(stored))[: action.size]
                digest = hashlib.sha256(image).digest()
                queue.extend(receiver.image_hashed(action.image, digest, Monotonic(now)))
            elif isinstance(action, DiscardImage):
                stored.clear()
            else:
                assert isinstance(action, Reply)
                sent.append((now, action.message.encode().hex()))

    def fire_timers(before: float) -> None:
        while (due := receiver.next_deadline()) is not None and due < before:
            carry_out(receiver.handle_timer(due), due)

    while arrivals:
        at, _n, _copy, data = heapq.heappop(arrivals)
        fire_timers(at)
        message = decode(data)
        if isinstance(message, Offer):  # the CH's wall clock: the transcript's fixed "now"
            actions = receiver.offer_received(message, UnixTime(ch["now"]), Monotonic(at))
        else:
            actions = receiver.message_received(message, Monotonic(at))
        carry_out(actions, at)
    fire_timers(float("inf"))

    expected = [(e["sent_at"], e["hex"]) for e in TRANSCRIPT["messages"] if e["direction"] == "up"]
    assert sent == expected
    image = otaimg.SignedImage.decode((VECTORS / "image.otaimg").read_bytes()).image
    assert b"".join(stored[i] for i in sorted(stored)) == image
    last = decode(bytes.fromhex(expected[-1][1]))
    assert isinstance(last, messages.ImageHeld)
    assert last.sha256 == hashlib.sha256(image).digest() == bytes.fromhex(TRANSCRIPT["image"])
