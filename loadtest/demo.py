"""``make demo``: signed images travel from otad through a real Mosquitto to hundreds of premises,
over each premises' HAN to their devices, and are activated and confirmed with proof.

Steps (everything in a fresh work directory, everything started is stopped again, also on
Ctrl-C or an error):

1. a release signing key (what ``otactl keys new`` makes) and its trust directory; otad's
   activation key and its public half (the CHs' devices trust it); the public keys of every
   device that signs its activation alerts (:meth:`loadtest.runner.FleetConfig.write_device_keys`,
   otad's ``activation.device_keys``);
2. two signed images (:func:`loadtest.release.make_release`): ~256 KiB of CH firmware and a
   smaller one for the Alt HAN bridges of type B2;
3. a private Mosquitto on a free port (:class:`loadtest.broker.MosquittoBroker`);
4. ``python -m otad run --config ... --broker ... --state-dir ... --trust ...`` as a subprocess;
5. N virtual CHs (default 300) with their premises' HAN, a share of them with Alt HAN bridges
   (:class:`loadtest.runner.HubFleet`, HAN time accelerated so hours of it run in seconds);
6. wait until otad lists them all (``otactl fleet list --json``);
7. ``otactl image import`` for both images, then one staged campaign each (``otactl campaign
   plan``, ``create``, ``expedite`` by two approvers -- the demo cannot wait the 7-day notice --
   and ``start``): micro-pilot, pilot, roll-out, with an automatic GO after a short soak. The
   bridge image's campaign goes first (each CH relays it over its HAN to its B2s, which are
   activated), then the CH image's (distributed and activated: the CH reboots into it, so it
   must not cut its own relay short). A hold (a threshold crossed) stops
   the demo as failed, unless the scenario asked for failures (``--self-test-failures``): then
   the demo, as the operator, records a GO naming them;
8. the WAN carries one copy per CH and image;
9. a live view fed by ``otactl devices`` (otad's state of every device) and its alerts: per
   phase how many devices got there (WAN held, HAN relayed, activated, confirmed), failures,
   STALLED when nothing moves;
10. a summary, and ``report.json`` in the work directory (its path printed): devices targeted
    and confirmed, confirmations by proof, failures by reason, alerts published, WAN block bytes
    sent, image bytes, duration, and ``stages``: per campaign stage its name, hubs, confirmed,
    failed and gate decision (``estimated_duration_s``: the longer campaign's plan).

Exit status 0 only when every targeted device is confirmed, or failed for the one reason the
scenario asked for (a seeded share failing its self-test, ``--self-test-failures``; with
``--answer-loss`` too, a rollback whose answer was lost reads back as ``ACTIVATION_FAILED``).
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
from collections.abc import Mapping, Sequence
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
    parser.add_argument("--image-kib", type=int, default=256, help="CH firmware size (default 256)")
    parser.add_argument(
        "--bridge-image-kib", type=int, default=16, help="B2 bridge firmware size (default 16)"
    )
    parser.add_argument(
        "--bridge-share", type=float, default=0.25,
        help="premises with 2-3 Alt HAN bridges (default 0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--han-acceleration", type=float, default=120.0,
        help="HAN time runs this many times as fast (default 120)",
    )  # fmt: skip
    parser.add_argument(
        "--han-max-transfers", type=int, default=2, help="concurrent HAN transfers per CH"
    )
    parser.add_argument(
        "--self-test-failures", type=float, default=0.0,
        help="share of devices whose new image fails its self-test and rolls back (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--answer-loss", type=float, default=0.0,
        help="share of activation answers lost on the HAN: otad reads the version back (default 0)",
    )  # fmt: skip
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

#: How far a device got, by its state in ``otactl devices`` (phases of :data:`PHASES`).
_RANK = {
    "offered": 0,
    "held_by_ch": 1,
    "han_transfer": 1,
    "held_by_device": 2,
    "activation_pending": 2,
    "activated": 3,
    "confirmed": 4,
}
PHASES = ("WAN held", "HAN relayed", "activated", "confirmed")
#: States a device ends in.
FINAL_STATES = frozenset({"confirmed", "failed", "timed_out"})
#: Version numbers of the demo's images: above every virtual device's (loadtest.hub).
CH_IMAGE_VERSION = 0x0101_0000
BRIDGE_IMAGE_VERSION = 0x0000_0200
BRIDGE_TYPE = "B2"


def phase_of(row: Mapping[str, Any]) -> int:
    """Phases (of :data:`PHASES`) a device has passed, by its ``otactl devices`` row. A CH is
    its own device: holding its image over the WAN, it needs no HAN relay."""
    rank = _RANK.get(str(row.get("state")), 0)
    if row.get("device_id") == row.get("guid") and rank == 1:
        return 2
    return rank


def otad_config(
    work: Path,
    activation_key: Path,
    device_keys: Path,
    *,
    pacing: Mapping[str, float] | None = None,
) -> Path:
    """otad's configuration for the demo and load tests: activation on, with deadlines for
    accelerated HAN; ``/metrics`` on a free port (a system otad may hold the default one);
    ``pacing``: the ``[campaigns]`` figures its plans estimate with (:mod:`otad.config`)."""
    from loadtest.broker import free_port

    path = work / "otad.toml"
    campaigns = "".join(f"{name} = {float(value)!r}\n" for name, value in (pacing or {}).items())
    path.write_text(
        "[activation]\n"
        f"key = {json.dumps(str(activation_key))}\n"
        f"device_keys = {json.dumps(str(device_keys))}\n"
        "response_timeout_s = 5.0\n"
        "read_back_backoff_s = 2.0\n"
        "read_back_attempts = 5\n"
        "han_timeout_s = 300.0\n"
        "\n[metrics]\n"
        f"port = {free_port()}\n" + (f"\n[campaigns]\n{campaigns}" if campaigns else "")
    )
    return path


def _has_bridges(identity: Any) -> bool:
    from protocol.wire.messages import ALT_HAN_BRIDGES

    return any(d.device_type in ALT_HAN_BRIDGES for d in identity.han)


class ImageProgress:
    """One image of the demo and what otad says (``otactl devices``) of the devices it is for.

    A device's phases passed are remembered at their highest: one that later fails (a self-test
    rolled back) still counts in the phases it got through, and, having ended, is done.
    """

    def __init__(self, label: str, manifest: Any, expected: int) -> None:
        self.label = label
        self.manifest = manifest
        self.sha256: str = manifest.sha256.hex()
        self.expected = expected  # devices the image is for, from the fleet's inventories
        self.rows: list[dict[str, Any]] = []
        self.passed: dict[str, int] = {}  # device id -> phases passed, at most

    def update(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Take a new ``otactl devices`` listing (every image's rows)."""
        self.rows = [dict(r) for r in rows if r.get("image") == self.sha256]
        for row in self.rows:
            device_id = str(row.get("device_id"))
            self.passed[device_id] = max(self.passed.get(device_id, 0), phase_of(row))

    def reached(self, phase: int) -> int:
        """Devices that got through ``phase`` (an index of :data:`PHASES`)."""
        return sum(1 for n in self.passed.values() if n > phase)

    def done(self) -> int:
        """Phases done over every device, for the progress bar: all of them once it ended."""
        ended = {str(r.get("device_id")) for r in self.rows if r.get("state") in FINAL_STATES}
        return sum(len(PHASES) if d in ended else n for d, n in self.passed.items())

    def count(self, *states: str) -> int:
        """Devices in one of ``states`` now."""
        return sum(1 for r in self.rows if r.get("state") in states)

    @property
    def all_listed(self) -> bool:
        """otad lists a row for every device the image is for."""
        return len(self.rows) >= self.expected

    @property
    def all_held(self) -> bool:
        """Every device holds the image (or has ended): it can be activated."""
        return self.all_listed and all(
            phase_of(r) >= 2 or r.get("state") in FINAL_STATES for r in self.rows
        )

    @property
    def all_final(self) -> bool:
        """Every device has ended (confirmed, failed, timed out)."""
        return self.all_listed and all(r.get("state") in FINAL_STATES for r in self.rows)


