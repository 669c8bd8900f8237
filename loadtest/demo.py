"""``make demo``: a signed image travels from otad through a real Mosquitto to hundreds of CHs.

Steps (everything in a fresh work directory, everything started is stopped again, also on
Ctrl-C or an error):

1. a signing key (what ``otactl keys new`` makes); a trust directory holding its public key;
2. ~256 KiB of CH firmware, signed (what ``otactl image sign`` does) into an ``.otaimg``
   (:func:`loadtest.release.make_release`);
3. a private Mosquitto on a free port (:class:`loadtest.broker.MosquittoBroker`);
4. ``python -m otad run --broker ... --state-dir ... --trust ...`` as a subprocess;
5. N virtual CHs (default 300) in a worker process (:class:`loadtest.runner.HubFleet`);
6. wait until otad lists them all (``otactl fleet list --json``);
7. ``otactl image import`` and ``otactl distribute IMAGE --all-matching``;
8. a live progress bar fed by otad's monitoring events (``ota/v1/events/#``, through
   :class:`otad.monitor.EventMonitor`) and the hubs' own counters: CHs holding the image, MB/s,
   blocks/s, ETA;
9. a summary: CHs holding the image and whether every hash they computed matched the manifest,
   bytes sent, duration, blocks/s.

Exit status 0 only when every CH holds the image with the right hash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from loadtest.release import make_release
from otad.events import DistributionResumed, DistributionStalled, TransferFailed, TransferHeld
from otad.monitor import EventMonitor
from otad.progress import ProgressBar, format_bytes, format_duration

OTACTL = "import sys; from otad.ctl import main; sys.exit(main(sys.argv[1:]))"


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m loadtest demo``."""
    parser.add_argument("--hubs", type=int, default=300, help="virtual CHs (default 300)")
    parser.add_argument("--image-kib", type=int, default=256, help="firmware size (default 256)")
    parser.add_argument("--block-size", type=int, default=1024, help="block size (default 1024)")
    parser.add_argument(
        "--procs", type=int, help="hub worker processes (default: one per 2,500 CHs)"
    )
    parser.add_argument("--library", choices=("gmqtt", "aiomqtt"), default="gmqtt")
    parser.add_argument("--work-dir", help="keep everything here (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="do not remove the work directory")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after (s)")


def main(args: argparse.Namespace) -> int:
    """Run the demo; 0 on full success."""
    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- helpers


