"""``make bench``: the raw broker baseline and otad end-to-end, in one run, on one broker.

1. **Baseline** (:func:`loadtest.baseline.run_baseline`): a minimal publisher sending blocks of
   ``--block-size`` bytes to ``--hubs`` minimal hubs with an application-level ack window of
   ``--window``, on the same MQTT client library, nothing else.
2. **otad**: ``python -m otad run`` distributes a signed image of ``--image-kib`` KiB (same block
   size) to ``--hubs`` virtual CHs declaring the same window, the hubs running in their own
   process(es) so otad's CPU can be read from ``/proc/<pid>/stat`` (utime + stime) before the
   distribution starts and once every CH holds the image.

Each is repeated ``--reps`` times, interleaved (baseline, otad, baseline, ...: the machine is
shared and its load drifts), with fresh otad and hub state each time, and the medians are
reported: blocks/s of each (otad: CHs x blocks per image / time from the distribution request to
the last ``transfer.held`` event), the ratio otad/baseline, otad CPU microseconds per block sent
(blocks the hubs received, duplicates included), and otad memory per active CH transfer (peak
RSS while the transfers run minus RSS when idle with every hub announced and the image
imported, divided by the number of CHs). A dated section with the command, the versions and the
table is appended to ``BENCHMARKS.md``; the last line printed is machine-readable
(``bench: baseline_blocks_per_s=... otad_blocks_per_s=... ratio=... us_per_block=...
kib_per_session=...``, on one line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from loadtest.broker import MosquittoBroker
from loadtest.demo import (
    DemoError,
    _guids_in,
    otactl,
    run_cmd,
    start_otad,
    stop_otad,
    wait_json,
)
from loadtest.procstat import cpu_seconds, rss_bytes
from loadtest.release import make_release
from otad.events import MonitorEvent, TransferFailed, TransferHeld, TransferStarted
from otad.monitor import EventMonitor
from otad.progress import ProgressBar
from protocol.release.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m loadtest bench``."""
    parser.add_argument("--hubs", type=int, default=1000, help="hubs / CHs (default 1000)")
    parser.add_argument("--image-kib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--block-size", type=int, default=1024, help="block bytes (default 1024)")
    parser.add_argument("--window", type=int, default=8, help="ack window (default 8)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--library", choices=("gmqtt", "aiomqtt"), default="gmqtt")
    parser.add_argument("--hub-procs", type=int, default=1, help="hub processes (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run (s)")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    parser.add_argument("--skip-baseline", action="store_true", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every run completed."""
    work = Path(tempfile.mkdtemp(prefix="otad-bench-"))
    broker = MosquittoBroker(workdir=work / "mosquitto")
    command = "python -m loadtest bench " + " ".join(sys.argv[2:])
    try:
        release = make_release(
            work,
            firmware_bytes=max(1, args.image_kib * 1024 - 64),
            block_size=args.block_size,
            name="ch-firmware",
            version=0x01020000,
        )
        manifest = release.manifest
        broker.start()
        print(
            f"bench: {args.hubs} hubs, image {manifest.size} bytes = {manifest.block_count} "
            f"blocks of {args.block_size}, window {args.window}, {args.library}, blocks at QoS "
            f"{_block_qos()}, {args.reps} reps, mosquitto on {broker.host}:{broker.port}",
            flush=True,
        )
        # Interleaved (baseline, otad, baseline, otad, ...) so both see the same machine
        # conditions: this box is shared, and its load drifts over minutes.
        bases: list[dict[str, Any]] = []
        runs: list[OtadRun] = []
        for rep in range(args.reps):
            if not args.skip_baseline:
                base = baseline_run(args, broker, manifest.block_count)
                bases.append(base)
                print(
                    f"  baseline run {rep + 1}/{args.reps}: {base['blocks_per_s']:,.0f} blocks/s",
                    flush=True,
                )
            runs.append(uvloop.run(otad_rep(args, work, broker, release.path, manifest, rep)))
    except DemoError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(Exception):
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(args, command, bases, runs)
    return 0


def _block_qos() -> int:
    """The QoS otad sends blocks at by default (the baseline uses the same)."""
    from otad.config import TransferConfig

    return int(TransferConfig().qos_blocks)


# ----------------------------------------------------------------------------- one otad run


@dataclass(frozen=True, slots=True)
class OtadRun:
    """One distribution measured."""

    blocks_per_s: float
    seconds: float
    blocks_sent: int
    cpu_s: float
    us_per_block: float
    hub_us_per_block: float  # the virtual CHs' processes, all together
    broker_us_per_block: float
    rss_idle: int
    rss_peak: int
    kib_per_session: float
    held: int
    hash_ok: int
    loop_lag_p99_ms: float | None  # worst p99 otad's status reported during the distribution
    loop_lag_max_ms: float | None


async def otad_run(
    args: argparse.Namespace, work: Path, broker: MosquittoBroker, image_file: Path,
    image_id: str,
    blocks_per_image: int, rep: int,
) -> OtadRun:  # fmt: skip
    """Start otad and the hubs, distribute once, measure, stop both."""
    from loadtest.runner import HubFleet

    host, port = broker.host, broker.port
    address = f"{host}:{port}"
    run_dir = work / f"otad-run-{rep}"
    proc = await start_otad(
        address, run_dir / "state", work / "trust", run_dir / "otad.log", library=args.library
    )
    first_started: list[float] = []
    last_held: list[float] = []
    held: dict[str, TransferHeld] = {}  # by GUID
    failed: dict[str, str] = {}

    def on_event(event: MonitorEvent) -> None:
        now = time.monotonic()
        if isinstance(event, TransferStarted) and not first_started:
            first_started.append(now)
        elif isinstance(event, TransferHeld) and event.guid not in held:
            held[event.guid] = event
            last_held[:] = [now]
        elif isinstance(event, TransferFailed):
            failed[event.guid] = event.reason

    monitor = await EventMonitor.connect(
        host,
        port,
        library=args.library,
        status=True,  # otad's retained status: its event-loop lag while it distributes
        client_id=f"bench-monitor-{rep}",
        on_event=on_event,
    )
    fleet = HubFleet(
        broker=(host, port),
        state_dir=run_dir / "hubs",
        count=args.hubs,
        procs=max(1, args.hub_procs),
        trust_dir=work / "trust",
        library=args.library,
        window=args.window,
        max_block=max(args.block_size, 1024),
        buffer=max(64 * 1024, args.window * args.block_size),
        seed=0,  # the same GUIDs every rep: new ones would pile up retained announcements
    )
    try:
        await fleet.start()
        wanted = set(fleet.guids)
        deadline = time.monotonic() + 120
        while True:
            if proc.returncode is not None:
                raise DemoError(f"otad exited ({proc.returncode}); see {run_dir / 'otad.log'}")
            with contextlib.suppress(DemoError, ValueError):
                listing = await wait_json(
                    otactl("--broker", address, "fleet", "list", "--json"), 30
                )
                if wanted <= _guids_in(listing):
                    break
            if time.monotonic() > deadline:
                raise DemoError("otad did not list every hub within 120 s")
            await asyncio.sleep(0.5)
        await run_cmd(otactl("--broker", address, "image", "import", str(image_file)))
        await asyncio.sleep(1.0)  # let otad settle (catalogue write, status publish)
        rss_idle = rss_bytes(proc.pid)
        before = await fleet.totals()
        cpu0 = cpu_seconds(proc.pid)
        hub_cpu0 = sum(cpu_seconds(pid) for pid in fleet.worker_pids)
        broker_cpu0 = cpu_seconds(broker.pid) if broker.pid else 0.0
        t0 = time.monotonic()
        statuses_before = len(monitor.statuses)
        await run_cmd(otactl("--broker", address, "distribute", image_id, "--all-matching"))
        rss_peak = rss_bytes(proc.pid)
        total_blocks = len(wanted) * blocks_per_image
        bar = ProgressBar(total_blocks, label=f"  otad run {rep + 1}/{args.reps}: blocks")
        while len(set(held) & wanted) < len(wanted):
            await asyncio.sleep(0.2)
            rss_peak = max(rss_peak, rss_bytes(proc.pid))
            totals = await fleet.totals()
            holding = len(set(held) & wanted)
            stored = min(total_blocks, totals.stored_blocks - before.stored_blocks)
            bar.update(stored, f"CHs holding {holding}/{len(wanted)}")
            if failed:
                raise DemoError(f"{len(failed)} transfers failed: {failed}")
            if proc.returncode is not None:
                raise DemoError(f"otad exited ({proc.returncode}); see {run_dir / 'otad.log'}")
            if time.monotonic() - t0 > args.timeout:
                raise DemoError(f"distribution not done after {args.timeout:.0f} s")
        cpu1 = cpu_seconds(proc.pid)
        hub_cpu = sum(cpu_seconds(pid) for pid in fleet.worker_pids) - hub_cpu0
        broker_cpu = (cpu_seconds(broker.pid) if broker.pid else 0.0) - broker_cpu0
        bar.close(total_blocks, f"CHs holding {len(wanted)}/{len(wanted)}")
        end = last_held[0] if last_held else time.monotonic()
        # from the first transfer.started event (otactl's own start-up is not otad's time)
        start = first_started[0] if first_started else t0
        seconds = end - start
        after_stats = await fleet.stats()
        # blocks otad sent, repeats included: from its transfer.held events (one per CH)
        blocks_sent = sum(held[g].blocks_total + held[g].retransmissions for g in wanted)
        hash_ok = sum(1 for s in after_stats.values() if s.held.get(image_id) == image_id)
        cpu = cpu1 - cpu0
        during = monitor.statuses[statuses_before:]
        lags = [s.get("loop_lag", {}) for s in during if isinstance(s.get("loop_lag"), dict)]
        return OtadRun(
            blocks_per_s=len(wanted) * blocks_per_image / seconds,
            seconds=seconds,
            blocks_sent=blocks_sent,
            cpu_s=cpu,
            us_per_block=cpu / max(1, blocks_sent) * 1e6,
            hub_us_per_block=hub_cpu / max(1, blocks_sent) * 1e6,
            broker_us_per_block=broker_cpu / max(1, blocks_sent) * 1e6,
            rss_idle=rss_idle,
            rss_peak=rss_peak,
            kib_per_session=max(0, rss_peak - rss_idle) / 1024 / len(wanted),
            held=len(set(held) & wanted),
            hash_ok=hash_ok,
            loop_lag_p99_ms=max((float(x.get("p99_ms", 0)) for x in lags), default=None),
            loop_lag_max_ms=max((float(x.get("max_ms", 0)) for x in lags), default=None),
        )
    finally:
        with contextlib.suppress(Exception):
            await monitor.close()
        with contextlib.suppress(Exception):
            await fleet.close()
        await stop_otad(proc, 20)
        await asyncio.to_thread(shutil.rmtree, run_dir / "hubs", True)


# ----------------------------------------------------------------------------- baseline


def baseline_run(
    args: argparse.Namespace, broker: MosquittoBroker, blocks_per_hub: int
) -> dict[str, Any]:
    """One raw baseline run (same broker, library, block size, window, block and ack QoS as
    otad and the virtual CHs); its figures."""
    from loadtest.baseline import run_baseline

    result = run_baseline(
        hubs=args.hubs,
        blocks_per_hub=blocks_per_hub,
        window=args.window,
        block_size=args.block_size,
        qos=_block_qos(),
        ack_qos=0,  # the virtual CHs acknowledge at QoS 0 too (loadtest.hub)
        library=args.library,
        broker=(broker.host, broker.port),
        broker_pid=broker.pid,
        hub_procs=max(1, args.hub_procs),
    )
    if not result.get("complete", True):
        raise DemoError(f"baseline run did not complete: {result}")
    return result


# ----------------------------------------------------------------------------- driver


def versions() -> dict[str, str]:
    """Versions of what the figures depend on."""
    out = {"python": platform.python_version()}
    try:
        first = subprocess.run(
            [_mosquitto(), "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()
        out["mosquitto"] = next((w for w in first[0].split() if w[:1].isdigit()), first[0])
    except (OSError, IndexError, subprocess.SubprocessError):
        out["mosquitto"] = "?"
    for package in ("gmqtt", "aiomqtt", "cbor2", "cryptography", "uvloop"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "?"
    return out


def _mosquitto() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


async def otad_rep(
    args: argparse.Namespace, work: Path, broker: MosquittoBroker, image_file: Path,
    manifest: Manifest, rep: int,
) -> OtadRun:  # fmt: skip
    """One otad distribution (fresh otad and fresh hubs), printed and checked."""
    result = await otad_run(
        args, work, broker, image_file, manifest.sha256.hex(), manifest.block_count, rep
    )
    print(
        f"  otad run {rep + 1}/{args.reps}: {result.blocks_per_s:,.0f} blocks/s "
        f"({result.seconds:.1f} s, {result.blocks_sent} blocks sent, "
        f"{result.us_per_block:.1f} us/block, {result.kib_per_session:.1f} KiB/CH, "
        f"{result.hash_ok}/{args.hubs} hashes match)",
        flush=True,
    )
    if result.hash_ok != args.hubs:
        raise DemoError(f"only {result.hash_ok} of {args.hubs} CHs hold the right image")
    return result


def report(
    args: argparse.Namespace, command: str, bases: list[dict[str, Any]], runs: list[OtadRun]
) -> None:
    """Print the table and the machine-readable line; append them to BENCHMARKS.md."""
    base_rates = [float(b["blocks_per_s"]) for b in bases]
    baseline_rate = statistics.median(base_rates) if base_rates else float("nan")

    def base_cpu(key: str) -> float:
        values = [float(b[key]) for b in bases if b.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    otad_rate = statistics.median(r.blocks_per_s for r in runs)
    us = statistics.median(r.us_per_block for r in runs)
    kib = statistics.median(r.kib_per_session for r in runs)
    ratio = otad_rate / baseline_rate if base_rates else float("nan")
    publisher_us = base_cpu("pub_cpu_us_per_block")
    baseline_hub_us = base_cpu("hub_cpu_us_per_block")
    hub_us = statistics.median(r.hub_us_per_block for r in runs)
    lag_p99 = _median_of(r.loop_lag_p99_ms for r in runs)
    lag_max = _median_of(r.loop_lag_max_ms for r in runs)
    table = [
        "| measure | median | runs |",
        "|---|---|---|",
        f"| baseline blocks/s | {baseline_rate:,.0f} | "
        + ", ".join(f"{r:,.0f}" for r in base_rates) + " |",
        f"| otad blocks/s | {otad_rate:,.0f} | "
        + ", ".join(f"{r.blocks_per_s:,.0f}" for r in runs) + " |",
        f"| ratio otad/baseline | {ratio:.2f} | |",
        f"| otad CPU us per block | {us:.1f} | "
        + ", ".join(f"{r.us_per_block:.1f}" for r in runs) + " |",
        "| CPU us per block, baseline: publisher / hubs / broker | "
        f"{base_cpu('pub_cpu_us_per_block'):.1f} / {base_cpu('hub_cpu_us_per_block'):.1f} / "
        f"{base_cpu('broker_cpu_us_per_block'):.1f} | |",
        "| CPU us per block, otad run: otad / virtual CHs / broker | "
        f"{us:.1f} / {hub_us:.1f} / "
        f"{statistics.median(r.broker_us_per_block for r in runs):.1f} | |",
        f"| otad event-loop lag during the distribution, p99 / max (ms) | {lag_p99:.0f} / "
        f"{lag_max:.0f} | |",
        f"| otad KiB per active CH transfer | {kib:.1f} | "
        + ", ".join(f"{r.kib_per_session:.1f}" for r in runs) + " |",
        f"| otad RSS idle / peak (MiB) | {statistics.median(r.rss_idle for r in runs) / 2**20:.1f}"
        f" / {statistics.median(r.rss_peak for r in runs) / 2**20:.1f} | |",
        f"| distribution time (s) | {statistics.median(r.seconds for r in runs):.1f} | "
        + ", ".join(f"{r.seconds:.1f}" for r in runs) + " |",
    ]  # fmt: skip
    last = (
        f"bench: baseline_blocks_per_s={baseline_rate:.0f} otad_blocks_per_s={otad_rate:.0f} "
        f"ratio={ratio:.2f} us_per_block={us:.1f} kib_per_session={kib:.1f} "
        f"publisher_us_per_block={publisher_us:.1f} hub_us_per_block={hub_us:.1f} "
        f"baseline_hub_us_per_block={baseline_hub_us:.1f}"
    )
    table += ["", *targets(us, publisher_us, hub_us, ratio, kib)]
    print()
    print("\n".join(table))
    if not args.no_record:
        record(args, command, table, last)
        print(f"(appended to {BENCHMARKS})")
    print(last, flush=True)


#: issue 12's targets, as this benchmark measures them
TARGET_OTAD_OVER_PUBLISHER = 1.5  # otad's CPU per block over the raw publisher's, at most
TARGET_HUB_US = 15.0  # a virtual CH's CPU per block, at most (verifying and writing each block)
TARGET_RATIO = 0.8  # otad's blocks/s over the raw baseline's, at least
TARGET_KIB = 16.0  # otad's memory per active transfer, at most


def targets(us: float, publisher_us: float, hub_us: float, ratio: float, kib: float) -> list[str]:
    """One line per target: the figure, the target and whether it is met."""

    def line(name: str, figure: str, target: str, met: bool) -> str:
        return f"- {name}: {figure} (target {target}): {'met' if met else 'MISSED'}"

    over = us / publisher_us if publisher_us > 0 else float("nan")
    return [
        "Targets:",
        "",
        line("otad CPU per block over the raw publisher's", f"{over:.2f}x",
             f"<= {TARGET_OTAD_OVER_PUBLISHER}x", over <= TARGET_OTAD_OVER_PUBLISHER),
        line("virtual CH CPU per block", f"{hub_us:.1f} us", f"<= {TARGET_HUB_US:.0f} us",
             hub_us <= TARGET_HUB_US),
        line("whole-system ratio otad/baseline blocks/s", f"{ratio:.2f}", f">= {TARGET_RATIO}",
             ratio >= TARGET_RATIO),
        line("otad memory per active transfer", f"{kib:.1f} KiB", f"<= {TARGET_KIB:.0f} KiB",
             kib <= TARGET_KIB),
    ]  # fmt: skip


def _median_of(values: Any) -> float:
    known = [float(v) for v in values if v is not None]
    return statistics.median(known) if known else float("nan")


def record(args: argparse.Namespace, command: str, table: list[str], last: str) -> None:
    """Append a dated section to BENCHMARKS.md."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = versions()
    lines = []
    if not BENCHMARKS.exists():
        lines += [
            "# Benchmarks",
            "",
            "Written by `make bench` (`python -m loadtest bench`), one section per run. Baseline:",
            "a minimal publisher and minimal hubs with an application-level ack window; otad:",
            "the daemon distributing a signed image to virtual CHs. Same broker, block size,",
            "window and MQTT library. Medians of the repetitions.",
            "",
        ]
    lines += [
        f"## {when}",
        "",
        f"Command: `{command.strip()}` ({args.hubs} hubs, {args.image_kib} KiB image, "
        f"{args.block_size} B blocks, window {args.window}, {args.library}, {args.reps} reps, "
        f"{os.cpu_count()} CPUs)",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        f"Load average at the end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        " -- the machine is shared: figures taken under other load are low in absolute terms.",
        "",
        *table,
        "",
        "```",
        last,
        "```",
        "",
    ]
    with BENCHMARKS.open("a") as f:
        f.write("\n".join(lines))


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
