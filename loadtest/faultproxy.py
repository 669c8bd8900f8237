"""An asyncio TCP fault proxy between virtual CHs and the broker (this kernel has no netem).

Each accepted connection is relayed to the upstream broker through two pumps (hub -> broker,
broker -> hub). The proxy understands just enough MQTT 3.1.1 to split each direction's byte
stream into whole control packets, and every fault acts on whole packets:

* **latency** (plus uniform **jitter**): each packet is forwarded ``latency`` after it arrived,
  in order (a later packet never overtakes an earlier one, as on one TCP connection);
* **loss**: a non-retained QoS 0 PUBLISH is dropped with probability ``loss``. Losing TCP
  segments is not possible at this level (and on a real link TCP recovers them: what an
  application protocol over MQTT must survive is a *message* that never arrives). QoS 0 is
  at-most-once: a broker under load may drop it, and it dies with a cut connection -- the blocks
  and SACKs, which otad's transfer protocol repairs. A QoS 1 PUBLISH survives a lossy link (TCP
  resends it; the MQTT session carries it over a reconnect); losing one takes a broker that
  acknowledged it and then lost it, the separate **acked_loss**: such a PUBLISH is acknowledged
  to its sender by the proxy with a PUBACK of its packet id, so no MQTT in-flight slot leaks.
  Which packets may go: only application messages -- CONNECT, SUBSCRIBE, PINGREQ,
  acknowledgements and retained state messages (a CH's announcement and will) are never
  dropped, so the MQTT sessions themselves stay sound;
* **bandwidth** (slow): each direction of each connection is paced to ``bandwidth`` bytes/s;
* **cut**: both sockets are closed at once (the CH sees its connection drop and reconnects);
* **half-open**: the proxy stops forwarding in both directions and keeps both sockets open
  (bytes are read and discarded, so neither side sees back-pressure or a close) until resumed:
  only keep-alive timeouts can tell.

The decision taken for each packet is sans-IO (:class:`PacketFilter`: bytes in, verdicts out,
seeded per connection), so it is tested without sockets and a seed gives the same verdicts.
Connections are known by the MQTT client id of their CONNECT (a CH's GUID), which is how the
load-test runner cuts or hangs particular hubs.

The proxy also measures the **ack round trip at the WAN edge**: from the arrival from the broker
of the first PUBLISH for a hub (a block, an offer) that the hub has not answered yet to the
moment the hub's next PUBLISH (its acknowledgement) leaves for the broker, the injected latency
both ways included. It is what otad's
sender sees of the CH link minus the broker hop; :meth:`FaultProxy.take_round_trips` hands out
the samples taken since it was last called.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("loadtest.faultproxy")

#: MQTT control packet types (the high nibble of the first byte).
CONNECT, PUBLISH, PUBACK = 1, 3, 4
#: Largest remaining length MQTT 3.1.1 can encode.
MAX_REMAINING = 268_435_455
READ_CHUNK = 256 * 1024
#: Round-trip samples kept between two :meth:`FaultProxy.take_round_trips` calls, at most.
#: Kept by reservoir sampling: every sample has the same chance, whatever the rate.
MAX_RTT_SAMPLES = 5_000


class MqttFramingError(ValueError):
    """The byte stream is not MQTT (the proxy closes that connection)."""


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """What the proxy does to traffic; ``loss`` (of QoS 0 messages) and ``acked_loss`` (of QoS
    1 ones, acknowledged by the proxy) in [0, 1), times in seconds, bandwidth in bytes per second
    per direction and connection (0: unlimited)."""

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    bandwidth: float = 0.0
    acked_loss: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.loss < 1.0 and 0.0 <= self.acked_loss < 1.0):
            raise ValueError("loss and acked_loss must be in [0, 1)")
        if self.latency < 0 or self.jitter < 0 or self.bandwidth < 0:
            raise ValueError("latency, jitter and bandwidth must not be negative")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one whole packet: forward it after ``delay`` (or drop it), and send
    ``reply`` back to its sender (a PUBACK standing in for a dropped QoS 1 PUBLISH)."""

    packet: bytes
    forward: bool
    delay: float = 0.0
    reply: bytes = b""


