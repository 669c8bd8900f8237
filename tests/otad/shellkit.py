"""otad's shell in memory, on virtual time: the fast tests of the daemon's parts.

* :class:`MemoryMqttClient` implements :class:`mqttio.MqttClient` with the shared supervision of
  the real adapters (connect, resubscribe, report the connection) and a link in memory: it
  records every publish, delivers what a test feeds it to the handler when a remembered
  subscription matches, and loses or regains its "broker" on request;
* :class:`VirtualTime` is a :class:`otad.timers.TimerHost`: a clock that moves only when the
  test advances it, and the timers on it;
* :class:`Shell` is the real :class:`otad.daemon.Daemon` (store in ``tmp_path``, a really signed
  release imported, registry, outbox, distribution, status, control) built by its own
  :meth:`~otad.daemon.Daemon.startup` over two :class:`MemoryMqttClient` sessions and a
  :class:`VirtualTime`;
* :class:`SimCH` is a CH: the protocol's :class:`~protocol.wan.receiver.Receiver` behind the
  seeded link's hub shell (``tests/protocol/simlink.py``), answering otad through the memory
  client; :meth:`Shell.run_until` moves messages and virtual time until a condition holds;
* :class:`HanRelay` is a CH's side of SPEC §8.10 for its HAN devices: real
  :class:`~protocol.device.device.Device` machines behind it, to which it relays ``Activate``
  (an activation or a credentials command: the device tells them apart, SPEC §8.11) and whose
  answers (and ``ReadVersion`` read-backs) it reports as ``DeviceReported``;
  :meth:`Shell.run_until_handled` also lets otad's device task (:mod:`otad.devices`) run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from simlink import Hub

from loadtest.release import Release, make_release
from mqttio import MqttClient, MqttConnectError, MqttSettings, NotConnected
from mqttio.interface import validate_topic_name
from otad.catalogue import Catalogue
from otad.config import (
    ActivationConfig,
    BrokerConfig,
    Config,
    EventsConfig,
    StoreConfig,
    TransferConfig,
    TrustConfig,
)
from otad.daemon import Daemon
from otad.distribution import Distribution
from otad.events import MonitorEvent, decode_event
from otad.keyfiles import load_trust_dir
from otad.outbox import EventPublisher
from otad.registry import Registry
from otad.status import StatusPublisher
from otad.store import Store, TransferRow
from protocol.clock import UnixTime
from protocol.device.activation import VersionReport
from protocol.device.device import AlertRaised, CredentialsConfirmed, Device, DeviceOutput
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import Manifest
from protocol.release.trust import TrustStore, verify_manifest
from protocol.wire import topics
from protocol.wire.messages import (
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    HanDevice,
    HubAnnounced,
    HubWentOffline,
    Limits,
    Message,
    Offer,
    ReadVersion,
    decode,
)

WALL0 = 1_767_225_600.0  # the virtual wall clock at virtual time 0 (2026-01-01T00:00:00Z)
LIMITS = Limits(max_block=4096, window=8, buffer=64 * 1024)
DOWN_TOPICS = f"{topics.ROOT}/ch/+/down"


# --------------------------------------------------------------------------- MQTT in memory


@dataclass(frozen=True)
class Published:
    """One message a client published."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest)."""
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


