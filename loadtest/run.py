"""``python -m loadtest run SCENARIO.toml --out DIR`` (and ``make loadtest``): a scenario
(:mod:`loadtest.scenario`) run end to end, the way an operator rehearses a national roll-out.

Steps (everything started is stopped again, also on Ctrl-C, SIGTERM or an error):

1. in ``DIR``: a release key and two signed images (the CH image and, when the scenario has one,
   the bridge image; :func:`loadtest.release.make_release`), otad's activation key, the public
   keys of every device that signs its alerts;
2. a private Mosquitto (persistence on, so a broker restart keeps the retained announcements;
   the open-files limit raised above the hub count, :func:`loadtest.runner.check_host_limits`);
3. when the scenario has WAN faults, the fault proxy (:mod:`loadtest.faultproxy`, in a process
   of its own) in front of it, which the hubs connect through (otad and the runner's own clients
   connect to the broker directly; without WAN faults the hubs do too);
4. otad (``python -m otad run``), then the virtual premises (:class:`loadtest.runner.HubFleet`,
   one worker process per ~2,500 CHs, each CH its own MQTT connection and HAN devices), and
   the scenario's cloned CHs;
5. one staged campaign per image through otad's control commands (issue 10's contract):
   ``campaign.plan`` (its estimate is ``estimated_duration_s``), ``campaign.create``,
   ``campaign.start``, then ``campaign.status`` every second; the gates open by themselves
   after ``policies.auto_gate_soak_s``. The bridge campaign runs first: the CH image's
   activation reboots the CH, which would cut its HAN relays short;
6. meanwhile the scenario's timeline (:meth:`loadtest.scenario.Scenario.timeline`): WAN cuts
   and half-open links through the proxy, flapping hubs (a power cut, then back), a broker
   restart, an otad SIGKILL (and otad started again at once);
7. a progress line per second; a sample every second (:class:`loadtest.report.Sample`);
8. ``DIR/report.json``, ``DIR/report.md`` and the plots (:mod:`loadtest.report`).

Exit status: 0 when every campaign completed and every target is confirmed or failed for a
reason the report names (with no failure at all when the scenario injected none); 1 otherwise;
2 for a scenario or host that cannot run; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from loadtest.demo import (
    BRIDGE_IMAGE_VERSION,
    CH_IMAGE_VERSION,
    _guids_in,
    otad_config,
    start_otad,
    stop_otad,
)
from loadtest.faultproxy import FaultPolicy, ProxyProcess
from loadtest.procstat import cpu_or_none, peak_rss_bytes, rss_or_none
from loadtest.release import Release, make_release
from loadtest.report import CampaignRecord, RunRecord, Sample, write_report
from loadtest.scenario import FaultAction, Scenario, ScenarioError, load_scenario

if TYPE_CHECKING:
    from loadtest.broker import MosquittoBroker
    from loadtest.runner import HubFleet
    from otad.ctl.client import CtlClient
    from otad.monitor import EventMonitor

#: Campaign states after which nothing more happens (issue 10).
FINAL_CAMPAIGN_STATES = frozenset({"completed", "aborted"})
#: States in which a campaign waits for a person (the runner reports it and gives up).
HELD_STATES = frozenset({"on_hold", "paused"})
SAMPLE_EVERY_S = 1.0
#: Longest the shutdown waits for one MQTT client of the runner, and for one process it
#: started (those kill what does not stop in time themselves).
CLIENT_CLOSE_S = 10.0
PROCESS_CLOSE_S = 150.0


class LoadTestError(Exception):
    """The run cannot go on; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m loadtest run``."""
    parser.add_argument(
        "scenario", help="a scenario file, or the name of one in loadtest/scenarios"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="work and report directory")
    parser.add_argument("--library", choices=("gmqtt", "aiomqtt"), default="gmqtt")
    parser.add_argument("--record", action="store_true",
                        help="append the run's figures to BENCHMARKS.md")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Run ``args.scenario``; the exit status of the module docstring."""
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    try:
        status = uvloop.run(run(scenario, out, library=args.library))
    except KeyboardInterrupt:
        print("\nloadtest: interrupted", file=sys.stderr)
        return 130
    if args.record and (out / "report.json").exists() and status in (0, 1):
        record_benchmark(out / "report.json", " ".join(["python -m loadtest", *sys.argv[1:]]))
    return status


