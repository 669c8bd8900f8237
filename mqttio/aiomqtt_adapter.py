"""aiomqtt adapter: the idiomatic asyncio client (aiomqtt 2.5 on paho-mqtt 2.2).

aiomqtt owns the connection life cycle here: connect (CONNACK), subscribe (SUBACK), the socket
callbacks that drive paho from the event loop, keepalive, and the clean DISCONNECT. Two things
its public API cannot do go straight to the paho client it wraps (``aiomqtt.Client._client``):

* a non-blocking ``publish``: ``aiomqtt.Client.publish`` is a coroutine that waits for the
  PUBACK, so a bulk sender would need one task per message and would hit aiomqtt's warning on
  more than ``pending_calls_threshold`` (10) pending calls. paho's ``publish`` queues the packet
  and returns; its ``on_publish`` (QoS 0: written to the socket; QoS 1: PUBACK received) feeds
  the in-flight count that :meth:`AiomqttClient.drain` waits on.
* a synchronous message handler: aiomqtt copies each message into an ``asyncio.Queue`` and its
  iterator creates a task per message. paho's ``on_message`` already runs on the event loop
  (aiomqtt calls ``loop_read`` from an ``add_reader`` callback), so the handler is called there.

Losses are detected through the public ``Client.messages`` iterator, which raises ``MqttError``
when the connection drops. Each connection uses a fresh ``aiomqtt.Client``.
TCP_NODELAY goes in through ``socket_options`` (paho does not set it: 88 ms per round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError as AiomqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from mqttio.inbound import DroppedPacket
from mqttio.interface import (
    HARD_INFLIGHT_LIMIT,
    InflightLimitError,
    MqttClient,
    MqttConnectError,
    MqttError,
    MqttSettings,
    NotConnected,
    validate_topic_name,
)

__all__ = ["AiomqttClient"]

log = logging.getLogger("mqttio.aiomqtt")

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
_V5_TO_V311_CONNACK = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


def _code(value: Any) -> int:
    return int(value.value) if isinstance(value, ReasonCode) else int(value)


def _direct_socket_callbacks(
    aclient: aiomqtt.Client, client: paho.Client, loop: asyncio.AbstractEventLoop
) -> None:
    """Once connected, register paho's socket writes with the loop synchronously.

    aiomqtt defers ``add_writer`` through ``call_soon_threadsafe`` (paho may call from the
    connect thread) and its ``on_socket_close`` removes only the reader. Under load a broker
    restart then leaves a write registration on a closed descriptor, or a deferred ``add_writer``
    lands after the close; uvloop keeps a closed poll handle for that descriptor number, the next
    connection gets the same number, and it is never read again: paho stays "connected" until
    keepalive gives up (RuntimeError "UVPoll closed" in the log; otad silent for 30-60 s).
    After CONNACK every paho callback runs on the loop thread, so do it directly, and drop the
    writer before the socket closes. Should uvloop still refuse the registration (a closed
    handle of the number, "unable to perform operation on <UVPoll closed=True>"), it is dropped
    and made again, and if that fails too the connection counts as lost (the supervisor
    reconnects at once) instead of the error reaching whoever published.
    """
    on_close = client.on_socket_close

    def register_write(c: paho.Client, userdata: Any, sock: Any) -> None:
        def writable() -> None:
            try:
                c.loop_write()
            except Exception as exc:
                if not aclient._disconnected.done():
                    aclient._disconnected.set_exception(exc)

        fileno = sock.fileno()
        try:
            loop.add_writer(fileno, writable)
        except RuntimeError:  # uvloop's closed poll handle of an earlier socket of this number
            try:
                loop.remove_writer(fileno)
                loop.add_writer(fileno, writable)
            except RuntimeError as exc:  # the socket cannot be written: the connection is lost
                if not aclient._disconnected.done():
                    aclient._disconnected.set_exception(exc)

    def unregister_write(c: paho.Client, userdata: Any, sock: Any) -> None:
        loop.remove_writer(sock.fileno())

    def socket_close(c: paho.Client, userdata: Any, sock: Any) -> None:
        fileno = sock.fileno()
        if fileno > -1:
            loop.remove_writer(fileno)
        if on_close is not None:
            on_close(c, userdata, sock)

    client.on_socket_register_write = register_write
    client.on_socket_unregister_write = unregister_write
    client.on_socket_close = socket_close


#: Bytes of a dropped packet skipped per call from paho's read (then the loop runs again).
_SKIP_PER_TURN = 16 * 64 * 1024
#: Bytes of a dropped PUBLISH's body kept for its topic and packet id (2 + 65,535 + 2 at most).
_PUBLISH_PREFIX = 2 + 65_535 + 2


def _fresh_in_packet() -> dict[str, Any]:
    """paho's state of the packet being read, as it resets it after each (client.py)."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


