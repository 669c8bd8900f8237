"""Wire messages: round trips, and every strictness rule of the decoder."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.wire import cbor, messages
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.limits import MAX_BLOCK_BYTES
from protocol.wire.messages import Block, HanDevice, HubAnnounced, Limits, TransferAcked

IMAGE = bytes(range(32))

SAMPLES: list[messages.Message] = [
    messages.Offer(image=IMAGE, manifest=b"\x01" * 300),
    Block(image=IMAGE, index=7, data=b"\xaa" * 1024),
    messages.Cancel(image=IMAGE, reason=Reason.CANCELLED),
    messages.Poll(nonce=42),
    TransferAcked(image=IMAGE, base=10, bitmap=b"\x05", credit=8),
    messages.ImageHeld(image=IMAGE, sha256=IMAGE),
    messages.TransferRejected(image=IMAGE, reason=Reason.ROLLBACK, detail="sequence 3 < 4"),
    HubAnnounced(
        guid="00112233AABBCCDD",
        fw_version=0x01020304,
        hw_version=0x0102,
        supplier="SUPPLIER-A",
        segment="cell-17",
        limits=Limits(max_block=1024, window=4, buffer=8192),
        han=(HanDevice("0011223344556677", "B2", "CAD", 5, 1),),
    ),
    messages.HubWentOffline(guid="00112233AABBCCDD"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: messages.Message) -> None:
    assert messages.decode(message.encode()) == message


def wire(message: messages.Message) -> dict[str, object]:
    raw = cbor.loads(message.encode(), max_size=1 << 20)
    assert isinstance(raw, dict)
    return raw


def reason_of(raw: object) -> Reason:
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps(raw))
    return info.value.reason


def test_unknown_key_is_refused() -> None:
    raw = wire(SAMPLES[1])
    raw["extra"] = 1
    assert reason_of(raw) is Reason.UNKNOWN_KEY


def test_missing_field_is_refused() -> None:
    raw = wire(SAMPLES[1])
    del raw["index"]
    assert reason_of(raw) is Reason.MALFORMED


def test_unknown_type_is_refused() -> None:
    raw = wire(SAMPLES[3])
    raw["t"] = 999
    assert reason_of(raw) is Reason.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("field", "value"),
    [("index", -1), ("index", 2**32), ("index", "7"), ("image", b"short"), ("data", 5)],
)
def test_field_types_and_ranges(field: str, value: object) -> None:
    raw = wire(SAMPLES[1])
    raw[field] = value
    assert reason_of(raw) is Reason.MALFORMED


def test_block_data_cap() -> None:
    big = Block(image=IMAGE, index=0, data=b"\x00" * (MAX_BLOCK_BYTES + 1))
    with pytest.raises(ProtocolError) as info:
        messages.decode(big.encode())
    assert info.value.reason is Reason.TOO_LARGE


def test_per_type_size_cap() -> None:
    # a Poll padded to over its cap by a huge unknown field is refused by size, not parsed
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps({"t": 4, "nonce": 1, "pad": b"\x00" * 10000}))
    assert info.value.reason is Reason.TOO_LARGE


def test_decoding_as_a_class_checks_the_class() -> None:
    with pytest.raises(ProtocolError) as info:
        Block.decode(SAMPLES[3].encode())
    assert info.value.reason is Reason.UNKNOWN_TYPE


def test_nested_record_is_checked() -> None:
    raw = wire(SAMPLES[7])
    han = raw["han"]
    assert isinstance(han, list)
    han[0]["fw_version"] = -3
    assert reason_of(raw) is Reason.MALFORMED


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("device_id", "0011223344556677/", Reason.BAD_IDENTIFIER),
        ("device_id", "00112233445566zz", Reason.BAD_IDENTIFIER),
        ("device_id", "meter-1", Reason.BAD_IDENTIFIER),
        ("device_type", "B5", Reason.MALFORMED),
        ("join_mode", "SMKI", Reason.MALFORMED),
        ("join_mode", 1, Reason.MALFORMED),
    ],
)
def test_han_devices_are_checked_as_spec_3_says(
    field: str, value: object, expected: Reason
) -> None:
    raw = wire(SAMPLES[7])
    han = raw["han"]
    assert isinstance(han, list)
    han[0][field] = value
    assert reason_of(raw) is expected


def test_han_device_types_and_join_modes_decode_as_members() -> None:
    announced = messages.decode(SAMPLES[7].encode())
    assert isinstance(announced, HubAnnounced)
    device = announced.han[0]
    assert (device.device_type, device.join_mode) == (DeviceType.B2, JoinMode.CAD)
    assert type(device.device_type) is DeviceType
    assert type(device.join_mode) is JoinMode
    # built from the plain strings (as callers outside protocol/ do), they are the members too
    assert type(HanDevice("0011223344556677", "ESME", "NATIVE", 1, 1).join_mode) is JoinMode
    with pytest.raises(ValueError):
        HanDevice("0011223344556677", "XX", "NATIVE", 1, 1)


def test_too_many_han_devices() -> None:
    raw = wire(SAMPLES[7])
    han = raw["han"]
    assert isinstance(han, list)
    raw["han"] = han * (messages.MAX_HAN_DEVICES + 1)
    assert reason_of(raw) is Reason.MALFORMED


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_type_declares_its_qos(message: messages.Message) -> None:
    # SPEC §1: blocks and acknowledgements at QoS 0 (the transfer repairs and repeats them),
    # control messages and reports at QoS 1
    qos = type(message).QOS
    assert qos == (0 if isinstance(message, (Block, TransferAcked)) else 1)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_encoding_is_the_canonical_encoding(message: messages.Message) -> None:
    # encode() builds maps in canonical key order and skips cbor2's canonical sort; the bytes
    # must be exactly what canonical mode produces
    assert message.encode() == cbor.dumps(cbor.loads(message.encode(), max_size=1 << 22))


EMPTY_HAN = HubAnnounced(
    guid="0011223344556677", fw_version=1, hw_version=1, supplier="S", segment="c", han=()
)


def _announcement_with(device: dict[str, object]) -> bytes:
    raw = cbor.loads(EMPTY_HAN.encode(), max_size=4096)
    raw["han"] = [device]
    return cbor.dumps(raw)


HAN_ENTRY = {
    "device_id": "00112233445566AA",
    "device_type": "ESME",
    "join_mode": "NATIVE",
    "fw_version": 1,
    "hw_version": 1,
}


@pytest.mark.parametrize(
    ("changes", "reason", "detail"),
    [
        ({"device_type": "B1", "join_mode": "NATIVE"}, Reason.MALFORMED, "joins CAD or PPMID"),
        ({"device_type": "ESME", "join_mode": "CAD"}, Reason.MALFORMED, "joins NATIVE, not CAD"),
        ({"device_type": "CH"}, Reason.MALFORMED, "does not list itself"),
        ({"device_id": "00112233445566aa"}, Reason.BAD_IDENTIFIER, ""),
    ],
)
def test_an_incoherent_han_entry_refuses_the_announcement(
    changes: dict[str, object], reason: Reason, detail: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        messages.decode(_announcement_with({**HAN_ENTRY, **changes}))
    assert info.value.reason is reason
    assert detail in info.value.detail


@pytest.mark.parametrize(
    ("device_type", "join_mode"),
    [("B1", "CAD"), ("B4", "PPMID"), ("ESME", "NATIVE"), ("PPMID", "NATIVE")],
)
def test_coherent_han_entries_and_an_empty_han_are_accepted(
    device_type: str, join_mode: str
) -> None:
    entry = {**HAN_ENTRY, "device_type": device_type, "join_mode": join_mode}
    decoded = messages.decode(_announcement_with(entry))
    assert isinstance(decoded, HubAnnounced)
    assert decoded.han[0].join_mode == join_mode
    assert messages.decode(EMPTY_HAN.encode()) == EMPTY_HAN


def test_a_nested_record_with_a_type_code_is_an_unknown_key() -> None:
    raw = cbor.loads(EMPTY_HAN.encode(), max_size=4096)
    raw["limits"] = {**raw["limits"], "t": 1}
    with pytest.raises(ProtocolError) as info:
        messages.decode(cbor.dumps(raw))
    assert info.value.reason is Reason.UNKNOWN_KEY
