"""``python -m loadtest scale``: otad with its default configuration at 1,000 to 10,000 CHs.

For each fleet size, on a fresh private Mosquitto, a fresh otad (default configuration) and
fresh virtual CHs (one worker process per 2,500):

* **connect**: seconds until every CH is connected, subscribed and announced, and until otad's
  retained status counts them all online;
* **otad RSS** idle (every CH known, images imported) and peak (over the whole run);
* for each image size (64 and 256 KiB by default), one distribution to every CH:
  ``distribute`` latency (the control request's round trip), distribution time (from the
  request to the last ``transfer.held`` event), blocks/s, otad CPU microseconds per block sent
  (its utime + stime over the distribution / the blocks it published, repeats included),
  blocks re-sent (share of the image blocks), event-loop lag p99 and max (otad's own
  measurement, the worst of the status snapshots during the distribution), control round trip
  during the distribution (``status`` requests every second: median and max; and the real
  ``otactl status`` command line every 10 s, process start-up included: its worst), and how far
  the monitoring events trail the transfers: per ``transfer.held`` event, receipt minus emit
  time (p50 / max), and the last event's receipt minus the moment the CHs themselves all held
  the image (sampled every 0.5 s).

The table is printed and (unless ``--no-record``) appended to ``BENCHMARKS.md`` with the
command, the versions and the date. Runs that the host cannot carry (open-file limits) are
reported in one line and skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from loadtest.bench import BENCHMARKS, versions
from loadtest.broker import MosquittoBroker
from loadtest.demo import DemoError, otactl, run_cmd, start_otad, stop_otad
from loadtest.procstat import cpu_seconds, peak_rss_bytes, rss_bytes
from loadtest.release import make_release
from loadtest.runner import HostLimitError, HubFleet, check_host_limits, default_procs
from mqttio import MqttSettings, create_client
from otad.ctl.client import CtlClient
from otad.events import MonitorEvent, TransferHeld
from otad.monitor import EventMonitor
from protocol.wire import topics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m loadtest scale``."""
    parser.add_argument(
        "--hubs", default="1000,2000,5000,10000", help="fleet sizes (default 1000,2000,5000,10000)"
    )
    parser.add_argument("--images", default="64,256", help="image sizes in KiB (default 64,256)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per distribution (s)")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    parser.add_argument("--config", metavar="FILE", help="otad config (default: none, defaults)")


def main(args: argparse.Namespace) -> int:
    """Run every size; 0 when every distribution completed."""
    sizes = [int(x) for x in args.hubs.split(",") if x.strip()]
    images = [int(x) for x in args.images.split(",") if x.strip()]
    command = "python -m loadtest scale " + " ".join(sys.argv[2:])
    try:
        results = uvloop.run(run_all(sizes, images, args.timeout, args.config))
    except KeyboardInterrupt:
        print("\nscale: interrupted", file=sys.stderr)
        return 130
    table = render(results)
    print("\n" + "\n".join(table), flush=True)
    if not args.no_record and results:
        record(command, table)
        print(f"(appended to {BENCHMARKS})")
    return 0 if all(r.complete for r in results) else 1


@dataclass
class Distribution:
    """One image distributed to a whole fleet."""

    image_kib: int
    blocks_per_ch: int
    distribute_s: float
    seconds: float
    blocks_sent: int
    cpu_s: float
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    control_ms: list[float]
    cli_ms: list[float]
    event_lag_s: list[float]
    tail_lag_s: float
    events_backlog_max: int
    complete: bool


@dataclass
class FleetRun:
    """One fleet size."""

    hubs: int
    procs: int
    broker: str = ""
    connect_s: float = 0.0
    known_s: float = 0.0
    rss_idle: int = 0
    rss_peak: int = 0
    distributions: list[Distribution] = field(default_factory=list)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and all(d.complete for d in self.distributions)