def _bound_packets(
    client: paho.Client, max_packet: int, on_dropped: Callable[[DroppedPacket], None]
) -> None:
    """Skip packets above ``max_packet`` before paho reads their body (:mod:`mqttio.inbound`).

    paho reads a packet's fixed header one byte at a time, then asks ``_sock_recv`` for the
    body: at that first ask the size is known and nothing of the body read. A body too large is
    then read here and thrown away, a bounded amount per call (``BlockingIOError`` tells paho
    to come back on the next readable event), its first bytes kept for a PUBLISH's topic and
    packet id; at its end paho's packet state is reset and ``on_dropped`` told."""
    recv = client._sock_recv
    skipping: dict[str, Any] = {}

    def guarded_recv(bufsize: int) -> bytes:
        packet = client._in_packet
        if not packet["have_remaining"] or packet["to_process"] <= 0:
            return recv(bufsize)
        size = 1 + len(packet["remaining_count"]) + packet["remaining_length"]
        if size <= max_packet:
            return recv(bufsize)
        if skipping.get("packet") is not packet:
            skipping.clear()
            skipping.update(packet=packet, prefix=bytearray(), size=size)
        prefix: bytearray = skipping["prefix"]
        budget = _SKIP_PER_TURN
        while packet["to_process"] > 0 and budget > 0:
            data = recv(min(packet["to_process"], 64 * 1024))  # BlockingIOError: come back
            if not data:
                return data  # the connection closed: paho reports the loss
            if len(prefix) < _PUBLISH_PREFIX:
                prefix += data[: _PUBLISH_PREFIX - len(prefix)]
            packet["to_process"] -= len(data)
            budget -= len(data)
        if packet["to_process"] <= 0:
            client._in_packet = cast(Any, _fresh_in_packet())
            skipping.clear()
            on_dropped(_dropped_packet(packet["command"], size, prefix))
        raise BlockingIOError

    client._sock_recv = guarded_recv  # type: ignore[method-assign]


def _dropped_packet(command: int, size: int, prefix: bytes | bytearray) -> DroppedPacket:
    packet_type, qos = command >> 4, (command >> 1) & 0x03
    topic: str | None = None
    packet_id: int | None = None
    if packet_type == 3 and len(prefix) >= 2:
        name_len = int.from_bytes(prefix[:2], "big")
        if len(prefix) >= 2 + name_len:
            topic = bytes(prefix[2 : 2 + name_len]).decode("utf-8", "replace")
            if qos and len(prefix) >= 4 + name_len:
                packet_id = int.from_bytes(prefix[2 + name_len : 4 + name_len], "big")
    return DroppedPacket(packet_type, size, qos if packet_type == 3 else 0, topic, packet_id)


