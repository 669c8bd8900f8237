"""Raw broker baseline for ``make bench``: the fastest block/ack loop the broker allows.

N minimal hubs (one MQTT connection each, client id = hub GUID) run in separate processes
(multiprocessing, spawn); each answers every block it receives on its ``down`` topic with a
4-byte application-level ack on its ``up`` topic. One publisher in this process keeps W
unacknowledged blocks per hub. Topics are :mod:`protocol.wire.topics` (16-hex-digit GUIDs); both
sides use :class:`mqttio.MqttClient` and nothing else: no CBOR, no store, no hashing. otad's
end-to-end figures are meaningful as a ratio of this.

Reported (one JSON line): blocks/s, MB/s, publisher CPU per block (``time.process_time`` of this
process over the timed phase; the hubs and the broker are other processes), hub and broker CPU
per block, and the ack latency (publish of a block -> its ack received) p50/p99.

    python -m loadtest.baseline --hubs 1000 --blocks-per-hub 100 --window 8 --block-size 1024 \\
        --qos 1 --library gmqtt [--broker HOST:PORT]

Without ``--broker`` a private Mosquitto is started for the run (and its CPU measured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import queue
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any

import uvloop

from loadtest.broker import MosquittoBroker, raise_nofile_limit
from loadtest.procstat import cpu_seconds
from mqttio import HARD_INFLIGHT_LIMIT, LIBRARIES, MqttSettings, create_client, parse_broker
from protocol.wire import topics

__all__ = ["guid", "main", "run_baseline"]

_GUID_BASE = 0xBA5E_0000_0000_0000
_SEQ_BYTES = 4


def guid(index: int) -> str:
    """GUID of virtual hub ``index`` (16 upper-case hex digits)."""
    return f"{_GUID_BASE + index:016X}"


# --------------------------------------------------------------------------- hubs


@dataclass(frozen=True)
class _HubJob:
    first: int
    count: int
    library: str
    host: str
    port: int
    qos: int
    ack_qos: int


def _hub_process(
    job: _HubJob,
    ready: multiprocessing.Queue[Any],
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Entry point of one hub process (spawned)."""
    raise_nofile_limit()
    try:
        uvloop.run(_hubs(job, ready, stop))
    except BaseException as exc:
        ready.put({"error": repr(exc)})
        raise


async def _hubs(
    job: _HubJob,
    ready: multiprocessing.Queue[Any],
    stop: multiprocessing.synchronize.Event,
) -> None:
    received = [0]
    limit = asyncio.Semaphore(256)
    clients = []

    async def start(index: int) -> None:
        hub = guid(index)
        up = topics.up(hub)
        client = create_client(
            job.library,
            MqttSettings(client_id=hub, host=job.host, port=job.port, keepalive=120),
        )
        publish, ack_qos = client.publish, job.ack_qos

        def on_block(topic: str, payload: bytes, retain: bool) -> None:
            received[0] += 1
            publish(up, payload[:_SEQ_BYTES], ack_qos)

        client.set_message_handler(on_block)
        await client.subscribe(topics.down(hub), job.qos)  # remembered: sent by connect()
        async with limit:
            await client.connect(fail_fast=True)
        clients.append(client)

    started = time.perf_counter()
    await asyncio.gather(*(start(i) for i in range(job.first, job.first + job.count)))
    connect_s = time.perf_counter() - started
    cpu_before = time.process_time()
    ready.put({"ready": job.count, "connect_s": connect_s})
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    cpu = time.process_time() - cpu_before
    ready.put({"cpu_s": cpu, "received": received[0]})

    async def close(client: Any) -> None:
        async with limit:
            await client.disconnect()

    await asyncio.gather(*(close(c) for c in clients), return_exceptions=True)


# --------------------------------------------------------------------------- publisher


