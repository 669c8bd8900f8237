"""Run many virtual CHs: in this process, or spread over worker processes.

:class:`HubFleet` is the API the demo, the benchmark and the tests use::

    async with HubFleet(broker=("127.0.0.1", port), state_dir=d, count=1000, procs=2) as fleet:
        await fleet.stop_hubs(fleet.guids[:200])      # 20% drop off (clean DISCONNECT)
        await fleet.start_hubs(fleet.guids[:200])     # ... and come back, resuming
        stats = await fleet.stats()                   # per-hub HubStats

``procs=0`` runs the hubs on the caller's event loop (handy in tests); ``procs>=1`` starts that
many ``python -m loadtest _worker`` processes, each one uvloop loop holding ``count/procs`` hubs,
driven over a line protocol on stdin/stdout (``@@LT {json}`` lines; anything else a worker
prints is passed through to stderr). Hub ``i`` of a run always gets the same GUID and HAN
inventory (``seed``, ``i``), and its state lives in ``<state_dir>/hubs/<GUID>/``, so a fleet
started again on the same state directory resumes where it stopped.

A worker writes its statistics to ``<state_dir>/stats/worker-<k>.json`` when it exits and when
it receives SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loadtest.broker import raise_nofile_limit
from loadtest.hanlink import LinkConfig
from loadtest.hub import (
    BRIDGE_SHARE,
    DEFAULT_LIMITS,
    HubGroup,
    HubIdentity,
    HubOptions,
    HubStats,
    make_identity,
    premises_seed,
)
from loadtest.premises import PremisesConfig, device_key
from otad.keyfiles import load_trust_dir
from protocol.release.trust import TrustStore
from protocol.wire.messages import MINOR_VERSION, Limits

log = logging.getLogger("loadtest.runner")

PREFIX = "@@LT "
_LINE_LIMIT = 256 * 1024 * 1024


#: Virtual CHs per worker process by default. gmqtt carries 5,000-10,000 connections on one
#: loop, but fewer keep each loop's latency low, and on two cores two processes already use them.
HUBS_PER_PROCESS = 2500
#: Open files a process needs beyond one per MQTT connection (stdio, pipes, state files, epoll).
FD_SLACK = 64
#: Connections a run's broker carries besides the CHs (otad, monitors, otactl calls).
OTHER_CLIENTS = 16


class HostLimitError(RuntimeError):
    """This host cannot carry the run; the message names the limit, in one line."""


def default_procs(count: int) -> int:
    """Worker processes for ``count`` virtual CHs (one per :data:`HUBS_PER_PROCESS`)."""
    return max(1, math.ceil(count / HUBS_PER_PROCESS))


def check_host_limits(count: int, procs: int, *, local_broker: bool, proxy: bool = False) -> None:
    """Raise the open-files limit as far as the host allows, and raise :class:`HostLimitError`
    (one line naming the limit and what to do) if ``count`` CHs over ``procs`` processes -- and,
    with ``local_broker``, one Mosquitto started by this process, which inherits the limit; with
    ``proxy``, the fault proxy, two sockets per CH -- cannot fit under it. Without this check
    such a run does not fail: it hangs, the CHs past the limit retrying their connections for
    ever (a 10,000-CH run's proxy stopped accepting at its 20,000th socket)."""
    soft = raise_nofile_limit()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    per_process = math.ceil(count / max(1, procs)) + FD_SLACK
    if per_process > limit:
        need = math.ceil(count / max(1, limit - FD_SLACK))
        raise HostLimitError(
            f"{count} virtual CHs in {procs} process(es) need {per_process} open files per "
            f"process but RLIMIT_NOFILE is {limit} here: use at least {need} processes"
        )
    broker = count + OTHER_CLIENTS + FD_SLACK
    if local_broker and broker > limit:
        raise HostLimitError(
            f"{count} virtual CHs need {broker} open files in the one Mosquitto that carries "
            f"them, but this host's RLIMIT_NOFILE hard limit is {limit} (one broker holds at "
            f"most {limit - OTHER_CLIENTS - FD_SLACK} CHs here): run fewer, or raise the hard "
            "limit (ulimit -Hn as root; LimitNOFILE= for a systemd unit)"
        )
    relayed = 2 * count + FD_SLACK
    if proxy and relayed > limit:
        raise HostLimitError(
            f"{count} virtual CHs need {relayed} open files in the fault proxy (a socket each way"
            f" per CH), but this host's RLIMIT_NOFILE is {limit}: run fewer, or raise the hard "
            "limit (ulimit -Hn as root)"
        )


def load_trust(trust_dir: Path | str | None) -> TrustStore:
    """The hubs' trust store: every public key in ``trust_dir``; empty if there is none."""
    if trust_dir is None or not Path(trust_dir).is_dir():
        return TrustStore()
    if not any(Path(trust_dir).glob("*.pem")):
        return TrustStore()
    return load_trust_dir(trust_dir)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Everything that defines a fleet of virtual CHs (and is sent to its workers as JSON)."""

    host: str
    port: int
    state_dir: str
    count: int
    seed: int = 0
    library: str = "gmqtt"
    trust_dir: str | None = None
    max_block: int = DEFAULT_LIMITS.max_block
    window: int = DEFAULT_LIMITS.window
    buffer: int = DEFAULT_LIMITS.buffer
    limits_for: tuple[tuple[int, int, int, int], ...] = ()  # (index, max_block, window, buffer)
    segments: int = 8
    flush_interval: float = 10.0
    ack_every: int | None = None
    ack_delay: float | None = None
    keepalive: int = 30
    announce_on_poll: bool = False
    protocol_minor: int = MINOR_VERSION  # 0: CHs of protocol 1.0 (SPEC §5)
    # The premises' HAN (loadtest/chhan.py): on when otad's activation public key is given.
    activation_trust_dir: str | None = None
    han_acceleration: float = 1.0  # HAN time runs this many times as fast
    han_max_transfers: int = 2  # K concurrent HAN transfers per CH
    self_test_failure_share: float = 0.0  # devices (seeded) whose new image fails self-test
    activation_answer_loss: float = 0.0  # extra loss of activation answers (not read-backs)
    bridge_share: float = BRIDGE_SHARE  # hubs whose premises have Alt HAN bridges
    han_link: tuple[int, float, float] | None = None  # (block size, frames/s, loss); None: default
    sleepy_gsme: bool = True  # the GSME listens only when it wakes (PremisesConfig.sleepy)
    tls_ca: str | None = None  # TLS: CA of the broker's certificate (HubOptions.tls_ca)
    tls_cert_dir: str | None = None  # <GUID>.crt and <GUID>.key per hub (HubOptions)

    def premises(self) -> PremisesConfig:
        """The premises scenario every hub of the fleet runs (seeded per hub by its group)."""
        extra: dict[str, Any] = {}
        if self.han_link is not None:
            block_size, frame_rate, loss = self.han_link
            extra["link"] = LinkConfig(block_size=block_size, frame_rate=frame_rate, loss=loss)
        if not self.sleepy_gsme:
            extra["sleepy"] = frozenset()
        return PremisesConfig(
            seed=self.seed,
            acceleration=self.han_acceleration,
            max_transfers=self.han_max_transfers,
            self_test_failure_share=self.self_test_failure_share,
            activation_answer_loss=self.activation_answer_loss,
            **extra,
        )

    @property
    def limits(self) -> Limits:
        """The limits every hub declares unless overridden."""
        return Limits(max_block=self.max_block, window=self.window, buffer=self.buffer)

    def overrides(self) -> dict[int, Limits]:
        """Per-index limit overrides."""
        return {i: Limits(max_block=m, window=w, buffer=b) for i, m, w, b in self.limits_for}

    def identity(self, index: int) -> HubIdentity:
        """Hub ``index``'s identity, exactly as the hub itself derives it."""
        return make_identity(
            self.seed,
            index,
            limits=self.overrides().get(index, self.limits),
            segments=self.segments,
            bridge_share=self.bridge_share,
        )

    def write_device_keys(self, directory: Path) -> int:
        """Write ``<DEVICE_ID>.pem``, the public key of every device of the fleet that signs its
        activation alerts (each CH and its natively or PPMID-joined HAN devices; CAD-joined
        bridges cannot sign), into ``directory``: what otad's ``activation.device_keys`` names.
        Returns how many were written."""
        directory.mkdir(parents=True, exist_ok=True)
        written = 0
        for index in range(self.count):
            ident = self.identity(index)
            seed = premises_seed(self.seed, index)
            signers = [ident.guid] + [d.device_id for d in ident.han if d.join_mode.can_sign]
            for device_id in signers:
                public = device_key(seed, device_id).public_key()
                pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
                (directory / f"{device_id}.pem").write_bytes(pem)
                written += 1
        return written

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            name: (list(map(list, value)) if name == "limits_for" else value)
            for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FleetConfig:
        """Inverse of :meth:`to_json`."""
        raw = dict(data)
        raw["limits_for"] = tuple(tuple(x) for x in raw.get("limits_for", ()))
        if raw.get("han_link") is not None:
            raw["han_link"] = tuple(raw["han_link"])
        return cls(**raw)


def _prepare(state_dir: str) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    raise_nofile_limit()


def _make_group(config: FleetConfig, indices: Iterable[int]) -> HubGroup:
    options = HubOptions(
        host=config.host,
        port=config.port,
        library=config.library,
        keepalive=config.keepalive,
        ack_every=config.ack_every,
        ack_delay=config.ack_delay,
        announce_on_poll=config.announce_on_poll,
        protocol_minor=config.protocol_minor,
        tls_ca=config.tls_ca,
        tls_cert_dir=config.tls_cert_dir,
    )
    trust_dir = config.trust_dir or str(Path(config.state_dir) / "trust")
    return HubGroup(
        options=options,
        trust=load_trust(trust_dir),
        state_dir=config.state_dir,
        seed=config.seed,
        indices=indices,
        limits=config.limits,
        limits_for=config.overrides(),
        segments=config.segments,
        flush_interval=config.flush_interval,
        bridge_share=config.bridge_share,
        activation_trust=(
            load_trust(config.activation_trust_dir) if config.activation_trust_dir else None
        ),
        premises=config.premises(),
    )


def _stats_json(stats: Mapping[str, HubStats]) -> dict[str, Any]:
    return {guid: s.to_json() for guid, s in stats.items()}


# ----------------------------------------------------------------------------- worker side


def _quiet_about_gmqtt_read_loops(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The worker's loop exception handler: gmqtt leaves the read-loop task of a closed
    connection pending, unreferenced, and asyncio reports each as "Task was destroyed but it is
    pending" when it is collected -- thousands of lines when a worker stops its hubs, nothing
    wrong. Everything else goes to the default handler."""
    task = context.get("task")
    coro = getattr(task, "get_coro", lambda: None)()
    if (
        isinstance(task, asyncio.Task)
        and getattr(coro, "__qualname__", "") == "MQTTProtocol._read_loop"
        and str(context.get("message", "")).startswith("Task was destroyed")
    ):
        return
    loop.default_exception_handler(context)


#: Longest a worker spends closing its hubs when told to stop.
WORKER_CLOSE_S = 20.0


async def worker_main(config: FleetConfig, worker: int, first: int, last: int) -> int:
    """Body of a worker process: run hubs ``first..last-1`` and obey commands on stdin."""
    # Virtual CHs lose their connections by design (a reboot into new firmware, a kill, a broker
    # restart): a WARNING line per CH would bury the live view; the hubs' statistics count them.
    logging.getLogger("mqttio").setLevel(logging.ERROR)
    # ... and gmqtt warns once per write on a socket a power cut or a fault proxy just closed
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    raise_nofile_limit()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_about_gmqtt_read_loops)
    group = _make_group(config, range(first, last))
    stats_path = Path(config.state_dir) / "stats" / f"worker-{worker}.json"

    def write_stats() -> None:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"worker": worker, "hubs": _stats_json(group.stats())}))
        os.replace(tmp, stats_path)

    def send(obj: Mapping[str, Any]) -> None:
        sys.stdout.write(PREFIX + json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, write_stats)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the parent orchestrates the shutdown (it asks for
    # the statistics first, then says quit), so a worker ignores SIGINT. If the parent dies, the
    # worker sees EOF on stdin and stops by itself.
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def close_group() -> None:
        # bounded: a worker whose loop is swamped must not outlive its parent's patience (it
        # took minutes to close 2,500 busy hubs one DISCONNECT at a time); what is left is
        # dropped with the process, as a power cut would
        try:
            await asyncio.wait_for(group.close(), WORKER_CLOSE_S)
        except TimeoutError:
            log.warning("worker %d: hubs not all closed within %.0f s", worker, WORKER_CLOSE_S)

    async def serve() -> None:
        while True:
            line = await reader.readline()
            if not line:
                stop.set()  # the parent went away
                return
            try:
                request = json.loads(line)
                reply = await handle(request)
            except Exception as exc:
                log.exception("worker %d: command failed", worker)
                send(
                    {
                        "id": request.get("id") if isinstance(request, dict) else None,
                        "ok": False,
                        "error": repr(exc),
                    }
                )
                continue
            send({"id": request.get("id"), "ok": True, "result": reply})
            if request.get("cmd") == "quit":
                stop.set()
                return

    async def handle(request: Mapping[str, Any]) -> Any:
        cmd = request.get("cmd")
        if cmd == "stats":
            return _stats_json(group.stats())
        if cmd == "start":
            return await group.start(request.get("guids"))
        if cmd == "stop":
            await group.stop(request.get("guids"), crash=bool(request.get("crash")))
            return group.running
        if cmd == "mute":
            group.mute(request.get("guids") or [], bool(request.get("muted", True)))
            return True
        if cmd == "running":
            return group.running
        if cmd == "totals":
            return FleetSummary.of(group.stats()).to_json()
        if cmd == "quit":
            await close_group()
            write_stats()
            return _stats_json(group.stats())
        raise ValueError(f"unknown command {cmd!r}")

    started = time.monotonic()
    running = await group.start()
    # thousands of hubs' long-lived state: out of the collector's way (about 2% of a worker)
    gc.freeze()
    send({"event": "started", "running": running, "seconds": time.monotonic() - started})
    server = loop.create_task(serve(), name="worker-commands")
    await stop.wait()
    if not server.done():
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    await close_group()
    write_stats()
    return 0


# ----------------------------------------------------------------------------- parent side


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, number: int, first: int, last: int) -> None:
        self.number = number
        self.first = first
        self.last = last
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._reader: asyncio.Task[None] | None = None
        self.started: asyncio.Future[dict[str, Any]] | None = None
        self.last_stats: dict[str, Any] = {}

    async def spawn(self, config: FleetConfig, python: str) -> None:
        loop = asyncio.get_running_loop()
        self.started = loop.create_future()
        self.proc = await asyncio.create_subprocess_exec(
            python,
            "-m",
            "loadtest",
            "_worker",
            json.dumps(config.to_json()),
            str(self.number),
            str(self.first),
            str(self.last),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        self._reader = loop.create_task(self._read(), name=f"hub-worker-{self.number}")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        while True:
            try:
                raw = await stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                break
            text = raw.decode("utf-8", "replace")
            if not text.startswith(PREFIX):
                sys.stderr.write(text)
                continue
            message = json.loads(text[len(PREFIX) :])
            if message.get("event") == "started":
                if self.started is not None and not self.started.done():
                    self.started.set_result(message)
                continue
            future = self._pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                if message.get("ok"):
                    future.set_result(message.get("result"))
                else:
                    future.set_exception(RuntimeError(f"worker {self.number}: {message}"))
        error = RuntimeError(f"hub worker {self.number} exited")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self.started is not None and not self.started.done():
            self.started.set_exception(error)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def call(self, cmd: str, wait_s: float = 120.0, **fields: Any) -> Any:
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"hub worker {self.number} is not running")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        line = json.dumps({"id": request_id, "cmd": cmd, **fields}) + "\n"
        self.proc.stdin.write(line.encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(future, wait_s)

    async def close(self, wait_s: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                result = await self.call("quit", wait_s=wait_s)
                if isinstance(result, dict):
                    self.last_stats = result
            except Exception as exc:
                log.warning("hub worker %d did not quit cleanly: %s", self.number, exc)
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        if proc.stdin is not None:
            proc.stdin.close()


class HubFleet:
    """N virtual CHs, in this process (``procs=0``) or over ``procs`` worker processes.

    Use as ``async with HubFleet(...) as fleet:``; leaving the block stops every hub cleanly
    (snapshots saved, MQTT DISCONNECT) and ends every worker process. ``activation_trust_dir``
    (otad's activation public key) gives every 1.1 hub its premises' HAN
    (:mod:`loadtest.chhan`), with ``han_acceleration``, ``han_max_transfers``,
    ``self_test_failure_share`` and ``activation_answer_loss`` as :class:`FleetConfig` says;
    ``bridge_share`` of the hubs have Alt HAN bridges (:func:`loadtest.hub.make_identity`).
    ``tls_ca`` and ``tls_cert_dir`` connect every hub over TLS with its own client certificate
    (:class:`loadtest.hub.HubOptions`).
    """

    def __init__(
        self,
        *,
        broker: tuple[str, int],
        state_dir: Path | str,
        count: int,
        procs: int = 1,
        seed: int = 0,
        library: str = "gmqtt",
        trust_dir: Path | str | None = None,
        max_block: int = DEFAULT_LIMITS.max_block,
        window: int = DEFAULT_LIMITS.window,
        buffer: int = DEFAULT_LIMITS.buffer,
        limits_for: Mapping[int, Limits] | None = None,
        segments: int = 8,
        flush_interval: float = 10.0,
        ack_every: int | None = None,
        ack_delay: float | None = None,
        announce_on_poll: bool = False,
        protocol_minor: int = MINOR_VERSION,
        activation_trust_dir: Path | str | None = None,
        han_acceleration: float = 1.0,
        han_max_transfers: int = 2,
        self_test_failure_share: float = 0.0,
        activation_answer_loss: float = 0.0,
        bridge_share: float = BRIDGE_SHARE,
        han_link: tuple[int, float, float] | None = None,
        sleepy_gsme: bool = True,
        python: str | None = None,
        tls_ca: Path | str | None = None,
        tls_cert_dir: Path | str | None = None,
    ) -> None:
        if count < 0 or procs < 0:
            raise ValueError("count and procs must not be negative")
        self.config = FleetConfig(
            host=broker[0],
            port=broker[1],
            state_dir=str(state_dir),
            count=count,
            seed=seed,
            library=library,
            trust_dir=None if trust_dir is None else str(trust_dir),
            max_block=max_block,
            window=window,
            buffer=buffer,
            limits_for=tuple(
                (i, lim.max_block, lim.window, lim.buffer)
                for i, lim in sorted((limits_for or {}).items())
            ),
            segments=segments,
            flush_interval=flush_interval,
            ack_every=ack_every,
            ack_delay=ack_delay,
            announce_on_poll=announce_on_poll,
            protocol_minor=protocol_minor,
            activation_trust_dir=None
            if activation_trust_dir is None
            else str(activation_trust_dir),
            han_acceleration=han_acceleration,
            han_max_transfers=han_max_transfers,
            self_test_failure_share=self_test_failure_share,
            activation_answer_loss=activation_answer_loss,
            bridge_share=bridge_share,
            han_link=han_link,
            sleepy_gsme=sleepy_gsme,
            tls_ca=None if tls_ca is None else str(tls_ca),
            tls_cert_dir=None if tls_cert_dir is None else str(tls_cert_dir),
        )
        self.procs = min(procs, count) if count else 0
        self.python = python or sys.executable
        self.identities: list[HubIdentity] = [self.config.identity(i) for i in range(count)]
        self.guids: list[str] = [ident.guid for ident in self.identities]
        self._index = {guid: i for i, guid in enumerate(self.guids)}
        self._group: HubGroup | None = None
        self._workers: list[_Worker] = []
        self.started_in: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> HubFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, wait_s: float = 300.0) -> None:
        """Start every hub; returns once each has connected, subscribed and announced."""
        _prepare(self.config.state_dir)
        began = time.monotonic()
        if self.procs == 0:
            self._group = _make_group(self.config, range(self.config.count))
            await self._group.start()
        else:
            n, p = self.config.count, self.procs
            self._workers = [_Worker(k, k * n // p, (k + 1) * n // p) for k in range(p)]
            try:
                for worker in self._workers:
                    await worker.spawn(self.config, self.python)
                await asyncio.wait_for(
                    asyncio.gather(*(w.started for w in self._workers if w.started)), wait_s
                )
            except BaseException:
                await self.close()
                raise
        self.started_in = time.monotonic() - began

    async def close(self, wait_s: float = 60.0) -> None:
        """Stop every hub cleanly and end the worker processes (idempotent)."""
        if self._group is not None:
            group, self._group = self._group, None
            await group.close()
        workers, self._workers = self._workers, []
        await asyncio.gather(*(w.close(wait_s) for w in workers), return_exceptions=True)

    # ------------------------------------------------------------------ control

    def _by_worker(self, guids: Iterable[str]) -> dict[_Worker, list[str]]:
        out: dict[_Worker, list[str]] = {}
        for guid in guids:
            index = self._index[guid]
            for worker in self._workers:
                if worker.first <= index < worker.last:
                    out.setdefault(worker, []).append(guid)
                    break
        return out

    async def stop_hubs(self, guids: Sequence[str], *, crash: bool = False) -> None:
        """Stop some hubs: a clean disconnect, or with ``crash`` a power cut (no state saved
        since the last periodic flush, no DISCONNECT: the broker publishes their last will)."""
        if self._group is not None:
            await self._group.stop(guids, crash=crash)
            return
        await asyncio.gather(
            *(w.call("stop", guids=g, crash=crash) for w, g in self._by_worker(guids).items())
        )

    async def mute_hubs(self, guids: Sequence[str], *, muted: bool = True) -> None:
        """Make hubs hang with their connection up (``muted``), or come back to life: a hung CH
        that neither answers nor drops off, which only otad's stall signal reveals."""
        if self._group is not None:
            self._group.mute(guids, muted)
            return
        await asyncio.gather(
            *(w.call("mute", guids=g, muted=muted) for w, g in self._by_worker(guids).items())
        )

    async def start_hubs(self, guids: Sequence[str]) -> None:
        """(Re)start some stopped hubs from their persisted state."""
        if self._group is not None:
            await self._group.start(guids)
            return
        await asyncio.gather(*(w.call("start", guids=g) for w, g in self._by_worker(guids).items()))

    async def stats(self) -> dict[str, HubStats]:
        """Per-hub statistics of every hub (a worker that died reports its last known ones)."""
        if self._group is not None:
            return dict(self._group.stats())
        out: dict[str, HubStats] = {}
        for worker in self._workers:
            if worker.alive:
                try:
                    worker.last_stats = await worker.call("stats")
                except Exception as exc:
                    log.warning("hub worker %d: no stats: %s", worker.number, exc)
            for guid, data in worker.last_stats.items():
                out[guid] = HubStats.from_json(data)
        return out

    async def totals(self) -> FleetSummary:
        """Totals over every hub, summed inside each worker (cheap enough to poll often)."""
        if self._group is not None:
            return FleetSummary.of(self._group.stats())
        parts = await asyncio.gather(
            *(w.call("totals") for w in self._workers if w.alive), return_exceptions=True
        )
        return FleetSummary.combine(FleetSummary(**p) for p in parts if isinstance(p, dict))

    async def running(self) -> int:
        """How many hubs are running now."""
        if self._group is not None:
            return self._group.running
        counts = await asyncio.gather(
            *(w.call("running") for w in self._workers if w.alive), return_exceptions=True
        )
        return sum(c for c in counts if isinstance(c, int))

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes."""
        return [w.proc.pid for w in self._workers if w.proc is not None and w.alive]

    def index_of(self, guid: str) -> int | None:
        """Index of hub ``guid`` in the fleet (its seed position), or None if not one of it."""
        return self._index.get(guid)

    def worker_of(self, guid: str) -> int:
        """Number of the worker process that runs hub ``guid``."""
        index = self._index[guid]
        for worker in self._workers:
            if worker.first <= index < worker.last:
                return worker.number
        raise KeyError(guid)

    async def kill_worker(self, number: int) -> None:
        """SIGKILL worker ``number`` (its hubs vanish without DISCONNECT: their wills fire)."""
        worker = self._workers[number]
        if worker.proc is not None and worker.alive:
            worker.proc.kill()
            await worker.proc.wait()

    async def restart_worker(self, number: int, wait_s: float = 120.0) -> None:
        """Start worker ``number`` again (after :meth:`kill_worker`): its hubs resume."""
        worker = self._workers[number]
        if worker.alive:
            return
        await worker.close(5)
        fresh = _Worker(worker.number, worker.first, worker.last)
        self._workers[number] = fresh
        await fresh.spawn(self.config, self.python)
        assert fresh.started is not None
        await asyncio.wait_for(fresh.started, wait_s)


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """Totals over a fleet's per-hub statistics."""

    hubs: int
    restored: int
    blocks: int
    block_bytes: int
    stored_blocks: int
    held: int
    rejected: dict[str, int]
    max_outstanding: int
    held_by_image: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, stats: Mapping[str, HubStats]) -> FleetSummary:
        """Sum ``stats``."""
        rejected: dict[str, int] = {}
        held_by_image: dict[str, int] = {}
        for s in stats.values():
            for reason, n in s.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + n
            for image in s.held:
                held_by_image[image] = held_by_image.get(image, 0) + 1
        return cls(
            hubs=len(stats),
            restored=sum(1 for s in stats.values() if s.restored),
            blocks=sum(s.blocks for s in stats.values()),
            block_bytes=sum(s.block_bytes for s in stats.values()),
            stored_blocks=sum(s.stored_blocks for s in stats.values()),
            held=sum(1 for s in stats.values() if s.held),
            rejected=rejected,
            max_outstanding=max((s.max_outstanding for s in stats.values()), default=0),
            held_by_image=held_by_image,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def combine(cls, parts: Iterable[FleetSummary]) -> FleetSummary:
        """Totals of several partial summaries (one per worker)."""
        items = list(parts)
        rejected: dict[str, int] = {}
        held_by_image: dict[str, int] = {}
        for part in items:
            for reason, n in part.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + n
            for image, n in part.held_by_image.items():
                held_by_image[image] = held_by_image.get(image, 0) + n
        return cls(
            hubs=sum(p.hubs for p in items),
            restored=sum(p.restored for p in items),
            blocks=sum(p.blocks for p in items),
            block_bytes=sum(p.block_bytes for p in items),
            stored_blocks=sum(p.stored_blocks for p in items),
            held=sum(p.held for p in items),
            rejected=rejected,
            max_outstanding=max((p.max_outstanding for p in items), default=0),
            held_by_image=held_by_image,
        )

    def line(self) -> str:
        """One human line."""
        rejected = ", ".join(f"{k.lower()} {v}" for k, v in sorted(self.rejected.items()))
        return (
            f"{self.hubs} hubs, {self.restored} resumed from saved state; "
            f"{self.blocks} blocks received ({self.block_bytes / 1e6:.1f} MB), "
            f"{self.stored_blocks} stored; {self.held} holding an image; "
            f"most blocks outstanding {self.max_outstanding}; "
            f"rejected: {rejected or 'none'}"
        )
