"""mqttio.inbound: packets above the limit never reach the library, large ones reach it whole,
the rest byte for byte, however the stream is cut into reads."""

from __future__ import annotations

import random

import pytest

from mqttio.gmqtt_adapter import _publish_qos0
from mqttio.inbound import DroppedPacket, InboundFilter, MalformedPacketError

MAX = 4096
WHOLE_ABOVE = 512


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    """An MQTT 3.1.1 PUBLISH (QoS 0 framed by the adapter's own builder; QoS 1 with its id)."""
    if qos == 0:
        return _publish_qos0(topic, payload, False)
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + packet_id.to_bytes(2, "big") + payload
    return bytes((0x32,)) + remaining_length(len(body)) + body


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def run(gate: InboundFilter, stream: bytes, cuts: list[int]) -> list[bytes]:
    pieces = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out = gate.feed(stream[last:cut])
        if out:
            pieces.append(out)
        last = cut
    return pieces


@pytest.mark.parametrize("seed", range(40))
def test_any_cutting_of_a_mixed_stream_gives_the_same_packets(seed: int) -> None:
    rng = random.Random(seed)
    packets: list[tuple[bytes, DroppedPacket | None]] = []
    for n in range(60):
        kind = rng.choice(["ack", "ack", "ack", "medium", "huge", "ping"])
        if kind == "ping":
            packets.append((b"\xd0\x00", None))
            continue
        size = {"ack": rng.randint(0, 40), "medium": rng.randint(600, 3900),
                "huge": rng.randint(MAX, 3 * MAX)}[kind]  # fmt: skip
        qos = rng.choice([0, 1])
        topic = f"ota/v1/ch/{n:016X}/up"
        packet = publish(topic, rng.randbytes(size), qos=qos, packet_id=n + 1)
        dropped = None
        if len(packet) > MAX:
            dropped = DroppedPacket(3, len(packet), qos, topic, n + 1 if qos else None)
        packets.append((packet, dropped))
    stream = b"".join(p for p, _ in packets)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 400)))
    gate = InboundFilter(max_packet=MAX, whole_above=WHOLE_ABOVE)
    pieces = run(gate, stream, cuts)
    assert b"".join(pieces) == b"".join(p for p, d in packets if d is None)
    assert gate.dropped == [d for _, d in packets if d is not None]
    assert gate.dropped_total == len(gate.dropped)
    for packet, dropped in packets:  # a large packet is handed over within one read
        if dropped is None and len(packet) > WHOLE_ABOVE:
            assert any(packet in piece for piece in pieces)


def test_a_read_of_small_packets_only_is_handed_over_as_it_is() -> None:
    gate = InboundFilter(max_packet=MAX, whole_above=WHOLE_ABOVE)
    data = b"".join(publish("t", bytes(10)) for _ in range(50))
    assert gate.feed(data) is data


def test_a_header_cut_in_the_middle_is_held_back_until_it_is_whole() -> None:
    gate = InboundFilter(max_packet=MAX, whole_above=WHOLE_ABOVE)
    big = publish("ota/v1/otad/x", bytes(200_000), qos=1, packet_id=7)  # 3 length bytes
    assert gate.feed(big[:2]) == b""
    assert gate.feed(big[2:3]) == b""
    assert gate.feed(big[3:]) == b""
    assert gate.dropped == [DroppedPacket(3, len(big), 1, "ota/v1/otad/x", 7)]
    small = publish("a", b"xy")
    assert gate.feed(small[:1]) == b""
    assert gate.feed(small[1:]) == small


def test_past_mqtts_own_maximum_the_stream_is_not_mqtt() -> None:
    gate = InboundFilter(max_packet=MAX, whole_above=WHOLE_ABOVE)
    with pytest.raises(MalformedPacketError):
        gate.feed(b"\x30\xff\xff\xff\xff\x01")


def test_the_limit_is_exact() -> None:
    at_limit = publish("t", bytes(MAX - 6))
    assert len(at_limit) == MAX
    over = publish("t", bytes(MAX - 5))
    gate = InboundFilter(max_packet=MAX, whole_above=WHOLE_ABOVE)
    assert gate.feed(at_limit + over) == at_limit
    assert [d.size for d in gate.dropped] == [MAX + 1]


def test_an_80_mib_packet_streams_past_in_reads_without_being_kept() -> None:
    gate = InboundFilter(max_packet=2_098_216, whole_above=8192)
    header = bytes((0x32,)) + remaining_length(80 * 1024 * 1024 + 2 + 5 + 2)
    head = header + b"\x00\x05ota/x\x00\x09"
    assert gate.feed(head) == b""
    chunk = bytes(8192)
    for n in range(80 * 1024 * 1024 // 8192):
        assert gate.feed(chunk) == b""
        if n == 5000:  # half-way: nothing gathered, a topic's worth of prefix at most
            assert len(gate._whole) == 0
            assert len(gate._prefix) <= 2 + 65_535 + 2
    after = publish("ota/y", b"{}")
    assert gate.feed(after) == after
    assert gate.dropped == [DroppedPacket(3, len(header) + 80 * 1024 * 1024 + 9, 1, "ota/x", 9)]


@pytest.mark.parametrize("bad", [{"max_packet": 1}, {"whole_above": 0}])
def test_nonsense_limits_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        InboundFilter(**{"max_packet": MAX, "whole_above": WHOLE_ABOVE, **bad})