async def _publisher(
    *,
    host: str,
    port: int,
    library: str,
    hubs: int,
    blocks_per_hub: int,
    window: int,
    block_size: int,
    qos: int,
    ack_qos: int,
    stall_timeout: float,
    broker_pid: int | None,
) -> dict[str, Any]:
    max_inflight = min(HARD_INFLIGHT_LIMIT, max(1000, hubs * window + 100))
    client = create_client(
        library,
        MqttSettings(
            client_id="baseline-publisher",
            host=host,
            port=port,
            keepalive=120,
            max_inflight=max_inflight,
        ),
    )
    down = [topics.down(guid(i)) for i in range(hubs)]
    hub_of_up = {topics.up(guid(i)): i for i in range(hubs)}
    filler = bytes(max(0, block_size - _SEQ_BYTES))
    sent = [0] * hubs
    sent_at = [array("d", bytes(8 * window)) for _ in range(hubs)]
    latencies = array("d")
    total = hubs * blocks_per_hub
    state = {"acked": 0, "out_of_order": 0, "unknown": 0}
    acked_per_hub = [0] * hubs
    done = asyncio.Event()
    perf_counter, publish = time.perf_counter, client.publish

    def send(i: int) -> None:
        seq = sent[i]
        sent[i] = seq + 1
        sent_at[i][seq % window] = perf_counter()
        publish(down[i], seq.to_bytes(_SEQ_BYTES, "big") + filler, qos)

    def on_ack(topic: str, payload: bytes, retain: bool) -> None:
        i = hub_of_up.get(topic)
        if i is None or len(payload) < _SEQ_BYTES:
            state["unknown"] += 1
            return
        seq = int.from_bytes(payload[:_SEQ_BYTES], "big")
        latencies.append(perf_counter() - sent_at[i][seq % window])
        if seq != acked_per_hub[i]:
            state["out_of_order"] += 1
        acked_per_hub[i] += 1
        state["acked"] += 1
        if sent[i] < blocks_per_hub:
            send(i)
        elif state["acked"] >= total:
            done.set()

    client.set_message_handler(on_ack)
    await client.subscribe(topics.UP_WILDCARD, ack_qos)
    await client.connect(fail_fast=True)
    try:
        broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else None
        cpu0, t0 = time.process_time(), time.perf_counter()
        first = min(window, blocks_per_hub)
        for i in range(hubs):
            for _ in range(first):
                send(i)
            await client.drain()
        last_progress, last_acked = time.perf_counter(), -1
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)
            now = time.perf_counter()
            if state["acked"] != last_acked:
                last_acked, last_progress = state["acked"], now
            elif now - last_progress > stall_timeout:
                break
        t1, cpu1 = time.perf_counter(), time.process_time()
        broker_cpu = None
        if broker_pid and broker_cpu0 is not None:
            broker_cpu = cpu_seconds(broker_pid) - broker_cpu0
    finally:
        await client.disconnect()

    acked = state["acked"]
    seconds = t1 - t0
    ordered = sorted(latencies)

    def pct(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e3, 3)

    return {
        "complete": acked == total,
        "blocks": acked,
        "seconds": round(seconds, 3),
        "blocks_per_s": round(acked / seconds, 1) if seconds > 0 else 0.0,
        "mb_per_s": round(acked * block_size / seconds / 1e6, 2) if seconds > 0 else 0.0,
        "pub_cpu_s": round(cpu1 - cpu0, 3),
        "pub_cpu_pct": round(100 * (cpu1 - cpu0) / seconds, 1) if seconds > 0 else 0.0,
        "pub_cpu_us_per_block": round(1e6 * (cpu1 - cpu0) / acked, 2) if acked else None,
        "broker_cpu_us_per_block": (
            round(1e6 * broker_cpu / acked, 2) if broker_cpu is not None and acked else None
        ),
        "ack_p50_ms": pct(0.50),
        "ack_p99_ms": pct(0.99),
        "out_of_order": state["out_of_order"],
        "unknown_acks": state["unknown"],
    }


# --------------------------------------------------------------------------- driver


