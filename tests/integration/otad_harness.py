"""Shared pieces of the otad integration tests (``test_otad_*.py``).

* :class:`Otad` runs ``python -m otad run`` as a real subprocess (so SIGKILL is real) with a
  config file, a state directory and a trust directory of the test, logging to a file;
* :class:`Monitor` is an independent MQTT client subscribed from the start to the events, the
  retained status and, as a wiretap, every CH's ``down`` topic (it decodes each ``Block`` and
  counts its payload bytes per CH);
* :func:`otactl` runs the real ``otactl`` command line (``python -m otad.ctl``);
* :func:`make_release` signs a CH firmware release with a fresh key.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.broker import MosquittoBroker
from mqttio import MqttClient, MqttSettings, create_client
from otad import imagetool
from protocol.errors import ProtocolError
from protocol.release.manifest import DeviceType
from protocol.wire import topics
from protocol.wire.messages import Block, Offer, decode

WAIT = 60.0


@dataclass
class Release:
    """A signed image on disk."""

    path: Path
    sha256: str
    size: int  # bytes of the image (the OTA file the manifest covers)
    blocks: int
    block_size: int
    trust_dir: Path
    key: Path


def make_release(
    workdir: Path,
    *,
    size: int = 256 * 1024,
    block_size: int = 1024,
    device_type: DeviceType = DeviceType.CH,
    name: str = "fw",
    key: Path | None = None,
) -> Release:
    """Sign ``size`` random bytes of firmware (wrapped into a ZigBee OTA file) for hardware
    0x0000-0xFFFF; the key's public half goes into ``workdir/trust`` unless ``key`` is given."""
    workdir.mkdir(parents=True, exist_ok=True)
    trust = workdir / "trust"
    trust.mkdir(exist_ok=True)
    if key is None:
        key = workdir / f"{name}-key.pem"
        imagetool.keys_new(key)
        (trust / f"{name}.pem").write_bytes((workdir / f"{name}-key.pub.pem").read_bytes())
    firmware = workdir / f"{name}.bin"
    firmware.write_bytes(os.urandom(size))
    out = workdir / f"{name}.otaimg"
    imagetool.sign_image(
        key=key,
        source=firmware,
        out=out,
        device_type=device_type,
        now=int(time.time()),
        version=0x01020304,
        hw_min=0,
        hw_max=0xFFFF,
        block_size=block_size,
    )
    from protocol.release.otaimg import SignedImage

    signed = SignedImage.decode(out.read_bytes())
    import hashlib

    digest = hashlib.sha256(signed.image).hexdigest()
    n = -(-len(signed.image) // block_size)
    return Release(out, digest, len(signed.image), n, block_size, trust, key)


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
    ) -> None:
        self.broker = broker
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.trust_dir = trust_dir
        self.library = library
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "otad.toml"
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
                sys.executable,
                "-m",
                "otad",
                "run",
                "--config",
                str(self.config_path),
                "--broker",
                self.broker.address,
                "--state-dir",
                str(self.state_dir),
                "--trust",
                str(self.trust_dir),
                "--mqtt-library",
                self.library,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
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


@dataclass
class Monitor:
    """Events, status and a wiretap on every CH's ``down`` topic, from an independent client."""

    events: list[dict[str, Any]] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)
    block_bytes: dict[str, int] = field(default_factory=dict)  # per CH GUID
    blocks: dict[str, int] = field(default_factory=dict)
    offers: dict[str, int] = field(default_factory=dict)
    block_times: list[float] = field(default_factory=list)  # monotonic arrival of each Block
    client: MqttClient | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, broker: MosquittoBroker, *, wiretap: bool = True) -> Monitor:
        """Connect and subscribe (events, status, and the wiretap unless disabled)."""
        client = create_client(
            "gmqtt",
            MqttSettings(client_id=f"monitor-{os.getpid()}", host=broker.host, port=broker.port),
        )
        client.set_message_handler(self._on_message)
        await client.subscribe(f"{topics.ROOT}/events/#", 1)
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

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.endswith("/down"):
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
            return
        data = json.loads(payload)
        if topic == topics.OTAD_STATUS:
            self.status.append(data)
        else:
            self.events.append(data)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], wait_s: float = WAIT) -> None:
        """Wait until ``predicate()`` holds (checked whenever an event or status arrives, and
        every 0.2 s)."""
        async with asyncio.timeout(wait_s):
            while not predicate():
                self._changed.clear()
                try:
                    async with asyncio.timeout(0.2):
                        await self._changed.wait()
                except TimeoutError:
                    pass

    async def wait_online(self, otad: Otad, wait_s: float = WAIT) -> None:
        """Wait for the retained status of this otad process saying online."""
        await self.wait_for(
            lambda: any(
                s.get("state") == "online" and s.get("pid") == otad.pid for s in self.status
            ),
            wait_s,
        )

    def by_seq(self) -> dict[int, dict[str, Any]]:
        """Events deduplicated by ``seq`` (asserting duplicates are identical)."""
        out: dict[int, dict[str, Any]] = {}
        for event in self.events:
            seen = out.setdefault(event["seq"], event)
            assert seen == event, f"two different events share seq {event['seq']}"
        return out

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Deduplicated events of one kind."""
        return [e for e in self.by_seq().values() if e["kind"] == kind]

    def acked_fraction(self, total_blocks: int) -> float:
        """Share of all blocks acknowledged, from the latest progress event per transfer."""
        latest: dict[str, int] = {}
        for e in self.events:
            if e["kind"] == "transfer.progress":
                latest[e["guid"]] = max(latest.get(e["guid"], 0), e["blocks_acked"])
            elif e["kind"] == "transfer.held":
                latest[e["guid"]] = e["blocks_total"]
        return sum(latest.values()) / total_blocks if total_blocks else 0.0


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