async def run(args: argparse.Namespace) -> int:
    """The demo itself (see the module docstring)."""
    from loadtest.broker import MosquittoBroker
    from loadtest.runner import HostLimitError, HubFleet, check_host_limits, default_procs
    from otad.ctl import imagetool
    from otad.ctl.client import CtlClient, call_all
    from otad.events import ALERTS_PREFIX, DeviceConfirmed, DeviceFailed
    from otad.keyfiles import public_key_path
    from protocol.release.manifest import DeviceType
    from protocol.wire.messages import ALT_HAN_BRIDGES

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
    alerts: EventMonitor | None = None
    ctl: CtlClient | None = None
    ok = False
    interrupted = False
    procs = args.procs or default_procs(args.hubs)
    try:
        check_host_limits(args.hubs, procs, local_broker=True)
    except HostLimitError as exc:
        say(f"demo: {exc}")
        return 2
    work = await asyncio.to_thread(_work_dir, args.work_dir, "otad-demo-")
    report_path = work / "report.json"
    began = time.monotonic()
    try:
        # 1-2: keys, trust, images ----------------------------------------------------------
        ch_release = await asyncio.to_thread(
            make_release,
            work,
            firmware_bytes=max(1, args.image_kib * 1024 - 64),
            block_size=args.block_size,
            name="ch-firmware",
            version=CH_IMAGE_VERSION,
        )
        bridge_release = await asyncio.to_thread(
            make_release,
            work,
            firmware_bytes=max(1, args.bridge_image_kib * 1024 - 64),
            block_size=args.block_size,
            device_type=DeviceType(BRIDGE_TYPE),
            name="b2-firmware",
            key=ch_release.key,
            version=BRIDGE_IMAGE_VERSION,
        )
        activation_key = work / "activation-key.pem"
        activation_trust = work / "activation-trust"
        activation_trust.mkdir(exist_ok=True)
        await asyncio.to_thread(imagetool.keys_new, activation_key)
        shutil.copy(public_key_path(activation_key), activation_trust / "otad-activation.pem")
        for release in (ch_release, bridge_release):
            m = release.manifest
            say(
                f"image {release.path.name}: {m.device_type.value}, {m.size} bytes, "
                f"{m.block_count} blocks of {m.block_size}, version {m.fw_version:#010x}, "
                f"sha256 {release.sha256[:16]}..."
            )

        # 3: broker -------------------------------------------------------------------------
        broker = MosquittoBroker(workdir=work / "mosquitto")
        broker.start()
        host, port = broker.host, broker.port
        address = f"{host}:{port}"
        say(f"mosquitto on {address} (pid {broker.pid})")

        # 5 (its identities first: otad needs the devices' public keys) --------------------
        fleet = HubFleet(
            broker=(host, port),
            state_dir=work / "hubs",
            count=args.hubs,
            procs=procs,
            trust_dir=ch_release.trust_dir,
            library=args.library,
            activation_trust_dir=activation_trust,
            han_acceleration=args.han_acceleration,
            han_max_transfers=args.han_max_transfers,
            self_test_failure_share=args.self_test_failures,
            activation_answer_loss=args.answer_loss,
            bridge_share=args.bridge_share,
        )
        device_keys = work / "device-keys"
        signers = await asyncio.to_thread(fleet.config.write_device_keys, device_keys)
        bridges = [
            d for ident in fleet.identities for d in ident.han if d.device_type in ALT_HAN_BRIDGES
        ]
        b2s = [d for d in bridges if d.device_type.value == BRIDGE_TYPE]
        with_bridges = sum(
            1
            for ident in fleet.identities
            if any(d.device_type in ALT_HAN_BRIDGES for d in ident.han)
        )
        say(
            f"{args.hubs} premises, {with_bridges} with Alt HAN bridges ({len(bridges)} bridges, "
            f"{len(b2s)} of type {BRIDGE_TYPE}); {signers} device keys for otad"
        )

        # 4: otad ---------------------------------------------------------------------------
        config = otad_config(work, activation_key, device_keys)
        otad_proc = await start_otad(
            address,
            work / "otad",
            ch_release.trust_dir,
            work / "otad.log",
            library=args.library,
            config=config,
        )
        say(f"otad running (pid {otad_proc.pid}), log in {work / 'otad.log'}")

        # monitoring subscriptions from the start: every event and alert, once, by sequence
        monitor = await EventMonitor.connect(
            host, port, library=args.library, status=False, client_id="demo-monitor"
        )
        alerts = await EventMonitor.connect(
            host,
            port,
            library=args.library,
            status=False,
            events_filter=f"{ALERTS_PREFIX}/#",
            client_id="demo-alerts",
        )
        tally = _Tally(monitor)

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

        # 7: import both, one staged campaign each ------------------------------------------
        images = [
            ImageProgress(BRIDGE_TYPE, bridge_release.manifest, len(b2s)),
            ImageProgress("CH", ch_release.manifest, len(wanted)),
        ]
        before = await fleet.totals()
        started = time.monotonic()
        for release in (bridge_release, ch_release):
            line = await run_cmd(otactl("--broker", address, "image", "import", str(release.path)))
            say(line.strip().splitlines()[-1] if line.strip() else "image imported")
        # the bridges first, then the CHs (a CH image's activation reboots the CH: it must not
        # cut its own HAN relay of the bridge image short)
        campaigns = [
            DemoCampaign("demo-b2", bridge_release.sha256, len(b2s)),
            DemoCampaign("demo-ch", ch_release.sha256, len(wanted)),
        ]
        for campaign in campaigns:
            if campaign.targets:
                await campaign.launch(address, say)
                break

        # 8-9: live view, activations ------------------------------------------------------
        ctl = CtlClient(host, port, library=args.library, name="demo-view", timeout=30.0)
        await ctl.connect()
        targeted = sum(i.expected for i in images)
        bar = ProgressBar(targeted * len(PHASES), label="devices", stalled_after=15.0)

        def progress() -> int:
            return sum(i.done() for i in images)

        def extra() -> str:
            parts = []
            for image in images:
                counts = " ".join(f"{name} {image.reached(p)}" for p, name in enumerate(PHASES))
                failed = image.count("failed", "timed_out")
                parts.append(
                    f"{image.label}[{counts} / {image.expected}"
                    + (f", failed {failed}" if failed else "")
                    + "]"
                )
            return "  ".join(parts)

        failures_expected = bool(args.self_test_failures or args.answer_loss)
        gave_up = False
        while True:
            await asyncio.sleep(1.0)
            if otad_proc.returncode is not None:
                raise DemoError(f"otad exited with status {otad_proc.returncode}; see otad.log")
            with contextlib.suppress(Exception):
                rows = await call_all(ctl, "devices")
                for image in images:
                    image.update(rows)
            bar.update(progress(), extra(), stalled=tally.stalled)
            for index, campaign in enumerate(campaigns):
                if not campaign.targets:
                    continue
                if not campaign.plan:  # not launched: after every campaign before it
                    if all(c.finished for c in campaigns[:index]):
                        await campaign.launch(address, say)
                    continue
                with contextlib.suppress(Exception):
                    campaign.status = await ctl.call("campaign.status", {"id": campaign.id})
                for step in campaign.new_steps():
                    bar.update(progress(), extra(), force=True)
                    say(f"\n{campaign.id}: {step}")
                if campaign.state == "on_hold":
                    if not failures_expected:
                        raise DemoError(f"{campaign.id} held: {campaign.status['hold_reason']}")
                    await run_cmd(otactl(
                        "--broker", address, "campaign", "approve", campaign.id, "--reason",
                        "the demo's seeded self-test failures are expected",
                    ))  # fmt: skip
            if all(i.all_final for i in images) and all(c.finished for c in campaigns):
                break
            if time.monotonic() - started > args.timeout:
                gave_up = True  # the summary and the report say who did not finish
                break
        duration = time.monotonic() - started
        with contextlib.suppress(Exception):  # the last word, as of the alerts counted below
            rows = await call_all(ctl, "devices")
            for image in images:
                image.update(rows)
        bar.close(progress(), extra())

        # 10: summary and report -----------------------------------------------------------
        sent_bytes, sent_blocks = sum(tally.bytes_sent.values()), sum(tally.blocks_sent.values())
        if not sent_bytes:
            sent_bytes, sent_blocks = await _otad_sent(
                address, fallback=(await fleet.totals(), before)
            )
        rows = [r for i in images for r in i.rows]
        manifests = {i.sha256: i.manifest.size for i in images}
        by_proof: dict[str, int] = {}
        failures: dict[str, int] = {}
        for r in rows:
            if r["state"] == "confirmed":
                by_proof[str(r["proof"])] = by_proof.get(str(r["proof"]), 0) + 1
            elif r["state"] in ("failed", "timed_out"):
                reason = str(r.get("reason") or r["state"].upper())
                failures[reason] = failures.get(reason, 0) + 1
        unfinished: dict[str, int] = {}  # devices still in progress when the demo gave up
        for r in rows:
            if r["state"] not in FINAL_STATES:
                unfinished[r["state"]] = unfinished.get(r["state"], 0) + 1
        not_started = sum(max(0, i.expected - len(i.rows)) for i in images)
        if not_started:  # targets a campaign had not started (or not yet been launched for)
            unfinished["not_started"] = not_started
        confirmed_alerts = alerts.of_kind(DeviceConfirmed)
        failed_alerts = alerts.of_kind(DeviceFailed)
        image_bytes = sum(i.manifest.size for i in images)
        wan_copies = len(tally.held)
        report: dict[str, Any] = {
            "stages": [row for c in campaigns for row in c.stage_rows()],
            "campaigns": [c.summary() for c in campaigns],
            "estimated_duration_s": max(
                (c.plan["estimate"]["total_s"] for c in campaigns if c.plan), default=0.0
            ),
            "devices_targeted": targeted,
            "devices_confirmed": sum(by_proof.values()),
            "confirmations_by_method": dict(sorted(by_proof.items())),
            "failures": dict(sorted(failures.items())),
            "unfinished": dict(sorted(unfinished.items())),
            "alerts_published": len(confirmed_alerts) + len(failed_alerts),
            "alerts_by_kind": {
                DeviceConfirmed.KIND: len(confirmed_alerts),
                DeviceFailed.KIND: len(failed_alerts),
            },
            "wan_block_bytes_sent": sent_bytes,
            "wan_blocks_sent": sent_blocks,
            "wan_copies": wan_copies,
            "image_bytes": image_bytes,
            "duration_s": round(duration, 3),
            "hubs": len(wanted),
            "premises_with_bridges": with_bridges,
            "images": [
                {
                    "label": i.label,
                    "sha256": i.sha256,
                    "device_type": i.manifest.device_type.value,
                    "version": i.manifest.fw_version,
                    "size": i.manifest.size,
                    "devices_targeted": i.expected,
                    "devices_listed": len(i.rows),
                    "devices_confirmed": i.count("confirmed"),
                }
                for i in images
            ],
        }
        await asyncio.to_thread(
            report_path.write_text, json.dumps(report, indent=2, sort_keys=True) + "\n"
        )
        ideal = sum(manifests[image] for _guid, image in tally.held)
        say("")
        for image in images:
            say(
                f"{image.label + ' image':<21}: {image.count('confirmed')} / {image.expected} "
                f"devices confirmed ({len(image.rows)} listed by otad)"
            )
        say(
            "confirmations        : "
            + (", ".join(f"{n} by {p}" for p, n in sorted(by_proof.items())) or "none")
        )
        say(
            "failures             : "
            + (", ".join(f"{n} {r}" for r, n in sorted(failures.items())) or "none")
        )
        say(
            f"alerts published     : {len(confirmed_alerts)} device.confirmed, "
            f"{len(failed_alerts)} device.failed"
        )
        say(
            f"WAN bytes sent       : {format_bytes(sent_bytes)} in {wan_copies} image copies "
            f"({sent_bytes / ideal if ideal else 0:.3f} x one copy per CH and image)"
        )
        for row in report["stages"]:
            label = f"{row['campaign']} {row['name']}"
            say(
                f"{label:<21}: {row['hubs']} hubs, {row['confirmed']} confirmed,"
                f" {row['failed']} failed, gate {row['gate_decision']}"
            )
        say(f"duration             : {format_duration(duration)} ({duration:.1f} s)"
            f", the plans estimated {report['estimated_duration_s']:.0f} s")  # fmt: skip
        say(f"events               : {len(monitor.events)} seen, {monitor.duplicates} duplicates")
        say(f"report               : {report_path}")
        # A rolled-back device whose answer was lost is found by the read-back still on its old
        # version after taking the command: otad cannot tell that from a failed activation.
        expected_failures = {"SELF_TEST_FAILED"} if args.self_test_failures else set()
        if args.self_test_failures and args.answer_loss:
            expected_failures.add("ACTIVATION_FAILED")
        if gave_up:
            say(
                f"not finished after {args.timeout:.0f} s: "
                + ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items()))
            )
        ok = (
            not gave_up
            and all(i.all_listed and len(i.rows) == i.expected for i in images)
            and report["devices_confirmed"] + sum(failures.values()) == targeted
            and set(failures) <= expected_failures
            and report["alerts_published"] == targeted
            and not tally.failed
            and all(c.finished for c in campaigns)
        )
        say(f"demo: {'OK' if ok else 'FAILED'} (total {time.monotonic() - began:.0f} s)")
    except asyncio.CancelledError:
        say("demo: interrupted")
        ok = False
        interrupted = True
    except DemoError as exc:
        say(f"demo: FAILED: {exc}")
        ok = False
    finally:
        if ctl is not None:
            with contextlib.suppress(Exception):
                await ctl.close()
        for mon in (monitor, alerts):
            with contextlib.suppress(Exception):
                if mon is not None:
                    await mon.close()
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
        else:  # everything but the report, whose path the summary printed
            for entry in work.iterdir():
                if entry != report_path:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
    if interrupted:
        return 130
    return 0 if ok else 1


