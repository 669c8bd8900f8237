"""The otad application: one process, one uvloop event loop, one MQTT session, named tasks.

Start-up order: trust store (a worker thread reads the key files), store (migrations), image
catalogue, fleet registry, active transfers rebuilt from the store, then the MQTT sessions
(retrying with backoff until the broker answers; the subscriptions are in place before
``connect`` returns), then sending starts.

Two MQTT sessions. The data session (client id ``broker.client_id``) carries the CHs' reports,
the blocks, the events and the retained status (its last will marks the status offline). The
control session (``<client_id>.ctl``) carries only operator requests and their responses: at
fleet scale the data session's socket holds hundreds of kilobytes of acknowledgements waiting
to be read, and its send buffer a megabyte of blocks, so a control request or response sharing
it waited behind them (0.5-1 s measured at 3,000 CHs). On its own connection a request is read
within one event-loop turn. Long-running work
runs as named tasks in one :class:`asyncio.TaskGroup`:

``otad.events``     outbox -> ``ota/v1/events/<kind>`` (see :mod:`otad.events`)
``otad.events.prune`` published events past ``events.retention_days`` leave the outbox, hourly
``otad.status``     the retained ``ota/v1/otad/status`` snapshot
``otad.progress``   hands acknowledgement bookkeeping to the store's batch every flush interval
``otad.finals``     commits ended transfers' final states, in batches, after their events
``otad.stalls``     flags transfers and distributions that stopped making progress
``otad.looplag``    measures event-loop lag continuously (shown in the status)
``otad.registry``   writes hub announcements / presence to the store, group-committed
``otad.store.writer`` (the store's own single writer task)

Everything on the data path runs in the MQTT message handler and in ``loop.call_at`` timers, with
no task per message (:mod:`otad.distribution`).

SIGTERM or SIGINT: stop sending, commit the final states and the progress batch, publish the
queued events and the retained ``offline`` status, disconnect cleanly, close the store, exit 0.
If the process dies instead, the broker publishes otad's last will: the same ``offline`` status.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from mqttio import MqttClient, MqttSettings, Will, create_client
from otad.catalogue import Catalogue
from otad.commands import Commands
from otad.config import Config
from otad.control import Control
from otad.distribution import Distribution
from otad.events import (
    SCHEMA_VERSION,
    EventPublisher,
    StatusPublisher,
    dumps,
    wait_acknowledged,
)
from otad.keyfiles import load_trust_dir
from otad.looplag import LoopLag
from otad.registry import Hub, Registry
from otad.rejects import RejectLog
from otad.store import Store, StoreError
from protocol.errors import Reason
from protocol.wire import topics

log = logging.getLogger("otad")

#: How often each progressing transfer's acknowledged bitmap is handed to the store's batch.
#: The CH's answer to the Offer after a restart is authoritative, so staleness here costs no
#: resent blocks; it only bounds what ``otactl transfers`` shows for a CH that is offline. (At
#: 10,000 CHs every hand-off is 10,000 row updates on the store's one writer, which the events
#: wait behind: 0.5 s was 20,000 updates a second.)
PROGRESS_HANDOFF_S = 2.0
#: Bytes of received packets handled per event-loop turn (MqttSettings.read_chunk). gmqtt reads
#: 64 KiB at a time and handles every packet in it before anything else runs: about 660
#: acknowledgements, 100-180 ms of otad's work at 3,000 CHs, during which no timer, control
#: request or status ran. 8 KiB (about 80, ~12 ms) bounds that for one extra loop turn a chunk.
READ_CHUNK = 8 * 1024
_CH_PREFIX = f"{topics.ROOT}/ch/"
_CTL_PREFIX = f"{topics.ROOT}/ctl/"
_UP_TOPIC_LEN = len(topics.up("0" * 16))


def version() -> str:
    """The installed otad version."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("otad")
    except Exception:
        return "0+unknown"


class _StopRequestedError(Exception):
    """Raised inside the task group to end it on a shutdown signal."""