async def run_all(
    sizes: list[int], images: list[int], limit_s: float, config: str | None = None
) -> list[FleetRun]:
    """Every fleet size in turn."""
    work = Path(tempfile.mkdtemp(prefix="otad-scale-"))
    try:
        releases = await asyncio.to_thread(make_releases, work, images)
        out = []
        for n in sizes:
            run = FleetRun(hubs=n, procs=default_procs(n))
            try:
                check_host_limits(n, run.procs, local_broker=True)
                await fleet_run(run, work / f"n{n}", releases, limit_s, config)
            except (HostLimitError, DemoError, TimeoutError) as exc:
                run.error = str(exc) or type(exc).__name__
                print(f"scale: {n} CHs: {run.error}", flush=True)
            out.append(run)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_releases(work: Path, sizes_kib: list[int]) -> dict[int, tuple[Path, str, int]]:
    """A signing key, its trust directory and one signed CH image per size (each a newer
    sequence): size -> (file, SHA-256 hex, blocks)."""
    out: dict[int, tuple[Path, str, int]] = {}
    key: Path | None = None
    for kib in sizes_kib:
        release = make_release(
            work,
            firmware_bytes=kib * 1024 - 64,
            name=f"fw-{kib}",
            key=key,
            version=0x01020000 + kib,
            sequence=int(time.time()) + kib,
        )
        key = release.key
        out[kib] = (release.path, release.sha256, release.blocks)
    return out


