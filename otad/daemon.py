"""The otad application: one process, one uvloop event loop, two MQTT sessions, named tasks.

:meth:`Daemon.run` reads as its three phases (uvicorn's ``Server`` is the model):

**start-up** (:meth:`Daemon.startup`, then :meth:`Daemon.connect`): the trust store (a worker
thread reads the key files), the store (migrations), the image catalogue, the fleet registry,
the event outbox and the status, the active transfers rebuilt from the store, the control
commands; then the MQTT sessions connect (retrying with backoff until the broker answers; the
subscriptions are in place before ``connect`` returns) and sending starts.

**run** (:meth:`Daemon.main_loop`): long-running work as named tasks in one
:class:`asyncio.TaskGroup`, until SIGTERM or SIGINT (or a task fails):

``otad.events``       outbox -> ``ota/v1/events/...`` (:mod:`otad.outbox`, :mod:`otad.events`)
``otad.events.prune`` published events past ``events.retention_days`` leave the outbox, hourly
``otad.status``       the retained ``ota/v1/otad/status`` snapshot (:mod:`otad.status`)
``otad.progress``     hands acknowledgement bookkeeping to the store's batch
``otad.finals``       commits ended transfers' final states, in batches, after their events
``otad.stalls``       flags transfers and distributions that stopped making progress
``otad.looplag``      measures event-loop lag continuously (shown in the status); like
                      ``otad.watchdog`` it runs from the moment the store is open
``otad.registry``     writes hub announcements / presence to the store, group-committed
``otad.devices``      HAN devices' reports, activations, read-backs, deadlines (:mod:`otad.devices`)
                      and credential replacements in turn with them (:mod:`otad.credentials`)
``otad.campaigns``    the campaign engines' evaluation tick (:mod:`otad.campaigns`)
``otad.store.writer`` (the store's own single writer task)
``otad.watchdog``     systemd's ``WATCHDOG=1`` pings, only while the loop and the store's writer
                      are healthy, and ``STATUS=`` lines (:mod:`otad.watchdog`); from the moment
                      the store is open, so it runs while otad waits for the broker too

**systemd** (:mod:`otad.sdnotify`): ``READY=1`` once the store is open, migrations are done and
both MQTT sessions are connected and subscribed; ``STOPPING=1`` when the shutdown begins;
SIGHUP reloads the trust store and the revocation list (``RELOADING=1`` ... ``READY=1``;
transfers carry on: only later imports see the new keys). If the data session keeps being
taken over (:data:`TAKEOVER_LIMIT` short sessions lost within :data:`TAKEOVER_WINDOW_S`: another
client uses the same client id, typically a second otad), otad stops with an ERROR and exit
status 1 instead of fighting over the session.

Beside the loop, ``prometheus_client``'s HTTP server thread answers ``/metrics``
(:mod:`otad.metrics`; it gets its figures handed over by the loop), from start-up to the end.

Everything on the data path runs in the MQTT message handler and in ``loop.call_at`` timers, with
no task per message (:mod:`otad.distribution`). The message handlers here only route by topic.

**shutdown** (:meth:`Daemon.shutdown`): stop sending, commit the final states and the progress
batch, publish the queued events and the retained ``offline`` status, disconnect cleanly, close
the store, exit 0 (:data:`EXIT_STORE_FAILED` if the store could not make everything durable:
systemd restarts otad and the new run records it). If the process dies instead, the broker
publishes otad's last will: an ``offline`` status too.

Two MQTT sessions. The data session (client id ``broker.client_id``) carries the CHs' reports,
the blocks, the events and the retained status (its last will marks the status offline). The
control session (``<client_id>.ctl``) carries only operator requests and their responses: at
fleet scale the data session's socket holds hundreds of kilobytes of acknowledgements waiting
to be read, and its send buffer a megabyte of blocks, so a control request or response sharing
it waited behind them (0.5-1 s measured at 3,000 CHs). On its own connection a request is read
within one event-loop turn. After each connection of the data session a third, short-lived
session (``<client_id>.probe``, :mod:`otad.brokercheck`) measures the broker against SPEC §1.1 in
the background (< 1 s) and puts what it saw broken in the status (``broker_warnings``).

The MQTT clients, the monotonic clock and timers, and the wall clock are injected (the real ones
by default), so the daemon's shell is tested whole in memory on virtual time
(``tests/otad/shellkit.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from mqttio import MqttClient, MqttSettings, Will, create_client, wait_acknowledged
from otad.brokercheck import BrokerCheck, largest_packet_bytes
from otad.campaigns import Campaigns
from otad.catalogue import Catalogue
from otad.commands import Commands
from otad.config import Config
from otad.control import MAX_REQUEST_BYTES, Control
from otad.credentials import Credentials, DeviceKeys, load_device_keys
from otad.devices import Devices, load_signing_key
from otad.distribution import Distribution
from otad.keyfiles import KeyFileError, load_trust_dir
from otad.looplag import LoopLag
from otad.metrics import BuildInfo, MetricsServer, Sources, serve
from otad.outbox import EventPublisher
from otad.refusals import HubRefusals
from otad.registry import Hub, Registry
from otad.rejects import RejectLog
from otad.sdnotify import Notifier, watchdog_interval
from otad.status import StatusPublisher, StatusSnapshot, lost_status
from otad.store import Store, StoreError
from otad.timers import TimerHost
from otad.watchdog import Watchdog
from protocol.errors import Reason
from protocol.release.trust import TrustStore
from protocol.wire import topics

log = logging.getLogger("otad")

#: Exit status of a start-up failure (trust store or store unusable).
EXIT_START_FAILED = 2
#: Exit status when the data session was taken over again and again (another client, most
#: likely a second otad, uses the same client id).
EXIT_SESSION_TAKEN_OVER = 1
#: Exit status when another otad is online on this broker (its retained status says so): a
#: deployment error, like a configuration error, that a restart would not cure.
EXIT_ANOTHER_OTAD = 2
#: Seconds after connecting for the broker's retained copy of otad's status to arrive.
OTHER_OTAD_GRACE_S = 0.3
#: Sessions lost within TAKEOVER_WINDOW_S seconds, each within TAKEOVER_WINDOW_S of its connect,
#: that make otad stop as taken over. A network that drops a fresh session 5 times in 30 s is
#: not one otad can serve either; systemd's restart (with its own pacing) then takes over.
TAKEOVER_LIMIT = 5
TAKEOVER_WINDOW_S = 30.0
#: Environment variable (tests, debugging): seconds to block the event loop with a synchronous
#: sleep on each SIGUSR2, so the watchdog's behaviour with a really blocked loop can be seen.
DEBUG_BLOCK_ENV = "OTAD_DEBUG_BLOCK_ON_SIGUSR2"
#: Exit status when the store could not make everything durable by the end of a run (ended
#: transfers unrecorded, the last progress batch lost): not 0, so systemd restarts otad, and the
#: restarted daemon asks the CHs again and records what they hold (the database never says more
#: than what was durable).
EXIT_STORE_FAILED = 3
#: Bytes of received packets handled per event-loop turn (MqttSettings.read_chunk). gmqtt reads
#: 64 KiB at a time and handles every packet in it before anything else runs: about 660
#: acknowledgements, 100-180 ms of otad's work at 3,000 CHs, during which no timer, control
#: request or status ran. 8 KiB (about 80, ~12 ms) bounds that for one extra loop turn a chunk.
READ_CHUNK = 8 * 1024
#: Largest packet otad takes from the broker on its control session: the largest request
#: (:data:`otad.control.MAX_REQUEST_BYTES`, an image import) and its PUBLISH header. On the data
#: session it is SPEC §1.1's packet size (:func:`otad.brokercheck.largest_packet_bytes`): a
#: compliant broker passes nothing larger, and nothing larger is a CH message. A larger packet is
#: skipped unread, with a WARNING (:mod:`mqttio.inbound`), whatever the broker lets through.
CONTROL_MAX_PACKET = MAX_REQUEST_BYTES + 1024
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

    def __init__(
        self,
        config: Config,
        *,
        mqtt_client: Callable[[str, MqttSettings], MqttClient] = create_client,
        timers: TimerHost | None = None,
        wall_clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        peer_grace_s: float = OTHER_OTAD_GRACE_S,
    ) -> None:
        """Prepare; nothing happens until :meth:`run`. ``mqtt_client(library, settings)`` makes
        each MQTT session's client; ``timers`` is the monotonic clock and its timers (None: the
        running event loop); ``wall_clock`` is unix time; ``notifier`` tells systemd (None:
        ``$NOTIFY_SOCKET``'s); ``peer_grace_s``: how long after connecting the broker's copy of
        otad's status is awaited (another otad's: :meth:`connect`)."""
        self.config = config
        self._mqtt_client = mqtt_client
        self._timers = timers
        self._wall_clock = wall_clock
        self.started_at = wall_clock()
        self.version = version()
        self._stop = asyncio.Event()
        self.notifier = notifier if notifier is not None else Notifier()
        self._ready = False
        self._stopping = False
        self._exit_status = 0
        self._peer_grace_s = peer_grace_s
        self._other_online: dict[str, object] | None = None  # another otad's retained status
        self._another_otad = False  # one proved alive: this one stops
        self._peer_cleared = asyncio.Event()  # the other otad's status said offline
        self._reload_task: asyncio.Task[None] | None = None
        self.rejects = RejectLog(logging.getLogger("otad.input"))
        self.loop_lag = LoopLag()
        # set up by startup()
        self.store: Store
        self.client: MqttClient
        self.control_client: MqttClient
        self.catalogue: Catalogue
        self.registry: Registry
        self.events: EventPublisher
        self.status: StatusPublisher
        self.distribution: Distribution
        self.control: Control
        self.broker_check: BrokerCheck
        self.devices: Devices
        self.credentials: Credentials
        self.campaigns: Campaigns
        self.commands: Commands
        self.metrics: MetricsServer | None = None

    @property
    def degraded(self) -> list[str]:
        """Why otad is degraded now, one line each, empty when healthy (the status's
        ``degraded``; what READY/WATCHDOG should reflect): the store's writes failing on
        storage (:attr:`otad.store.Store.degraded`) and ended transfers not yet recorded
        (:attr:`otad.distribution.Distribution.degraded`)."""
        return self.store.degraded + self.distribution.degraded

    def request_stop(self) -> None:
        """Begin a clean shutdown (signal handler)."""
        if not self._stop.is_set():
            log.info("shutdown requested")
            self._notify_stopping()
        self._stop.set()

    def _notify_stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping("stopping: flushing state")

    def request_reload(self) -> None:
        """Reload the trust store and the revocation list (SIGHUP), in the background."""
        if self._reload_task is not None and not self._reload_task.done():
            log.info("reload requested while one runs: ignored")
            return
        if not hasattr(self, "catalogue"):
            log.info("reload requested during start-up: the trust store being loaded is used")
            return
        self._reload_task = asyncio.get_running_loop().create_task(
            self.reload_trust(), name="otad.reload"
        )

    async def reload_trust(self) -> None:
        """Read the trust directory and the revocation list again and verify later imports
        against them; on any error keep the current trust store (logged)."""
        c = self.config.trust
        self.notifier.reloading(time.monotonic_ns() // 1000)
        try:
            try:
                trust = await asyncio.to_thread(load_trust_dir, c.dir, c.revoked_file)
            except KeyFileError as exc:
                log.error("reload: trust store kept as it was: %s", exc)
                return
            old = self.catalogue.trust
            no_longer = self.catalogue.replace_trust(trust)
            added = sorted(k.hex() for k in trust.kids - old.kids)
            removed = sorted(k.hex() for k in old.kids - trust.kids)
            log.info(
                "reload: trust store %s: %d key(s) trusted (added: %s; no longer trusted: %s);"
                " %d key id(s) revoked",
                c.dir,
                len(trust.kids),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
                len(trust.revoked),
            )
            for line in no_longer:
                log.warning(
                    "reload: no longer verifies: image %s; served until otad restarts", line
                )
        finally:
            if self._ready and not self._stopping:
                self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        """The one-line summary systemd shows (``STATUS=``)."""
        b = self.config.broker
        if self._stopping:
            return "stopping"
        if not self._ready:
            problem = None
            for name in ("client", "control_client"):  # the control session connects first
                session = getattr(self, name, None)
                if session is not None and session.last_connect_error is not None:
                    problem = session.last_connect_error
            where = f"{b.host}:{b.port}"
            return f"connecting to the broker {where}" + (f": {problem}" if problem else "")
        counts = self.distribution.counts()
        line = (
            f"{self.registry.online} of {len(self.registry.hubs)} hubs online,"
            f" {counts.get('active', 0)} transfers active, {len(self.catalogue.images)} images"
        )
        degraded = self.degraded
        return f"{line}; DEGRADED: {'; '.join(degraded)}" if degraded else line

    async def run(self) -> int:
        """Start up, run until SIGTERM/SIGINT, shut down; return the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        _install_debug_block()
        c = self.config
        try:
            trust = await asyncio.to_thread(load_trust_dir, c.trust.dir, c.trust.revoked_file)
        except Exception as exc:
            log.error("cannot load the trust store: %s", exc)
            return EXIT_START_FAILED
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
            return EXIT_START_FAILED
        self.watchdog = Watchdog(
            self.notifier,
            timeout=watchdog_interval(),
            loop_lag=self.loop_lag,
            store=self.store,
            status_line=self._status_line,
        )
        supervision = [
            loop.create_task(self.loop_lag.run(), name="otad.looplag"),
            loop.create_task(self.watchdog.run(), name="otad.watchdog"),
        ]
        try:
            status = await self._run_opened(trust)
        finally:
            for task in supervision:
                task.cancel()
            await asyncio.gather(*supervision, return_exceptions=True)
            if self.metrics is not None:
                await self.metrics.stop()
            try:
                await self.store.close()
            except StoreError as exc:
                log.error("closing the store: %s", exc)
                status = EXIT_STORE_FAILED
        return status

    async def _run_opened(self, trust: TrustStore) -> int:
        try:
            await self.startup(trust)
        except KeyFileError as exc:
            log.error("cannot load the activation keys: %s", exc)
            return EXIT_START_FAILED
        self.metrics = await serve(self.config.metrics, self._metrics_sources(), self._build_info())
        if not await self.connect():
            if self._another_otad:  # leave without a will: the other otad's status stands
                for client in (self.client, self.control_client):
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                return self._exit_status
            log.info("stopped before the broker could be reached")
            return self._exit_status
        self._ready = True
        self.notifier.ready(self._status_line())
        status = await self.main_loop()
        self._notify_stopping()
        if not await self.shutdown() and status == 0:
            status = EXIT_STORE_FAILED
        return status or self._exit_status

    # ------------------------------------------------------------------ start-up

    async def startup(self, trust: TrustStore) -> None:
        """Build every part on the open :attr:`store`, in dependency order; nothing is sent
        until :meth:`connect`."""
        c = self.config
        timers: TimerHost = self._timers or asyncio.get_running_loop()
        self.catalogue = Catalogue(self.store, trust, Path(c.store.state_dir) / "images")
        await self.catalogue.load()
        settings = await self._mqtt_settings()
        self.client = self._mqtt_client(c.broker.library, settings)
        self.broker_check = BrokerCheck(settings, self._mqtt_client, on_result=self._status_poke)
        self.events = EventPublisher(
            self.store, self.client, topic_prefix=c.events.topic_prefix, clock=self._wall_clock
        )
        self.refusals = HubRefusals(
            self.rejects, self.events, self.client, monotonic=timers.time,
            wall_clock=self._wall_clock,
        )  # fmt: skip
        self.registry = Registry(
            self.store,
            self.events,
            on_change=self._hub_changed,
            rejects=self.rejects,
            refusals=self.refusals,
            on_flapping=self._hub_flapping,
            monotonic=timers.time,
            wall_clock=self._wall_clock,
        )
        await self.registry.load()
        self.distribution = Distribution(
            timers=timers,
            client=self.client,
            store=self.store,
            catalogue=self.catalogue,
            registry=self.registry,
            events=self.events,
            config=c.transfer,
            progress_interval=c.events.progress_interval_s,
            rejects=self.rejects,
            wall_clock=self._wall_clock,
        )
        resumed = await self.distribution.resume()
        a = c.activation
        signing_key = await asyncio.to_thread(load_signing_key, a.key)
        device_keys = DeviceKeys(await asyncio.to_thread(load_device_keys, a.device_keys))
        self.devices = Devices(
            store=self.store,
            client=self.client,
            registry=self.registry,
            catalogue=self.catalogue,
            events=self.events,
            timers=timers,
            config=a,
            signing_key=signing_key,
            device_keys=device_keys,
            wall_clock=self._wall_clock,
        )
        await self.devices.load()
        self.credentials = Credentials(
            store=self.store,
            client=self.client,
            registry=self.registry,
            events=self.events,
            timers=timers,
            config=a,
            signing_key=signing_key,
            device_keys=device_keys,
            devices=self.devices,
            wall_clock=self._wall_clock,
        )
        await self.credentials.load()
        self.devices.credentials_reported = self.credentials.confirmation_reported
        self.devices.credentials_state = self.credentials.state_of
        self.distribution.device_reports = self.devices.report_received
        self.distribution.transfer_ended = self.devices.transfer_ended
        self.devices.transfer_state = self.distribution.transfer_state
        self.campaigns = Campaigns(
            store=self.store,
            registry=self.registry,
            catalogue=self.catalogue,
            distribution=self.distribution,
            devices=self.devices,
            credentials=self.credentials,
            events=self.events,
            client=self.client,
            config=c.campaigns,
            wall_clock=self._wall_clock,
        )
        await self.campaigns.load()
        self.devices.changed = self.campaigns.device_changed
        self.credentials.changed = self.campaigns.credentials_changed
        self.devices.campaign_of = self.campaigns.campaign_of_device
        self.credentials.campaign_of = self.campaigns.campaign_of_device
        self.distribution.campaign_of = self.campaigns.campaign_of_transfer
        snapshot = StatusSnapshot(
            version=self.version,
            started_at=self.started_at,
            library=c.broker.library,
            registry=self.registry,
            catalogue=self.catalogue,
            distribution=self.distribution,
            loop_lag=self.loop_lag,
            events=self.events,
            rejects=self.rejects,
            refusals=self.refusals,
            broker_check=self.broker_check,
            degraded=lambda: self.degraded,
            clock=timers.time,
        )
        self.status = StatusPublisher(
            self.client,
            topics.OTAD_STATUS,
            snapshot,
            heartbeat_s=c.events.status_heartbeat_s,
            clock=self._wall_clock,
        )
        self.commands = commands = Commands(
            catalogue=self.catalogue,
            registry=self.registry,
            distribution=self.distribution,
            devices=self.devices,
            credentials=self.credentials,
            campaigns=self.campaigns,
            events=self.events,
            snapshot=snapshot,
            status_changed=self.status.poke,
            rejects=self.rejects,
            wall_clock=self._wall_clock,
        )
        self.control_client = self._mqtt_client(
            c.broker.library, await self._mqtt_settings(control=True)
        )
        self.control = Control(self.control_client, commands.table(), rejects=self.rejects)
        self.client.set_message_handler(self._on_message)
        self.client.set_connection_handler(self._on_connection)
        self.control_client.set_message_handler(self._on_control_message)
        for topic in (topics.STATE_WILDCARD, topics.UP_WILDCARD):
            await self.client.subscribe(topic, 1)  # remembered: sent with every connect
        await self.control_client.subscribe(topics.CTL_REQUEST_WILDCARD, 1)
        # another otad's retained "online" (a second deployment with its own client id)
        await self.control_client.subscribe(topics.OTAD_STATUS, 1)
        log.info(
            "otad %s: %d image(s), %d hub(s) known, %d transfer(s) to resume; connecting to %s:%d"
            " with %s as %s",
            self.version,
            len(self.catalogue.images),
            len(self.registry.hubs),
            resumed,
            c.broker.host,
            c.broker.port,
            c.broker.library,
            c.client_id,
        )

    def _metrics_sources(self) -> Sources:
        return Sources(
            registry=self.registry,
            distribution=self.distribution,
            devices=self.devices,
            events=self.events,
            control=self.control,
            rejects=self.rejects,
            refusals=self.refusals,
            loop_lag=self.loop_lag,
            campaigns=self.campaigns.counts_by_state,
        )

    def _build_info(self) -> BuildInfo:
        return BuildInfo(version=self.version, mqtt_library=self.config.broker.library)

    async def connect(self) -> bool:
        """Connect both sessions (retrying) and start sending; False if a stop came first."""
        loop = asyncio.get_running_loop()
        connect = loop.create_task(self._connect_both(), name="mqttio.connect")
        stop = loop.create_task(self._stop.wait(), name="otad.stop.wait")
        await asyncio.wait((connect, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            return False
        connect.result()
        self.distribution.start()  # no await since the data session connected: nothing ran
        await self.devices.start()
        self.credentials.start()
        await self.campaigns.start()
        self.status.poke()
        # Everything loaded so far (modules, the fleet, resumed transfers) lives as long as the
        # process: move it out of the cyclic collector's sight, so its full passes scan only
        # what came later (a pass over a fleet-sized heap stalls the loop for 50-150 ms).
        gc.freeze()
        log.info("otad ready (state %s)", self.config.store.state_dir)
        return True

    async def _connect_both(self) -> None:
        # the control session first: another otad's status is read before the data session
        # (whose CHs' messages, will and connection report belong to a serving otad) connects
        await self.control_client.connect()
        if await self._no_other_otad():
            await self.client.connect()

    async def _no_other_otad(self) -> bool:
        """With the control session connected, before the data session: if the broker holds
        another otad's status saying online, wait until it shows it is alive (its heartbeat:
        this one is refused, and stops) or for up to 1.5 heartbeats (it is a dead one's copy).
        False if this one must stop."""
        await asyncio.sleep(self._peer_grace_s)  # the retained status arrives after SUBACK
        other = self._other_online
        if other is None or self._stop.is_set():
            return not self._stop.is_set()
        wait_s = 1.5 * self.config.events.status_heartbeat_s
        log.warning(
            "the broker holds another otad's status saying online (pid %s, started %s): waiting"
            " up to %.0f s for it to show it is alive before serving",
            other.get("pid"),
            other.get("started_at_iso"),
            wait_s,
        )
        waits = [
            asyncio.ensure_future(self._stop.wait()),
            asyncio.ensure_future(self._peer_cleared.wait()),
        ]
        await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        if self._stop.is_set():
            return False
        if self._other_online is not None:
            log.info(
                "no sign of life from that otad in %.0f s: its status was a stale copy", wait_s
            )
        return True

    def _status_seen(self, payload: bytes, retain: bool) -> None:
        """otad's status topic as the broker has it. Another otad serving the same broker
        (another pid or start time saying online) would answer the same CHs and fight over
        every transfer. A retained copy may be a dead one's (a broker that kept it across a
        crash), so only a live publication (``retain`` false: it published just now) proves it:
        then the one that started later stops, the other says it is here again."""
        try:
            status = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(status, dict):
            return
        pid, started = status.get("pid"), status.get("started_at")
        if not isinstance(started, (int, float)):
            return
        if pid == os.getpid() and abs(started - self.started_at) < 0.01:
            return  # our own (the status has the start time to the millisecond)
        if status.get("state") != "online":
            self._other_online = None
            self._peer_cleared.set()
            if self._ready and not self._stop.is_set():
                self.status.poke()  # another's offline (its will) over ours: ours again
            return
        if retain:
            self._other_online = status  # a hint: connect() waits for proof either way
            return
        newer = (started, pid) > (self.started_at, os.getpid())
        if newer and self._ready:
            log.warning(
                "a second otad (pid %s, started %s) says it is online on this broker; it"
                " started later and will stop", pid, status.get("started_at_iso"),
            )  # fmt: skip
            self.status.poke()
            return
        if self._stop.is_set():
            return
        log.error(
            "another otad is online on this broker (pid %s, version %s, started %s): two would"
            " serve the same CHs; stopping (stop the other, or give each its own broker)",
            pid,
            status.get("version"),
            status.get("started_at_iso"),
        )
        self._exit_status = EXIT_ANOTHER_OTAD
        self._another_otad = True
        self.request_stop()

    def _check_takeover(self) -> None:
        """After a loss of the data session: stop if it keeps being taken over."""
        lost = self.client.short_session_losses(TAKEOVER_WINDOW_S, shorter_than=TAKEOVER_WINDOW_S)
        if lost >= TAKEOVER_LIMIT and not self._stop.is_set():
            log.error(
                "MQTT session %r lost %d times within %.0f s, each soon after connecting: another"
                " client (a second otad?) uses this client id and the broker keeps handing the"
                " session over; stopping",
                self.client.settings.client_id,
                lost,
                TAKEOVER_WINDOW_S,
            )
            self._exit_status = EXIT_SESSION_TAKEN_OVER
            self.request_stop()

    async def _mqtt_settings(self, *, control: bool = False) -> MqttSettings:
        """The data session's settings, or (``control``) the control session's: same broker
        and credentials, client id ``<client_id>.ctl``, no will."""
        b = self.config.broker
        password = None
        if b.password_file is not None:
            text = await asyncio.to_thread(Path(b.password_file).read_text)
            password = text.strip()
        will = Will(topics.OTAD_STATUS, lost_status(self.version, self.started_at), 1, True)
        return MqttSettings(
            client_id=f"{self.config.client_id}.ctl" if control else self.config.client_id,
            host=b.host,
            port=b.port,
            username=b.username,
            password=password,
            tls_ca=None if b.tls_ca is None else str(b.tls_ca),
            tls_cert=None if b.tls_cert is None else str(b.tls_cert),
            tls_key=None if b.tls_key is None else str(b.tls_key),
            keepalive=b.keepalive,
            clean_session=True,
            will=None if control else will,
            max_inflight=1000 if control else 10_000,
            read_chunk=READ_CHUNK,
            max_packet=CONTROL_MAX_PACKET if control else largest_packet_bytes(),
        )

    # ------------------------------------------------------------------ run

    async def main_loop(self) -> int:
        """Run the named tasks until a stop is requested (0) or one of them fails (1)."""
        c = self.config
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
                    self.distribution.run_progress_flusher(c.store.flush_interval),
                    name="otad.progress",
                )
                group.create_task(self.distribution.run_final_writer(), name="otad.finals")
                group.create_task(self.distribution.run_stall_watch(), name="otad.stalls")
                group.create_task(self.registry.run(), name="otad.registry")
                group.create_task(self.devices.run(), name="otad.devices")
                group.create_task(self.campaigns.run(), name="otad.campaigns")
                group.create_task(self._wait_stop(), name="otad.shutdown")
        except* _StopRequestedError:
            pass
        except* Exception as failures:
            for exc in failures.exceptions:
                log.error("task failed: %r", exc, exc_info=exc)
            status = 1
        return status

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        raise _StopRequestedError

    # ------------------------------------------------------------------ MQTT routing

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.endswith("/up") and len(topic) == _UP_TOPIC_LEN and topic.startswith(_CH_PREFIX):
            self.distribution.up_received(topic, payload)
        elif topic.startswith(_CH_PREFIX):
            if topic.endswith("/state"):
                self.registry.state_received(topic, payload, retain, self._wall_clock())
            else:
                self.distribution.up_received(topic, payload)  # the slow path refuses it
        else:
            self.rejects.reject(f"message on {topic[:80]!r}", Reason.BAD_IDENTIFIER, "topic")

    def _on_control_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.startswith(_CTL_PREFIX) and topic.endswith("/req"):
            self.control.request_received(topic, payload)
        elif topic == topics.OTAD_STATUS:
            self._status_seen(payload, retain)
        else:
            self.rejects.reject(f"message on {topic[:80]!r}", Reason.BAD_IDENTIFIER, "topic")

    def _on_connection(self, up: bool) -> None:
        if up:
            log.info("MQTT session up")
        else:
            log.warning("MQTT session lost; reconnecting")
            self._check_takeover()
        self.distribution.connection_changed(up)
        self.events.connection_changed(up)
        if up:
            self.status.poke()
            self.broker_check.connection_up()

    def _status_poke(self) -> None:
        self.status.poke()

    def _hub_changed(self, hub: Hub, was_online: bool, announced: bool, changed: bool) -> None:
        self.distribution.hub_changed(hub, was_online, announced, changed)
        self.campaigns.hub_changed(hub, was_online, announced)
        if announced:
            self.devices.hub_announced(hub)
        if was_online != hub.online:
            self.status.poke()

    def _hub_flapping(self, hub: Hub) -> None:
        self.distribution.hub_flapping(hub)
        self.status.poke()

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> bool:
        """Clean stop: nothing more is sent, every decision and the latest progress is
        committed, queued events go out, the retained status says offline. False if the store
        refused some ended transfers' final states (they stay active in the database) or some
        events (lost)."""
        log.info("stopping: flushing state")
        self.distribution.halt()
        await self.broker_check.close()
        await self.control.close()
        await self.registry.flushed()
        await self.devices.flushed()
        self.credentials.shutdown()
        await self.events.flush()  # commits the events the final-state writes wait for
        recorded = await self.distribution.wait_final_writes()
        if not recorded:
            log.error(
                "stopping with ended transfers not recorded (the store refuses them): the next"
                " start asks those CHs again and records what they hold"
            )
        await self.events.close()
        if self.events.backlog:
            log.error(
                "stopping with %d event(s) not committed to the outbox (the store refuses"
                " them): they are lost",
                self.events.backlog,
            )
            recorded = False
        self.status.publish_offline()
        await wait_acknowledged(self.client, 2.0)
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        with contextlib.suppress(Exception):
            await self.control_client.disconnect()
        log.info("stopped")
        return recorded


def _install_debug_block() -> None:
    """With ``$OTAD_DEBUG_BLOCK_ON_SIGUSR2`` = seconds, each SIGUSR2 blocks the event loop for
    that long: a Python-level handler (not the loop's) sleeping synchronously, so the loop
    really cannot run (unlike a SIGSTOP, which stops the whole process and systemd with it)."""
    seconds = os.environ.get(DEBUG_BLOCK_ENV, "")
    try:
        block = float(seconds)
    except ValueError:
        return
    if not 0 < block <= 3600:
        return
    log.warning("%s=%s: SIGUSR2 blocks the event loop for %.1f s", DEBUG_BLOCK_ENV, seconds, block)

    def blocked(signum: int, frame: object) -> None:
        log.warning("SIGUSR2: blocking the event loop for %.1f s", block)
        time.sleep(block)

    signal.signal(signal.SIGUSR2, blocked)


async def run(config: Config) -> int:
    """Run a daemon with ``config`` on the current loop; return its exit status."""
    return await Daemon(config).run()


__all__ = ["Daemon", "run", "version"]
