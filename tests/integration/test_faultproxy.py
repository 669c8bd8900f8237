"""The load test's TCP fault proxy: the sans-IO packet filter, and the proxy between real MQTT
clients and a real Mosquitto (latency, loss of QoS 0/1 publishes, bandwidth, cut, half-open)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from loadtest.broker import MosquittoBroker
from loadtest.faultproxy import (
    FaultPolicy,
    FaultProxy,
    MqttFramingError,
    PacketFilter,
    ProxyProcess,
)
from mqttio import MqttClient, MqttSettings, create_client

WAIT = 10.0


async def eventually(condition: Callable[[], bool], wait_s: float = WAIT) -> None:
    async with asyncio.timeout(wait_s):
        while not condition():  # noqa: ASYNC110 - MQTT callbacks change plain state
            await asyncio.sleep(0.02)


def _publish(topic: str, payload: bytes, *, qos: int, retain: bool = False, pid: int = 1) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += pid.to_bytes(2, "big")
    body += payload
    first = 0x30 | (qos << 1) | int(retain)
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([first, *encoded]) + body


def _connect(client_id: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id.encode()
    return bytes([0x10, len(body)]) + body


# ----------------------------------------------------------------------------- sans-IO


def test_filter_frames_packets_split_anywhere_and_learns_the_client_id() -> None:
    stream = _connect("0123456789ABCDEF") + _publish("a/b", b"x" * 300, qos=1) + b"\xc0\x00"
    packets = PacketFilter(FaultPolicy(), random.Random(1), upstream=True)
    verdicts = []
    for i in range(len(stream)):  # one byte at a time: packets only complete at their end
        verdicts += packets.feed(stream[i : i + 1])
    assert [v.packet for v in verdicts] == [
        _connect("0123456789ABCDEF"),
        _publish("a/b", b"x" * 300, qos=1),
        b"\xc0\x00",
    ]
    assert all(v.forward for v in verdicts)
    assert packets.client_id == "0123456789ABCDEF"


def test_filter_drops_only_non_retained_qos0_qos1_publishes_and_acks_qos1() -> None:
    policy = FaultPolicy(loss=0.999_999, acked_loss=0.999_999)
    packets = PacketFilter(policy, random.Random(2), upstream=True)
    q1 = _publish("d", b"1", qos=1, pid=0x1234)
    q0 = _publish("d", b"0", qos=0)
    kept = [
        _connect("c"),
        _publish("s", b"r", qos=1, retain=True),
        b"\xc0\x00",
        b"\x40\x02\x00\x07",
    ]
    verdicts = packets.feed(q1 + q0 + b"".join(kept))
    assert [v.forward for v in verdicts] == [False, False, True, True, True, True]
    assert verdicts[0].reply == b"\x40\x02\x12\x34"  # PUBACK for the lost QoS 1 message
    assert verdicts[1].reply == b""
    assert packets.stats.dropped == 2
    assert packets.stats.publishes == 3


def test_link_loss_takes_qos0_messages_only_and_acked_loss_qos1_ones() -> None:
    # a lossy link loses at-most-once messages; a QoS 1 one survives it (TCP, the session):
    # only a broker that acknowledged and then lost it loses it (acked_loss)
    q0, q1 = _publish("d", b"0", qos=0), _publish("d", b"1", qos=1, pid=9)
    link = PacketFilter(FaultPolicy(loss=0.999_999), random.Random(2), upstream=True)
    assert [v.forward for v in link.feed(q0 + q1)] == [False, True]
    broker = PacketFilter(FaultPolicy(acked_loss=0.999_999), random.Random(2), upstream=True)
    assert [v.forward for v in broker.feed(q0 + q1)] == [True, False]


def test_filter_loss_is_seeded_and_near_its_rate() -> None:
    def run(seed: int) -> list[bool]:
        packets = PacketFilter(FaultPolicy(loss=0.05), random.Random(seed), upstream=False)
        return [v.forward for v in packets.feed(_publish("t", b"p", qos=0) * 20_000)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert 0.04 < first.count(False) / len(first) < 0.06


def test_filter_refuses_what_is_not_mqtt() -> None:
    packets = PacketFilter(FaultPolicy(), random.Random(0), upstream=True)
    with pytest.raises(MqttFramingError):
        packets.feed(b"\x30\xff\xff\xff\xff\x01")


def test_round_trip_samples_stay_bounded_past_the_limit() -> None:
    from loadtest.faultproxy import MAX_RTT_SAMPLES

    proxy = FaultProxy(("127.0.0.1", 1), seed=1)
    for n in range(3 * MAX_RTT_SAMPLES):
        proxy.record_round_trip(float(n))
    kept = proxy.take_round_trips()
    assert len(kept) == MAX_RTT_SAMPLES
    # a reservoir: the later two thirds of the samples hold about two thirds of the places
    late = sum(1 for x in kept if x >= MAX_RTT_SAMPLES)
    assert 0.6 < late / MAX_RTT_SAMPLES < 0.73
    assert proxy.take_round_trips() == []
    proxy.record_round_trip(0.5)
    assert proxy.take_round_trips() == [0.5]


def test_policy_bounds() -> None:
    with pytest.raises(ValueError, match="loss"):
        FaultPolicy(loss=1.0)
    with pytest.raises(ValueError, match="negative"):
        FaultPolicy(latency=-1)


# ----------------------------------------------------------------------------- real broker


class Inbox:
    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.arrived: list[float] = []
        self._changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.payloads.append(payload)
        self.arrived.append(time.monotonic())
        self._changed.set()

    async def wait_for(self, count: int, within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            while len(self.payloads) < count:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def client(port: int, client_id: str, **settings: object) -> AsyncIterator[MqttClient]:
    mqtt = create_client(
        "gmqtt",
        MqttSettings(
            client_id=client_id,
            port=port,
            reconnect_min=0.05,
            reconnect_max=0.3,
            connect_timeout=5.0,
            **settings,  # type: ignore[arg-type]
        ),
    )
    await mqtt.connect()
    try:
        yield mqtt
    finally:
        await mqtt.disconnect()


@asynccontextmanager
async def pair(
    broker: MosquittoBroker,
    proxy: FaultProxy | ProxyProcess,
    topic: str = "lt/t",
    **settings: object,
) -> AsyncIterator[tuple[MqttClient, Inbox]]:
    """A publisher through the proxy, a subscriber straight on the broker."""
    inbox = Inbox()
    async with (
        client(broker.port, "direct-sub") as sub,
        client(proxy.port, "hub-1", **settings) as pub,
    ):
        sub.set_message_handler(inbox)
        await sub.subscribe(topic, 1)
        yield pub, inbox


@pytest.mark.broker
async def test_clean_relay_delivers_everything_in_order(broker: MosquittoBroker) -> None:
    async with FaultProxy((broker.host, broker.port)) as proxy, pair(broker, proxy) as (pub, inbox):
        for n in range(500):
            pub.publish("lt/t", n.to_bytes(4, "big") + b"x" * 1024, 1)
        await inbox.wait_for(500)
        assert [int.from_bytes(p[:4], "big") for p in inbox.payloads] == list(range(500))
        assert [c.client_id for c in proxy.connections] == ["hub-1"]


@pytest.mark.broker
async def test_loss_drops_about_its_share_and_the_session_survives(broker: MosquittoBroker) -> None:
    policy = FaultPolicy(acked_loss=0.2)
    async with (
        FaultProxy((broker.host, broker.port), policy, seed=3) as proxy,
        pair(broker, proxy) as (pub, inbox),
    ):
        for n in range(1000):
            pub.publish("lt/t", n.to_bytes(4, "big"), 1)
        await eventually(lambda: pub.inflight == 0)  # each QoS 1 acked (by broker or proxy)
        dropped = proxy.totals().dropped
        await inbox.wait_for(1000 - dropped)
        await asyncio.sleep(0.2)
        assert len(inbox.payloads) == 1000 - dropped
        assert 120 < dropped < 280
        # a retained message is never dropped: the session's state stays whole
        for n in range(50):
            pub.publish("lt/t", b"r%d" % n, 1, True)
        await inbox.wait_for(1050 - dropped)


@pytest.mark.broker
async def test_latency_delays_each_packet(broker: MosquittoBroker) -> None:
    async with FaultProxy((broker.host, broker.port)) as proxy, pair(broker, proxy) as (pub, inbox):
        proxy.set_policy(FaultPolicy(latency=0.3))
        sent = time.monotonic()
        pub.publish("lt/t", b"slow", 1)
        await inbox.wait_for(1)
        assert inbox.arrived[0] - sent >= 0.29


@pytest.mark.broker
async def test_round_trips_are_measured_from_a_publish_to_the_hub_to_its_answer(
    broker: MosquittoBroker,
) -> None:
    """An echoing "hub" behind the proxy, 0.1 s latency each way: every round trip >= 0.2 s."""
    policy = FaultPolicy(latency=0.1)
    async with (
        FaultProxy((broker.host, broker.port), policy) as proxy,
        client(proxy.port, "hub-echo") as hub,
        client(broker.port, "sender") as sender,
    ):
        answers = Inbox()
        sender.set_message_handler(answers)
        await sender.subscribe("lt/up", 1)
        hub.set_message_handler(lambda topic, payload, retain: hub.publish("lt/up", payload, 1))
        await hub.subscribe("lt/down", 1)
        assert proxy.take_round_trips() == []
        for n in range(5):
            sender.publish("lt/down", b"%d" % n, 1)
            await answers.wait_for(n + 1)
        samples = proxy.take_round_trips()
        assert len(samples) == 5
        assert all(0.2 <= s < 2.0 for s in samples)
        assert proxy.take_round_trips() == []


@pytest.mark.broker
async def test_bandwidth_caps_bytes_per_second(broker: MosquittoBroker) -> None:
    async with FaultProxy((broker.host, broker.port)) as proxy, pair(broker, proxy) as (pub, inbox):
        proxy.set_policy(FaultPolicy(bandwidth=100_000))  # 100 kB/s
        began = time.monotonic()
        for _ in range(50):
            pub.publish("lt/t", b"x" * 4000, 0)  # 200 kB: two seconds at the cap
        await inbox.wait_for(50)
        assert time.monotonic() - began >= 1.8


@pytest.mark.broker
async def test_cut_closes_both_sides_and_the_client_reconnects(broker: MosquittoBroker) -> None:
    async with FaultProxy((broker.host, broker.port)) as proxy, pair(broker, proxy) as (pub, inbox):
        downs: list[bool] = []
        pub.set_connection_handler(downs.append)
        assert proxy.cut(["hub-1"]) == 1
        assert proxy.cut(["someone-else"]) == 0
        await eventually(lambda: downs[-2:] == [False, True])
        pub.publish("lt/t", b"after", 1)
        await inbox.wait_for(1)


@pytest.mark.broker
async def test_half_open_forwards_nothing_until_resumed(broker: MosquittoBroker) -> None:
    async with FaultProxy((broker.host, broker.port)) as proxy, pair(broker, proxy) as (pub, inbox):
        downs: list[bool] = []
        pub.set_connection_handler(downs.append)
        assert proxy.hang(["hub-1"]) == 1
        pub.publish("lt/t", b"lost-while-hung", 0)
        await asyncio.sleep(0.5)
        assert inbox.payloads == []
        assert downs == []  # nothing closed: the client cannot tell yet
        proxy.hang(["hub-1"], hung=False)
        pub.publish("lt/t", b"after", 0)
        await inbox.wait_for(1)
        assert inbox.payloads == [b"after"]


@pytest.mark.broker
async def test_a_hung_hub_that_reconnects_stays_hung(broker: MosquittoBroker) -> None:
    async with (
        FaultProxy((broker.host, broker.port)) as proxy,
        pair(broker, proxy, keepalive=1) as (pub, inbox),
    ):
        downs: list[bool] = []
        pub.set_connection_handler(downs.append)
        proxy.hang(["hub-1"])
        # keep-alive 1 s: the client's own ping timeout finds the link dead, and reconnects
        await eventually(lambda: False in downs)
        await asyncio.sleep(1.0)
        assert not pub.connected  # its new CONNECT went into the void too
        proxy.hang(["hub-1"], hung=False)
        proxy.cut(["hub-1"])
        await eventually(lambda: pub.connected)
        pub.publish("lt/t", b"back", 1)
        await inbox.wait_for(1)


@pytest.mark.broker
async def test_the_proxy_in_its_own_process_obeys_the_same_controls(
    broker: MosquittoBroker,
) -> None:
    proxy = ProxyProcess((broker.host, broker.port), FaultPolicy(loss=0.2), seed=5)
    await proxy.start()
    try:
        assert proxy.pid is not None
        async with pair(broker, proxy) as (pub, inbox):
            for n in range(500):
                pub.publish("lt/t", n.to_bytes(4, "big"), 0)
            await asyncio.sleep(1.0)
            totals = await proxy.totals()
            assert 50 < totals.dropped < 150
            assert len(inbox.payloads) == 500 - totals.dropped
            await proxy.set_policy(FaultPolicy())
            downs: list[bool] = []
            pub.set_connection_handler(downs.append)
            assert await proxy.cut(["hub-1"]) == 1
            await eventually(lambda: downs[-2:] == [False, True])
            assert await proxy.hang(["hub-1"]) == 1
            pub.publish("lt/t", b"void", 0)
            await asyncio.sleep(0.3)
            assert b"void" not in inbox.payloads
            await proxy.hang(["hub-1"], hung=False)
            pub.publish("lt/t", b"seen", 0)
            await eventually(lambda: b"seen" in inbox.payloads)
            assert isinstance(await proxy.take_round_trips(), list)
    finally:
        await proxy.close()
    assert proxy.pid is None
