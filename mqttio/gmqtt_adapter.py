"""gmqtt adapter: the fast one (~17 us of CPU per block/ack against ~170 for aiomqtt).

gmqtt 0.8 is asyncio-native and writes straight into the transport, but it has no flow control
and its built-in reconnect does not fit: fixed delay without jitter, ``clean_session=False`` on
every reconnect whatever was asked, and packet ids of messages lost with the old connection are
never freed. So each connection is a fresh, single-use gmqtt client (:class:`_Link`) whose
``reconnect`` hook only reports the loss; :class:`mqttio.interface.MqttClient` reconnects,
with backoff and jitter, and restores subscriptions.

Flow control: QoS 1 messages in flight are counted by gmqtt's own store of unacknowledged
packets (:class:`_Store`); bytes not yet written are bounded by the transport's write-buffer
high-water mark (the protocol is paused above it, as asyncio does for any stream).

Bounded reads: gmqtt's read loop takes 64 KiB from the socket and handles every packet in it in
one go; with ``MqttSettings.read_chunk`` set, :func:`_bound_read_turns` makes it take that many
bytes at a time and yield to the event loop between chunks, so event-loop lag stays bounded
however fast messages arrive (otad sets it; the virtual CHs do not). With
``MqttSettings.max_packet`` set, every read goes through :class:`mqttio.inbound.InboundFilter`:
a packet above the limit is skipped unread, and a large one is handed to gmqtt in one piece
(gmqtt's own reassembly is quadratic: an 80 MiB PUBLISH read 8 KiB at a time had not arrived
after 120 s).

Receiving QoS 0 PUBLISH packets: gmqtt hands each received packet through its connection, its
package handler and its publish handler (struct formats built per packet, two debug log calls,
``inspect.iscoroutinefunction`` on the callback) before the message reaches the adapter: 7% of
otad's samples in a profile of ``make bench``. :func:`read_packets` takes gmqtt's place in front of
its parser: a complete QoS 0 PUBLISH (MQTT 3.1.1, a non-empty topic) goes straight to the
message handler, every other packet to gmqtt's own parser, in the order they came.

Write coalescing: gmqtt writes every packet with its own ``transport.write``, i.e. one
``send()`` system call per PUBLISH and per PUBACK (about 40% of a bulk sender's CPU).
:class:`_CoalescingTransport` gathers the packets written during one event-loop iteration (at
most :data:`COALESCE_BYTES`) and writes them with one call at the end of the iteration.

gmqtt is untyped and some of what we need (the transport, the protocol) is only reachable
through its private attributes; every such access is in the ``_transport_of`` /
``_protocol_of`` helpers, checked against gmqtt 0.8.0 (pinned ``<0.9`` in pyproject).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import gmqtt
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.storage import PersistentStorage

from mqttio.inbound import DroppedPacket, InboundFilter
from mqttio.interface import (
    HARD_INFLIGHT_LIMIT,
    InflightLimitError,
    MqttClient,
    MqttConnectError,
    MqttSettings,
    NotConnected,
    validate_topic_name,
)

__all__ = ["GmqttClient"]

#: Transport write buffer above which drain() waits (low-water is a quarter of it).
WRITE_BUFFER_HIGH = 1 << 20

#: Packets gathered before they are written at once (or at the end of the loop iteration).
COALESCE_BYTES = 64 * 1024

#: Framed headers one :meth:`GmqttClient.qos0_publisher` keeps, by payload length (a transfer's
#: blocks come in a few lengths: the CBOR of the index grows at 24, 256, 65536; the last block).
QOS0_HEADS = 8


log = logging.getLogger("mqttio.gmqtt")

# gmqtt logs every connection, SUBSCRIBE and SUBACK at INFO: thousands of lines for a fleet of
# virtual hubs. Quieten it unless the application configured the "gmqtt" logger itself.
_gmqtt_logger = logging.getLogger("gmqtt")
if _gmqtt_logger.level == logging.NOTSET:
    _gmqtt_logger.setLevel(logging.WARNING)


def _not_gmqtts_reconnect_verdict(record: logging.LogRecord) -> bool:
    """gmqtt logs "... permanent, not reconnecting" at ERROR after a refusal; reconnecting is not
    gmqtt's decision here (:class:`mqttio.interface.MqttClient` logs the refusal, named)."""
    return "not reconnecting" not in str(record.msg)


