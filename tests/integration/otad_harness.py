"""Shared pieces of the otad integration tests (``test_otad_*.py``).

* :class:`Otad` runs ``python -m otad run`` as a real subprocess (so SIGKILL is real) with a
  config file, a state directory and a trust directory of the test, logging to a file;
* :class:`Monitor` is otad's monitoring feed as any tool reads it (:class:`otad.monitor.
  EventMonitor`: events decoded, kept once by ``seq``, the retained status) plus, as a wiretap,
  every CH's ``down`` topic (it decodes each ``Block`` and counts its payload bytes per CH);
* :func:`otad_with_fleet` is the setup every test repeats: a monitor, otad, a fleet of virtual
  CHs, and every CH known to otad (its ``hub.online`` seen);
* :func:`otactl` runs the real ``otactl`` command line (``python -m otad.ctl``).

Releases come from :func:`loadtest.release.make_release`, as the demo's and the benchmarks' do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.broker import MosquittoBroker
from loadtest.release import Release
from loadtest.runner import HubFleet
from mqttio import MqttClient, MqttSettings, create_client
from otad.events import HubOnline, MonitorEvent, TransferHeld, TransferProgress
from otad.monitor import EventMonitor
from protocol.errors import ProtocolError
from protocol.wire import topics
from protocol.wire.messages import Block, Offer, decode

WAIT = 60.0


def otactl(
    broker: MosquittoBroker, *args: str, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``otactl --broker HOST:PORT ARGS...`` and return its result (never raises)."""
    return subprocess.run(
        [sys.executable, "-m", "otad.ctl", "--broker", broker.address, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def otactl_json(broker: MosquittoBroker, *args: str) -> Any:
    """Run an ``otactl ... --json`` command that must succeed; return its parsed output."""
    result = otactl(broker, *args, "--json")
    assert result.returncode == 0, f"otactl {args} failed: {result.stderr}"
    return json.loads(result.stdout)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    """The test's environment without what would make otad believe it runs under systemd
    (journal-style log lines, notifications), unless a test sets it."""
    hidden = ("JOURNAL_STREAM", "INVOCATION_ID", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in os.environ.items() if k not in hidden}


class Otad:
    """One ``otad run`` subprocess (restartable on the same state directory)."""

    def __init__(
        self,
        broker: MosquittoBroker,
        workdir: Path,
        trust_dir: Path,
        *,
        library: str = "gmqtt",
        config: str = "",
        env: dict[str, str] | None = None,
        address: str | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        """``env``: added to the daemon's environment; ``wrapper``: argv run before
        ``python -m otad ...`` (a launcher that execs its arguments); ``address``: the
        ``--broker`` otad is given (default ``broker.address``; a shipped broker's TLS listener
        is ``127.0.0.1:<broker.tls_port>``)."""
        self.env = env or {}
        self.wrapper = wrapper
        self.broker = broker
        self.address = address or broker.address
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.trust_dir = trust_dir
        self.library = library
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "otad.toml"
        if (
            "[metrics]" not in config
        ):  # every otad of the tests serves /metrics on a port of its own
            config += f"\n[metrics]\nport = {free_port()}\n"
        self.config_path.write_text(config)
        self.log_path = workdir / "otad.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the daemon (appending to the same log file)."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"----- start {self.starts}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "otad",
                "run",
                "--config",
                str(self.config_path),
                "--broker",
                self.address,
                "--state-dir",
                str(self.state_dir),
                "--trust",
                str(self.trust_dir),
                "--mqtt-library",
                self.library,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_environment(), **self.env},
        )
        log.close()

    @property
    def pid(self) -> int:
        """The current process id."""
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop_quietly(self) -> None:
        """Make sure the process is gone (test clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def db(self) -> sqlite3.Connection:
        """A read-only connection to the daemon's database (after it stopped)."""
        return sqlite3.connect(f"file:{self.state_dir / 'otad.db'}?mode=ro", uri=True)


class Monitor(EventMonitor):
    """Events and status, from an independent client, and a wiretap on every CH's ``down``
    topic."""

    def __init__(self) -> None:
        super().__init__()
        self.block_bytes: dict[str, int] = {}  # per CH GUID
        self.blocks: dict[str, int] = {}
        self.offers: dict[str, int] = {}
        self.block_times: list[float] = []  # monotonic arrival of each Block
        self.client: MqttClient | None = None

    async def start(self, broker: MosquittoBroker, *, wiretap: bool = True) -> Monitor:
        """Connect and subscribe (events, status, and the wiretap unless disabled)."""
        client = create_client(
            "gmqtt",
            MqttSettings(client_id=f"monitor-{os.getpid()}", host=broker.host, port=broker.port),
        )
        client.set_message_handler(self.feed)
        await client.subscribe(topics.EVENTS_WILDCARD, 1)
        await client.subscribe(topics.OTAD_STATUS, 1)
        if wiretap:
            await client.subscribe(f"{topics.ROOT}/ch/+/down", 0)
        await client.connect()
        self.client = client
        return self

    async def close(self) -> None:
        """Disconnect."""
        if self.client is not None:
            await self.client.disconnect()

    def feed(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """The wiretap's messages are counted here; the feed's go to the event monitor."""
        if not topic.endswith("/down"):
            super().feed(topic, payload, retain)
            return
        guid = topic.split("/")[3]
        try:
            message = decode(payload)
        except ProtocolError:
            return
        if type(message) is Block:
            self.block_bytes[guid] = self.block_bytes.get(guid, 0) + len(message.data)
            self.blocks[guid] = self.blocks.get(guid, 0) + 1
            self.block_times.append(time.monotonic())
        elif type(message) is Offer:
            self.offers[guid] = self.offers.get(guid, 0) + 1

    async def wait_online(self, otad: Otad, wait_s: float = WAIT) -> None:
        """Wait for the retained status of this otad process saying online."""
        await self.wait_for(
            lambda: any(
                s.get("state") == "online" and s.get("pid") == otad.pid for s in self.statuses
            ),
            wait_s,
        )

    def by_seq(self) -> dict[int, MonitorEvent]:
        """Events deduplicated by ``seq`` (asserting duplicates are identical)."""
        for event in self.received:
            seen = self.events[event.seq]
            assert seen == event, f"two different events share seq {event.seq}"
        return dict(self.events)

    def acked_fraction(self, total_blocks: int) -> float:
        """Share of all blocks acknowledged, from the latest progress event per transfer."""
        latest: dict[str, int] = {}
        for e in self.received:
            if isinstance(e, TransferProgress):
                latest[e.guid] = max(latest.get(e.guid, 0), e.blocks_acked)
            elif isinstance(e, TransferHeld):
                latest[e.guid] = e.blocks_total
        return sum(latest.values()) / total_blocks if total_blocks else 0.0


@dataclass
class Setup:
    """What :func:`otad_with_fleet` starts."""

    broker: MosquittoBroker
    release: Release
    monitor: Monitor
    otad: Otad
    fleet: HubFleet

    def import_and_distribute(self) -> None:
        """``otactl image import`` the release and ``otactl distribute`` it to every matching
        CH, each asserted to succeed."""
        imported = otactl(self.broker, "image", "import", str(self.release.path))
        assert imported.returncode == 0, imported.stderr
        result = otactl(self.broker, "distribute", self.release.sha256, "--all-matching")
        assert result.returncode == 0, result.stderr


@asynccontextmanager
async def otad_with_fleet(
    broker: MosquittoBroker,
    workdir: Path,
    release: Release,
    *,
    hubs: int,
    library: str = "gmqtt",
    config: str = "",
    wiretap: bool = True,
    **fleet_options: Any,
) -> AsyncIterator[Setup]:
    """A monitor (subscribed from the start), an otad (``library``, ``config``) trusting the
    release's key, and ``hubs`` virtual CHs (``fleet_options`` for :class:`HubFleet`: ``procs``
    defaults to 1), every one of them known to otad. The fleet stops when the block ends (or
    before, by ``fleet.close()``), then otad is killed if it still runs."""
    monitor = await Monitor().start(broker, wiretap=wiretap)
    otad = Otad(broker, workdir / "otad", release.trust_dir, library=library, config=config)
    otad.start()
    try:
        await monitor.wait_online(otad)
        fleet_options.setdefault("procs", 1)
        async with HubFleet(
            broker=(broker.host, broker.port),
            state_dir=workdir / "hubs",
            count=hubs,
            trust_dir=release.trust_dir,
            **fleet_options,
        ) as fleet:
            await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == hubs)
            yield Setup(broker, release, monitor, otad, fleet)
    finally:
        otad.stop_quietly()
        await monitor.close()


def otad_config(**sections: dict[str, Any]) -> str:
    """A TOML config from ``section={key: value}`` keyword arguments."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def assert_clean_log(otad: Otad) -> None:
    """The daemon never logged a traceback or an internal error."""
    text = otad.log()
    assert "Traceback" not in text, text[-4000:]
    assert " ERROR " not in text, text[-4000:]