def demo_stages(targets: int) -> tuple[str, ...]:
    """The stage plan for ``targets``: micro-pilot (10-20), pilot, roll-out; a fleet too small
    for a micro-pilot and more has a pilot and a roll-out."""
    if targets >= 40:
        return ("micro-pilot:micro_pilot:15" if targets >= 75 else "micro-pilot:micro_pilot:10",
                "pilot:pilot:20%", "roll-out:rollout")  # fmt: skip
    return ("pilot:pilot:50%", "roll-out:rollout")


class DemoCampaign:
    """One staged campaign of the demo, driven through ``otactl campaign``."""

    SOAK_S = 3.0

    def __init__(
        self, campaign_id: str, image: str, targets: int, extra: Sequence[str] = ()
    ) -> None:
        self.id = campaign_id
        self.image = image
        self.targets = targets
        self.extra = tuple(extra)
        self.plan: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        self._seen_steps = 0
        self._steps: list[str] = []

    def flags(self) -> list[str]:
        flags = ["--id", self.id, "--image", self.image, "--rate", "600",
                 "--auto-gate", f"{self.SOAK_S:g}s", *self.extra]  # fmt: skip
        for stage in demo_stages(self.targets):
            flags += ["--stage", stage]
        return flags

    async def launch(self, address: str, say: Any) -> None:
        """Plan, create, waive the notice (two approvers), start."""
        base = ("--broker", address, "campaign")
        self.plan = json.loads(await run_cmd(otactl(*base, "plan", *self.flags(), "--json")))
        await run_cmd(otactl(*base, "create", *self.flags()))
        await run_cmd(otactl(*base, "expedite", self.id, "--justification",
                             "demo: no 7-day notice period"))  # fmt: skip
        await run_cmd(otactl(*base, "expedite", self.id, "--approve"))
        await run_cmd(otactl(*base, "start", self.id))
        stages = ", ".join(f"{s['name']} {s['targets']}" for s in self.plan["stages"])
        say(
            f"campaign {self.id}: {stages}; estimated"
            f" {format_duration(self.plan['estimate']['total_s'])}"
        )

    @property
    def state(self) -> str:
        return str(self.status.get("state", ""))

    @property
    def finished(self) -> bool:
        return not self.targets or self.state in ("completed", "aborted")

    def new_steps(self) -> list[str]:
        """Stage starts and gate decisions not told yet (from the status)."""
        steps = []
        for stage in self.status.get("stages", []):
            if stage.get("started_at"):
                steps.append(f"stage {stage['name']} started ({stage['targets']} targets)")
            if stage.get("gate"):
                steps.append(f"gate after {stage['name']}: {stage['gate'].upper()}")
        fresh = [s for s in steps if s not in self._steps]
        self._steps.extend(fresh)
        return fresh

    def stage_rows(self) -> list[dict[str, Any]]:
        """``report.json``'s ``stages`` entries of this campaign."""
        hubs = {s["name"]: s["hubs"] for s in self.plan.get("stages", [])}
        rows = []
        stages = self.status.get("stages", [])
        for index, stage in enumerate(stages):
            counts = stage.get("counts", {})
            last = index == len(stages) - 1
            rows.append(
                {
                    "campaign": self.id,
                    "name": stage["name"],
                    "hubs": hubs.get(stage["name"], 0),
                    "targets": stage["targets"],
                    "confirmed": counts.get("confirmed", 0),
                    "failed": sum(n for state, n in counts.items() if state in FAILED_STATES),
                    "gate_decision": stage.get("gate") or ("none" if last else "pending"),
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        """``report.json``'s ``campaigns`` entry."""
        return {
            "id": self.id,
            "state": self.state,
            "targets": self.targets,
            "estimated_duration_s": self.plan.get("estimate", {}).get("total_s"),
        }


#: Campaign target states that count as failed in the report.
FAILED_STATES = frozenset({"failed", "rejected", "timed_out", "rolled_back", "lost", "cancelled"})


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
    """What the demo reads of otad's events (each counted once, by ``seq``), by (CH, image)."""

    def __init__(self, monitor: EventMonitor) -> None:
        self._monitor = monitor

    @property
    def held(self) -> dict[tuple[str, str], str]:
        """(GUID, image) -> the hash the CH reported holding it."""
        return {(e.guid, e.image): e.sha256 for e in self._monitor.of_kind(TransferHeld)}

    @property
    def failed(self) -> dict[tuple[str, str], str]:
        """(GUID, image) -> why its transfer failed."""
        return {(e.guid, e.image): e.reason for e in self._monitor.of_kind(TransferFailed)}

    @property
    def stalled(self) -> bool:
        """otad says a distribution is stalled now (its latest distribution event)."""
        monitor = self._monitor
        moves = [*monitor.of_kind(DistributionStalled), *monitor.of_kind(DistributionResumed)]
        return isinstance(max(moves, key=lambda e: e.seq, default=None), DistributionStalled)

    @property
    def bytes_sent(self) -> dict[tuple[str, str], int]:
        """(GUID, image) -> block bytes otad sent, once the CH holds the image."""
        return {(e.guid, e.image): e.bytes_sent for e in self._monitor.of_kind(TransferHeld)}

    @property
    def blocks_sent(self) -> dict[tuple[str, str], int]:
        """(GUID, image) -> blocks otad sent, repeats included, once the CH holds the image."""
        return {
            (e.guid, e.image): e.blocks_total + e.retransmissions
            for e in self._monitor.of_kind(TransferHeld)
        }


class _Sayer:
    def __call__(self, line: str) -> None:
        print(line, flush=True)


def image_digest(path: Path) -> str:
    """SHA-256 hex of a file (for scripts)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