class MemoryMqttClient(MqttClient):
    """An :class:`~mqttio.MqttClient` whose broker is the test (see the module docstring)."""

    library = "memory"

    def __init__(self, settings: MqttSettings | None = None) -> None:
        base = settings or MqttSettings(client_id="memory")
        super().__init__(replace(base, reconnect_min=0.001, reconnect_max=0.01))
        self.published: list[Published] = []
        self.reachable = True
        """While False, every connection attempt fails (the broker is down)."""
        self._link_lost = asyncio.Event()
        self._reported = asyncio.Event()
        self.opened = 0

    # ------------------------------------------------------------------ the link

    async def _open(self) -> None:
        if not self.reachable:
            raise MqttConnectError("broker unreachable (in memory)")
        self.opened += 1

    async def _subscribe_many(self, items: list[tuple[str, int]]) -> list[int]:
        return [qos for _, qos in items]

    async def _wait_lost(self) -> None:
        await self._link_lost.wait()
        self._link_lost.clear()

    async def _close(self, *, clean: bool) -> None:
        return None

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Record the message (``NotConnected`` while the link is down)."""
        validate_topic_name(topic)
        if not self._connected:
            raise NotConnected(f"{self.settings.client_id}: not connected")
        self.published.append(Published(topic, bytes(payload), qos, retain))

    async def drain(self) -> None:
        """Nothing is ever outstanding."""
        if not self._connected:
            raise NotConnected(f"{self.settings.client_id}: not connected")

    def socket_fileno(self) -> int | None:
        """No socket."""
        return None

    @property
    def inflight(self) -> int:
        """Nothing is ever outstanding: the memory broker acknowledges at once."""
        return 0

    # ------------------------------------------------------------------ the test's side

    @property
    def subscriptions(self) -> dict[str, int]:
        """Every filter the client remembers, and its QoS."""
        return dict(self._subscriptions)

    def deliver(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """The broker delivers a message, if the client is connected and subscribed to it."""
        if not self._connected or not any(topic_matches(f, topic) for f in self._subscriptions):
            return False
        self._message_handler(topic, payload, retain)
        return True

    def lose_connection(self) -> None:
        """The link drops (the supervisor reports it and reconnects while ``reachable``)."""
        self._link_lost.set()

    def take(self, topic_filter: str = "#") -> list[Published]:
        """Remove and return the published messages on topics matching ``topic_filter``."""
        taken = [p for p in self.published if topic_matches(topic_filter, p.topic)]
        self.published = [p for p in self.published if not topic_matches(topic_filter, p.topic)]
        return taken

    def _notify(self, up: bool) -> None:
        super()._notify(up)
        self._reported.set()

    async def until_connected(self, connected: bool = True, wait_s: float = 5.0) -> None:
        """Wait (real time) until the supervisor reports the link ``connected`` or not."""
        async with asyncio.timeout(wait_s):
            while self.connected is not connected:
                self._reported.clear()
                await self._reported.wait()


# --------------------------------------------------------------------------- virtual time


class VirtualHandle:
    """A timer on :class:`VirtualTime`."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        """The callback will not run."""
        self.cancelled = True


class VirtualTime:
    """A monotonic clock that moves only in :meth:`advance`, and timers on it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, VirtualHandle, Callable[[], object]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        """The clock."""
        return self.now

    def call_at(self, when: float, callback: Callable[[], object], /) -> VirtualHandle:
        """Run ``callback()`` once the clock reaches ``when``."""
        handle = VirtualHandle()
        heapq.heappush(self._timers, (when, next(self._order), handle, callback))
        return handle

    def next_at(self) -> float | None:
        """When the next live timer fires, or None."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float = 0.0) -> int:
        """Move the clock ``seconds`` on, running every timer that comes due, in order (the
        clock stands at each one's time while it runs); return how many ran."""
        until = self.now + seconds
        ran = 0
        while True:
            at = self.next_at()
            if at is None or at > until:
                break
            _, _, _, callback = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            callback()
            ran += 1
        self.now = until
        return ran

    def wall(self) -> float:
        """The wall clock that goes with it (unix seconds)."""
        return WALL0 + self.now


# --------------------------------------------------------------------------- a CH


class SimCH:
    """One CH: a Receiver behind simlink's hub shell, answering through the memory broker."""

    def __init__(
        self,
        guid: str,
        trust: TrustStore,
        *,
        limits: Limits = LIMITS,
        hw_version: int = 0x0100,
        han: tuple[HanDevice, ...] = (),
        segment: str = "cell-0",
        verify: Callable[[bytes, UnixTime], Manifest] | None = None,
    ) -> None:
        """``verify`` is the CH's check of an Offer's manifest (default: signature and expiry
        against ``trust``)."""
        self.guid = guid
        self.announcement = HubAnnounced(
            guid=guid,
            fw_version=0x0100_0000,
            hw_version=hw_version,
            supplier="SUPPLIER-A",
            segment=segment,
            limits=limits,
            han=han,
        )
        self.hub = Hub(
            limits, verify or (lambda signed, at: verify_manifest(signed, trust, now=at))
        )
        self.silent = False
        """A hung CH: it receives and answers nothing."""
        self.received: list[Message] = []
        self.lose: Callable[[Message], bool] = lambda reply: False
        """Which of its replies the link loses (``lose(reply)`` true: never reaches otad)."""
        self.lost: list[Message] = []
        self.han = HanRelay()
        """Its HAN devices (SPEC §8.10)."""

    def handle(self, message: Message, now: float) -> list[Message]:
        """Feed one downlink message to the receiver; return its replies."""
        self.received.append(message)
        if self.silent:
            return []
        if isinstance(message, (Activate, ReadVersion)):
            return self._sent(self.han.handle(message, WALL0 + now))
        rx = self.hub.receiver
        if isinstance(message, Offer):
            actions = rx.offer_received(message, UnixTime(time.time()), now)
        else:
            actions = rx.message_received(message, now)
        return self._sent(self.hub.apply(actions, now))

    def timers_due(self, now: float) -> list[Message]:
        """Run the receiver's timers due at ``now`` (delayed acknowledgements)."""
        if self.silent:
            return []
        replies = self._sent(self.han.timers_due(WALL0 + now))
        deadline = self.hub.receiver.next_deadline()
        if deadline is None or deadline > now:
            return replies
        return replies + self._sent(self.hub.apply(self.hub.receiver.handle_timer(now), now))

    def next_deadline(self) -> float | None:
        """The receiver's or a device's next deadline (virtual monotonic time), or None."""
        han = self.han.next_deadline()
        deadlines = [self.hub.receiver.next_deadline(), None if han is None else han - WALL0]
        return min((d for d in deadlines if d is not None), default=None)

    def _sent(self, replies: list[Message]) -> list[Message]:
        kept = []
        for reply in replies:
            (self.lost if self.lose(reply) else kept).append(reply)
        return kept


# --------------------------------------------------------------------------- a CH's HAN


class HanRelay:
    """A CH's side of SPEC §8.10: the real device machines on its HAN, and what it reports.

    The HAN link itself (ZigBee OTA frames) is not simulated here: :meth:`deliver` puts an image
    into a device the way its HAN client would (manifest first, then the bytes) and returns the
    reports a CH sends about it. ``lose(output)`` true drops a device's answer on the way."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.lose: Callable[[DeviceOutput], bool] = lambda output: False
        self.refused: list[tuple[str, Reason]] = []
        """(device id, reason) of every command (activation or credentials) a device refused."""
        self.lost: list[DeviceOutput] = []

    def add(self, device: Device) -> Device:
        self.devices[device.identity.device_id] = device
        return device

    def deliver(
        self, device_id: str, sha: bytes, signed_manifest: bytes, image: bytes, wall: float
    ) -> list[Message]:
        """Relay image ``sha`` to a device: a progress report halfway, then its outcome."""
        device = self.devices[device_id]
        size = len(image)
        try:
            device.manifest_received(signed_manifest, UnixTime(wall))
        except ProtocolError as exc:
            refused = DeviceTransferState.REFUSED
            return [DeviceTransferReported(sha, device_id, refused, 0, size, int(exc.reason))]
        half = size // 2
        device.image_data_received(0, image[:half])
        reports: list[Message] = [
            DeviceTransferReported(sha, device_id, DeviceTransferState.TRANSFERRING, half, size, 0)
        ]
        try:
            device.image_data_received(half, image[half:])
        except ProtocolError as exc:
            state = DeviceTransferState.DISCARDED
            reason = int(exc.reason)
            return [*reports, DeviceTransferReported(sha, device_id, state, 0, size, reason)]
        held = DeviceTransferState.HELD
        return [*reports, DeviceTransferReported(sha, device_id, held, size, size, 0)]

    def handle(self, message: Message, wall: float) -> list[Message]:
        """An ``Activate`` or a ``ReadVersion`` from otad; the reports it causes."""
        if isinstance(message, ReadVersion):
            device = self.devices.get(message.device_id)
            if device is None:
                return []
            running = device.running.fw_version
            report = VersionReport(
                message.device_id, running, device.boot_count, device.last_counter
            )
            return [DeviceReported(message.device_id, report.encode(), Evidence.DEVICE)]
        if not isinstance(message, Activate):
            return []
        device = self.devices.get(message.device_id)
        if device is None:
            return []
        try:
            outputs = device.command_received(message.command, UnixTime(wall))
        except ProtocolError as exc:
            self.refused.append((message.device_id, exc.reason))
            return []
        return self._reports(device, outputs)

    def timers_due(self, wall: float) -> list[Message]:
        """Run the devices' future-dated activations due at ``wall``."""
        replies: list[Message] = []
        for device in self.devices.values():
            deadline = device.next_deadline()
            if deadline is not None and deadline <= wall:
                replies += self._reports(device, device.handle_timer(UnixTime(wall)))
        return replies

    def next_deadline(self) -> float | None:
        """The earliest device deadline (wall clock), or None."""
        deadlines = [d.next_deadline() for d in self.devices.values()]
        return min((float(d) for d in deadlines if d is not None), default=None)

    def _reports(self, device: Device, outputs: list[DeviceOutput]) -> list[Message]:
        device_id = device.identity.device_id
        reports: list[Message] = []
        for output in outputs:
            if self.lose(output):
                self.lost.append(output)
                continue
            if isinstance(output, (AlertRaised, CredentialsConfirmed)):
                reports.append(DeviceReported(device_id, output.signed, Evidence.DEVICE))
            elif isinstance(output, VersionReport):  # what the CH saw of a CAD bridge
                reports.append(DeviceReported(device_id, output.encode(), Evidence.CH))
            else:
                reports.append(DeviceReported(device_id, output.encode(), Evidence.DEVICE))
        return reports


# --------------------------------------------------------------------------- the shell


@dataclass
class Shell:
    """The real daemon in memory (see the module docstring)."""

    daemon: Daemon
    client: MemoryMqttClient  # the data session
    control: MemoryMqttClient  # the control session
    clock: VirtualTime
    release: Release
    trust: TrustStore
    chs: dict[str, SimCH] = field(default_factory=dict)
    latency: float = 0.02
    """One way, seconds, each message (the broker and the CH's link)."""
    downlink: list[Published] = field(default_factory=list)
    """Every downlink message otad published, as the broker saw it (a wiretap)."""
    _wire: list[tuple[float, int, str, str, bytes]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    killed: bool = False
    """:meth:`kill` was called: no clean shutdown."""

    def kill(self) -> None:
        """The process dies (SIGKILL): nothing more is sent or handled, nothing is flushed;
        what the store committed is all that survives (the store is closed afterwards)."""
        self.killed = True
        self.client.reachable = False
        self.client.lose_connection()
        self._wire.clear()

    @property
    def store(self) -> Store:
        return self.daemon.store

    @property
    def registry(self) -> Registry:
        return self.daemon.registry

    @property
    def distribution(self) -> Distribution:
        return self.daemon.distribution

    @property
    def events(self) -> EventPublisher:
        return self.daemon.events

    @property
    def catalogue(self) -> Catalogue:
        return self.daemon.catalogue

    @property
    def status(self) -> StatusPublisher:
        return self.daemon.status

    @property
    def image(self) -> bytes:
        """The release's digest."""
        return self.release.manifest.sha256

    # ------------------------------------------------------------------ CHs

    def add_ch(self, guid: str, **options: Any) -> SimCH:
        """A CH that answers otad from now on (announce it with :meth:`announce`)."""
        ch = self.chs[guid] = SimCH(guid, self.trust, **options)
        return ch

    def announce(self, guid: str, *, retain: bool = False) -> None:
        """The CH publishes its announcement (a live one unless ``retain``)."""
        ch = self.chs[guid]
        ch.silent = False
        self.client.deliver(topics.state(guid), ch.announcement.encode(), retain)

    def drop(self, guid: str) -> None:
        """The broker publishes the CH's last will; the CH stops answering."""
        self.client.deliver(topics.state(guid), HubWentOffline(guid=guid).encode(), True)
        self.chs[guid].silent = True

    async def distribute(self, *targets: str) -> dict[str, Any]:
        """``otactl distribute`` of the release to ``targets`` (every matching CH if none)."""
        return await self.distribution.distribute(
            self.release.sha256, targets, all_matching=not targets
        )

    # ------------------------------------------------------------------ running

    def pump(self) -> int:
        """Move every message due by now: otad's downlink messages reach their CHs, and the CHs'
        answers reach otad, each :attr:`latency` after it was sent; the CHs' timers due run.
        Return how many messages arrived."""
        arrived = 0
        while True:
            now = self.clock.now
            for published in self.client.take(DOWN_TOPICS):
                guid = published.topic.split("/")[3]
                self.downlink.append(published)
                self._send(now, "down", guid, published.payload)
            for guid, ch in self.chs.items():
                for reply in ch.timers_due(now):
                    self._send(now, "up", guid, reply.encode())
            if not self._wire or self._wire[0][0] > now:
                return arrived
            _, _, direction, guid, payload = heapq.heappop(self._wire)
            arrived += 1
            if direction == "up":
                self.client.deliver(topics.up(guid), payload)
                continue
            ch = self.chs.get(guid)
            if ch is not None:
                for reply in ch.handle(decode(payload), now):
                    self._send(now, "up", guid, reply.encode())

    def _send(self, now: float, direction: str, guid: str, payload: bytes) -> None:
        at = now + self.latency
        heapq.heappush(self._wire, (at, next(self._order), direction, guid, payload))

    def run_until(self, condition: Callable[[], bool], max_s: float = 600.0) -> float:
        """Move messages and virtual time (to the next timer of otad or of a CH) until
        ``condition()`` holds; return the virtual seconds it took. ``AssertionError`` if it does
        not hold within ``max_s``."""
        began = self.clock.now
        while True:
            self.pump()
            if condition():
                return self.clock.now - began
            at = self._next_deadline()
            if at is None or at - began > max_s:
                raise AssertionError(f"not done after {self.clock.now - began:.1f} virtual s")
            self.clock.advance(max(0.0, at - self.clock.now))

    async def run_until_handled(self, condition: Callable[[], bool], max_s: float = 600.0) -> float:
        """:meth:`run_until`, letting otad's device task handle what arrived at every step (its
        store writes need the event loop); return the virtual seconds it took."""
        began = self.clock.now
        while True:
            self.pump()
            await self.daemon.devices.flushed()
            self.pump()
            if condition():
                return self.clock.now - began
            at = self._next_deadline()
            if at is None or at - began > max_s:
                raise AssertionError(f"not done after {self.clock.now - began:.1f} virtual s")
            self.clock.advance(max(0.0, at - self.clock.now))

    def send_up(self, guid: str, *messages: Message) -> None:
        """The CH ``guid`` publishes ``messages`` on its up topic (they arrive after latency)."""
        for message in messages:
            self._send(self.clock.now, "up", guid, message.encode())

    def run_for(self, seconds: float) -> None:
        """Move messages and virtual time for ``seconds``."""
        until = self.clock.now + seconds
        while True:
            self.pump()
            at = self._next_deadline()
            if at is None or at > until:
                self.clock.advance(until - self.clock.now)
                self.pump()
                return
            self.clock.advance(max(0.0, at - self.clock.now))

    def _next_deadline(self) -> float | None:
        deadlines = [self.clock.next_at(), self._wire[0][0] if self._wire else None] + [
            ch.next_deadline() for ch in self.chs.values() if not ch.silent
        ]
        return min((d for d in deadlines if d is not None), default=None)

    async def settle(self) -> None:
        """Commit and publish the events emitted so far, then every final state."""
        await self.events.flush()
        await self.distribution.wait_final_writes()
        await self.registry.flushed()

    def events_published(self) -> list[MonitorEvent]:
        """Decode (and remove) the events published so far."""
        return [decode_event(p.payload) for p in self.client.take("ota/v1/events/#")]

    async def recorded(self, guid: str) -> TransferRow | None:
        """The stored row of the transfer of the release to ``guid``."""
        return await self.store.transfer(guid, self.image)


@asynccontextmanager
async def shell(
    tmp_path: Path,
    *,
    transfer: TransferConfig | None = None,
    events: EventsConfig | None = None,
    firmware_bytes: int = 8 * 1024,
    block_size: int = 1024,
    seed: int = 1,
    activation: ActivationConfig | None = None,
    release: Release | None = None,
    clock: VirtualTime | None = None,
) -> AsyncIterator[Shell]:
    """A :class:`Shell` on a fresh state directory with one signed release imported, its MQTT
    sessions connected, sending started; shut down (as on SIGTERM) and closed afterwards.

    Given the ``release`` (and ``clock``) of an earlier shell on the same ``tmp_path``, it is
    that daemon restarted on its state directory (after :meth:`Shell.kill`, a crash)."""
    if release is None:
        release = make_release(tmp_path / "release", firmware_bytes=firmware_bytes,
                               block_size=block_size)  # fmt: skip
    trust = load_trust_dir(release.trust_dir)
    config = Config(
        broker=BrokerConfig(client_id="otad"),  # the sessions below are looked up by id
        store=StoreConfig(state_dir=tmp_path / "state", flush_interval_ms=10),
        trust=TrustConfig(dir=release.trust_dir),
        transfer=transfer or TransferConfig(),
        events=events or EventsConfig(),
        activation=activation or ActivationConfig(),
    )
    clock = clock or VirtualTime()
    sessions: dict[str, MemoryMqttClient] = {}

    def mqtt_client(library: str, settings: MqttSettings) -> MemoryMqttClient:
        client = sessions[settings.client_id] = MemoryMqttClient(settings)
        return client

    daemon = Daemon(config, mqtt_client=mqtt_client, timers=clock, wall_clock=clock.wall)
    daemon.store = await Store.open(config.store.state_dir, flush_interval=0.01)
    try:
        await daemon.startup(trust)
        assert await daemon.connect()
        daemon.distribution._rng.seed(seed)
        await daemon.catalogue.import_image(release.path.read_bytes())
        sh = Shell(
            daemon=daemon,
            client=sessions["otad"],
            control=sessions["otad.ctl"],
            clock=clock,
            release=release,
            trust=trust,
        )
        yield sh
        if not sh.killed:
            await daemon.shutdown()
    finally:
        for client in sessions.values():
            await client.disconnect()
        await daemon.store.close()


async def eventually(condition: Callable[[], bool], wait_s: float = 5.0) -> None:
    """Wait (real time) until ``condition()`` holds: for what a task of the daemon does."""
    async with asyncio.timeout(wait_s):
        while not condition():  # noqa: ASYNC110 - the task changes plain state, signals nothing
            await asyncio.sleep(0.001)


def guids(n: int) -> list[str]:
    """``n`` distinct GUIDs."""
    return [f"{0x0011223344550000 + i:016X}" for i in range(n)]