logging.getLogger("gmqtt.mqtt.handler").addFilter(_not_gmqtts_reconnect_verdict)


class _Store(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of outbound QoS>0 packets awaiting their PUBACK, which tells the adapter
    each time one is released (so :meth:`GmqttClient.drain` can wake up)."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        super().__init__()
        self._on_release = on_release

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._on_release()

    def clear(self) -> None:
        super().clear()
        self._on_release()

    @property
    def count(self) -> int:
        """Packets awaiting acknowledgement. (Not ``__len__``: gmqtt tests the store with
        ``persistent_storage or PersistentStorage()``, and an empty store would be falsy.)"""
        return len(self._messages)


class _Link(gmqtt.Client):  # type: ignore[misc]
    """A gmqtt client used for exactly one connection. gmqtt calls ``reconnect`` when the
    connection drops or a CONNACK is refused; here that only records the loss."""

    def __init__(
        self,
        client_id: str,
        *,
        clean_session: bool,
        will: Any,
        store: _Store,
        on_lost: Callable[[_Link], None],
    ) -> None:
        super().__init__(
            client_id,
            clean_session=clean_session,
            will_message=will,
            persistent_storage=store,
        )
        self.store = store
        self.lost = asyncio.Event()
        self._on_lost = on_lost

    async def reconnect(self, delay: bool = False) -> None:
        """Replace gmqtt's reconnect: mark this link dead and let the adapter take over."""
        if not self.lost.is_set():
            self.lost.set()
            self._on_lost(self)


class _CoalescingTransport:
    """Stands in for gmqtt's transport: ``write`` appends to a list that is flushed with one
    ``transport.write`` at the end of the current loop iteration (or at ``COALESCE_BYTES``);
    ``close`` flushes first (so a DISCONNECT gets out); anything else goes to the transport."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= COALESCE_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._chunks:
            return
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._chunks.clear()
        self._size = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _coalesce_writes(link: _Link) -> _CoalescingTransport:
    """Route gmqtt's writes (protocol and connection) through a :class:`_CoalescingTransport`
    and return it: the adapter's own writes must take the same path, in the same order."""
    connection = link._connection
    protocol = connection._protocol
    if isinstance(connection._transport, _CoalescingTransport):
        return connection._transport
    proxy = _CoalescingTransport(connection._transport)
    connection._transport = proxy
    if protocol._transport is not None:
        protocol._transport = proxy
    return proxy


#: What gmqtt's read loop asks for at a time (``_read_loop``: ``protocol.read(65536)``).
GMQTT_READ = 64 * 1024


def _bound_read_turns(
    link: _Link,
    chunk: int | None,
    gate: InboundFilter | None,
    on_dropped: Callable[[DroppedPacket], None],
) -> None:
    """Put our reads between gmqtt's read loop and the socket.

    ``chunk``: take at most that many bytes per read and yield to the event loop after each
    (``_read_loop`` parses all it reads in one go; a read that finds the data already buffered
    does not suspend by itself). ``gate``: every read goes through the
    :class:`~mqttio.inbound.InboundFilter` first, so a packet above its limit never reaches
    gmqtt (``on_dropped`` is told), and a large one reaches it in one piece: gmqtt appends each
    read to its buffer and re-slices it after each parse, quadratic in a packet's size."""
    protocol = _protocol_of(link)
    if protocol is None or getattr(protocol, "_otad_bounded", False):
        return
    read = protocol.read
    size = chunk or GMQTT_READ

    async def bounded_read(n: int = -1) -> bytes:
        while True:
            data: bytes = await read(size if n < 0 or n > size else n)
            if gate is not None:
                data = gate.feed(data)
                if gate.dropped:
                    for packet in gate.dropped:
                        on_dropped(packet)
                    gate.dropped.clear()
            if chunk is not None:
                await asyncio.sleep(0)
            if data:
                return data
            await asyncio.sleep(0)  # all of it gathered or skipped: read on, in a later turn

    protocol.read = bounded_read
    protocol._otad_bounded = True


def read_packets(
    data: bytes, parse: Callable[[bytes], int], deliver: Callable[[str, bytes, bool], None]
) -> int:
    """gmqtt's ``MQTTProtocol._read_packet`` for MQTT 3.1.1, with its QoS 0 PUBLISH packets
    delivered here: each complete one with a non-empty topic goes to ``deliver(topic, payload,
    retain)`` (a topic that is not UTF-8 is decoded with replacement characters, as the adapter
    does for gmqtt's own deliveries), every other complete packet to gmqtt's ``parse``, in their
    order. Return what ``parse`` would: the bytes consumed (an incomplete packet at the end is
    left for the next read), or -1 for a malformed stream (gmqtt then resets the connection)."""
    n = len(data)
    i = 0
    run = 0  # start of the packets not yet handed over (gmqtt's)
    while n - i >= 2:
        first = data[i]
        byte = data[i + 1]
        length = byte & 0x7F
        head = 2
        shift = 7
        while byte & 0x80:  # remaining length: 7 bits per byte, least significant first
            if i + head >= n or head == 5:
                break  # incomplete (or malformed: gmqtt's parser says so)
            byte = data[i + head]
            length |= (byte & 0x7F) << shift
            shift += 7
            head += 1
        if byte & 0x80:
            break
        end = i + head + length
        if end > n:
            break
        if (first == 0x30 or first == 0x31) and length >= 2:  # PUBLISH, QoS 0, no DUP
            body = i + head
            name_end = body + 2 + (data[body] << 8 | data[body + 1])
            if body + 2 < name_end <= end:
                if run < i and parse(data[run:i]) == -1:
                    return -1
                deliver(data[body + 2 : name_end].decode("utf-8", "replace"),
                        data[name_end:end], first == 0x31)  # fmt: skip
                run = end
        i = end
    if run == n:
        return n
    rest = parse(data[run:] if run else data)
    return -1 if rest == -1 else run + rest


def _deliver_qos0_here(link: _Link, deliver: Callable[[str, bytes, bool], None]) -> None:
    """Put :func:`read_packets` in front of gmqtt's parser on ``link``'s protocol (MQTT 3.1.1
    only: a 5.0 PUBLISH has properties gmqtt must parse)."""
    protocol = _protocol_of(link)
    connection = getattr(link, "_connection", None)
    if protocol is None or connection is None or getattr(protocol, "_otad_qos0_here", False):
        return
    if protocol.proto_ver != MQTTv311:
        return
    parse = protocol._read_packet

    def read_packet(data: bytes) -> int:
        if connection._handler.current_connection is not connection:
            return int(parse(data))  # a superseded connection: gmqtt drops what it reads
        connection._last_data_in = time.monotonic()  # the keep-alive's input clock
        return read_packets(data, parse, deliver)

    protocol._read_packet = read_packet
    protocol._otad_qos0_here = True


def _transport_of(link: _Link) -> asyncio.Transport | None:
    # Duck-typed: uvloop's transports are not subclasses of asyncio.BaseTransport.
    transport = getattr(getattr(link, "_connection", None), "_transport", None)
    if isinstance(transport, _CoalescingTransport):
        transport = transport._transport
    return None if transport is None else cast(asyncio.Transport, transport)


def _protocol_of(link: _Link) -> Any:
    return getattr(getattr(link, "_connection", None), "_protocol", None)


def _publish_qos0(topic: str, payload: bytes, retain: bool) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet at QoS 0 (section 3.3): fixed header, topic, payload."""
    return _publish_qos0_head(topic, len(payload), retain) + payload


def _publish_qos0_head(topic: str, payload_length: int, retain: bool) -> bytes:
    """What precedes the payload in a QoS 0 PUBLISH: the fixed header and the topic name. (On
    the hot path the payload, a block, is then written as it is, not copied into a packet.)"""
    name = topic.encode()
    remaining = 2 + len(name) + payload_length
    first = 0x31 if retain else 0x30
    if remaining < 0x80:  # remaining length: 7 bits per byte, least significant first
        header = bytes((first, remaining))
    elif remaining < 0x4000:  # a block's packet: two bytes
        header = bytes((first, remaining & 0x7F | 0x80, remaining >> 7))
    else:
        encoded = bytearray((first,))
        while True:
            byte, remaining = remaining & 0x7F, remaining >> 7
            encoded.append(byte | 0x80 if remaining else byte)
            if not remaining:
                break
        header = bytes(encoded)
    return b"".join((header, len(name).to_bytes(2, "big"), name))


class GmqttClient(MqttClient):
    """:class:`~mqttio.interface.MqttClient` on gmqtt (MQTT 3.1.1)."""

    library = "gmqtt"

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self._link: _Link | None = None
        self._transport: asyncio.Transport | None = None
        self._writer: _CoalescingTransport | None = None
        self._sub_waiters: dict[int, asyncio.Future[list[int]]] = {}
        self._drain_waiter: asyncio.Future[None] | None = None
        self._low_water = max(0, settings.max_inflight // 2)

    # ------------------------------------------------------------------ hot path

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """See :meth:`MqttClient.publish`."""
        link = self._link
        writer = self._writer
        if not self._connected or link is None or writer is None or writer.is_closing():
            raise NotConnected(f"{self.settings.client_id}: not connected")
        if qos and link.store.count >= HARD_INFLIGHT_LIMIT:
            raise InflightLimitError(f"{HARD_INFLIGHT_LIMIT} QoS 1 messages unacknowledged")
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic) > 16383:
            validate_topic_name(topic)
        if qos == 0:
            # QoS 0 needs no packet id, store or retry, so frame the MQTT 3.1.1 PUBLISH here
            # (gmqtt's general path builds it through several layers: ~3x the CPU per block).
            writer.write(_publish_qos0_head(topic, len(payload), retain))
            writer.write(payload)
            return
        link.publish(topic, payload, qos=qos, retain=retain)

    @property
    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged by the broker."""
        link = self._link
        return 0 if link is None else link.store.count

    def qos0_publisher(self, topic: str) -> Callable[[bytes], None]:
        """See :meth:`MqttClient.qos0_publisher`: the packet's header and topic are framed once
        per payload length (a transfer's blocks come in a few lengths) and written before the
        payload itself."""
        validate_topic_name(topic)
        heads: dict[int, bytes] = {}

        def publish_to_topic(payload: bytes) -> None:
            writer = self._writer
            if not self._connected or writer is None or writer.is_closing():
                raise NotConnected(f"{self.settings.client_id}: not connected")
            length = len(payload)
            head = heads.get(length)
            if head is None:
                if len(heads) >= QOS0_HEADS:
                    heads.clear()
                head = heads[length] = _publish_qos0_head(topic, length, False)
            writer.write(head)
            writer.write(payload)

        return publish_to_topic

    async def drain(self) -> None:
        """See :meth:`MqttClient.drain`."""
        while True:
            link = self._link
            if not self._connected or link is None:
                raise NotConnected(f"{self.settings.client_id}: not connected")
            if link.store.count >= self.settings.max_inflight:
                if self._drain_waiter is None or self._drain_waiter.done():
                    self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
                continue
            protocol = _protocol_of(link)
            if protocol is not None and getattr(protocol, "_paused", False):
                try:
                    await protocol._drain_helper()
                except ConnectionError as exc:
                    raise NotConnected(f"{self.settings.client_id}: connection lost") from exc
                continue
            return

    def socket_fileno(self) -> int | None:
        """See :meth:`MqttClient.socket_fileno`."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return None
        sock = transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())

    # ------------------------------------------------------------------ gmqtt callbacks

    def _on_message(
        self, client: Any, topic: Any, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> None:
        if type(topic) is not str:  # gmqtt hands over bytes when the topic is not UTF-8
            topic = bytes(topic).decode("utf-8", "replace")
        try:
            self._message_handler(topic, payload, properties.get("retain") == 1)
        except Exception:
            self._deliver_error(topic)

    def _on_qos0_message(self, topic: str, payload: bytes, retain: bool) -> None:
        """A QoS 0 PUBLISH read by :func:`read_packets` (not through gmqtt)."""
        try:
            self._message_handler(topic, payload, retain)
        except Exception:
            self._deliver_error(topic)

    def _on_subscribe(
        self, client: Any, mid: int, granted: tuple[int, ...], properties: Any
    ) -> None:
        if client is not self._link:
            return
        waiter = self._sub_waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result([int(code) for code in granted])

    def _on_release(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            link = self._link
            if link is None or link.store.count <= self._low_water:
                self._drain_waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    def _dropped(self, packet: DroppedPacket) -> None:
        """A packet above ``max_packet`` was skipped: count and log it, and acknowledge a
        QoS 1 PUBLISH (PUBACK, MQTT 3.1.1 §3.4) so the broker frees its in-flight slot."""
        self._packet_dropped(packet)
        writer = self._writer
        if packet.qos == 1 and packet.packet_id is not None and writer is not None:
            writer.write(b"\x40\x02" + packet.packet_id.to_bytes(2, "big"))

    def _on_lost(self, link: _Link) -> None:
        if link is not self._link:
            return
        self._connected = False
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        for waiter in self._sub_waiters.values():
            if not waiter.done():
                waiter.set_exception(NotConnected("connection lost before SUBACK"))
        waiter_ = self._drain_waiter
        self._drain_waiter = None
        if waiter_ is not None and not waiter_.done():
            waiter_.set_exception(NotConnected("connection lost while draining"))

    # ------------------------------------------------------------------ link primitives

    async def _open(self) -> None:
        s = self.settings
        will = None
        if s.will is not None:
            will = gmqtt.Message(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        link = _Link(
            s.client_id,
            clean_session=s.clean_session,
            will=will,
            store=_Store(self._on_release),
            on_lost=self._on_lost,
        )
        link.on_message = self._on_message
        link.on_subscribe = self._on_subscribe
        if s.username is not None:
            link.set_auth_credentials(s.username, s.password)
        self._link = link
        try:
            context = s.ssl_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._link = None
            raise MqttConnectError(f"TLS set-up: {exc}", tls=True) from None
        try:
            await asyncio.wait_for(
                link.connect(
                    s.host,
                    s.port,
                    ssl=context if context is not None else False,
                    keepalive=s.keepalive,
                    version=MQTTv311,
                    raise_exc=True,
                ),
                s.connect_timeout,
            )
        except gmqtt.MQTTConnectError as exc:
            await self._close(clean=False)
            raise MqttConnectError(f"refused: {exc}", getattr(exc, "_code", None)) from None
        except ssl.SSLError as exc:
            await self._close(clean=False)
            raise MqttConnectError(
                f"{s.host}:{s.port}: TLS handshake failed: {exc}", tls=True
            ) from None
        except (OSError, TimeoutError) as exc:
            await self._close(clean=False)
            raise MqttConnectError(f"{s.host}:{s.port} unreachable: {exc!r}") from None
        except BaseException:
            await self._close(clean=False)
            raise
        transport = _transport_of(link)
        if transport is None or transport.is_closing() or link.lost.is_set():
            await self._close(clean=False)
            raise MqttConnectError(f"{s.host}:{s.port} closed the connection after CONNACK")
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio and uvloop set it already; make sure of it
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(AttributeError, ValueError):
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._writer = _coalesce_writes(link)
        if s.read_chunk is not None or s.max_packet is not None:
            gate = None
            if s.max_packet is not None:
                whole_above = s.read_chunk or GMQTT_READ
                gate = InboundFilter(max_packet=s.max_packet, whole_above=whole_above)
            _bound_read_turns(link, s.read_chunk, gate, self._dropped)
        _deliver_qos0_here(link, self._on_qos0_message)
        self._transport = transport

    async def _subscribe_many(self, items: list[tuple[str, int]]) -> list[int]:
        link = self._link
        if link is None or link.lost.is_set():
            raise NotConnected(f"{self.settings.client_id}: not connected")
        waiter: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        mid = link.subscribe([gmqtt.Subscription(topic, qos=qos) for topic, qos in items])
        self._sub_waiters[mid] = waiter
        try:
            return await asyncio.wait_for(waiter, self.settings.connect_timeout)
        except TimeoutError:
            raise NotConnected(f"{self.settings.client_id}: no SUBACK in time") from None
        finally:
            self._sub_waiters.pop(mid, None)

    async def _wait_lost(self) -> None:
        link = self._link
        if link is not None:
            await link.lost.wait()

    async def _close(self, *, clean: bool) -> None:
        link, self._link = self._link, None
        self._writer = None
        transport, self._transport = self._transport, None
        self._fail_waiters()
        if link is None:
            return
        link.lost.set()  # from now on its reconnect hook is inert
        transport = transport or _transport_of(link)
        if transport is None:
            return
        if clean and not transport.is_closing():
            try:
                await asyncio.wait_for(link.disconnect(), self.settings.connect_timeout)
            except (OSError, TimeoutError) as exc:
                log.debug("%s: unclean disconnect: %r", self.settings.client_id, exc)
        if not transport.is_closing():
            transport.abort()