def _work_dir(given: str | None, prefix: str) -> Path:
    work = Path(given or tempfile.mkdtemp(prefix=prefix)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return work


def _open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


async def start_otad(
    address: str,
    state_dir: Path,
    trust: Path,
    log_path: Path,
    *,
    library: str = "gmqtt",
    config: str | os.PathLike[str] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``python -m otad run`` against ``address`` (with ``config``, else its defaults);
    its output goes to ``log_path``."""
    log_fd = await asyncio.to_thread(_open_log, log_path)
    extra = ["--config", str(config)] if config is not None else []
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "otad", "run", *extra, "--broker", address,
            "--state-dir", str(state_dir), "--trust", str(trust), "--mqtt-library", library,
            stdout=log_fd, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    finally:
        os.close(log_fd)


async def stop_otad(proc: asyncio.subprocess.Process, wait_s: float = 20.0) -> None:
    """SIGTERM (otad drains and exits), SIGKILL if it has not exited after ``wait_s``."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def run_cmd(argv: Sequence[str], *, wait_s: float = 60.0) -> str:
    """Run a command, return its stdout; raise :class:`DemoError` with its stderr on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DemoError(f"{' '.join(argv[-4:])}: timed out after {wait_s:.0f} s") from None
    if proc.returncode != 0:
        message = (err or out).decode(errors="replace").strip().splitlines()
        raise DemoError(f"{' '.join(argv[3:6])}: {message[-1] if message else proc.returncode}")
    return out.decode(errors="replace")


def otactl(*args: str) -> list[str]:
    """argv running ``otactl ARGS`` with this interpreter."""
    return [sys.executable, "-c", OTACTL, *args]


async def wait_json(argv: Sequence[str], wait_s: float = 10.0) -> Any:
    """Run a command that prints JSON and parse it."""
    return json.loads(await run_cmd(argv, wait_s=wait_s))


def _guids_in(listing: Any) -> set[str]:
    """GUIDs in an ``otactl fleet list --json`` answer (a list of hubs, or {"hubs": [...]})."""
    items = listing.get("hubs", listing.get("fleet", [])) if isinstance(listing, dict) else listing
    out: set[str] = set()
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("guid"), str):
            online = item.get("online", True)
            if online in (True, None, "online", 1):
                out.add(item["guid"])
        elif isinstance(item, str):
            out.add(item)
    return out


# ----------------------------------------------------------------------------- the demo


async def run(args: argparse.Namespace) -> int:
    """The demo itself (see the module docstring)."""
    from loadtest.broker import MosquittoBroker
    from loadtest.runner import HostLimitError, HubFleet, check_host_limits, default_procs

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)

    keep = args.keep or args.work_dir is not None
    say = _Sayer()
    broker: Any = None
    otad_proc: asyncio.subprocess.Process | None = None
    fleet: HubFleet | None = None
    monitor: EventMonitor | None = None
    ok = False
    interrupted = False
    procs = args.procs or default_procs(args.hubs)
    try:
        check_host_limits(args.hubs, procs, local_broker=True)
    except HostLimitError as exc:
        say(f"demo: {exc}")
        return 2
    work = await asyncio.to_thread(_work_dir, args.work_dir, "otad-demo-")
    try:
        # 1-2: key, trust, image ------------------------------------------------------------
        release = await asyncio.to_thread(
            make_release,
            work,
            firmware_bytes=max(1, args.image_kib * 1024 - 64),
            block_size=args.block_size,
            name="ch-firmware",
            version=0x01010000,
        )
        trust, image_file, manifest = release.trust_dir, release.path, release.manifest
        image_id = manifest.sha256.hex()
        say(
            f"image {image_file.name}: {manifest.size} bytes, {manifest.block_count} blocks of "
            f"{manifest.block_size}, sha256 {image_id[:16]}..., signed by {release.key.name}"
        )

        # 3: broker -------------------------------------------------------------------------
        broker = MosquittoBroker(workdir=work / "mosquitto")
        broker.start()
        host, port = broker.host, broker.port
        address = f"{host}:{port}"
        say(f"mosquitto on {address} (pid {broker.pid})")

        # 4: otad ---------------------------------------------------------------------------
        otad_proc = await start_otad(
            address, work / "otad", trust, work / "otad.log", library=args.library
        )
        say(f"otad running (pid {otad_proc.pid}), log in {work / 'otad.log'}")

        # monitoring subscription from the start: every event, once, by sequence
        monitor = await EventMonitor.connect(
            host, port, library=args.library, status=False, client_id="demo-monitor"
        )
        tally = _Tally(monitor)

        # 5: hubs ---------------------------------------------------------------------------
        fleet = HubFleet(
            broker=(host, port),
            state_dir=work / "hubs",
            count=args.hubs,
            procs=procs,
            trust_dir=trust,
            library=args.library,
        )
        await fleet.start()
        say(f"{args.hubs} virtual CHs connected and announced in {fleet.started_in or 0:.1f} s")

        # 6: wait until otad knows them all ------------------------------------------------
        wanted = set(fleet.guids)
        deadline = time.monotonic() + 60
        known: set[str] = set()
        while True:
            if otad_proc.returncode is not None:
                raise DemoError(f"otad exited with status {otad_proc.returncode}; see otad.log")
            with contextlib.suppress(DemoError, ValueError):
                known = _guids_in(
                    await wait_json(otactl("--broker", address, "fleet", "list", "--json"))
                )
            if wanted <= known:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"otad lists {len(known & wanted)} of {len(wanted)} CHs after 60 s")
            await asyncio.sleep(0.5)
        say(f"otad lists all {len(wanted)} CHs")

        # 7: import and distribute ---------------------------------------------------------
        line = await run_cmd(otactl("--broker", address, "image", "import", str(image_file)))
        say(line.strip().splitlines()[-1] if line.strip() else "image imported")
        before = await fleet.totals()
        started = time.monotonic()
        await run_cmd(otactl("--broker", address, "distribute", image_id, "--all-matching"))

        # 8: live progress -----------------------------------------------------------------
        # The bar follows blocks stored over every CH (CHs finish together when they stream in
        # parallel, so a bar of CHs would sit at 0% until the end); the line also shows the CHs
        # holding the image, as otad's transfer.held events report them.
        total_blocks = len(wanted) * manifest.block_count
        bar = ProgressBar(total_blocks, label="blocks")
        base_stored = before.stored_blocks
        last_t, last_bytes, last_blocks = started, before.block_bytes, before.blocks
        mbps = bps = 0.0
        summary = before

        def extra() -> str:
            held = len(set(tally.held) & wanted)
            return f"CHs holding {held}/{len(wanted)}  {mbps:5.1f} MB/s {bps:7,.0f} blocks/s"

        while True:
            await asyncio.sleep(0.25)
            summary = await fleet.totals()
            now = time.monotonic()
            if now - last_t >= 1.0:
                mbps = (summary.block_bytes - last_bytes) / (now - last_t) / 1e6
                bps = (summary.blocks - last_blocks) / (now - last_t)
                last_t, last_bytes, last_blocks = now, summary.block_bytes, summary.blocks
            done = len(set(tally.held) & wanted)
            bar.update(
                min(total_blocks, summary.stored_blocks - base_stored),
                extra(),
                stalled=tally.stalled,
            )
            if done >= len(wanted) and summary.held >= len(wanted):
                break
            if tally.failed and len(tally.failed) + done >= len(wanted):
                break
            if otad_proc.returncode is not None:
                raise DemoError(f"otad exited with status {otad_proc.returncode}; see otad.log")
            if now - started > args.timeout:
                raise DemoError(f"not finished after {args.timeout:.0f} s")
        duration = time.monotonic() - started
        bar.close(min(total_blocks, summary.stored_blocks - base_stored), extra())

        # 9: summary -----------------------------------------------------------------------
        stats = await fleet.stats()
        hub_hashes = {g: s.held.get(image_id) for g, s in stats.items()}
        matched = sum(1 for h in hub_hashes.values() if h == image_id)
        otad_matched = sum(1 for g in wanted if tally.held.get(g) == image_id)
        sent_bytes, sent_blocks = sum(tally.bytes_sent.values()), sum(tally.blocks_sent.values())
        if not sent_bytes:
            sent_bytes, sent_blocks = await _otad_sent(address, fallback=(summary, before))
        ideal = len(wanted) * manifest.size
        say("")
        say(
            f"CHs holding the image : {matched} / {len(wanted)} (hash computed by the CH == "
            f"manifest sha256 on {matched}; otad's held events agree on {otad_matched})"
        )
        if tally.failed:
            say(
                f"failed transfers     : {len(tally.failed)} ({sorted(set(tally.failed.values()))})"
            )
        say(
            f"bytes sent           : {format_bytes(sent_bytes)} ({sent_bytes / ideal:.3f} x "
            f"{len(wanted)} CHs x {format_bytes(manifest.size)})"
        )
        say(f"duration             : {format_duration(duration)} ({duration:.1f} s)")
        say(
            f"throughput           : {sent_blocks / duration:,.0f} blocks/s, "
            f"{sent_bytes / duration / 1e6:.1f} MB/s"
        )
        say(f"events               : {len(monitor.events)} seen, {monitor.duplicates} duplicates")
        ok = matched == len(wanted) and otad_matched == len(wanted) and not tally.failed
        say(f"demo: {'OK' if ok else 'FAILED'}")
    except asyncio.CancelledError:
        say("demo: interrupted")
        ok = False
        interrupted = True
    except DemoError as exc:
        say(f"demo: FAILED: {exc}")
        ok = False
    finally:
        with contextlib.suppress(Exception):
            if monitor is not None:
                await monitor.close()
        if fleet is not None:
            with contextlib.suppress(Exception):
                await fleet.close()
        if otad_proc is not None:
            await stop_otad(otad_proc, 15)
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.stop()
        if keep or not ok:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if ok else 1


async def _otad_sent(address: str, *, fallback: tuple[Any, Any]) -> tuple[int, int]:
    """Bytes and blocks otad says it sent (``otactl transfers --json``), else the hubs' count."""
    with contextlib.suppress(DemoError, ValueError, TypeError):
        listing = await wait_json(otactl("--broker", address, "transfers", "--json"))
        items = listing.get("transfers", []) if isinstance(listing, dict) else listing
        sent_bytes = sum(int(t.get("bytes_sent", 0)) for t in items)
        sent_blocks = sum(int(t.get("blocks_sent", 0)) for t in items)
        if sent_bytes:
            if not sent_blocks:
                sent_blocks = sum(int(t.get("blocks_acked", 0)) for t in items)
            return sent_bytes, sent_blocks
    after, before = fallback
    return after.block_bytes - before.block_bytes, after.blocks - before.blocks


class _Tally:
    """What the demo reads of otad's events (each counted once, by ``seq``)."""

    def __init__(self, monitor: EventMonitor) -> None:
        self._monitor = monitor

    @property
    def held(self) -> dict[str, str]:
        """GUID -> the hash the CH reported."""
        return {e.guid: e.sha256 for e in self._monitor.of_kind(TransferHeld)}

    @property
    def failed(self) -> dict[str, str]:
        """GUID -> why its transfer failed."""
        return {e.guid: e.reason for e in self._monitor.of_kind(TransferFailed)}

    @property
    def stalled(self) -> bool:
        """otad says the distribution is stalled now (its latest distribution event)."""
        monitor = self._monitor
        moves = [*monitor.of_kind(DistributionStalled), *monitor.of_kind(DistributionResumed)]
        return isinstance(max(moves, key=lambda e: e.seq, default=None), DistributionStalled)

    @property
    def bytes_sent(self) -> dict[str, int]:
        """GUID -> block bytes otad sent it, when it holds the image."""
        return {e.guid: e.bytes_sent for e in self._monitor.of_kind(TransferHeld)}

    @property
    def blocks_sent(self) -> dict[str, int]:
        """GUID -> blocks otad sent it, repeats included, when it holds the image."""
        return {
            e.guid: e.blocks_total + e.retransmissions for e in self._monitor.of_kind(TransferHeld)
        }


class _Sayer:
    def __call__(self, line: str) -> None:
        print(line, flush=True)


def image_digest(path: Path) -> str:
    """SHA-256 hex of a file (for scripts)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
