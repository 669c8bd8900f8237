"""A subscriber to otad's monitoring feed: the events, decoded and each kept once, and the status.

What the demo, the benchmarks and the integration tests watch otad through, the way any tool
would (``docs/EVENTS.md``)::

    monitor = await EventMonitor.connect("127.0.0.1", 1883)
    await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) == 200)
    await monitor.close()

Events are decoded with :func:`otad.events.decode_event` and kept by ``seq``: a duplicate on the
wire (otad re-publishes what it could not confirm) is counted in :attr:`EventMonitor.duplicates`,
never kept twice; a payload that is no event of this schema is counted in
:attr:`EventMonitor.undecodable`. The retained status is kept as it arrives (the newest last).
:meth:`EventMonitor.feed` is the MQTT message handler, so a caller with its own client (a wiretap
on more topics) can feed it what it receives.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mqttio import MqttClient, MqttSettings, create_client
from otad.events import EventDecodeError, MonitorEvent, decode_event
from protocol.wire import topics

__all__ = ["EventMonitor"]

_E = TypeVar("_E", bound=MonitorEvent)
#: The default events topic filter (every event, under the default ``events.topic_prefix``).
EVENTS_FILTER = topics.EVENTS_WILDCARD


class EventMonitor:
    """Decoded events by ``seq`` and the statuses seen (see the module docstring)."""

    def __init__(
        self,
        *,
        on_event: Callable[[MonitorEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_event(event)`` is called once per new event, as it arrives; ``clock`` (unix
        seconds) stamps :attr:`received_at`."""
        self._on_event = on_event
        self._clock = clock
        self.events: dict[int, MonitorEvent] = {}
        """Every distinct event by ``seq``, in the order they arrived."""
        self.received: list[MonitorEvent] = []
        """Every event received, duplicates included."""
        self.received_at: dict[int, float] = {}
        """When each ``seq`` first arrived (``clock``)."""
        self.statuses: list[dict[str, Any]] = []
        """Every retained status received, the newest last."""
        self.duplicates = 0
        self.undecodable = 0
        self._by_kind: dict[type[MonitorEvent], list[MonitorEvent]] = {}
        self._changed = asyncio.Event()
        self._client: MqttClient | None = None

    # ------------------------------------------------------------------ connection

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        library: str = "gmqtt",
        status: bool = True,
        events_filter: str = EVENTS_FILTER,
        client_id: str | None = None,
        on_event: Callable[[MonitorEvent], None] | None = None,
    ) -> EventMonitor:
        """A monitor subscribed (before it connects, so nothing is missed) to the events and,
        with ``status``, the retained status."""
        monitor = cls(on_event=on_event)
        client = create_client(
            library,
            MqttSettings(
                client_id=client_id or f"monitor-{os.getpid()}-{secrets.token_hex(3)}",
                host=host,
                port=port,
            ),
        )
        client.set_message_handler(monitor.feed)
        await client.subscribe(events_filter, 1)
        if status:
            await client.subscribe(topics.OTAD_STATUS, 1)
        await client.connect()
        monitor._client = client
        return monitor

    async def close(self) -> None:
        """Disconnect (if :meth:`connect` made the client)."""
        if self._client is not None:
            await self._client.disconnect()
            self._client = None

    # ------------------------------------------------------------------ the feed

    def feed(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Take one message of the feed (the MQTT message handler)."""
        if topic == topics.OTAD_STATUS:
            try:
                status = json.loads(payload)
            except ValueError:
                self.undecodable += 1
                return
            if isinstance(status, dict):
                self.statuses.append(status)
                self._changed.set()
            return
        try:
            event = decode_event(payload)
        except EventDecodeError:
            self.undecodable += 1
            return
        self.received.append(event)
        if event.seq in self.events:
            self.duplicates += 1
            return
        self.events[event.seq] = event
        self.received_at[event.seq] = self._clock()
        self._by_kind.setdefault(type(event), []).append(event)
        if self._on_event is not None:
            self._on_event(event)
        self._changed.set()

    def of_kind(self, kind: type[_E]) -> list[_E]:
        """The distinct events of one kind, in the order they arrived."""
        return cast(list[_E], list(self._by_kind.get(kind, ())))

    @property
    def status(self) -> dict[str, Any]:
        """The newest status received ({} before the first)."""
        return self.statuses[-1] if self.statuses else {}

    async def wait_for(self, predicate: Callable[[], bool], wait_s: float = 60.0) -> None:
        """Wait until ``predicate()`` holds (checked whenever an event or a status arrives, and
        every 0.2 s); ``TimeoutError`` after ``wait_s``."""
        async with asyncio.timeout(wait_s):
            while not predicate():
                self._changed.clear()
                try:
                    async with asyncio.timeout(0.2):
                        await self._changed.wait()
                except TimeoutError:
                    pass