class Daemon:
    """The running daemon (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        """Prepare; nothing happens until :meth:`run`."""
        self.config = config
        self.started_at = time.time()
        self.version = version()
        self._stop = asyncio.Event()
        self.rejects = RejectLog(logging.getLogger("otad.input"))
        self.loop_lag = LoopLag()
        # set up in run()
        self.store: Store
        self.client: MqttClient
        self.control_client: MqttClient
        self.catalogue: Catalogue
        self.registry: Registry
        self.events: EventPublisher
        self.status: StatusPublisher
        self.distribution: Distribution
        self.control: Control

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Begin a clean shutdown (signal handler)."""
        if not self._stop.is_set():
            log.info("shutdown requested")
        self._stop.set()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        c = self.config
        try:
            trust = await asyncio.to_thread(load_trust_dir, c.trust.dir, c.trust.revoked_file)
        except Exception as exc:
            log.error("cannot load the trust store: %s", exc)
            return 2
        if not trust.kids:
            log.warning(
                "trust store %s holds no usable key: every image will be refused", c.trust.dir
            )
        try:
            self.store = await Store.open(
                c.store.state_dir,
                flush_interval=c.store.flush_interval,
                flush_batch=c.store.flush_batch,
            )
        except StoreError as exc:
            log.error("cannot open the store: %s", exc)
            return 2
        try:
            return await self._run_open(trust)
        finally:
            try:
                await self.store.close()
            except StoreError as exc:
                log.error("closing the store: %s", exc)

    async def _run_open(self, trust: Any) -> int:
        c = self.config
        loop = asyncio.get_running_loop()
        self.catalogue = Catalogue(self.store, trust, Path(c.store.state_dir) / "images")
        await self.catalogue.load()
        self.client = create_client(c.broker.library, await self._mqtt_settings())
        self.events = EventPublisher(self.store, self.client, topic_prefix=c.events.topic_prefix)
        self.registry = Registry(
            self.store, self.events, on_change=self._hub_changed, rejects=self.rejects
        )
        await self.registry.load()
        self.status = StatusPublisher(self.client, topics.OTAD_STATUS, self._snapshot)
        self.distribution = Distribution(
            timers=loop,
            client=self.client,
            store=self.store,
            catalogue=self.catalogue,
            registry=self.registry,
            events=self.events,
            config=c.transfer,
            progress_interval=c.events.progress_interval_s,
            rejects=self.rejects,
        )
        resumed = await self.distribution.resume()
        self.control_client = create_client(
            c.broker.library, await self._mqtt_settings(control=True)
        )
        commands = Commands(
            catalogue=self.catalogue,
            registry=self.registry,
            distribution=self.distribution,
            events=self.events,
            snapshot=self._snapshot,
            status_changed=self.status.poke,
            rejects=self.rejects,
        )
        self.control = Control(self.control_client, commands.table(), rejects=self.rejects)
        self.client.set_message_handler(self._on_message)
        self.client.set_connection_handler(self._on_connection)
        self.control_client.set_message_handler(self._on_control_message)
        for topic in (topics.STATE_WILDCARD, topics.UP_WILDCARD):
            await self.client.subscribe(topic, 1)
        await self.control_client.subscribe(topics.CTL_REQUEST_WILDCARD, 1)
        log.info(
            "otad %s: %d image(s), %d hub(s) known, %d transfer(s) to resume; connecting to %s:%d"
            " with %s",
            self.version,
            len(self.catalogue.images),
            len(self.registry.hubs),
            resumed,
            c.broker.host,
            c.broker.port,
            c.broker.library,
        )
        connect = loop.create_task(self._connect_both(), name="mqttio.connect")
        stop = loop.create_task(self._stop.wait(), name="otad.stop.wait")
        await asyncio.wait((connect, stop), return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            stop.cancel()
            log.info("stopped before the broker could be reached")
            return 0
        stop.cancel()
        connect.result()
        self.distribution.start()
        self.status.poke()
        # Everything loaded so far (modules, the fleet, resumed transfers) lives as long as the
        # process: move it out of the cyclic collector's sight, so its full passes scan only
        # what came later (a pass over a fleet-sized heap stalls the loop for 50-150 ms).
        gc.freeze()
        log.info("otad ready (state %s)", c.store.state_dir)
        status = 0
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.events.run(), name="otad.events")
                if c.events.retention_days:
                    group.create_task(
                        self.events.run_pruning(c.events.retention_days * 86_400.0),
                        name="otad.events.prune",
                    )
                group.create_task(self.status.run(), name="otad.status")
                group.create_task(
                    self.distribution.run_progress_flusher(
                        max(c.store.flush_interval, PROGRESS_HANDOFF_S)
                    ),
                    name="otad.progress",
                )
                group.create_task(self.distribution.run_final_writer(), name="otad.finals")
                group.create_task(self.distribution.run_stall_watch(), name="otad.stalls")
                group.create_task(self.loop_lag.run(), name="otad.looplag")
                group.create_task(self.registry.run(), name="otad.registry")
                group.create_task(self._wait_stop(), name="otad.shutdown")
        except* _StopRequestedError:
            pass
        except* Exception as failures:
            for exc in failures.exceptions:
                log.error("task failed: %r", exc, exc_info=exc)
            status = 1
        await self._shutdown()
        return status

    async def _connect_both(self) -> None:
        await self.client.connect()
        await self.control_client.connect()

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        raise _StopRequestedError

    async def _shutdown(self) -> None:
        """Clean stop: nothing more is sent, every decision and the latest progress is
        committed, queued events go out, the retained status says offline."""
        log.info("stopping: flushing state")
        self.distribution.halt()
        await self.control.close()
        await self.registry.flushed()
        await self.events.flush()  # commits the events the final-state writes wait for
        await self.distribution.wait_final_writes()
        await self.events.close()
        self.status.publish_offline()
        await wait_acknowledged(self.client, 2.0)
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        with contextlib.suppress(Exception):
            await self.control_client.disconnect()
        log.info("stopped")

    async def _mqtt_settings(self, *, control: bool = False) -> MqttSettings:
        """The data session's settings, or (``control``) the control session's: same broker
        and credentials, client id ``<client_id>.ctl``, no will."""
        b = self.config.broker
        password = None
        if b.password_file is not None:
            text = await asyncio.to_thread(Path(b.password_file).read_text)
            password = text.strip()
        offline = dumps(
            {
                "v": SCHEMA_VERSION,
                "state": "offline",
                "version": self.version,
                "pid": os.getpid(),
                "started_at": round(self.started_at, 3),
                "reason": "connection lost",
            }
        )
        return MqttSettings(
            client_id=f"{b.client_id}.ctl" if control else b.client_id,
            host=b.host,
            port=b.port,
            username=b.username,
            password=password,
            tls_ca=None if b.tls_ca is None else str(b.tls_ca),
            tls_cert=None if b.tls_cert is None else str(b.tls_cert),
            tls_key=None if b.tls_key is None else str(b.tls_key),
            keepalive=b.keepalive,
            clean_session=True,
            will=None if control else Will(topics.OTAD_STATUS, offline, 1, True),
            max_inflight=1000 if control else 10_000,
            read_chunk=READ_CHUNK,
        )

    # ------------------------------------------------------------------ MQTT routing

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.endswith("/up") and len(topic) == _UP_TOPIC_LEN and topic.startswith(_CH_PREFIX):
            self.distribution.up_received(topic, payload)
        elif topic.startswith(_CH_PREFIX):
            if topic.endswith("/state"):
                self.registry.state_received(topic, payload, retain, time.time())
            else:
                self.distribution.up_received(topic, payload)  # the slow path refuses it
        else:
            self.rejects.reject(f"message on {topic[:80]!r}", Reason.BAD_IDENTIFIER, "topic")

    def _on_control_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.startswith(_CTL_PREFIX) and topic.endswith("/req"):
            self.control.request_received(topic, payload)
        else:
            self.rejects.reject(f"message on {topic[:80]!r}", Reason.BAD_IDENTIFIER, "topic")

    def _on_connection(self, up: bool) -> None:
        if up:
            log.info("MQTT session up")
        else:
            log.warning("MQTT session lost; reconnecting")
        self.distribution.connection_changed(up)
        self.events.connection_changed(up)
        if up:
            self.status.poke()

    # ------------------------------------------------------------------ fleet

    def _hub_changed(self, hub: Hub, was_online: bool, announced: bool, changed: bool) -> None:
        self.distribution.hub_changed(hub, was_online, announced, changed)
        if was_online != hub.online:
            self.status.poke()

    # ------------------------------------------------------------------ status

    def _snapshot(self) -> dict[str, Any]:
        """The status fields (cheap: every figure is kept incrementally, nothing walks the
        fleet)."""
        hubs = self.registry.hubs
        distribution = self.distribution
        now = asyncio.get_running_loop().time()
        return {
            "version": self.version,
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "library": self.config.broker.library,
            "hubs": {"known": len(hubs), "online": self.registry.online},
            "images": len(self.catalogue.images),
            "transfers": distribution.counts(),
            "stalled": distribution.stalled_count,
            "distributions": distribution.distributions(now),
            "scheduler": distribution.scheduler.snapshot(now),
            "loop_lag": self.loop_lag.snapshot(),
            "timer_spins": distribution.timer_stats.spins,
            "events_seq": self.events.last_seq,
            "events_backlog": self.events.backlog,
            "events_unconfirmed": self.events.unconfirmed,
            "events_superseded": self.events.superseded,
            "blocks_published": distribution.scheduler.blocks_published,
            "reports_received": distribution.up_messages,
            "blocks_in_flight": distribution.scheduler.inflight,
            "rejected": dict(self.rejects.counts),
        }


async def run(config: Config) -> int:
    """Run a daemon with ``config`` on the current loop; return its exit status."""
    return await Daemon(config).run()


__all__ = ["Daemon", "run", "version"]
