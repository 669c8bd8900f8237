"""What otad can see of the broker breaking SPEC §1.1 (broker requirements), measured at start.

After each (re)connection of the data session, :class:`BrokerCheck` opens a short probe session
(client id ``<client_id>.probe``, same broker, credentials and TLS, no will) and talks to itself
on ``ota/v1/otad/probe/<client_id>/...``:

* **Nagle** (``set_tcp_nodelay true``): a few bursts of small QoS 0 messages, each burst written
  in one go. A broker with Nagle on sends the first message of a burst at once and holds the
  rest until the receiver's delayed ACK (~40 ms on Linux); with it off the whole burst arrives
  within a millisecond. Measured on loopback with Mosquitto 2.0.11: the spread between the first
  and the last arrival of a burst of 4 was 0.3-0.5 ms with ``set_tcp_nodelay true`` and 41.3-45 ms
  with ``false``, every burst. The check warns when the median spread over :data:`BURSTS` bursts
  exceeds :data:`NAGLE_SPREAD_S` (15 ms: 30x the good case, a third of the bad one). The effect
  needs the burst to reach the broker in one read, as otad's blocks do: the probe therefore
  always uses gmqtt (:data:`PROBE_LIBRARY`), which writes a loop turn's packets in one go.
  aiomqtt (paho) writes each packet on its own, and through it the stall showed in only 1 burst
  of 9, whichever library otad itself uses. The spread is robust to a busy event loop (otad
  replaying a fleet's retained announcements at the same moment): without Nagle the burst comes
  back in one segment and is handled in one read, so its arrivals are timestamped together.
* **retained messages**: a retained probe is published, the probe filter is subscribed again, and
  the broker must replay the message flagged retained; the probe then clears it (empty retained).
* **packet size** (``max_packet_size``): one QoS 0 probe exactly as large as otad's largest
  packet (an ``Offer`` at its cap on a CH's down topic) must come back. Mosquitto with a smaller
  ``max_packet_size`` disconnects the client ("oversize packet"); with the deprecated
  ``message_size_limit`` it drops the message silently. Either is a warning. This check runs last
  (it may cost the probe session its connection) and on the probe's own session, never on the
  data session.

Each failed check is one WARNING log line naming the requirement and the SPEC section, and one
entry of :attr:`BrokerCheck.warnings` (the status's ``broker_warnings``). The whole probe is bounded
by :data:`BUDGET_S` (1 s) and runs in its own task: start-up never waits for it, a broker that does
not answer only leaves the checks not made (logged at INFO), and a run that is still going when
the connection comes back again is not doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from mqttio import MqttClient, MqttError, MqttSettings, wait_acknowledged
from protocol.wire import topics
from protocol.wire.messages import Offer

__all__ = [
    "BUDGET_S",
    "BURSTS",
    "NAGLE_SPREAD_S",
    "PROBE_LIBRARY",
    "BrokerCheck",
    "largest_packet_bytes",
]

log = logging.getLogger("otad.brokercheck")

SECTION = "SPEC §1.1"
PROBE_LIBRARY = "gmqtt"
"""The probe's MQTT client, whatever otad's own (see the module docstring)."""
BUDGET_S = 1.0
"""The whole probe, connection included, never takes longer."""
BURSTS = 5
BURST_MESSAGES = 4
NAGLE_SPREAD_S = 0.015
"""Median first-to-last arrival spread of a burst above which the broker's Nagle is on."""
_BURST_WAIT_S = 0.12  # one burst: ~40 ms with Nagle on, well under 1 ms without
_RETAINED_WAIT_S = 0.2
_SIZE_WAIT_S = 0.4
_PAYLOAD_BYTES = 16

#: A CH's down topic (every GUID has 16 characters), where otad's largest packet goes.
_DOWN_TOPIC_BYTES = len(topics.down("0" * 16))


def largest_packet_bytes() -> int:
    """Bytes of otad's largest MQTT packet: an ``Offer`` at its cap, at QoS 1, on a CH's down
    topic (fixed header, remaining length, topic, packet id, payload). A broker's
    ``max_packet_size`` must be at least this (SPEC §1.1)."""
    return _packet_bytes(_DOWN_TOPIC_BYTES, Offer.MAX_BYTES, qos=1)