class Watcher:
    """What the scale run reads of the monitoring feed (an :class:`EventMonitor`): when each CH's
    ``transfer.held`` was emitted and received, and the worst the status said."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, float]] = {}  # image -> guid -> emit time (wall)
        self.held_at: dict[str, list[float]] = {}  # image -> receipt times (wall)
        self.lags: dict[str, list[float]] = {}
        self.monitor = EventMonitor(on_event=self.on_event)
        self._mark = 0

    def on_event(self, event: MonitorEvent) -> None:
        """Note a ``transfer.held`` (the monitor's hook)."""
        if not isinstance(event, TransferHeld):
            return
        now = time.time()
        seen = self.held.setdefault(event.image, {})
        if event.guid in seen:
            return
        seen[event.guid] = event.time
        self.held_at.setdefault(event.image, []).append(now)
        self.lags.setdefault(event.image, []).append(now - event.time)

    @property
    def status(self) -> dict[str, Any]:
        """The newest retained status."""
        return self.monitor.status

    def reset_peaks(self) -> None:
        """Start the worst-of figures afresh (a new distribution)."""
        self._mark = len(self.monitor.statuses)

    def _since_mark(self) -> list[dict[str, Any]]:
        return self.monitor.statuses[self._mark :]

    @property
    def lag_p99(self) -> float:
        """Worst event-loop lag p99 otad reported since :meth:`reset_peaks`, ms."""
        return max((float(s.get("loop_lag", {}).get("p99_ms", 0)) for s in self._since_mark()),
                   default=0.0)  # fmt: skip

    @property
    def lag_max(self) -> float:
        """Worst event-loop lag max otad reported since :meth:`reset_peaks`, ms."""
        return max((float(s.get("loop_lag", {}).get("max_ms", 0)) for s in self._since_mark()),
                   default=0.0)  # fmt: skip

    @property
    def backlog_max(self) -> int:
        """Largest outbox backlog otad reported since :meth:`reset_peaks`."""
        return max((int(s.get("events_backlog", 0)) for s in self._since_mark()), default=0)


async def fleet_run(
    run: FleetRun,
    work: Path,
    releases: dict[int, tuple[Path, str, int]],
    limit_s: float,
    config: str | None = None,
) -> None:
    """One fleet size, every image."""
    await asyncio.to_thread(work.mkdir, parents=True)
    trust = next(iter(releases.values()))[0].parent / "trust"
    broker = MosquittoBroker(workdir=work / "mosquitto")
    broker.start()
    address = run.broker = broker.address
    proc = await start_otad(address, work / "otad", trust, work / "otad.log", config=config)
    watcher = Watcher()
    monitor = create_client(
        "gmqtt", MqttSettings(client_id="scale-monitor", host=broker.host, port=broker.port)
    )
    monitor.set_message_handler(watcher.monitor.feed)
    await monitor.subscribe(topics.EVENTS_WILDCARD, 1)
    await monitor.subscribe(topics.OTAD_STATUS, 1)
    await monitor.connect()
    fleet = HubFleet(
        broker=(broker.host, broker.port), state_dir=work / "hubs", count=run.hubs,
        procs=run.procs, trust_dir=trust,
    )  # fmt: skip
    try:
        began = time.monotonic()
        await fleet.start(wait_s=600)
        run.connect_s = time.monotonic() - began
        await _until(lambda: watcher.status.get("hubs", {}).get("online") == run.hubs, 300, proc)
        run.known_s = time.monotonic() - began
        print(
            f"scale: {run.hubs} CHs in {run.procs} process(es): connected in "
            f"{run.connect_s:.1f} s, all known to otad in {run.known_s:.1f} s",
            flush=True,
        )
        for image, _sha, _blocks in releases.values():
            await run_cmd(otactl("--broker", address, "image", "import", str(image)), wait_s=120)
        await asyncio.sleep(2.0)
        run.rss_idle = rss_bytes(proc.pid)
        run.rss_peak = run.rss_idle
        async with CtlClient(broker.host, broker.port, timeout=120) as ctl:
            for kib, (_image, sha, blocks) in releases.items():
                result = await distribute(run, ctl, fleet, watcher, proc, kib, sha, blocks, limit_s)
                run.distributions.append(result)
                print(f"scale: {run.hubs} CHs, {kib} KiB: {summary(result, run.hubs)}", flush=True)
        run.rss_peak = max(run.rss_peak, peak_rss_bytes(proc.pid))
    finally:
        with contextlib.suppress(Exception):
            await monitor.disconnect()
        with contextlib.suppress(Exception):
            await fleet.close()
        await stop_otad(proc, 30)
        broker.stop()
        await asyncio.to_thread(shutil.rmtree, work, True)


async def distribute(
    run: FleetRun, ctl: CtlClient, fleet: HubFleet, watcher: Watcher,
    proc: asyncio.subprocess.Process, kib: int, sha: str, blocks: int, limit_s: float,
) -> Distribution:  # fmt: skip
    """One distribution to every CH, measured."""
    n = run.hubs
    before = await ctl.call("status")
    cpu0 = cpu_seconds(proc.pid)
    watcher.reset_peaks()
    t0 = time.monotonic()
    wall0 = time.time()
    await ctl.call("distribute", {"image": sha, "all_matching": True})
    distribute_s = time.monotonic() - t0
    control_ms: list[float] = []
    cli_ms: list[float] = []
    all_held_at: float | None = None
    next_probe = 0.0
    next_cli = 2.0
    while len(watcher.held.get(sha, {})) < n:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        if now - t0 > limit_s:
            raise TimeoutError(f"{kib} KiB to {n} CHs not done after {limit_s:.0f} s")
        if proc.returncode is not None:
            raise DemoError(f"otad exited ({proc.returncode})")
        run.rss_peak = max(run.rss_peak, rss_bytes(proc.pid))
        if all_held_at is None:
            totals = await fleet.totals()
            if totals.held_by_image.get(sha, 0) >= n:
                all_held_at = time.time()
        if now >= next_probe:
            began = time.monotonic()
            await ctl.call("status")
            control_ms.append((time.monotonic() - began) * 1e3)
            next_probe = now + 1.0
        if now - t0 >= next_cli:  # the real command line, as an operator types it
            began = time.monotonic()
            await run_cmd(otactl("--broker", run.broker, "status"), wait_s=30)
            cli_ms.append((time.monotonic() - began) * 1e3)
            next_cli = now - t0 + 10.0
    cpu = cpu_seconds(proc.pid) - cpu0
    last = max(watcher.held_at[sha])
    if all_held_at is None:
        all_held_at = last
    after = await ctl.call("status")
    sent = int(after["blocks_published"]) - int(before["blocks_published"])
    return Distribution(
        image_kib=kib,
        blocks_per_ch=blocks,
        distribute_s=distribute_s,
        seconds=last - wall0,
        blocks_sent=sent,
        cpu_s=cpu,
        loop_lag_p99_ms=watcher.lag_p99,
        loop_lag_max_ms=watcher.lag_max,
        control_ms=control_ms,
        cli_ms=cli_ms,
        event_lag_s=watcher.lags.get(sha, []),
        tail_lag_s=max(0.0, last - all_held_at),
        events_backlog_max=watcher.backlog_max,
        complete=len(watcher.held.get(sha, {})) >= n,
    )


async def _until(condition: Any, wait_s: float, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        if proc.returncode is not None:
            raise DemoError(f"otad exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {wait_s:.0f} s")
        await asyncio.sleep(0.2)


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(d: Distribution, hubs: int) -> str:
    """One line about one distribution."""
    ideal = hubs * d.blocks_per_ch
    return (
        f"{d.seconds:.1f} s, {ideal / d.seconds:,.0f} blocks/s, "
        f"{d.cpu_s / max(1, d.blocks_sent) * 1e6:.1f} us/block, "
        f"re-sent {max(0, d.blocks_sent - ideal) / ideal:.2%}, "
        f"loop lag p99 {d.loop_lag_p99_ms:.0f} ms (max {d.loop_lag_max_ms:.0f}), "
        f"control {statistics.median(d.control_ms) if d.control_ms else float('nan'):.0f}/"
        f"{max(d.control_ms, default=float('nan')):.0f} ms, otactl status "
        f"{max(d.cli_ms, default=float('nan')):.0f} ms at worst, event lag p50 "
        f"{_q(d.event_lag_s, 0.5):.2f} s max {max(d.event_lag_s, default=float('nan')):.2f} s, "
        f"tail {d.tail_lag_s:.1f} s, outbox backlog max {d.events_backlog_max}, distribute "
        f"{d.distribute_s:.2f} s"
    )


def render(results: list[FleetRun]) -> list[str]:
    """The Markdown table."""
    rows = [
        "| CHs | procs | connect / known (s) | otad RSS idle / peak (MiB) | image | distribute "
        "request (s) | distribution (s) | blocks/s | otad us/block | re-sent | loop lag p99 / "
        "max (ms) | control p50 / max (ms) | otactl status, worst (ms) | event lag p50 / max (s) | "
        "events behind the CHs (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results:
        if run.error is not None:
            rows.append(f"| {run.hubs} | {run.procs} | not run: {run.error} |" + " |" * 12)
            continue
        for d in run.distributions:
            ideal = run.hubs * d.blocks_per_ch
            rows.append(
                f"| {run.hubs:,} | {run.procs} | {run.connect_s:.1f} / {run.known_s:.1f} | "
                f"{run.rss_idle / 2**20:.0f} / {run.rss_peak / 2**20:.0f} | {d.image_kib} KiB | "
                f"{d.distribute_s:.2f} | {d.seconds:.1f} | {ideal / d.seconds:,.0f} | "
                f"{d.cpu_s / max(1, d.blocks_sent) * 1e6:.1f} | "
                f"{max(0, d.blocks_sent - ideal) / ideal:.2%} | "
                f"{d.loop_lag_p99_ms:.0f} / {d.loop_lag_max_ms:.0f} | "
                f"{statistics.median(d.control_ms) if d.control_ms else float('nan'):.0f} / "
                f"{max(d.control_ms, default=float('nan')):.0f} | "
                f"{max(d.cli_ms, default=float('nan')):.0f} | "
                f"{_q(d.event_lag_s, 0.5):.2f} / {max(d.event_lag_s, default=float('nan')):.2f} | "
                f"{d.tail_lag_s:.1f} |"
            )
    return rows


def record(command: str, table: list[str]) -> None:
    """Append a dated section to BENCHMARKS.md."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = versions()
    lines = [
        f"## Scale: {when}",
        "",
        f"Command: `{command.strip()}` (otad's default configuration; {os.cpu_count()} CPUs "
        "shared by the broker, otad and the virtual CHs)",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        *table,
        "",
    ]
    with BENCHMARKS.open("a") as f:
        f.write("\n".join(lines))