def _next_message(
    ready: multiprocessing.Queue[Any], processes: list[Any], timeout: float
) -> dict[str, Any]:
    """Next report from a hub process; raise at once if one of them died or reported an error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            message: dict[str, Any] = ready.get(timeout=0.25)
        except queue.Empty:
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"hub process(es) died: {', '.join(dead)}") from None
            if time.monotonic() > deadline:
                raise TimeoutError("no report from the hub processes") from None
            continue
        if "error" in message:
            raise RuntimeError(f"hub process failed: {message['error']}")
        return message


def run_baseline(
    *,
    hubs: int = 1000,
    blocks_per_hub: int = 100,
    window: int = 8,
    block_size: int = 1024,
    qos: int = 1,
    ack_qos: int | None = None,
    library: str = "gmqtt",
    hub_library: str | None = None,
    broker: str | tuple[str, int] | None = None,
    broker_pid: int | None = None,
    hub_procs: int = 1,
    stall_timeout: float = 30.0,
    ready_timeout: float = 120.0,
) -> dict[str, Any]:
    """Run one baseline measurement and return its figures (see the module docstring).

    ``broker`` is ``"HOST:PORT"`` or ``(host, port)``; None starts a private Mosquitto for the
    run. ``broker_pid`` (a local broker's PID) adds the broker's CPU per block. ``ack_qos``
    defaults to ``qos`` and ``hub_library`` to ``library``.
    """
    if library not in LIBRARIES or (hub_library or library) not in LIBRARIES:
        raise ValueError(f"library must be one of {LIBRARIES}")
    if qos not in (0, 1) or (ack_qos is not None and ack_qos not in (0, 1)):
        raise ValueError("qos must be 0 or 1")
    if min(hubs, blocks_per_hub, window, hub_procs) < 1 or block_size < _SEQ_BYTES:
        raise ValueError("hubs, blocks_per_hub, window, hub_procs >= 1; block_size >= 4")
    ack_qos = qos if ack_qos is None else ack_qos
    hub_library = hub_library or library
    raise_nofile_limit()

    private: MosquittoBroker | None = None
    if broker is None:
        private = MosquittoBroker()
        private.start()
        host, port = private.host, private.port
        broker_pid = private.pid
    else:
        host, port = parse_broker(broker) if isinstance(broker, str) else broker

    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[Any] = context.Queue()
    stop = context.Event()
    processes = []
    try:
        share, extra = divmod(hubs, hub_procs)
        first = 0
        for p in range(hub_procs):
            count = share + (1 if p < extra else 0)
            job = _HubJob(first, count, hub_library, host, port, qos, ack_qos)
            process = context.Process(
                target=_hub_process, args=(job, ready, stop), name=f"baseline-hubs-{p}"
            )
            process.start()
            processes.append(process)
            first += count
        connect_s = 0.0
        for _ in processes:
            message = _next_message(ready, processes, ready_timeout)
            connect_s = max(connect_s, message["connect_s"])

        result = uvloop.run(
            _publisher(
                host=host,
                port=port,
                library=library,
                hubs=hubs,
                blocks_per_hub=blocks_per_hub,
                window=window,
                block_size=block_size,
                qos=qos,
                ack_qos=ack_qos,
                stall_timeout=stall_timeout,
                broker_pid=broker_pid,
            )
        )
        stop.set()
        hub_cpu = 0.0
        for _ in processes:
            hub_cpu += _next_message(ready, processes, 60.0).get("cpu_s", 0.0)
    finally:
        stop.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        if private is not None:
            private.cleanup()
        try:
            while True:
                ready.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass

    blocks = result["blocks"]
    return {
        "library": library,
        "hub_library": hub_library,
        "hubs": hubs,
        "hub_procs": hub_procs,
        "blocks_per_hub": blocks_per_hub,
        "window": window,
        "block_size": block_size,
        "qos": qos,
        "ack_qos": ack_qos,
        "broker": f"{host}:{port}" + (" (private)" if private is not None else ""),
        "connect_s": round(connect_s, 3),
        **result,
        "hub_cpu_us_per_block": round(1e6 * hub_cpu / blocks, 2) if blocks else None,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: run one measurement, print one JSON line; exit 1 if not every block was acked."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.baseline", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--hubs", type=int, default=1000)
    parser.add_argument("--blocks-per-hub", type=int, default=100)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--ack-qos", type=int, choices=(0, 1), default=None, help="default: --qos")
    parser.add_argument("--library", choices=LIBRARIES, default="gmqtt")
    parser.add_argument("--hub-library", choices=LIBRARIES, default=None, help="default: --library")
    parser.add_argument("--broker", default=None, metavar="HOST:PORT", help="default: private")
    parser.add_argument("--broker-pid", type=int, default=None, help="measure this broker's CPU")
    parser.add_argument("--hub-procs", type=int, default=1)
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    result = run_baseline(
        hubs=args.hubs,
        blocks_per_hub=args.blocks_per_hub,
        window=args.window,
        block_size=args.block_size,
        qos=args.qos,
        ack_qos=args.ack_qos,
        library=args.library,
        hub_library=args.hub_library,
        broker=args.broker,
        broker_pid=args.broker_pid,
        hub_procs=args.hub_procs,
        stall_timeout=args.stall_timeout,
    )
    print(json.dumps(result), flush=True)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
