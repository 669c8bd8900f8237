"""otad as systemd sees it: notifications on a real AF_UNIX datagram socket (``$NOTIFY_SOCKET``)
from otad run as a real subprocess against a real Mosquitto.

* READY=1 comes only once the broker is there (otad is started first, the broker later), then
  STATUS lines and WATCHDOG=1 pings, and STOPPING=1 on SIGTERM, in that order;
* no WATCHDOG=1 while the event loop is blocked: ``$OTAD_DEBUG_BLOCK_ON_SIGUSR2`` makes SIGUSR2
  run a Python signal handler that sleeps synchronously, so otad's loop really cannot run (the
  process keeps running, unlike under SIGSTOP), and the turn after it withholds its ping too;
* no pings at all when ``$WATCHDOG_PID`` names another process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from otad_harness import Otad

from loadtest.broker import MosquittoBroker, free_port
from loadtest.release import make_release
from otad.daemon import DEBUG_BLOCK_ENV

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Listener:
    """A bound AF_UNIX datagram socket; every message with its arrival (monotonic) time."""

    address: str  # as $NOTIFY_SOCKET names it ("@..." for an abstract name)
    sock: socket.socket
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _closed: bool = False

    def start(self) -> Listener:
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()

    def having(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    def first(self, key: str) -> float | None:
        found = self.having(key)
        return found[0][0] if found else None

    async def wait_for(self, key: str, wait_s: float = 30.0) -> float:
        deadline = time.monotonic() + wait_s
        while (at := self.first(key)) is None:
            assert time.monotonic() < deadline, f"no {key} in {self.messages}"
            await asyncio.sleep(0.05)
        return at


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        # sun_path holds 108 bytes: a short directory, not tmp_path
        directory = Path("/tmp") / f"otad-notify-{secrets.token_hex(4)}"
        directory.mkdir()
        path = directory / "notify"
        sock.bind(str(path))
        address = str(path)
    else:
        name = f"otad-test-notify-{secrets.token_hex(6)}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    instance = Listener(address, sock).start()
    try:
        yield instance
    finally:
        instance.close()
        if request.param == "path":
            path.unlink(missing_ok=True)
            directory.rmdir()


def make_otad(broker: MosquittoBroker, tmp_path: Path, env: dict[str, str]) -> Otad:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    return Otad(broker, tmp_path / "otad", release.trust_dir, env=env)


async def test_ready_only_once_the_broker_is_there_then_status_watchdog_stopping(
    tmp_path: Path, listener: Listener
) -> None:
    broker = MosquittoBroker(port=free_port(), workdir=tmp_path / "mosquitto")  # not started
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"}  # pings every 0.5 s
    otad = make_otad(broker, tmp_path, env)
    otad.start()
    try:
        await asyncio.sleep(4.0)  # otad up, the broker absent
        assert otad.alive, otad.log()
        assert listener.first("READY") is None, listener.messages
        waiting = [m["STATUS"] for _, m in listener.having("STATUS")]
        assert waiting, listener.messages
        assert waiting[-1].startswith(f"connecting to the broker {broker.address}")
        assert "unreachable" in waiting[-1], waiting
        # the loop and the store are healthy while waiting: the watchdog is fed meanwhile
        assert len(listener.having("WATCHDOG")) >= 4, listener.messages

        broker.start()
        try:
            ready_at = await listener.wait_for("READY")
            await asyncio.sleep(2.0)
            otad.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            assert otad.proc.wait(30) == 0  # type: ignore[union-attr]
        finally:
            broker.stop()
    finally:
        otad.stop_quietly()
    stopping_at = listener.first("STOPPING")
    assert stopping_at is not None, listener.messages
    ready = listener.having("READY")
    assert len(ready) == 1
    assert ready[0][1]["STATUS"].endswith("images"), ready  # "0 of 0 hubs online, ..."
    pings_between = [t for t, _ in listener.having("WATCHDOG") if ready_at < t < stopping_at]
    assert len(pings_between) >= 2, listener.messages
    assert ready_at < stopping_at
    keys = [next(iter(m)) for _, m in listener.messages]
    assert keys.index("READY") < keys.index("STOPPING")


async def test_no_watchdog_ping_while_the_event_loop_is_blocked(
    tmp_path: Path, broker: MosquittoBroker, listener: Listener
) -> None:
    block_s = 4.0
    env = {
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": "2000000",  # a ping every second; a wake-up 0.5 s late withholds one
        DEBUG_BLOCK_ENV: str(block_s),
    }
    otad = make_otad(broker, tmp_path, env)
    otad.start()
    try:
        await listener.wait_for("READY")
        await asyncio.sleep(3.0)
        before = len(listener.having("WATCHDOG"))
        assert before >= 2, listener.messages
        blocked_at = time.monotonic()
        otad.proc.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
        await asyncio.sleep(block_s + 4.0)
        assert otad.alive, otad.log()
        otad.terminate()
    finally:
        otad.stop_quietly()
    pings = [t for t, _ in listener.having("WATCHDOG")]
    during = [t for t in pings if blocked_at + 0.2 < t < blocked_at + block_s]
    assert during == [], (pings, blocked_at)
    after = [t for t in pings if t >= blocked_at + block_s]
    assert after, "pings resumed once the loop ran again"
    # the first turn after the block saw the loop late and withheld its ping
    gap = min(after) - max(t for t in pings if t < blocked_at + 0.2)
    assert gap > block_s + 0.5, pings
    assert "not pinging the watchdog: event loop blocked" in otad.log()
    statuses = [m["STATUS"] for t, m in listener.having("STATUS") if t > blocked_at]
    assert any("DEGRADED: event loop blocked" in s for s in statuses), statuses


async def test_no_pings_for_another_watchdog_pid(
    tmp_path: Path, broker: MosquittoBroker, listener: Listener
) -> None:
    env = {
        "NOTIFY_SOCKET": listener.address,
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": str(os.getpid()),  # the test's pid, not otad's
    }
    otad = make_otad(broker, tmp_path, env)
    otad.start()
    try:
        await listener.wait_for("READY")
        await asyncio.sleep(2.0)
        assert otad.terminate() == 0
    finally:
        otad.stop_quietly()
    assert listener.having("WATCHDOG") == []
    assert listener.first("STOPPING") is not None
