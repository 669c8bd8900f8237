"""The gmqtt adapter reads QoS 0 PUBLISH packets itself (the hot path of every acknowledgement):
what reaches the message handler, and what reaches gmqtt's parser, must be what gmqtt alone would
have delivered, in the same order, however the stream is cut into reads."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from gmqtt.mqtt.protocol import MQTTProtocol
from test_inbound_packets import remaining_length

from mqttio.gmqtt_adapter import read_packets

Event = tuple[Any, ...]


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + remaining_length(len(body)) + body


def publish(topic: bytes, payload: bytes, *, qos: int = 0, retain: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x07" if qos else b"") + payload
    return packet(0x30 | qos << 1 | int(retain), body)


def random_stream(rng: random.Random, count: int) -> bytes:
    packets = []
    for _ in range(count):
        kind = rng.random()
        topic = rng.choice(
            [b"ota/v1/ch/00112233AABBCCDD/up", b"ota/v1/ch/x/state", "ota/v1/ü".encode(),
             b"bad\xff\xfetopic", b"a"]
        )  # fmt: skip
        payload = rng.randbytes(rng.choice((0, 1, 60, 127, 200, 20_000)))
        if kind < 0.6:
            packets.append(publish(topic, payload, retain=rng.random() < 0.2))
        elif kind < 0.7:
            packets.append(publish(topic, payload, qos=1))
        elif kind < 0.75:
            packets.append(publish(b"", payload))  # empty topic: gmqtt's to refuse
        elif kind < 0.8:
            packets.append(packet(0x30, b"\x00\x40" + b"short"))  # topic runs past the packet
        elif kind < 0.9:
            packets.append(packet(0x40, b"\x00\x07"))  # PUBACK
        else:
            packets.append(packet(0xD0, b""))  # PINGRESP
    return b"".join(packets)


def as_delivered(events: list[Event]) -> list[Event]:
    """gmqtt's packages, with each QoS 0 PUBLISH of a non-empty topic as the adapter's message."""
    out: list[Event] = []
    for event in events:
        if event[0] == "package" and event[1] in (0x30, 0x31):
            data = event[2]
            name_end = 2 + int.from_bytes(data[:2], "big")
            if 2 < name_end <= len(data):
                topic = data[2:name_end].decode("utf-8", "replace")
                out.append(("message", topic, data[name_end:], event[1] == 0x31))
                continue
        out.append(event)
    return out


def read_all(stream: bytes, cuts: list[int], fast: bool) -> tuple[list[Event], int]:
    """Feed ``stream`` in reads cut at ``cuts`` through gmqtt's read loop logic; return what was
    handed over and the last parse result."""
    events: list[Event] = []

    def put_package(pkg: Any) -> None:
        events.append(("package", pkg.cmd, bytes(pkg.data)))

    fake = SimpleNamespace(_connection=SimpleNamespace(put_package=put_package))

    def parse(data: bytes) -> int:
        return int(MQTTProtocol._read_packet(fake, data))

    def deliver(topic: str, payload: bytes, retain: bool) -> None:
        events.append(("message", topic, payload, retain))

    buf = b""
    parsed = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buf += stream[start:end]
        parsed = read_packets(buf, parse, deliver) if fast else parse(buf)
        if parsed == -1:
            break
        buf = buf[parsed:]
    return events, parsed


@pytest.mark.parametrize("seed", range(40))
def test_what_gmqtt_would_deliver_in_its_order_however_the_reads_fall(seed: int) -> None:
    rng = random.Random(seed)
    stream = random_stream(rng, rng.randint(1, 60))
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 30))))
    theirs, their_last = read_all(stream, cuts, fast=False)
    ours, our_last = read_all(stream, cuts, fast=True)
    assert ours == as_delivered(theirs)
    assert our_last == their_last


@pytest.mark.parametrize(
    "header",
    [
        bytes((0x30, 0xFF, 0xFF, 0xFF, 0x7F)),  # MQTT's largest remaining length: wait for it
        bytes((0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01)),  # a fifth length byte: malformed
        bytes((0x30, 0x80, 0x80, 0x80, 0x80, 0x00)),  # malformed, and short if it were not
    ],
)
def test_a_remaining_length_at_and_past_four_bytes_is_gmqtts_to_judge(header: bytes) -> None:
    stream = publish(b"a/b", b"x") + header + b"\x00" * 8
    theirs, their_last = read_all(stream, [], fast=False)
    ours, our_last = read_all(stream, [], fast=True)
    assert our_last == their_last
    assert ours == as_delivered(theirs)
    assert ours[0] == ("message", "a/b", b"x", False)
