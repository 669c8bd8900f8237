"""The one narrow MQTT client interface used by otad, the virtual hubs and otactl.

Two adapters implement it: :mod:`mqttio.gmqtt_adapter` (fast: ~10x less CPU per message)
and :mod:`mqttio.aiomqtt_adapter` (the idiomatic asyncio client). Pick one by name with
:func:`create_client`. Both speak plain MQTT 3.1.1, so they run on any broker.

Semantics shared by both adapters (the contract the daemon relies on):

* :meth:`MqttClient.connect` returns once the broker accepted the connection (CONNACK) and every
  remembered subscription was acknowledged (SUBACK). With ``fail_fast=True`` the first refusal or
  unreachable broker raises :class:`MqttConnectError`; otherwise it retries with exponential
  backoff and full jitter (``reconnect_min`` .. ``reconnect_max``) until it succeeds.
* After a loss the client reconnects by itself (same backoff), re-subscribes to everything
  :meth:`MqttClient.subscribe` was ever given, and only then calls the connection handler with
  ``True``. The loss itself is reported with ``False`` first. A :meth:`MqttClient.disconnect`
  asked for by the caller is not reported.
* :meth:`MqttClient.publish` never blocks and never drops silently. While the client is not
  connected it raises :class:`NotConnected` (nothing is queued: otad's application-level
  acknowledgements decide what to resend, and a stale block in a client-side queue is worse than
  a clear error). A successful ``publish`` means "handed to the transport", not "delivered":
  QoS 1 messages still unacknowledged when a connection drops are not replayed by the adapter.
* Flow control is the caller's: :meth:`MqttClient.drain` waits while more than ``max_inflight``
  messages are outstanding (QoS 1 not yet PUBACKed, or bytes not yet written to the socket).
  ``publish`` itself refuses with :class:`InflightLimitError` only at the hard ceiling
  :data:`HARD_INFLIGHT_LIMIT` (16-bit packet ids), i.e. when a bulk sender forgot to drain.
* The message handler runs synchronously on the event loop for every message; an exception in it
  is logged (rate-limited) and never breaks the receive loop.
* TCP_NODELAY is set on every connection (without it a request/ack round trip costs ~88 ms).
* A failed attempt is logged with its reason: at ERROR when someone must change a
  configuration (a CONNACK refusal, named: ``bad user name or password``, ``not authorised``;
  or a TLS failure: set-up or handshake), at WARNING otherwise (unreachable, lost).
  :attr:`MqttClient.last_connect_error` keeps the latest, for a status line.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mqttio.inbound import DroppedPacket

__all__ = [
    "CONNACK_REASONS",
    "HARD_INFLIGHT_LIMIT",
    "LIBRARIES",
    "ConnectionHandler",
    "InflightLimitError",
    "MessageHandler",
    "MqttClient",
    "MqttConnectError",
    "MqttError",
    "MqttSettings",
    "MqttSubscribeError",
    "NotConnected",
    "Will",
    "backoff_delays",
    "create_client",
    "validate_topic_filter",
    "validate_topic_name",
    "wait_acknowledged",
]

LIBRARIES = ("gmqtt", "aiomqtt")

#: Most QoS 1 messages one client may have unacknowledged at once. MQTT packet ids are 16 bits
#: (1..65535); gmqtt raises and paho silently reuses ids beyond that, so we stop well short.
HARD_INFLIGHT_LIMIT = 60_000

#: MQTT 3.1.1 CONNACK return codes that retrying cannot fix (bad protocol, bad id, bad
#: credentials, not authorised). Code 3 ("server unavailable") is transient.
PERMANENT_CONNACK_CODES = frozenset({1, 2, 4, 5})

MessageHandler = Callable[[str, bytes, bool], None]
"""``handler(topic, payload, retain)``: called on the event loop for every message."""

ConnectionHandler = Callable[[bool], None]
"""``handler(up)``: ``True`` after a (re)connect and resubscription, ``False`` on a loss."""

log = logging.getLogger("mqttio")


# --------------------------------------------------------------------------- errors


class MqttError(Exception):
    """Base class of every error this package raises."""


#: What each MQTT 3.1.1 CONNACK refusal code means (section 3.2.2.3).
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class MqttConnectError(MqttError):
    """The broker refused the connection (``return_code``: its CONNACK code), the TLS
    handshake or TLS set-up failed (``tls``), or the broker could not be reached (neither)."""

    def __init__(self, message: str, return_code: int | None = None, *, tls: bool = False) -> None:
        reason = CONNACK_REASONS.get(return_code) if return_code is not None else None
        if reason is not None and reason not in message:
            message = f"{message} ({reason})"
        super().__init__(message)
        self.return_code = return_code
        self.tls = tls

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help until someone changes a configuration: bad
        credentials, not authorised, a certificate the other side does not accept."""
        return self.return_code in PERMANENT_CONNACK_CODES or self.tls

    @property
    def reason(self) -> str:
        """The refusal's name (``bad user name or password``), ``TLS failure`` or
        ``unreachable``."""
        if self.return_code is not None:
            return CONNACK_REASONS.get(self.return_code, f"CONNACK code {self.return_code}")
        return "TLS failure" if self.tls else "unreachable"


