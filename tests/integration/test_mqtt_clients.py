"""Both MQTT adapters against a real Mosquitto: the contract of mqttio.interface."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from loadtest.broker import MosquittoBroker, free_port
from mqttio import (
    MqttClient,
    MqttConnectError,
    MqttSettings,
    NotConnected,
    Will,
    create_client,
)

pytestmark = pytest.mark.broker

WAIT = 10.0  # generous upper bound for anything that should take milliseconds


class Inbox:
    """A message handler that records (topic, payload, retain) and lets a test wait for them."""

    def __init__(self, fail_on: Callable[[str], bool] = lambda topic: False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.calls = 0
        self._fail_on = fail_on
        self._changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.calls += 1
        self._changed.set()
        if self._fail_on(topic):
            raise RuntimeError(f"handler fails on {topic[:40]}")
        self.messages.append((topic, payload, retain))

    async def wait_for(self, count: int, within: float = WAIT) -> list[tuple[str, bytes, bool]]:
        async with asyncio.timeout(within):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.messages]


def settings_for(broker: MosquittoBroker, client_id: str, **overrides: Any) -> MqttSettings:
    return MqttSettings(
        client_id=client_id,
        host=broker.host,
        port=broker.port,
        reconnect_min=0.05,
        reconnect_max=0.5,
        connect_timeout=5.0,
        **overrides,
    )


@asynccontextmanager
async def connected(
    library: str,
    broker: MosquittoBroker,
    client_id: str,
    *,
    handler: Callable[[str, bytes, bool], None] | None = None,
    subscribe: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[MqttClient]:
    client = create_client(library, settings_for(broker, client_id, **overrides))
    if handler is not None:
        client.set_message_handler(handler)
    await client.connect(fail_fast=True)
    try:
        for topic in subscribe:
            await client.subscribe(topic, 1)
        yield client
    finally:
        await client.disconnect()


async def until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(0.005)


async def settle(client: MqttClient) -> None:
    """Wait until every QoS 1 message the client sent was acknowledged by the broker."""
    await until(lambda: client.inflight == 0)


def nodelay_of(client: MqttClient) -> int:
    fileno = client.socket_fileno()
    assert fileno is not None
    with socket.socket(fileno=os.dup(fileno)) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def cut(client: MqttClient) -> None:
    """Drop the client's TCP connection without an MQTT DISCONNECT (a power cut)."""
    fileno = client.socket_fileno()
    assert fileno is not None
    with socket.socket(fileno=os.dup(fileno)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- tests


async def test_publish_subscribe_qos0_and_qos1(mqtt_library: str, broker: MosquittoBroker) -> None:
    inbox = Inbox()
    async with (
        connected(mqtt_library, broker, "sub", handler=inbox, subscribe=("t/#",)) as sub,
        connected(mqtt_library, broker, "pub") as pub,
    ):
        assert sub.connected
        assert pub.connected
        pub.publish("t/zero", b"q0", qos=0)
        pub.publish("t/one", b"q1" * 100, qos=1)
        got = await inbox.wait_for(2)
        assert sorted(got) == [("t/one", b"q1" * 100, False), ("t/zero", b"q0", False)]
        await settle(pub)
        assert pub.inflight == 0


async def test_a_publisher_bound_to_a_topic_sends_every_length_in_order(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    """qos0_publisher: payloads of more lengths than the gmqtt adapter keeps framed headers for
    (QOS0_HEADS), across the 127 and 16,383-byte boundaries of the remaining length, arrive
    intact and in order; a bad topic is refused at once; disconnected, it raises NotConnected."""
    inbox = Inbox()
    lengths = [0, 1, 50, 94, 95, 96, 200, 1024, 1100, 16350, 16351, 16352, 70_000, 1, 1024, 0]
    async with (
        connected(mqtt_library, broker, "sub", handler=inbox, subscribe=("b/#",)) as sub,
        connected(mqtt_library, broker, "pub") as pub,
    ):
        assert sub.connected
        with pytest.raises(ValueError):
            pub.qos0_publisher("b/+")
        send = pub.qos0_publisher("b/00112233AABBCCDD/down")
        payloads = [bytes((i + n) % 251 for n in range(length)) for i, length in enumerate(lengths)]
        for payload in payloads:
            send(payload)
        got = await inbox.wait_for(len(payloads))
        assert got == [("b/00112233AABBCCDD/down", p, False) for p in payloads]
        lost = asyncio.Event()
        pub.set_connection_handler(lambda up: None if up else lost.set())
        broker.kill()
        await asyncio.wait_for(lost.wait(), WAIT)
        with pytest.raises(NotConnected):
            send(b"nowhere")
        broker.start()


async def test_retained_message_reaches_a_late_subscriber(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    async with connected(mqtt_library, broker, "pub") as pub:
        pub.publish("r/state", b"kept", qos=1, retain=True)
        await settle(pub)
        inbox = Inbox()
        async with connected(mqtt_library, broker, "late", handler=inbox, subscribe=("r/+",)):
            assert await inbox.wait_for(1) == [("r/state", b"kept", True)]
            pub.publish("r/state", b"live", qos=1, retain=True)
            got = await inbox.wait_for(2)
            assert got[1] == ("r/state", b"live", False)  # live delivery: retain flag clear


async def test_last_will_on_a_cut_connection_but_not_on_a_clean_disconnect(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    inbox = Inbox()
    async with connected(mqtt_library, broker, "watch", handler=inbox, subscribe=("will/#",)):
        clean = create_client(
            mqtt_library,
            settings_for(broker, "clean", will=Will("will/clean", b"clean died")),
        )
        await clean.connect(fail_fast=True)
        await clean.disconnect()

        events: list[bool] = []
        victim = create_client(
            mqtt_library,
            settings_for(broker, "victim", will=Will("will/victim", b"victim died", 1, True)),
        )
        victim.set_connection_handler(events.append)
        await victim.connect(fail_fast=True)
        assert events == [True]
        cut(victim)
        got = await inbox.wait_for(1)
        assert got == [("will/victim", b"victim died", False)]
        await until(lambda: events == [True, False, True])  # and it comes back by itself
        assert victim.connected
        assert victim.reconnects == 1
        await victim.disconnect()
        await asyncio.sleep(0.3)
        assert inbox.topics() == ["will/victim"]  # never will/clean

    # the will was retained: a newcomer sees it
    late = Inbox()
    async with connected(mqtt_library, broker, "late", handler=late, subscribe=("will/#",)):
        assert await late.wait_for(1) == [("will/victim", b"victim died", True)]


async def test_reconnect_after_broker_restart_restores_subscriptions(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    inbox = Inbox()
    events: list[bool] = []
    async with connected(mqtt_library, broker, "sub", handler=inbox) as sub:
        sub.set_connection_handler(events.append)
        await sub.subscribe("re/#", 1)
        for hard, expected in ((False, 1), (True, 2)):
            broker.restart(hard=hard)  # same port; a fresh broker knows no subscription
            await until(lambda n=expected: events == [False, True] * n)  # type: ignore[misc]
            assert sub.connected
            assert sub.reconnects == expected
            async with connected(mqtt_library, broker, f"pub{expected}") as pub:
                pub.publish("re/after", str(expected).encode(), qos=1)
                await inbox.wait_for(expected)
        assert inbox.messages == [("re/after", b"1", False), ("re/after", b"2", False)]


async def test_publish_and_drain_refuse_while_disconnected(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    events: list[bool] = []
    client = create_client(mqtt_library, settings_for(broker, "lonely"))
    client.set_connection_handler(events.append)
    await client.connect(fail_fast=True)
    try:
        broker.kill()
        await until(lambda: events == [True, False])
        assert not client.connected
        with pytest.raises(NotConnected):
            client.publish("x/y", b"nowhere", qos=1)
        with pytest.raises(NotConnected):
            await client.drain()
        await client.subscribe("later/#", 1)  # remembered only; sent on reconnect
        await asyncio.sleep(0.3)  # a few failed attempts against the dead port
        broker.start()
        await until(lambda: events == [True, False, True])
        inbox = Inbox()
        client.set_message_handler(inbox)
        client.publish("later/x", b"back", qos=1)
        assert await inbox.wait_for(1) == [("later/x", b"back", False)]
    finally:
        await client.disconnect()


async def test_burst_of_1000_qos1_messages_with_drain_arrives_complete(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    inbox = Inbox()
    async with (
        connected(mqtt_library, broker, "sink", handler=inbox, subscribe=("burst/#",)),
        connected(mqtt_library, broker, "source", max_inflight=50) as source,
    ):
        peak = 0
        for i in range(1000):
            await source.drain()
            source.publish("burst/data", i.to_bytes(4, "big") + bytes(1020), qos=1)
            peak = max(peak, source.inflight)
        assert 0 < peak <= 50
        got = await inbox.wait_for(1000)
        assert [int.from_bytes(payload[:4], "big") for _, payload, _ in got] == list(range(1000))
        assert all(len(payload) == 1024 for _, payload, _ in got)


async def test_tcp_nodelay_is_set(mqtt_library: str, broker: MosquittoBroker) -> None:
    async with connected(mqtt_library, broker, "nodelay") as client:
        assert nodelay_of(client) != 0


async def test_odd_topics_and_a_failing_handler_do_not_break_the_receive_loop(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    inbox = Inbox(fail_on=lambda topic: topic.startswith("boom"))
    odd = [
        "boom/first",
        "odd/" + "x" * 30_000,
        "odd/ünïcödé/空白 with spaces",
        "odd//empty/level",
        "/leading/slash",
        "boom/again",
        "odd/$notsys",
    ]
    async with (
        connected(mqtt_library, broker, "sink", handler=inbox, subscribe=("#",)) as sink,
        connected(mqtt_library, broker, "source") as source,
    ):
        for topic in odd:
            source.publish(topic, b"?", qos=1)
        source.publish("odd/big", bytes(2 * 1024 * 1024), qos=1)
        source.publish("odd/empty-payload", b"", qos=0)
        with pytest.raises(ValueError):
            source.publish("odd/+/wildcard", b"refused locally", qos=1)
        with pytest.raises(ValueError):
            await sink.subscribe("bad/#/filter", 1)
        source.publish("odd/end", b"end", qos=1)
        got = await inbox.wait_for(len(odd) - 2 + 3)
        assert inbox.calls == len(odd) + 3
        assert inbox.topics() == [t for t in odd if not t.startswith("boom")] + [
            "odd/big",
            "odd/empty-payload",
            "odd/end",
        ]
        assert got[-3][1] == bytes(2 * 1024 * 1024)
        assert got[-2][1] == b""
        assert sink.connected
        assert source.connected
        assert sink.reconnects == 0
        assert source.reconnects == 0


async def test_fail_fast_connect_raises_typed_errors(mqtt_library: str, tmp_path: Path) -> None:
    unreachable = create_client(
        mqtt_library, MqttSettings(client_id="nobody", port=free_port(), connect_timeout=2.0)
    )
    with pytest.raises(MqttConnectError) as caught:
        await unreachable.connect(fail_fast=True)
    assert caught.value.return_code is None
    assert not unreachable.connected

    with MosquittoBroker(workdir=tmp_path / "closed", allow_anonymous=False) as closed:
        refused = create_client(mqtt_library, settings_for(closed, "anon"))
        with pytest.raises(MqttConnectError) as caught:
            await refused.connect(fail_fast=True)
        assert caught.value.return_code == 5
        assert caught.value.permanent


async def test_connect_without_fail_fast_waits_for_the_broker(
    mqtt_library: str, broker: MosquittoBroker
) -> None:
    broker.stop()
    client = create_client(mqtt_library, settings_for(broker, "patient"))
    inbox = Inbox()
    client.set_message_handler(inbox)
    await client.subscribe("p/#", 1)  # before connect: sent with the first CONNECT
    asyncio.get_running_loop().call_later(0.4, broker.start)
    async with asyncio.timeout(WAIT):
        await client.connect()
    try:
        assert client.connected
        client.publish("p/q", b"x", qos=1)
        assert await inbox.wait_for(1) == [("p/q", b"x", False)]
    finally:
        await client.disconnect()


def test_round_trip_on_uvloop(mqtt_library: str, broker: MosquittoBroker) -> None:
    """The daemon runs on uvloop (its transports differ from asyncio's): same contract."""

    async def main() -> None:
        inbox = Inbox()
        async with (
            connected(mqtt_library, broker, "uv-sub", handler=inbox, subscribe=("uv/#",)) as sub,
            connected(mqtt_library, broker, "uv-pub") as pub,
        ):
            assert nodelay_of(sub) != 0
            assert nodelay_of(pub) != 0
            for i in range(200):
                await pub.drain()
                pub.publish("uv/n", i.to_bytes(2, "big"), qos=1)
            got = await inbox.wait_for(200)
            assert [int.from_bytes(p, "big") for _, p, _ in got] == list(range(200))

    uvloop.run(main())


def _write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otad test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Path]]:
    """A broker that takes only TLS clients with a password: (broker, CA certificate)."""
    ca, cert, key = _write_tls_files(tmp_path)
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwords), "otad", "s3cret"],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin"},
    )
    with MosquittoBroker(
        workdir=tmp_path / "tls",
        allow_anonymous=False,
        extra_config=f"certfile {cert}\nkeyfile {key}\npassword_file {passwords}",
    ) as instance:
        yield instance, ca


async def test_tls_with_username_and_password(
    mqtt_library: str, tls_broker: tuple[MosquittoBroker, Path]
) -> None:
    broker, ca = tls_broker
    secure: dict[str, Any] = {"tls_ca": str(ca), "username": "otad", "password": "s3cret"}
    inbox = Inbox()
    async with (
        connected(mqtt_library, broker, "tls-sub", handler=inbox, **secure) as sub,
        connected(mqtt_library, broker, "tls-pub", **secure) as pub,
    ):
        await sub.subscribe("tls/#", 1)
        assert nodelay_of(pub) != 0
        pub.publish("tls/hello", b"over TLS", qos=1)
        assert await inbox.wait_for(1) == [("tls/hello", b"over TLS", False)]

    settings = settings_for(broker, "intruder", **secure)
    wrong = create_client(mqtt_library, dataclasses.replace(settings, password="wrong"))
    with pytest.raises(MqttConnectError) as caught:
        await wrong.connect(fail_fast=True)
    assert caught.value.permanent

    # no TLS: the broker never answers the CONNECT; the attempt times out as a typed error
    plaintext = create_client(
        mqtt_library, dataclasses.replace(settings, tls_ca=None, connect_timeout=0.5)
    )
    with pytest.raises(MqttConnectError):
        await plaintext.connect(fail_fast=True)