def record_benchmark(report_file: Path, command: str) -> None:
    """Append the load test's section to ``BENCHMARKS.md`` (:func:`benchmark_section`)."""
    import datetime
    import json

    from loadtest.bench import BENCHMARKS, versions
    from loadtest.report import benchmark_section

    report = json.loads(report_file.read_text())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with BENCHMARKS.open("a") as f:
        f.write("\n" + benchmark_section(report, command, when, versions()))
    _say(f"(figures appended to {BENCHMARKS})")


def _say(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------- the run


class OtadProcess:
    """otad as the run sees it: the current process, and what the killed ones used (``start``
    makes a new process: :func:`loadtest.demo.start_otad` with the run's arguments)."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self.proc: asyncio.subprocess.Process | None = None
        self.dead_cpu_s = 0.0
        self.peak_rss = 0
        self.kills = 0

    async def start(self) -> None:
        self.proc = await self._start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def note_peak(self) -> None:
        self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.pid))

    async def kill_and_restart(self) -> None:
        """SIGKILL (after reading its CPU and peak memory), then a new otad at once."""
        if self.proc is not None and self.proc.returncode is None:
            self.note_peak()
            self.dead_cpu_s += cpu_or_none(self.proc.pid) or 0.0
            self.proc.kill()
            await self.proc.wait()
        self.kills += 1
        await self.start()

    def cpu_s(self) -> float:
        return self.dead_cpu_s + (cpu_or_none(self.pid) or 0.0)

    async def stop(self) -> None:
        if self.proc is not None:
            self.note_peak()
            cpu = cpu_or_none(self.pid)
            await stop_otad(self.proc, 15)
            if cpu is not None:
                self.dead_cpu_s += cpu
            self.proc = None


async def run(scenario: Scenario, out: Path, *, library: str = "gmqtt") -> int:
    """Run ``scenario`` with ``out`` (an absolute path) as its work and report directory."""
    from loadtest.broker import MosquittoBroker
    from loadtest.runner import HostLimitError, HubFleet, check_host_limits, default_procs
    from otad.ctl import imagetool
    from otad.ctl.client import CtlClient, call_all
    from otad.events import ALERTS_PREFIX
    from otad.keyfiles import public_key_path
    from otad.monitor import EventMonitor
    from protocol.release.manifest import DeviceType

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)

    procs = scenario.procs or default_procs(scenario.hubs)
    try:
        check_host_limits(
            scenario.hubs + scenario.faults.cloned_hubs,
            procs,
            local_broker=True,
            proxy=scenario.faults.needs_proxy,
        )
    except HostLimitError as exc:
        _say(f"loadtest: {exc}")
        return 2
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    broker: MosquittoBroker | None = None
    proxy: ProxyProcess | None = None
    fleet: HubFleet | None = None
    clones: HubFleet | None = None
    otad: OtadProcess | None = None
    monitor: EventMonitor | None = None
    alerts: EventMonitor | None = None
    ctl: CtlClient | None = None
    approver: CtlClient | None = None
    try:
        _say(f"loadtest {scenario.name}: {scenario.hubs} premises, seed {scenario.seed}, in {out}")
        # 1: keys and images ------------------------------------------------------------
        ch_release = await asyncio.to_thread(
            make_release,
            out,
            firmware_bytes=max(1, scenario.ch_kib * 1024 - 64),
            block_size=scenario.wan_block_size,
            name="ch-firmware",
            version=CH_IMAGE_VERSION,
        )
        releases: list[tuple[str, Release]] = []
        if scenario.bridge_kib:
            bridge_release = await asyncio.to_thread(
                make_release,
                out,
                firmware_bytes=max(1, scenario.bridge_kib * 1024 - 64),
                block_size=scenario.wan_block_size,
                device_type=DeviceType(scenario.bridge_type),
                name=f"{scenario.bridge_type.lower()}-firmware",
                key=ch_release.key,
                version=BRIDGE_IMAGE_VERSION,
            )
            releases.append((scenario.bridge_type, bridge_release))
        releases.append(("CH", ch_release))
        activation_key = out / "activation-key.pem"
        activation_trust = out / "activation-trust"
        activation_trust.mkdir(exist_ok=True)
        await asyncio.to_thread(imagetool.keys_new, activation_key)
        shutil.copy(public_key_path(activation_key), activation_trust / "otad-activation.pem")

        # 2-3: broker and fault proxy ---------------------------------------------------
        # Mosquitto's max_connections is unlimited by default; what binds is the open-files
        # limit, raised and checked above for every CH and clone (check_host_limits). A cap
        # here would only add a way to fail: a half-open hub's reconnects hold extra sockets.
        broker = MosquittoBroker(workdir=out / "mosquitto", persistence=True)
        await asyncio.to_thread(broker.start)
        f = scenario.faults
        policy = FaultPolicy(
            latency=f.wan_latency_ms / 1000.0,
            jitter=f.wan_jitter_ms / 1000.0,
            loss=f.wan_loss,
            acked_loss=f.wan_acked_loss,
            bandwidth=f.wan_bandwidth_kib_s * 1024.0,
        )
        hubs_to = (broker.host, broker.port)
        if f.needs_proxy:
            proxy = ProxyProcess((broker.host, broker.port), policy, seed=scenario.seed)
            await proxy.start()
            hubs_to = (proxy.host, proxy.port)
        _say(
            f"mosquitto on {broker.address} (pid {broker.pid}); "
            + (
                f"hubs through the fault proxy on port {proxy.port}"
                if proxy
                else "hubs straight to it (no WAN fault asked for: no proxy)"
            )
        )

        # 4: otad, premises -------------------------------------------------------------
        fleet_options: dict[str, Any] = {
            "seed": scenario.seed,
            "trust_dir": ch_release.trust_dir,
            "library": library,
            "activation_trust_dir": activation_trust,
            "han_acceleration": scenario.han_acceleration,
            "han_max_transfers": scenario.han_max_transfers,
            "self_test_failure_share": f.self_test_failures,
            "activation_answer_loss": f.activation_answer_loss,
            "bridge_share": scenario.bridge_share,
            "han_link": (scenario.han_block_size, scenario.han_frame_rate, scenario.han_loss),
            "sleepy_gsme": scenario.sleepy_gsme,
            "max_block": max(scenario.wan_block_size, 1024),
        }
        fleet = HubFleet(
            broker=hubs_to,
            state_dir=out / "hubs",
            count=scenario.hubs,
            procs=procs,
            **fleet_options,
        )
        signers = await asyncio.to_thread(fleet.config.write_device_keys, out / "device-keys")
        config = otad_config(
            out, activation_key, out / "device-keys", pacing=scenario.otad_pacing()
        )
        address = broker.address
        otad = OtadProcess(
            lambda: start_otad(
                address,
                out / "otad",
                ch_release.trust_dir,
                out / "otad.log",
                library=library,
                config=config,
            )
        )
        await otad.start()
        _say(f"otad running (pid {otad.pid}); {signers} device keys; log {out / 'otad.log'}")
        monitor = await EventMonitor.connect(
            broker.host, broker.port, library=library, client_id="loadtest-events"
        )
        alerts = await EventMonitor.connect(
            broker.host,
            broker.port,
            library=library,
            status=False,
            events_filter=f"{ALERTS_PREFIX}/#",
            client_id="loadtest-alerts",
        )
        ctl = CtlClient(broker.host, broker.port, library=library, name="loadtest", timeout=10.0)
        await ctl.connect()
        # the second approver of the roll-out's expedited notice: another control client
        approver = CtlClient(
            broker.host, broker.port, library=library, name="loadtest-approver", timeout=10.0
        )
        await approver.connect()
        await fleet.start()
        _say(f"{scenario.hubs} virtual CHs in {procs} process(es), up in {fleet.started_in:.1f} s")
        if f.cloned_hubs:
            clones = HubFleet(
                broker=hubs_to,
                state_dir=out / "clones",
                count=f.cloned_hubs,
                procs=1,
                **fleet_options,
            )
            await clones.start()
            _say(f"{f.cloned_hubs} cloned CHs announce the GUIDs of the first {f.cloned_hubs}")
        await _wait_fleet_known(ctl, set(fleet.guids), otad)
        for _label, release in releases:
            data = await asyncio.to_thread(release.path.read_bytes)
            await ctl.call("image.import", {"data": base64.b64encode(data).decode()})

        # 5-7: campaigns, faults, samples -----------------------------------------------
        driver = _CampaignDriver(scenario, ctl, approver, releases)
        sampler = _Sampler(driver, fleet, broker, proxy, otad, monitor)
        faults = FaultPlayer(scenario, fleet, broker, proxy, otad)
        began = time.monotonic()
        outcome = await driver.run(sampler, faults, began)
        duration = time.monotonic() - began
        otad.note_peak()

        # 8: report ---------------------------------------------------------------------
        from otad.events import DeviceConfirmed, DeviceFailed, TransferHeld

        held = monitor.of_kind(TransferHeld)
        by_proof: dict[str, int] = {}
        confirmed_alerts = alerts.of_kind(DeviceConfirmed)
        for alert in confirmed_alerts:
            by_proof[alert.proof] = by_proof.get(alert.proof, 0) + 1
        proxy_totals = await proxy.totals() if proxy is not None else None
        images = {r.sha256 for _l, r in releases}
        failed_devices = [
            {"guid": row["guid"], "device_id": row["device_id"],
             "device_type": row["device_type"], "state": row["state"],
             "reason": row.get("reason"), "faults": faults.faults_of(str(row["guid"]))}
            for row in await call_all(ctl, "devices")
            if row.get("image") in images and row.get("state") in ("failed", "timed_out")
        ]  # fmt: skip
        record = RunRecord(
            scenario=scenario.name,
            hubs=scenario.hubs,
            samples=sampler.samples,
            campaigns=driver.records,
            duration_s=duration,
            image_bytes=sum(r.manifest.size for _l, r in releases),
            wan_block_bytes_sent=sum(e.bytes_sent for e in held),
            wan_blocks_sent=sum(e.blocks_total + e.retransmissions for e in held),
            confirmations_by_method=by_proof,
            alerts_published=len(confirmed_alerts) + len(alerts.of_kind(DeviceFailed)),
            otad_cpu_s=otad.cpu_s(),
            otad_peak_rss_bytes=otad.peak_rss,
            broker_cpu_s=cpu_or_none(broker.pid),
            faults_applied=faults.applied,
            faulty_hubs=faults.faulty_hubs(),
            proxy={}
            if proxy_totals is None
            else {
                "packets": proxy_totals.packets,
                "publishes": proxy_totals.publishes,
                "dropped": proxy_totals.dropped,
            },
            rtt_all_ms=sampler.rtt_all_ms,
            notes=outcome.notes,
            failed_devices=failed_devices,
        )
        report = build_and_check(record, scenario)
        await asyncio.to_thread(write_report, record, out)
        _summary(report, out)
        return 0 if record.ok else 1
    except asyncio.CancelledError:
        _say("\nloadtest: interrupted; stopping everything it started")
        main_task.uncancel()  # the cleanup below must run to its end
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut it short
            loop.add_signal_handler(sig, _say, "loadtest: still stopping what it started")
        return 130
    except LoadTestError as exc:
        _say(f"loadtest: FAILED: {exc}")
        return 1
    finally:
        await _shutdown(ctl, approver, monitor, alerts, clones, fleet, proxy, otad, broker)


async def _shutdown(*parts: Any) -> None:
    """Stop what was started, newest first; each on its own so one failure stops no other."""
    from loadtest.broker import MosquittoBroker

    ctl, approver, monitor, alerts, clones, fleet, proxy, otad, broker = parts
    # each part in bounded time: a client whose disconnect never completes must not keep the
    # processes after it running (once, a Ctrl-C left the runner, two workers and the proxy)
    for closer, limit_s in (
        (ctl and ctl.close, CLIENT_CLOSE_S),
        (approver and approver.close, CLIENT_CLOSE_S),
        (monitor and monitor.close, CLIENT_CLOSE_S),
        (alerts and alerts.close, CLIENT_CLOSE_S),
        (clones and clones.close, PROCESS_CLOSE_S),
        (fleet and fleet.close, PROCESS_CLOSE_S),
        (proxy and proxy.close, PROCESS_CLOSE_S),
        (otad and otad.stop, PROCESS_CLOSE_S),
    ):
        if closer:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(closer(), limit_s)
    if isinstance(broker, MosquittoBroker):
        with contextlib.suppress(Exception):
            await asyncio.to_thread(broker.stop)


def build_and_check(record: RunRecord, scenario: Scenario) -> dict[str, Any]:
    """Decide ``record.ok``: every campaign completed, every target confirmed or failed with a
    named reason, and no failure when the scenario injected no fault that can cause one."""
    from loadtest.report import build_report

    report = build_report(record)
    completed = all(c.status.get("state") == "completed" for c in record.campaigns)
    accounted = report["devices_confirmed"] + sum(report["failures"].values())
    faults = scenario.faults
    may_fail = bool(
        faults.self_test_failures
        or faults.activation_answer_loss
        or faults.cloned_hubs
        or faults.flap_share
        or faults.half_open
        or scenario.han_loss
    )
    # a failure must come from a fault: one the scenario put on the device's CH, or a
    # device-level one it injects anywhere (self-tests, lost answers, HAN loss)
    device_level = bool(faults.self_test_failures or faults.activation_answer_loss
                        or scenario.han_loss)  # fmt: skip
    unexplained = [f for f in record.failed_devices if not f["faults"] and not device_level]
    record.ok = (
        bool(record.campaigns)
        and completed
        and accounted == report["devices_targeted"]
        and (may_fail or not report["failures"])
        and not unexplained
    )
    if unexplained:
        record.notes.append(
            f"{len(unexplained)} devices failed on CHs the scenario put no fault on: "
            + ", ".join(f"{f['device_id']} {f['reason']}" for f in unexplained[:10])
        )
    if not completed:
        record.notes.append(
            "campaigns not completed: "
            + ", ".join(f"{c.label} {c.status.get('state')}" for c in record.campaigns)
        )
    if accounted != report["devices_targeted"]:
        record.notes.append(
            f"{report['devices_targeted'] - accounted} targets neither confirmed nor failed"
        )
    return build_report(record)  # again: with the verdict and its notes


def _summary(report: Mapping[str, Any], out: Path) -> None:
    _say("")
    _say(f"devices confirmed    : {report['devices_confirmed']} / {report['devices_targeted']}")
    _say(
        "confirmations        : "
        + (", ".join(f"{n} {m}" for m, n in report["confirmations_by_method"].items()) or "none")
    )
    _say(
        "failures             : "
        + (", ".join(f"{n} {r}" for r, n in report["failures"].items()) or "none")
    )
    for stage in report["stages"]:
        _say(
            f"stage {stage['campaign']}/{stage['name']:<14}: {stage['confirmed']} confirmed, "
            f"{stage['failed']} failed, gate {stage['gate_decision'] or '-'}"
        )
    est = report["estimated_duration_s"]
    _say(
        f"duration             : {report['duration_s']:.1f} s"
        + (f" (plan estimated {est:.1f} s, {report['estimate_error']:+.0%})" if est else "")
    )
    _say(f"otad                 : {report['otad_cpu_s']:.1f} s CPU, peak RSS "
         f"{report['otad_peak_rss_bytes'] / 2**20:.0f} MiB, loop lag p99 "
         f"{report['loop_lag_p99_ms']} ms")  # fmt: skip
    _say(f"report               : {out / 'report.md'}")
    _say(f"loadtest: {'OK' if report['ok'] else 'FAILED'}")


async def _wait_fleet_known(
    ctl: Any, wanted: set[str], otad: OtadProcess, wait_s: float = 120.0
) -> None:
    """Until otad lists every CH of the fleet online."""
    from otad.ctl.client import call_all

    deadline = time.monotonic() + wait_s
    known: set[str] = set()
    while True:
        if otad.proc is not None and otad.proc.returncode is not None:
            raise LoadTestError(f"otad exited with status {otad.proc.returncode}; see otad.log")
        with contextlib.suppress(Exception):
            known = _guids_in(await call_all(ctl, "fleet.list"))
        if wanted <= known:
            return
        if time.monotonic() > deadline:
            raise LoadTestError(f"otad lists {len(known & wanted)} of {len(wanted)} CHs")
        await asyncio.sleep(0.5)


class _CampaignDriver:
    """The campaigns of the run, one after the other, through otad's control commands."""

    def __init__(
        self,
        scenario: Scenario,
        ctl: CtlClient,
        approver: CtlClient,
        releases: list[tuple[str, Release]],
    ) -> None:
        self.scenario = scenario
        self.ctl = ctl
        self.approver = approver
        self._expedited: set[str] = set()
        self.releases = releases
        self.records: list[CampaignRecord] = []
        self.statuses: dict[str, Mapping[str, Any]] = {}  # label -> its latest status
        self.notes: list[str] = []

    async def _call(self, cmd: str, args: dict[str, Any]) -> Any:
        from otad.ctl.client import CtlError

        try:
            return await self.ctl.call(cmd, args)
        except CtlError as exc:
            raise LoadTestError(f"{cmd}: {exc.reason}: {exc.detail}") from None

    async def _expedite(self, campaign: str) -> None:
        """Waive the roll-out's 7-day notice (SECMP0024): requested by the runner's client,
        approved by its second one, as issue 10 requires of an expedited campaign. A load test
        rehearses the path, not the calendar; the report says the notice was waived."""
        from otad.ctl.client import CtlError

        if campaign in self._expedited:
            return
        try:
            await self.ctl.call(
                "campaign.expedite",
                {"id": campaign, "justification": f"load test {self.scenario.name}"},
            )
            await self.approver.call("campaign.expedite.approve", {"id": campaign})
        except CtlError as exc:
            if exc.reason != "CAMPAIGN_REFUSED":
                raise LoadTestError(f"campaign.expedite: {exc.reason}: {exc.detail}") from None
            return  # not in a state that takes it yet: tried again at the next state
        self._expedited.add(campaign)
        self.notes.append(f"campaign {campaign}: the roll-out's notice waived (two approvers)")

    async def run(self, sampler: _Sampler, faults: FaultPlayer, began: float) -> _CampaignDriver:
        from otad.progress import ProgressBar

        sampling = asyncio.create_task(sampler.run(began))
        playing = asyncio.create_task(faults.run(began))
        try:
            for label, release in self.releases:
                spec = self.scenario.campaign_spec(
                    release.sha256, f"lt-{self.scenario.name}-{label.lower()}-{self.scenario.seed}"
                )
                plan = await self._call("campaign.plan", {**spec, "detail": "summary"})
                if not plan.get("targets"):
                    self.notes.append(f"{label} campaign: no targets, skipped")
                    continue
                estimate = plan.get("estimate", {}).get("total_s")
                _say(
                    f"campaign {spec['id']}: {plan['targets']} targets on {plan.get('hubs')} hubs "
                    f"in {len(plan.get('stages', []))} stages; plan estimates {estimate} s"
                )
                await self._call("campaign.create", spec)
                await self._call("campaign.start", {"id": spec["id"]})
                await self._expedite(spec["id"])
                bar = ProgressBar(int(plan["targets"]), label=label, stalled_after=None)
                status = await self._follow(label, spec["id"], bar, began)
                history = await self._call("campaign.history", {"id": spec["id"]})
                self.records.append(CampaignRecord(label, plan, status, history or []))
                if status.get("state") != "completed":
                    break
        finally:
            for task in (sampling, playing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return self

    async def _follow(self, label: str, campaign: str, bar: Any, began: float) -> Mapping[str, Any]:
        status: Mapping[str, Any] = {}
        deadline = began + self.scenario.timeout_s
        try:
            while True:
                await asyncio.sleep(SAMPLE_EVERY_S)
                with contextlib.suppress(Exception):  # otad may be restarting
                    status = await self.ctl.call("campaign.status", {"id": campaign})
                    self.statuses[label] = status
                counts = status.get("counts", {})
                ended = sum(int(counts.get(s, 0)) for s in ("confirmed", "failed", "rejected",
                            "timed_out", "rolled_back", "lost", "cancelled"))  # fmt: skip
                bar.update(
                    ended,
                    f"{status.get('state', '?')} stage {status.get('stage', '-')}: "
                    f"{counts.get('confirmed', 0)} confirmed, "
                    f"{ended - int(counts.get('confirmed', 0))} failed",
                    stalled=status.get("stalled_s") is not None,
                )
                state = status.get("state")
                if (
                    state in ("awaiting_notice", "awaiting_gate")
                    and campaign not in self._expedited
                ):
                    await self._expedite(campaign)
                if state in FINAL_CAMPAIGN_STATES:
                    return status
                if state in HELD_STATES:
                    self.notes.append(
                        f"{label} campaign {state}: {status.get('hold_reason') or 'no reason'}"
                    )
                    return status
                if time.monotonic() > deadline:
                    self.notes.append(
                        f"{label} campaign not done after {self.scenario.timeout_s:.0f} s"
                    )
                    return status
        finally:
            bar.close()


class _Sampler:
    """Every second, what the report plots (see :class:`loadtest.report.Sample`)."""

    def __init__(
        self,
        driver: _CampaignDriver,
        fleet: HubFleet,
        broker: MosquittoBroker,
        proxy: ProxyProcess | None,
        otad: OtadProcess,
        monitor: EventMonitor,
    ) -> None:
        self.driver = driver
        self.fleet = fleet
        self.broker = broker
        self.proxy = proxy
        self.otad = otad
        self.monitor = monitor
        self.samples: list[Sample] = []
        self.rtt_all_ms: list[float] = []

    async def run(self, began: float) -> None:
        """Sample every :data:`SAMPLE_EVERY_S` until cancelled; a sample that fails is noted
        once (the run goes on: its report then has fewer points)."""
        failed = False
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            try:
                self.samples.append(await self._sample(began))
            except Exception as exc:
                if not failed:
                    self.driver.notes.append(f"sampling failed (first time): {exc!r}"[:300])
                failed = True

    async def _sample(self, began: float) -> Sample:
        from otad.events import TransferHeld

        sample = Sample(t=round(time.monotonic() - began, 3))
        for label, status in self.driver.statuses.items():
            for stage in status.get("stages", []):
                key = f"{label}/{stage.get('name')}"
                sample.confirmed_by_stage[key] = int(stage.get("counts", {}).get("confirmed", 0))
        with contextlib.suppress(Exception):
            totals = await self.fleet.totals()
            sample.hub_blocks, sample.hub_block_bytes = totals.blocks, totals.block_bytes
        sample.otad_cpu_s = self.otad.cpu_s()
        sample.otad_rss_bytes = rss_or_none(self.otad.pid)
        self.otad.note_peak()
        sample.broker_cpu_s = cpu_or_none(self.broker.pid)
        sample.broker_rss_bytes = rss_or_none(self.broker.pid)
        hub_cpu = [cpu_or_none(pid) for pid in self.fleet.worker_pids]
        sample.hubs_cpu_s = sum(c for c in hub_cpu if c is not None) if hub_cpu else None
        status = self.monitor.status
        lag = status.get("loop_lag") if isinstance(status, dict) else None
        if isinstance(lag, dict) and status.get("state") == "online":
            sample.loop_lag_p99_ms = lag.get("p99_ms")
            sample.loop_lag_max_ms = lag.get("max_ms")
        sample.proxy_cpu_s = None if self.proxy is None else cpu_or_none(self.proxy.pid)
        rtts: list[float] = []
        if self.proxy is not None:  # the round trips are measured at the proxy (WAN edge)
            with contextlib.suppress(Exception):
                rtts = [round(s * 1000.0, 3) for s in await self.proxy.take_round_trips()]
        sample.rtt_ms = rtts
        self.rtt_all_ms += rtts[: max(0, 200_000 - len(self.rtt_all_ms))]
        held = self.monitor.of_kind(TransferHeld)
        sample.retransmissions = sum(e.retransmissions for e in held)
        sample.blocks_sent = sum(e.blocks_total + e.retransmissions for e in held)
        return sample


class FaultPlayer:
    """Plays the scenario's timeline against the proxy, the fleet, the broker and otad;
    :attr:`applied` says what it did when (a fault that could not be applied has an ``error``)."""

    def __init__(
        self,
        scenario: Scenario,
        fleet: HubFleet,
        broker: MosquittoBroker,
        proxy: ProxyProcess | None,
        otad: OtadProcess,
    ) -> None:
        self.scenario = scenario
        self.fleet = fleet
        self.broker = broker
        self.proxy = proxy
        self.otad = otad
        self.applied: list[dict[str, Any]] = []
        self._hit: dict[str, set[int]] = {}

    def faults_of(self, guid: str) -> list[str]:
        """The faults the scenario put on CH ``guid`` (``cloned``: another CH announced its
        GUID)."""
        index = self.fleet.index_of(guid)
        if index is None:
            return []
        causes = [cause for cause, hubs in sorted(self._hit.items()) if index in hubs]
        if index < self.scenario.faults.cloned_hubs:
            causes.append("cloned")
        return causes

    def faulty_hubs(self) -> dict[str, int]:
        """Cause -> how many hubs it hit (clones: the CHs whose GUID is cloned)."""
        out = {cause: len(hubs) for cause, hubs in sorted(self._hit.items())}
        if self.scenario.faults.cloned_hubs:
            out["cloned"] = self.scenario.faults.cloned_hubs
        return out

    async def run(self, began: float) -> None:
        """Apply each action at its time. Each runs as a task of its own, after the earlier
        actions on the same hubs: a slow one (stopping hubs in a busy worker) must not hold back
        the rest. Played in one line, 250 flapping hubs' actions fell minutes behind, and the
        5k scenario's otad SIGKILL at 240 s never came."""
        running: set[asyncio.Task[None]] = set()
        last_on: dict[int, asyncio.Task[None]] = {}  # hub -> its latest action
        try:
            for action in self.scenario.timeline():
                wait = began + action.at_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                before = {last_on[h] for h in action.hubs if h in last_on}
                task = asyncio.create_task(self._apply_after(action, before, began))
                running.add(task)
                task.add_done_callback(running.discard)
                for hub in action.hubs:
                    last_on[hub] = task
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            for task in running:
                task.cancel()

    async def _apply_after(
        self, action: FaultAction, before: set[asyncio.Task[None]], began: float
    ) -> None:
        if before:
            await asyncio.gather(*before, return_exceptions=True)
        try:
            await self.apply(action)
        except Exception as exc:  # one fault that cannot be applied is a note, not the end
            self.applied.append({"at_s": action.at_s, "kind": action.kind,
                                 "error": repr(exc)[:200]})  # fmt: skip
            return
        self.applied.append(
            {"at_s": round(time.monotonic() - began, 3), "kind": action.kind,
             "hubs": len(action.hubs)}
        )  # fmt: skip

    def _link(self) -> ProxyProcess:
        """The fault proxy: every cut or half-open link goes through it (a scenario with one
        has it: Faults.needs_proxy)."""
        if self.proxy is None:
            raise LoadTestError("a WAN fault without the fault proxy")
        return self.proxy

    async def apply(self, action: FaultAction) -> None:
        guids = [self.fleet.guids[i] for i in action.hubs]
        if action.kind == "cut":
            self._hit.setdefault("cut", set()).update(action.hubs)
            await self._link().cut(guids)
        elif action.kind == "half_open":
            self._hit.setdefault("half_open", set()).update(action.hubs)
            await self._link().hang(guids)
        elif action.kind == "resume":
            await self._link().hang(guids, hung=False)
            await self._link().cut(
                guids
            )  # the hub reconnects at once rather than at its keep-alive
        elif action.kind == "hub_down":
            self._hit.setdefault("flapping", set()).update(action.hubs)
            await self.fleet.stop_hubs(guids, crash=True)
        elif action.kind == "hub_up":
            await self.fleet.start_hubs(guids)
        elif action.kind == "broker_restart":
            _say(f"\nfault: broker restart at {action.at_s:.0f} s")
            await asyncio.to_thread(self.broker.restart)
        elif action.kind == "otad_kill":
            _say(f"\nfault: otad SIGKILL at {action.at_s:.0f} s")
            await self.otad.kill_and_restart()
        else:
            raise AssertionError(action.kind)