class NotConnected(MqttError):  # noqa: N818 (the name the daemon code uses)
    """The operation needs a live connection and there is none right now."""


class MqttSubscribeError(MqttError):
    """The broker refused a subscription (SUBACK return code 0x80)."""


class InflightLimitError(MqttError):
    """``publish`` was called with :data:`HARD_INFLIGHT_LIMIT` messages outstanding: the caller
    must ``await drain()`` between bursts."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """Everything an adapter needs to reach and keep a broker connection.

    ``max_inflight`` is the flow-control bound :meth:`MqttClient.drain` enforces.
    ``connect_timeout`` bounds each attempt (TCP + CONNACK) and each SUBACK wait.
    TLS is used when any of ``tls_ca``/``tls_cert`` is set (``tls_ca`` None means the system CAs).
    """

    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30
    clean_session: bool = True
    will: Will | None = None
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    max_inflight: int = 1000
    connect_timeout: float = 10.0
    read_chunk: int | None = None
    """Bytes of received packets handled per event-loop turn (None: the library's own reads).
    A daemon that must stay responsive sets it; a bulk client (a virtual CH process holding
    thousands of connections) leaves it alone: smaller reads there only add loop turns."""
    max_packet: int | None = None
    """Largest packet taken from the broker, bytes, fixed header included (None: no bound of
    ours). A larger one is skipped as it streams in, never reassembled: one WARNING (at most
    every 10 s, with the count), counted in :attr:`MqttClient.dropped_packets`, and a QoS 1
    PUBLISH is acknowledged so the broker frees its slot (:mod:`mqttio.inbound`)."""

    def __post_init__(self) -> None:
        if not self.client_id or any(c in self.client_id for c in "+#/\0"):
            raise ValueError(f"unsafe MQTT client id {self.client_id!r}")
        if not 1 <= self.max_inflight <= HARD_INFLIGHT_LIMIT:
            raise ValueError(f"max_inflight must be in 1..{HARD_INFLIGHT_LIMIT}")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        if self.read_chunk is not None and self.read_chunk < 1024:
            raise ValueError("read_chunk must be at least 1024 bytes")
        if self.max_packet is not None and self.max_packet < 1024:
            raise ValueError("max_packet must be at least 1024 bytes")
        if not 0 <= self.keepalive <= 65535:
            raise ValueError("keepalive must be in 0..65535")
        if self.will is not None:
            validate_topic_name(self.will.topic)

    @property
    def uses_tls(self) -> bool:
        """Whether connections are made over TLS."""
        return self.tls_ca is not None or self.tls_cert is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context (server verified, optional client certificate), or None."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def backoff_delays(minimum: float, maximum: float) -> Iterator[float]:
    """Exponential backoff with full jitter: attempt n sleeps U(0, min(maximum, minimum * 2**n))."""
    ceiling = minimum
    while True:
        yield random.uniform(0.0, ceiling)
        ceiling = min(maximum, ceiling * 2)


# --------------------------------------------------------------------------- topic checks

_MAX_TOPIC_BYTES = 65535


def validate_topic_name(topic: str) -> str:
    """Return ``topic`` if it may be published to (no wildcards, no NUL, 1..65535 bytes).

    A broker disconnects a client that publishes to an invalid topic, so this is checked before
    anything is written.
    """
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"invalid MQTT topic name {topic[:80]!r}")
    if len(topic) > _MAX_TOPIC_BYTES // 4 and len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError("MQTT topic name longer than 65535 bytes")
    return topic


def validate_topic_filter(topic: str) -> str:
    """Return ``topic`` if it is a valid subscription filter (``+``/``#`` only as whole levels,
    ``#`` last), else raise ``ValueError``. A broker disconnects a client for a bad filter, and
    a remembered bad filter would make every reconnect fail."""
    if not topic or "\0" in topic or len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"invalid MQTT topic filter {topic[:80]!r}")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level: {topic[:80]!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic[:80]!r}")
    return topic


# --------------------------------------------------------------------------- interface


def _ignore_message(topic: str, payload: bytes, retain: bool) -> None:
    """Default message handler: drop."""


def _ignore_connection(up: bool) -> None:
    """Default connection handler: nothing."""


class MqttClient(abc.ABC):
    """One MQTT connection, kept alive, with the semantics described in the module docstring.

    Adapters subclass this and implement the link primitives (``_open``, ``_subscribe_many``,
    ``_wait_lost``, ``_close``) and the hot path (``publish``, ``drain``, ``socket_fileno``);
    connection supervision, backoff and resubscription live here, identical for both.
    """

    library: str = "?"

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._subscriptions: dict[str, int] = {}
        self._message_handler: MessageHandler = _ignore_message
        self._connection_handler: ConnectionHandler = _ignore_connection
        self._connected = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._handler_errors = 0
        self._handler_error_logged_at = -1e9
        self.reconnects = 0
        """How many times the connection was re-established after a loss."""
        self.last_connect_error: MqttConnectError | None = None
        """Why the latest connection attempt failed (None once one succeeded)."""
        self._up_since: float | None = None
        self._short_losses: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.dropped_packets = 0
        """Packets from the broker above ``settings.max_packet``, skipped unread."""
        self._dropped_logged_at = -1e9

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True from a completed (re)connect, subscriptions included, until a loss is seen."""
        return self._connected

    def set_message_handler(self, handler: MessageHandler) -> None:
        """Install ``handler(topic, payload, retain)``; runs synchronously on the event loop for
        every message (keep it fast; schedule any slow work)."""
        self._message_handler = handler

    def set_connection_handler(self, handler: ConnectionHandler) -> None:
        """Install ``handler(up)``: ``True`` after each (re)connect once every subscription is
        back, ``False`` when a connection is lost (not on a requested :meth:`disconnect`)."""
        self._connection_handler = handler

    async def connect(self, *, fail_fast: bool = False) -> None:
        """Connect, subscribe to every remembered filter, and start supervising the connection.

        Returns once CONNACK and all SUBACKs arrived. With ``fail_fast`` the first failure raises
        :class:`MqttConnectError`; otherwise attempts repeat with backoff until one succeeds.
        """
        if self._supervisor is not None and not self._supervisor.done():
            raise RuntimeError("connect() called twice without disconnect()")
        self._closing = False
        await self._establish(fail_fast=fail_fast)
        self._notify(True)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"mqtt-supervisor-{self.settings.client_id}"
        )

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe to ``topic`` (a filter) and remember it for every later reconnect.

        When connected, returns after the SUBACK (raises :class:`MqttSubscribeError` if refused,
        in which case it is forgotten). When not connected, it is only remembered: it will be
        sent before ``connect()`` returns / before the connection handler reports ``True``.
        If the connection drops while waiting for the SUBACK, raises :class:`NotConnected`; the
        subscription stays remembered and is restored on reconnect.
        """
        validate_topic_filter(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
        self._subscriptions[topic] = qos
        if not self._connected:
            return
        codes = await self._subscribe_many([(topic, qos)])
        if codes and codes[0] >= 0x80:
            self._subscriptions.pop(topic, None)
            raise MqttSubscribeError(f"broker refused subscription to {topic[:80]!r}")

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Send one message without blocking.

        Raises :class:`NotConnected` while disconnected (nothing is queued),
        :class:`InflightLimitError` at the hard in-flight ceiling, ``ValueError`` for a topic
        that is not a valid topic name.
        """

    def qos0_publisher(self, topic: str) -> Callable[[bytes], None]:
        """A function that publishes its argument to ``topic`` at QoS 0, not retained, as
        :meth:`publish` would (:class:`NotConnected` while disconnected), for a caller that
        sends many messages to one topic: the topic is checked once, here (``ValueError``), and
        an adapter may frame the messages faster than :meth:`publish` can."""
        validate_topic_name(topic)
        publish = self.publish

        def publish_to_topic(payload: bytes) -> None:
            publish(topic, payload, 0, False)

        return publish_to_topic

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait while the client holds more than ``max_inflight`` outstanding messages (QoS 1
        not yet acknowledged, or output not yet written to the socket); returns at once when
        below. Raises :class:`NotConnected` if the connection is or goes down meanwhile."""

    @abc.abstractmethod
    def socket_fileno(self) -> int | None:
        """File descriptor of the current broker connection, or None (diagnostics and tests:
        inspect socket options; never read or write it)."""

    @property
    @abc.abstractmethod
    def inflight(self) -> int:
        """Messages currently outstanding (see :meth:`drain`)."""

    async def disconnect(self) -> None:
        """Send a clean DISCONNECT (so the broker discards the will) and stop reconnecting."""
        self._closing = True
        self._connected = False
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await self._close(clean=True)  # the adapter sends DISCONNECT only on a live link

    def short_session_losses(self, within: float, *, shorter_than: float) -> int:
        """Losses in the last ``within`` seconds of sessions that had lasted less than
        ``shorter_than`` seconds: the signature of a client-id take-over (the broker closes
        the older of two connections with one client id, and each reconnect takes it back)."""
        cutoff = time.monotonic() - within
        return sum(1 for at, lasted in self._short_losses if at >= cutoff and lasted < shorter_than)

    # ------------------------------------------------------------------ adapter hooks

    @abc.abstractmethod
    async def _open(self) -> None:
        """Open a new link: TCP (+TLS), CONNECT, wait for CONNACK (``connect_timeout``).
        Raise :class:`MqttConnectError` on any failure, leaving nothing open."""

    @abc.abstractmethod
    async def _subscribe_many(self, items: list[tuple[str, int]]) -> list[int]:
        """Send one SUBSCRIBE for ``items`` on the current link and return the SUBACK codes.
        Raise :class:`NotConnected` if the link drops or the SUBACK does not come in time."""

    @abc.abstractmethod
    async def _wait_lost(self) -> None:
        """Return when the current link is lost."""

    @abc.abstractmethod
    async def _close(self, *, clean: bool) -> None:
        """Close the current link, sending a DISCONNECT first if ``clean`` and the link is still
        up (otherwise the socket is just dropped, and the broker publishes the will); idempotent."""

    # ------------------------------------------------------------------ shared machinery

    def _deliver_error(self, topic: str) -> None:
        """Count (and at most every 10 s log) an exception raised by the message handler."""
        self._handler_errors += 1
        now = time.monotonic()
        if now - self._handler_error_logged_at >= 10.0:
            self._handler_error_logged_at = now
            log.exception(
                "%s: message handler failed on %r (%d failure(s) so far)",
                self.settings.client_id,
                topic[:120],
                self._handler_errors,
            )

    def _packet_dropped(self, packet: DroppedPacket) -> None:
        """Count (and at most every 10 s log) a packet skipped for its size."""
        self.dropped_packets += 1
        now = time.monotonic()
        if now - self._dropped_logged_at < 10.0:
            return
        self._dropped_logged_at = now
        what = "PUBLISH" if packet.packet_type == 3 else f"packet of type {packet.packet_type}"
        on = "" if packet.topic is None else f" on {packet.topic[:120]!r}"
        log.warning(
            "%s: dropped a %s of %d bytes%s from the broker unread: above this client's"
            " max_packet of %d bytes (%d dropped so far; set the broker's max_packet_size)",
            self.settings.client_id,
            what,
            packet.size,
            on,
            self.settings.max_packet or 0,
            self.dropped_packets,
        )

    def _notify(self, up: bool) -> None:
        try:
            self._connection_handler(up)
        except Exception:
            log.exception("%s: connection handler failed", self.settings.client_id)

    async def _establish(self, *, fail_fast: bool) -> None:
        """Open a link and restore subscriptions, retrying with backoff unless ``fail_fast``."""
        delays = backoff_delays(self.settings.reconnect_min, self.settings.reconnect_max)
        failures = 0
        while True:
            try:
                await self._open()
                await self._restore_subscriptions()
            except asyncio.CancelledError:  # abandoned (or disconnect()): leave nothing open
                await self._close(clean=True)
                raise
            except Exception as exc:
                await self._close(clean=False)
                error = (
                    exc
                    if isinstance(exc, MqttConnectError)
                    else MqttConnectError(f"{type(exc).__name__}: {exc}")
                )
                self.last_connect_error = error
                if fail_fast:
                    if error is exc:
                        raise
                    raise error from exc
                delay = next(delays)
                failures += 1
                expected = isinstance(exc, (MqttConnectError, NotConnected))
                # A refusal or a TLS failure needs someone to change a configuration: ERROR,
                # naming it, every time. Otherwise (unreachable, lost) a WARNING.
                level = logging.ERROR if error.permanent or not expected else logging.WARNING
                log.log(
                    level,
                    "%s: cannot connect to %s:%d: %s%s; retrying in %.2f s (attempt %d)",
                    self.settings.client_id,
                    self.settings.host,
                    self.settings.port,
                    f"{error.reason}: " if error.permanent else "",
                    exc if expected else repr(exc),
                    delay,
                    failures,
                )
                await asyncio.sleep(delay)
                continue
            self._connected = True
            self.last_connect_error = None
            self._up_since = time.monotonic()
            return

    async def _restore_subscriptions(self) -> None:
        """Subscribe to every remembered filter, including ones added while this runs."""
        sent: dict[str, int] = {}
        while True:
            pending = [(t, q) for t, q in self._subscriptions.items() if sent.get(t) != q]
            if not pending:
                return
            codes = await self._subscribe_many(pending)
            for (topic, qos), code in zip(pending, codes, strict=False):
                sent[topic] = qos
                if code >= 0x80:
                    log.error(
                        "%s: broker refused subscription to %r",
                        self.settings.client_id,
                        topic[:120],
                    )

    async def _supervise(self) -> None:
        """Watch the link; on loss report False, reconnect with backoff, resubscribe, report
        True; forever, until :meth:`disconnect` cancels it."""
        while True:
            await self._wait_lost()
            if self._closing:
                return
            self._connected = False
            now = time.monotonic()
            if self._up_since is not None:
                self._short_losses.append((now, now - self._up_since))
                self._up_since = None
            log.warning("%s: connection to the broker lost", self.settings.client_id)
            self._notify(False)
            await self._close(clean=False)
            await self._establish(fail_fast=False)
            if self._closing:
                # disconnect() cancelled us while a library call swallowed the cancellation
                # (gmqtt's connect does, seen in a take-over loop): waiting for the new link to
                # be lost would hang disconnect() for ever
                return
            self.reconnects += 1
            log.info("%s: reconnected", self.settings.client_id)
            self._notify(True)


async def wait_acknowledged(client: MqttClient, wait_s: float) -> bool:
    """Wait up to ``wait_s`` until ``client`` has no QoS 1 message unacknowledged; return
    whether that happened while connected."""
    for _ in range(max(1, int(wait_s / 0.02))):
        if not client.connected:
            return False
        if client.inflight == 0:
            return True
        await asyncio.sleep(0.02)
    return False


def create_client(library: str, settings: MqttSettings) -> MqttClient:
    """Build an adapter by name: ``"gmqtt"`` or ``"aiomqtt"``."""
    if library == "gmqtt":
        from mqttio.gmqtt_adapter import GmqttClient

        return GmqttClient(settings)
    if library == "aiomqtt":
        from mqttio.aiomqtt_adapter import AiomqttClient

        return AiomqttClient(settings)
    raise ValueError(f"unknown MQTT library {library!r}; choose one of {', '.join(LIBRARIES)}")