@dataclass(slots=True)
class FilterStats:
    """Packets seen and dropped by one :class:`PacketFilter`."""

    packets: int = 0
    publishes: int = 0
    dropped: int = 0
    bytes: int = 0


@dataclass(slots=True)
class PacketFilter:
    """One direction of one connection, sans-IO: :meth:`feed` bytes, get a :class:`Verdict` per
    whole packet completed. ``upstream`` is True for hub -> broker (where the CONNECT is)."""

    policy: FaultPolicy
    rng: random.Random
    upstream: bool
    client_id: str | None = None
    stats: FilterStats = field(default_factory=FilterStats)
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Verdict]:
        """Take bytes off the socket; return the verdicts of the packets they complete."""
        self._buffer += data
        out: list[Verdict] = []
        while True:
            packet = self._next_packet()
            if packet is None:
                return out
            out.append(self._decide(packet))

    def _next_packet(self) -> bytes | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        remaining, multiplier, pos = 0, 1, 1
        while True:
            if pos >= len(buf):
                return None
            byte = buf[pos]
            remaining += (byte & 0x7F) * multiplier
            pos += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if pos > 4:
                raise MqttFramingError("remaining length longer than 4 bytes")
        end = pos + remaining
        if len(buf) < end:
            return None
        packet = bytes(buf[:end])
        del buf[:end]
        return packet

    def _decide(self, packet: bytes) -> Verdict:
        self.stats.packets += 1
        self.stats.bytes += len(packet)
        kind, flags = packet[0] >> 4, packet[0] & 0x0F
        if kind == CONNECT and self.upstream and self.client_id is None:
            self.client_id = _connect_client_id(packet)
        delay = self.policy.latency
        if self.policy.jitter:
            delay += self.rng.uniform(0.0, self.policy.jitter)
        if kind != PUBLISH:
            return Verdict(packet, True, delay)
        self.stats.publishes += 1
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        loss = self.policy.loss if qos == 0 else self.policy.acked_loss if qos == 1 else 0.0
        if retain or not loss or self.rng.random() >= loss:
            return Verdict(packet, True, delay)
        self.stats.dropped += 1
        reply = b""
        if qos == 1:
            packet_id = _publish_packet_id(packet)
            reply = bytes((PUBACK << 4, 2)) + packet_id.to_bytes(2, "big")
        return Verdict(packet, False, 0.0, reply)


def _body_start(packet: bytes) -> int:
    pos = 1
    while packet[pos] & 0x80:
        pos += 1
    return pos + 1


def _connect_client_id(packet: bytes) -> str | None:
    """The client identifier of an MQTT 3.1.1 CONNECT, or None if it cannot be read."""
    try:
        pos = _body_start(packet)
        name_len = int.from_bytes(packet[pos : pos + 2], "big")
        pos += 2 + name_len + 1 + 1 + 2  # protocol name, level, flags, keep-alive
        id_len = int.from_bytes(packet[pos : pos + 2], "big")
        return packet[pos + 2 : pos + 2 + id_len].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        return None


def _publish_packet_id(packet: bytes) -> int:
    pos = _body_start(packet)
    topic_len = int.from_bytes(packet[pos : pos + 2], "big")
    pos += 2 + topic_len
    return int.from_bytes(packet[pos : pos + 2], "big")


# ----------------------------------------------------------------------------- the proxy