class AiomqttClient(MqttClient):
    """:class:`~mqttio.interface.MqttClient` on aiomqtt/paho (MQTT 3.1.1)."""

    library = "aiomqtt"

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self._aclient: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._lost: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._established = False
        self._pending = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._low_water = max(0, settings.max_inflight // 2)

    # ------------------------------------------------------------------ hot path

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """See :meth:`MqttClient.publish`."""
        client = self._paho
        if not self._connected or client is None:
            raise NotConnected(f"{self.settings.client_id}: not connected")
        if self._pending >= HARD_INFLIGHT_LIMIT:
            raise InflightLimitError(f"{HARD_INFLIGHT_LIMIT} messages outstanding")
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic) > 16383:
            validate_topic_name(topic)
        self._pending += 1
        info = client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._pending -= 1
            if info.rc == paho.MQTT_ERR_NO_CONN:
                raise NotConnected(f"{self.settings.client_id}: not connected")
            raise MqttError(f"publish failed: {paho.error_string(info.rc)}")

    @property
    def inflight(self) -> int:
        """Messages handed to paho and not yet completed (QoS 0: not yet written to the socket;
        QoS 1: not yet acknowledged by the broker)."""
        return self._pending

    async def drain(self) -> None:
        """See :meth:`MqttClient.drain`."""
        while True:
            if not self._connected or self._paho is None:
                raise NotConnected(f"{self.settings.client_id}: not connected")
            if self._pending < self.settings.max_inflight:
                return
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def socket_fileno(self) -> int | None:
        """See :meth:`MqttClient.socket_fileno`."""
        client = self._paho
        sock = None if client is None else client.socket()
        return None if sock is None else int(sock.fileno())

    # ------------------------------------------------------------------ paho callbacks

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = bytes(message._topic).decode("utf-8", "replace")
        payload = message.payload
        if type(payload) is not bytes:
            payload = bytes(payload)
        try:
            self._message_handler(topic, payload, bool(message.retain))
        except Exception:
            self._deliver_error(topic)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if client is not self._paho:
            return
        self._pending -= 1
        waiter = self._drain_waiter
        if waiter is not None and self._pending <= self._low_water:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail_waiters(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(NotConnected("connection lost while draining"))

    async def _watch(self, aclient: aiomqtt.Client, lost: asyncio.Event) -> None:
        """Wait for aiomqtt to report the loss of this connection (its message iterator raises
        MqttError; no message ever enters its queue, ``on_message`` is ours)."""
        try:
            async for _ in aclient.messages:
                pass
        except aiomqtt.MqttError:
            pass
        finally:
            lost.set()
            if aclient is self._aclient:
                self._connected = False
                self._fail_waiters()

    def _dropped(self, packet: DroppedPacket) -> None:
        """A packet above ``max_packet`` was skipped: count and log it, and acknowledge a
        QoS 1 PUBLISH so the broker frees its in-flight slot."""
        self._packet_dropped(packet)
        client = self._paho
        if packet.qos == 1 and packet.packet_id is not None and client is not None:
            client._send_puback(packet.packet_id)

    # ------------------------------------------------------------------ link primitives

    async def _open(self) -> None:
        s = self.settings
        will = None
        if s.will is not None:
            will = aiomqtt.Will(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
        try:
            tls_context = s.ssl_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise MqttConnectError(f"TLS set-up: {exc}", tls=True) from None
        aclient = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=s.clean_session,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            max_inflight_messages=HARD_INFLIGHT_LIMIT,
            tls_context=tls_context,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        aclient.pending_calls_threshold = HARD_INFLIGHT_LIMIT
        client = aclient._client
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._aclient, self._paho, self._pending = aclient, client, 0
        self._established = False
        try:
            await aclient.__aenter__()
        except AiomqttConnectError as exc:
            await self._close(clean=False)
            code = None if exc.rc is None else _code(exc.rc)
            code = _V5_TO_V311_CONNACK.get(code, code) if code is not None else None
            raise MqttConnectError(f"refused: {exc}", code) from None
        except aiomqtt.MqttError as exc:
            await self._close(clean=False)
            if isinstance(exc.__context__, ssl.SSLError):  # aiomqtt raises "from None"
                raise MqttConnectError(
                    f"{s.host}:{s.port}: TLS handshake failed: {exc}", tls=True
                ) from None
            raise MqttConnectError(f"{s.host}:{s.port} unreachable: {exc}") from None
        except BaseException:
            await self._close(clean=False)
            raise
        self._established = True
        _direct_socket_callbacks(aclient, client, asyncio.get_running_loop())
        if s.max_packet is not None:
            _bound_packets(client, s.max_packet, self._dropped)
        self._lost = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(aclient, self._lost), name=f"mqtt-watch-{s.client_id}"
        )

    async def _subscribe_many(self, items: list[tuple[str, int]]) -> list[int]:
        aclient, lost = self._aclient, self._lost
        if aclient is None or lost is None or lost.is_set():
            raise NotConnected(f"{self.settings.client_id}: not connected")
        subscribing = asyncio.ensure_future(
            aclient.subscribe(items, timeout=self.settings.connect_timeout)
        )
        losing = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({subscribing, losing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            losing.cancel()
            if not subscribing.done():
                subscribing.cancel()
        if not subscribing.done() or subscribing.cancelled():
            raise NotConnected(f"{self.settings.client_id}: connection lost before SUBACK")
        try:
            codes = subscribing.result()
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{self.settings.client_id}: subscribe failed: {exc}") from None
        return [_code(code) for code in codes]

    async def _wait_lost(self) -> None:
        lost = self._lost
        if lost is not None:
            await lost.wait()

    async def _close(self, *, clean: bool) -> None:
        aclient, self._aclient = self._aclient, None
        client, self._paho = self._paho, None
        watcher, self._watcher = self._watcher, None
        lost, self._lost = self._lost, None
        established, self._established = self._established, False
        self._pending = 0
        self._fail_waiters()
        if aclient is None or client is None:
            return
        if clean and established and lost is not None and not lost.is_set():
            try:
                await aclient.__aexit__(None, None, None)
            except (aiomqtt.MqttError, OSError) as exc:
                log.debug("%s: unclean disconnect: %r", self.settings.client_id, exc)
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if lost is not None:
            lost.set()
        # Whatever state paho is in, release the socket and its event-loop registrations.
        if client.socket() is not None:
            with contextlib.suppress(OSError):
                client._sock_close()