def _packet_bytes(topic_bytes: int, payload_bytes: int, *, qos: int) -> int:
    remaining = 2 + topic_bytes + (2 if qos else 0) + payload_bytes
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


class BrokerCheck:
    """Measures the broker once per connection of the data session (see the module docstring).

    ``settings`` are the data session's (the probe takes its broker, credentials and TLS);
    ``make_client(library, settings)`` makes the probe's client; ``on_result`` is called after
    every run that changed :attr:`warnings`. A complete run replaces :attr:`warnings`; one cut
    short by the time budget only adds what it found.
    """

    def __init__(
        self,
        settings: MqttSettings,
        make_client: Callable[[str, MqttSettings], MqttClient],
        *,
        on_result: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = replace(
            settings,
            client_id=f"{settings.client_id}.probe",
            will=None,
            clean_session=True,
            reconnect_min=BUDGET_S,
            reconnect_max=BUDGET_S,
            connect_timeout=BUDGET_S / 2,
            max_inflight=100,
            read_chunk=None,
        )
        self._make_client = make_client
        self._on_result = on_result
        self._root = topics.otad_probe(settings.client_id)
        self._task: asyncio.Task[None] | None = None
        self.warnings: list[str] = []
        """One line per requirement the last complete run saw broken."""
        self.runs = 0

    def connection_up(self) -> None:
        """The data session came up: measure, in the background, unless a run is going."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otad.brokercheck")

    async def wait(self) -> None:
        """Wait for the current run, if any, to end (tests)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop a run in progress (shutdown)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        probe = _Probe(self._make_client(PROBE_LIBRARY, self._settings), self._root)
        found: list[str] = []
        try:
            async with asyncio.timeout(BUDGET_S):
                await probe.run(found)
        except TimeoutError:
            log.info("broker check: not finished within %.1f s; %s", BUDGET_S, probe.progress())
            found = self.warnings + [w for w in found if w not in self.warnings]
        except MqttError as exc:
            log.info("broker check: probe session failed (%s); %s", exc, probe.progress())
            return
        finally:
            await probe.close()
        self.runs += 1
        if not found and probe.finished:
            log.info(
                "broker check: every requirement it can see is met (burst spread %.2f ms,"
                " retained probe replayed, a %s-byte packet came back)",
                (probe.spread or 0.0) * 1000,
                f"{largest_packet_bytes():,}",
            )
        for line in found:
            if line not in self.warnings:
                log.warning("broker: %s", line)
        if found != self.warnings:
            self.warnings = found
            self._on_result()


class _Probe:
    """One run: the probe session and what came back on it."""

    def __init__(self, client: MqttClient, root: str) -> None:
        self._client = client
        self._root = root
        self._filter = f"{root}/#"
        self._nonce = os.urandom(4)
        self._arrivals: dict[int, list[float]] = {}
        self._burst_done: dict[int, asyncio.Event] = {}
        self._retained = asyncio.Event()
        self._sized = asyncio.Event()
        self._lost = asyncio.Event()
        self._size = 0
        self._step = "connecting"
        self.finished = False
        """Every check was made."""
        self.spread: float | None = None
        """Median first-to-last spread of the bursts, seconds (once measured)."""
        client.set_message_handler(self._message_received)
        client.set_connection_handler(self._connection_changed)

    def progress(self) -> str:
        """Which step the run had reached (for a log line)."""
        return f"stopped while {self._step}"

    async def run(self, found: list[str]) -> None:
        client = self._client
        await client.subscribe(self._filter, 1)
        await client.connect(fail_fast=True)
        self._step = "measuring bursts"
        spreads = await self._bursts()
        if spreads is None:
            log.info(
                "broker check: no probe message came back on %s (ACL?); nothing measured",
                self._filter,
            )
            return
        spread = self.spread = statistics.median(spreads)
        if spread > NAGLE_SPREAD_S:
            found.append(
                f"set_tcp_nodelay true ({SECTION}): the last of a burst of {BURST_MESSAGES} small"
                f" messages came {spread * 1000:.1f} ms after the first (median of {len(spreads)}"
                f" bursts; > {NAGLE_SPREAD_S * 1000:.0f} ms means the broker's Nagle holds back"
                " every burst towards a CH)"
            )
        self._step = "checking retained messages"
        if not await self._retained_replayed():
            what = (
                "made the broker close the connection"
                if self._lost.is_set()
                else "was not replayed on subscribe"
            )
            found.append(
                f"retained messages ({SECTION}): a retained probe {what} (CH announcements,"
                " their wills and otad's status are retained)"
            )
        if self._lost.is_set():
            log.info("broker check: the probe session was lost; packet size not checked")
            return
        self._step = "checking the packet size limit"
        outcome = await self._largest_packet()
        if outcome:
            found.append(
                f"max_packet_size >= {largest_packet_bytes():,} bytes ({SECTION}): a probe as"
                f" large as an Offer at its cap {outcome}"
            )
        self._step = "done"
        self.finished = True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    # ------------------------------------------------------------------ checks

    async def _bursts(self) -> list[float] | None:
        """First-to-last arrival spread of each complete burst; None if nothing came back."""
        topic = f"{self._root}/nagle"
        spreads: list[float] = []
        anything = False
        for burst in range(BURSTS):
            done = self._burst_done[burst] = asyncio.Event()
            self._arrivals[burst] = []
            for index in range(BURST_MESSAGES):
                payload = self._nonce + bytes((burst, index))
                self._client.publish(topic, payload.ljust(_PAYLOAD_BYTES, b"\0"), 0, False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_BURST_WAIT_S):
                    await done.wait()
            arrivals = self._arrivals[burst]
            anything = anything or bool(arrivals)
            if len(arrivals) == BURST_MESSAGES:
                spreads.append(arrivals[-1] - arrivals[0])
            elif arrivals:  # the rest held back past the wait: a stall at least that long
                spreads.append(_BURST_WAIT_S)
        return spreads if anything else None

    async def _retained_replayed(self) -> bool:
        topic = f"{self._root}/retained"
        client = self._client
        client.publish(topic, self._nonce, 1, True)
        try:
            if not await wait_acknowledged(client, _RETAINED_WAIT_S):
                return False
            await client.subscribe(self._filter, 1)  # again: the broker replays retained ones
            async with asyncio.timeout(_RETAINED_WAIT_S):
                await self._retained.wait()
            return True
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(MqttError):
                client.publish(topic, b"", 1, True)  # clear it
                await wait_acknowledged(client, _RETAINED_WAIT_S)

    async def _largest_packet(self) -> str:
        """'' if the largest packet came back, else what happened to it."""
        topic = f"{self._root}/size"
        target = largest_packet_bytes()
        size = Offer.MAX_BYTES
        while _packet_bytes(len(topic.encode()), size, qos=0) > target:
            size -= 1
        while _packet_bytes(len(topic.encode()), size + 1, qos=0) <= target:
            size += 1
        self._size = size
        self._client.publish(topic, self._nonce + bytes(size - len(self._nonce)), 0, False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SIZE_WAIT_S):
                await _first(self._sized, self._lost)
        if self._sized.is_set():
            return ""
        if self._lost.is_set():
            return "made the broker close the connection (max_packet_size too small)"
        return f"did not come back within {_SIZE_WAIT_S:.1f} s (message_size_limit too small?)"

    # ------------------------------------------------------------------ callbacks

    def _message_received(self, topic: str, payload: bytes, retain: bool) -> None:
        if not payload.startswith(self._nonce):
            return  # a previous run's, or another otad's
        leaf = topic[len(self._root) + 1 :]
        if leaf == "nagle" and len(payload) == _PAYLOAD_BYTES:
            arrivals = self._arrivals.get(payload[4])
            if arrivals is not None:
                arrivals.append(time.perf_counter())
                if len(arrivals) == BURST_MESSAGES:
                    self._burst_done[payload[4]].set()
        elif leaf == "retained" and retain:
            self._retained.set()
        elif leaf == "size" and len(payload) == self._size:
            self._sized.set()

    def _connection_changed(self, up: bool) -> None:
        if not up:
            self._lost.set()


async def _first(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