class ProxiedConnection:
    """One relayed connection: its two filters, and cut / half-open controls."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        hub_reader: asyncio.StreamReader,
        hub_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.number = number
        self._hub_reader = hub_reader
        self._hub_writer = hub_writer
        seed = f"{proxy.seed}/{number}"
        self.up = PacketFilter(proxy.policy, random.Random(f"{seed}/up"), upstream=True)
        self.down = PacketFilter(proxy.policy, random.Random(f"{seed}/down"), upstream=False)
        self.half_open = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._broker_writer: asyncio.StreamWriter | None = None
        self._unanswered_since: float | None = None  # first PUBLISH to the hub not answered

    @property
    def client_id(self) -> str | None:
        """The MQTT client id the hub connected with (None before its CONNECT)."""
        return self.up.client_id

    def set_policy(self, policy: FaultPolicy) -> None:
        """Apply ``policy`` to packets from now on."""
        self.up.policy = policy
        self.down.policy = policy

    async def run(self) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection(*self.proxy.upstream)
        except OSError as exc:
            log.info("proxy: upstream %s:%d refused: %s", *self.proxy.upstream, exc)
            await self._close_writer(self._hub_writer)
            return
        self._broker_writer = broker_writer
        self._tasks = [
            asyncio.create_task(self._pump(self._hub_reader, broker_writer, self.up, True)),
            asyncio.create_task(self._pump(broker_reader, self._hub_writer, self.down, False)),
        ]
        try:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.cut()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        packets: PacketFilter,
        upstream: bool,
    ) -> None:
        back = self._hub_writer if upstream else self._broker_writer
        next_free = 0.0  # when this direction's bandwidth allows the next byte (monotonic)
        last_due = 0.0
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    return
                if self.half_open:
                    continue
                try:
                    verdicts = packets.feed(data)
                except MqttFramingError as exc:
                    log.info("proxy: connection %d: %s", self.number, exc)
                    return
                if upstream and self.proxy.is_hung(self.client_id):
                    self.half_open = True  # a hung hub that reconnected stays hung
                    continue
                now = time.monotonic()
                for verdict in verdicts:
                    if verdict.reply and back is not None:
                        back.write(verdict.reply)
                    if not verdict.forward:
                        continue
                    publish = verdict.packet[0] >> 4 == PUBLISH
                    if not upstream and publish and self._unanswered_since is None:
                        self._unanswered_since = now  # in from the broker: a round trip starts
                    due = max(now + verdict.delay, last_due)
                    bandwidth = packets.policy.bandwidth
                    if bandwidth:
                        start = max(due, next_free)
                        next_free = start + len(verdict.packet) / bandwidth
                        due = next_free
                    last_due = due
                    queue.put_nowait((due, verdict.packet))
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        to_hub = writer is self._hub_writer
        while True:
            item = await queue.get()
            if item is None:
                return
            due, packet = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.half_open:
                continue
            if not to_hub and packet[0] >> 4 == PUBLISH:
                self._answered()  # leaves the proxy for the broker: the round trip ends
            writer.write(packet)
            if writer.transport.get_write_buffer_size() > READ_CHUNK:
                await writer.drain()

    def _answered(self) -> None:
        if self._unanswered_since is not None:
            self.proxy.record_round_trip(time.monotonic() - self._unanswered_since)
            self._unanswered_since = None

    def cut(self) -> None:
        """Close both sides now (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for writer in (self._hub_writer, self._broker_writer):
            if writer is not None:
                writer.transport.abort()
        for task in self._tasks:
            task.cancel()

    @property
    def closed(self) -> bool:
        """Whether the connection has been cut or has ended."""
        return self._closed.is_set()

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class FaultProxy:
    """Listen on ``host:port`` (0: a free port) and relay to ``upstream`` under ``policy``.

    ``async with FaultProxy(("127.0.0.1", broker.port), FaultPolicy(loss=0.01)) as proxy:``
    then point the hubs at ``proxy.port``. :meth:`cut` and :meth:`hang` act on the connections
    whose client id a predicate selects (default: all of them).
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        policy: FaultPolicy | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        self.policy = policy or FaultPolicy()
        self.host = host
        self.port = port
        self.seed = seed
        self.connections: list[ProxiedConnection] = []
        self._server: asyncio.Server | None = None
        self._count = 0
        self._hung: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed_stats = FilterStats()  # totals of connections that have ended
        self._round_trips: list[float] = []
        self._rtt_seen = 0
        self._rtt_rng = random.Random(f"{seed}/rtt")

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening (``port`` becomes the real one)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for conn in list(self.connections):
            conn.cut()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def set_policy(self, policy: FaultPolicy) -> None:
        """Change the policy of every connection, current and future."""
        self.policy = policy
        for conn in self.connections:
            conn.set_policy(policy)

    def _select(self, client_ids: Iterable[str] | None) -> list[ProxiedConnection]:
        if client_ids is None:
            return list(self.connections)
        wanted = set(client_ids)
        return [c for c in self.connections if c.client_id in wanted]

    def cut(self, client_ids: Iterable[str] | None = None) -> int:
        """Cut the connections of ``client_ids`` (all if None); returns how many."""
        chosen = self._select(client_ids)
        for conn in chosen:
            conn.cut()
        return len(chosen)

    def hang(self, client_ids: Iterable[str] | None = None, *, hung: bool = True) -> int:
        """Half-open (``hung``) or resume the connections of ``client_ids``; a hub that
        reconnects while hung stays hung. Returns how many connections it changed."""
        ids = None if client_ids is None else set(client_ids)
        if ids is not None:
            self._hung = self._hung | ids if hung else self._hung - ids
        chosen = self._select(ids)
        for conn in chosen:
            conn.half_open = hung
        return len(chosen)

    def totals(self) -> FilterStats:
        """Packets seen and dropped over every connection, both directions, so far."""
        out = FilterStats(**_fields(self.closed_stats))
        for conn in self.connections:
            for part in (conn.up.stats, conn.down.stats):
                _add(out, part)
        return out

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count += 1
        conn = ProxiedConnection(self, self._count, reader, writer)
        conn.set_policy(self.policy)
        self.connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # the server's own task, cancelled at the end of the loop: nothing to report
        finally:
            self.connections.remove(conn)
            for part in (conn.up.stats, conn.down.stats):
                _add(self.closed_stats, part)
            if task is not None:
                self._tasks.discard(task)

    def record_round_trip(self, seconds: float) -> None:
        """Keep one ack round-trip sample (at most :data:`MAX_RTT_SAMPLES` until taken)."""
        self._rtt_seen += 1
        if len(self._round_trips) < MAX_RTT_SAMPLES:
            self._round_trips.append(seconds)
        else:
            slot = self._rtt_rng.randrange(self._rtt_seen)
            if slot < MAX_RTT_SAMPLES:
                self._round_trips[slot] = seconds

    def take_round_trips(self) -> list[float]:
        """The ack round trips (seconds) measured since the last call."""
        out, self._round_trips, self._rtt_seen = self._round_trips, [], 0
        return out

    def is_hung(self, client_id: str | None) -> bool:
        """Whether connections of ``client_id`` are to be half-open."""
        return client_id is not None and client_id in self._hung


def _fields(stats: FilterStats) -> dict[str, int]:
    return {
        "packets": stats.packets,
        "publishes": stats.publishes,
        "dropped": stats.dropped,
        "bytes": stats.bytes,
    }


def _add(total: FilterStats, part: FilterStats) -> None:
    total.packets += part.packets
    total.publishes += part.publishes
    total.dropped += part.dropped
    total.bytes += part.bytes


# ----------------------------------------------------------------------------- own process


async def serve_process(config: dict[str, Any]) -> int:
    """Body of ``python -m loadtest _proxy CONFIG``: a :class:`FaultProxy` obeying JSON lines on
    stdin (``cut``, ``hang``, ``policy``, ``totals``, ``round_trips``, ``quit``), answering on
    stdout; its first line gives the port. Ends on ``quit`` or when stdin closes (the parent
    went away); ignores SIGINT (the parent orchestrates the shutdown)."""
    import signal
    import sys

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    proxy = FaultProxy(
        (config["upstream_host"], int(config["upstream_port"])),
        FaultPolicy(**config.get("policy", {})),
        seed=int(config.get("seed", 0)),
    )
    await proxy.start()

    def send(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    send({"event": "listening", "port": proxy.port})
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return 0
            request = json.loads(line)
            cmd = request.get("cmd")
            result: Any = None
            if cmd == "cut":
                result = proxy.cut(request.get("ids"))
            elif cmd == "hang":
                result = proxy.hang(request.get("ids"), hung=bool(request.get("hung", True)))
            elif cmd == "policy":
                proxy.set_policy(FaultPolicy(**request["policy"]))
            elif cmd == "totals":
                result = _fields(proxy.totals())
            elif cmd == "round_trips":
                result = proxy.take_round_trips()
            elif cmd == "quit":
                send({"id": request.get("id"), "result": None})
                return 0
            else:
                send({"id": request.get("id"), "error": f"unknown command {cmd!r}"})
                continue
            send({"id": request.get("id"), "result": result})
    finally:
        await proxy.close()


class ProxyProcess:
    """A :class:`FaultProxy` in its own process (``python -m loadtest _proxy``), so relaying
    thousands of hubs' packets has a core of its own rather than the runner's loop. The same
    controls as the proxy, as coroutines; :meth:`close` ends the process (also killed if it
    does not end by itself)."""

    def __init__(
        self, upstream: tuple[str, int], policy: FaultPolicy | None = None, *, seed: int = 0
    ) -> None:
        self.upstream = upstream
        self.policy = policy or FaultPolicy()
        self.seed = seed
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._next = 0

    @property
    def pid(self) -> int | None:
        """The proxy process's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def start(self, wait_s: float = 30.0) -> None:
        """Start the process; returns once it listens (``port`` is then set)."""
        import sys

        config = {
            "upstream_host": self.upstream[0],
            "upstream_port": self.upstream[1],
            "seed": self.seed,
            "policy": _policy_json(self.policy),
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest", "_proxy", json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )  # fmt: skip
        first = await asyncio.wait_for(self._line(), wait_s)
        self.port = int(first["port"])

    async def _line(self) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError("the fault proxy process exited")
        answer: dict[str, Any] = json.loads(raw)
        return answer

    async def call(self, cmd: str, wait_s: float = 30.0, **fields: Any) -> Any:
        """One command, its result."""
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise RuntimeError("the fault proxy process is not running")
        async with self._lock:
            self._next += 1
            line = json.dumps({"id": self._next, "cmd": cmd, **fields}) + "\n"
            self.proc.stdin.write(line.encode())
            await self.proc.stdin.drain()
            answer = await asyncio.wait_for(self._line(), wait_s)
        if "error" in answer:
            raise RuntimeError(f"fault proxy: {answer['error']}")
        return answer.get("result")

    async def cut(self, client_ids: Iterable[str] | None = None) -> int:
        """:meth:`FaultProxy.cut` in the proxy process."""
        ids = None if client_ids is None else list(client_ids)
        return int(await self.call("cut", ids=ids))

    async def hang(self, client_ids: Iterable[str] | None = None, *, hung: bool = True) -> int:
        """:meth:`FaultProxy.hang` in the proxy process."""
        ids = None if client_ids is None else list(client_ids)
        return int(await self.call("hang", ids=ids, hung=hung))

    async def set_policy(self, policy: FaultPolicy) -> None:
        """:meth:`FaultProxy.set_policy` in the proxy process."""
        self.policy = policy
        await self.call("policy", policy=_policy_json(policy))

    async def totals(self) -> FilterStats:
        """:meth:`FaultProxy.totals` of the proxy process."""
        return FilterStats(**await self.call("totals"))

    async def take_round_trips(self) -> list[float]:
        """:meth:`FaultProxy.take_round_trips` of the proxy process."""
        return [float(x) for x in await self.call("round_trips")]

    async def close(self, wait_s: float = 10.0) -> None:
        """End the process (``quit``; SIGKILL if it does not end within ``wait_s``)."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("quit", wait_s=wait_s)
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        self.proc = None


def _policy_json(policy: FaultPolicy) -> dict[str, float]:
    return {
        "latency": policy.latency,
        "jitter": policy.jitter,
        "loss": policy.loss,
        "bandwidth": policy.bandwidth,
        "acked_loss": policy.acked_loss,
    }
