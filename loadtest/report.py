"""The load test's report: ``DIR/report.json``, ``DIR/report.md`` and PNG plots, from what a run
measured (:class:`RunRecord`): samples taken every second while it ran (otad's campaign status,
the hubs' block counters, ``/proc`` of otad, the broker and the hub workers, otad's retained
status with its event-loop lag, the fault proxy's round trips), otad's events and alerts, and the
campaigns' plans and final statuses. Nothing here is a constant: a figure that was not measured
is absent (``null``), never guessed.

Plots (matplotlib, Agg backend: no display needed): ``confirmed.png`` (confirmed devices over
time, one line per campaign stage), ``wan_blocks.png`` (WAN blocks/s), ``ack_rtt.png`` (ack
round-trip p50/p90/p99 per second), ``retransmissions.png`` (retransmitted blocks over blocks
sent, cumulative), ``failures.png`` (failures by cause), ``resources.png`` (otad and broker CPU
and resident memory), ``loop_lag.png`` (otad's event-loop lag p99 and max).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Target states that count as failed in a stage's ``failed`` figure (issue 10's counts).
FAILED_STATES = ("failed", "rejected", "timed_out", "rolled_back", "lost")


@dataclass(slots=True)
class Sample:
    """What the runner measured at one instant, ``t`` seconds after the campaigns started."""

    t: float
    confirmed_by_stage: dict[str, int] = field(default_factory=dict)  # "campaign/stage" -> n
    hub_blocks: int = 0  # blocks the virtual CHs received so far (repeats included)
    hub_block_bytes: int = 0
    otad_cpu_s: float | None = None  # this otad process's utime + stime
    otad_rss_bytes: int | None = None
    broker_cpu_s: float | None = None
    broker_rss_bytes: int | None = None
    hubs_cpu_s: float | None = None  # every hub worker process
    proxy_cpu_s: float | None = None  # the fault proxy's process
    loop_lag_p99_ms: float | None = None  # from otad's retained status
    loop_lag_max_ms: float | None = None
    rtt_ms: list[float] = field(default_factory=list)  # ack round trips seen since last sample
    retransmissions: int = 0  # of transfers held so far (otad's transfer.held events)
    blocks_sent: int = 0  # blocks otad published for those transfers, repeats included


@dataclass(slots=True)
class CampaignRecord:
    """One campaign of the run: its plan (the dry run), its last status and audit trail."""

    label: str
    plan: Mapping[str, Any]
    status: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]] = ()


@dataclass(slots=True)
class RunRecord:
    """Everything a run measured, for :func:`build_report`."""

    scenario: str
    hubs: int
    samples: list[Sample]
    campaigns: list[CampaignRecord]
    duration_s: float
    image_bytes: int  # the images' sizes (each once)
    wan_block_bytes_sent: int  # block payload bytes otad published (transfer.held, repeats)
    wan_blocks_sent: int
    confirmations_by_method: dict[str, int]  # from device.confirmed alerts, by proof
    alerts_published: int  # device alerts otad published (confirmed and failed)
    otad_cpu_s: float  # over every otad process of the run (one per SIGKILL and restart)
    otad_peak_rss_bytes: int
    broker_cpu_s: float | None
    faults_applied: list[dict[str, Any]] = field(default_factory=list)
    faulty_hubs: dict[str, int] = field(default_factory=dict)  # cause -> hubs it hit
    proxy: dict[str, int] = field(default_factory=dict)  # packets seen / dropped
    rtt_all_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # every failed or timed-out target: guid, device_id, device_type, state, reason, and the
    # faults the scenario put on its CH ("faults": [] -- none: unexplained unless device-level)
    failed_devices: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = False


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def _stage_rows(record: RunRecord) -> list[dict[str, Any]]:
    """Per stage: its plan, outcome and gate, and its time as estimated and as measured (from
    its start to the next stage's, the soak included, or, for the last, to its settling)."""
    rows = []
    for campaign in record.campaigns:
        planned = {s.get("name"): s for s in campaign.plan.get("stages", [])}
        estimated = {s.get("name"): s for s in campaign.plan.get("estimate", {}).get("stages", [])}
        stages = list(campaign.status.get("stages", []))
        ends = [nxt.get("started_at") for nxt in stages[1:]] + [
            stages[-1].get("settled_at") if stages else None
        ]
        deciders = {  # who made each stage's gate decision (the audit trail)
            str(e.get("stage")): str(e.get("actor"))
            for e in campaign.history
            if e.get("kind") == "gate_decided"
        }
        for stage, end in zip(stages, ends, strict=True):
            counts = stage.get("counts", {})
            began = stage.get("started_at")
            rows.append(
                {
                    "campaign": campaign.label,
                    "name": stage.get("name"),
                    "hubs": planned.get(stage.get("name"), {}).get("hubs"),
                    "targets": stage.get("targets"),
                    "confirmed": counts.get("confirmed", 0),
                    "failed": sum(int(counts.get(s, 0)) for s in FAILED_STATES),
                    "gate_decision": stage.get("gate") or None,
                    "gate_actor": deciders.get(str(stage.get("name"))),
                    "started_at": began,
                    "settled_at": stage.get("settled_at"),
                    "estimated_s": estimated.get(stage.get("name"), {}).get("total_s"),
                    "measured_s": (
                        round(float(end) - float(began), 1)
                        if isinstance(began, int | float) and isinstance(end, int | float)
                        else None
                    ),
                }
            )
    return rows


def implied_fleet_rate(campaign: CampaignRecord, rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The all-together WAN rate (blocks/s) that would have made the plan exact for the
    campaign's largest stage (the one whose WAN time the fleet's shared rate sets): the figure
    to give otad's ``[campaigns] fleet_blocks_per_s`` (a scenario's ``[pacing]``) for the next
    plan on this machine. ``None`` where nothing was measured or planned."""
    estimate = campaign.plan.get("estimate", {})
    fleet = estimate.get("model", {}).get("fleet_blocks_per_s")
    per_stage = {s.get("name"): s for s in estimate.get("stages", [])}
    best: tuple[int, float] | None = None
    for row in rows:
        est = per_stage.get(row.get("name"))
        measured = row.get("measured_s")
        if row.get("campaign") != campaign.label or est is None or measured is None or not fleet:
            continue
        rest = sum(float(est.get(k, 0.0)) for k in ("han_s", "activate_s", "soak_s"))
        wan_s = float(measured) - rest - float(estimate["model"].get("tick_s", 0.0))
        distribute = float(est.get("distribute_s", 0.0))
        if wan_s <= 0 or distribute <= 0:
            continue
        targets = int(row.get("targets") or 0)
        if best is None or targets > best[0]:
            best = (targets, float(fleet) * distribute / wan_s)
    return None if best is None else round(best[1], 1)


def _failures_by_fault(failed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Failed targets by the fault on their CH ("none": on a CH with no fault), then reason."""
    out: dict[str, dict[str, int]] = {}
    for f in failed:
        cause = "+".join(f.get("faults") or []) or "none"
        reasons = out.setdefault(cause, {})
        reason = str(f.get("reason") or f.get("state"))
        reasons[reason] = reasons.get(reason, 0) + 1
    return {cause: dict(sorted(r.items())) for cause, r in sorted(out.items())}


def build_report(record: RunRecord) -> dict[str, Any]:
    """The content of ``report.json`` (every key issue 12 asks for, plus context)."""
    failures: dict[str, int] = {}
    targeted = confirmed = 0
    for campaign in record.campaigns:
        targeted += int(campaign.status.get("targets", 0))
        confirmed += int(campaign.status.get("counts", {}).get("confirmed", 0))
        for reason, n in campaign.status.get("failures", {}).items():
            failures[reason] = failures.get(reason, 0) + int(n)
    estimates = [c.plan.get("estimate", {}).get("total_s") for c in record.campaigns]
    estimated = sum(float(e) for e in estimates if isinstance(e, int | float))
    last = record.samples[-1] if record.samples else None
    lags = [s.loop_lag_p99_ms for s in record.samples if s.loop_lag_p99_ms is not None]
    blocks_per_s = (
        record.wan_blocks_sent / record.duration_s
        if record.duration_s > 0 and record.wan_blocks_sent
        else None
    )
    rtts = record.rtt_all_ms
    stage_rows = _stage_rows(record)
    return {
        "scenario": record.scenario,
        "ok": record.ok,
        "hubs": record.hubs,
        "devices_targeted": targeted,
        "devices_confirmed": confirmed,
        "confirmations_by_method": dict(sorted(record.confirmations_by_method.items())),
        "failures": dict(sorted(failures.items())),
        "alerts_published": record.alerts_published,
        "stages": stage_rows,
        "campaigns": [
            {
                "label": c.label,
                "id": c.status.get("id"),
                "state": c.status.get("state"),
                "targets": c.status.get("targets"),
                "counts": c.status.get("counts"),
                "estimated_s": c.plan.get("estimate", {}).get("total_s"),
                "estimate_assumptions": c.plan.get("estimate", {}).get("assumptions"),
                "estimate_model": c.plan.get("estimate", {}).get("model"),
                "implied_fleet_blocks_per_s": implied_fleet_rate(c, stage_rows),
                "started_at": c.status.get("created_at"),
            }
            for c in record.campaigns
        ],
        "duration_s": round(record.duration_s, 3),
        "estimated_duration_s": round(estimated, 3) if estimated else None,
        "estimate_error": (
            round(estimated / record.duration_s - 1.0, 4)
            if estimated and record.duration_s
            else None
        ),
        "wan_block_bytes_sent": record.wan_block_bytes_sent,
        "wan_blocks_sent": record.wan_blocks_sent,
        "image_bytes": record.image_bytes,
        "blocks_per_s": round(blocks_per_s, 1) if blocks_per_s is not None else None,
        "retransmission_ratio": (
            round(last.retransmissions / last.blocks_sent, 5)
            if last is not None and last.blocks_sent
            else None
        ),
        "ack_rtt_ms": {
            "samples": len(rtts),
            "p50": percentile(rtts, 0.5),
            "p90": percentile(rtts, 0.9),
            "p99": percentile(rtts, 0.99),
        },
        "otad_cpu_s": round(record.otad_cpu_s, 3),
        "otad_peak_rss_bytes": record.otad_peak_rss_bytes,
        "broker_cpu_s": None if record.broker_cpu_s is None else round(record.broker_cpu_s, 3),
        "loop_lag_p99_ms": max(lags) if lags else None,
        "faults_applied": record.faults_applied,
        "faulty_hubs": record.faulty_hubs,
        "failures_by_fault": _failures_by_fault(record.failed_devices),
        "failed_devices": record.failed_devices[:1000],
        "proxy": record.proxy,
        "notes": record.notes,
    }


# ----------------------------------------------------------------------------- plots


def _plots(record: RunRecord, report: Mapping[str, Any], out: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns (file name, title) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = record.samples
    t = [s.t for s in samples]
    written: list[tuple[str, str]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append((name, title))

    fig, ax = plt.subplots(figsize=(8, 4))
    stages = sorted({k for s in samples for k in s.confirmed_by_stage})
    for stage in stages:
        ax.plot(t, [s.confirmed_by_stage.get(stage, 0) for s in samples], label=stage)
    ax.set_xlabel("s since the campaigns started")
    ax.set_ylabel("devices confirmed")
    if stages:
        ax.legend(fontsize="small")
    save(fig, "confirmed.png", "Confirmed devices over time, per stage")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    rate_t, rate = _rate(t, [float(s.hub_blocks) for s in samples])
    ax.plot(rate_t, rate)
    ax.set_xlabel("s")
    ax.set_ylabel("blocks/s received by the CHs")
    save(fig, "wan_blocks.png", "WAN blocks per second")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for q, label in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        points = [(s.t, percentile(s.rtt_ms, q) or 0.0) for s in samples if s.rtt_ms]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel("s")
    ax.set_ylabel("ms")
    ax.legend(fontsize="small")
    save(fig, "ack_rtt.png", "Ack round trip at the WAN edge (block out -> ack back)")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    points = [(s.t, s.retransmissions / s.blocks_sent) for s in samples if s.blocks_sent]
    ax.plot([p[0] for p in points], [p[1] for p in points])
    ax.set_xlabel("s")
    ax.set_ylabel("retransmitted / sent")
    save(fig, "retransmissions.png", "Retransmission ratio of the transfers held so far")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    failures = report["failures"]
    if failures:
        ax.barh(list(failures), list(failures.values()))
    else:
        ax.text(0.5, 0.5, "no failures", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("targets")
    save(fig, "failures.png", "Failures by cause")

    fig, (cpu, mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    resources: tuple[tuple[str, str, str | None], ...] = (
        ("otad", "otad_cpu_s", "otad_rss_bytes"),
        ("mosquitto", "broker_cpu_s", "broker_rss_bytes"),
        ("virtual CHs", "hubs_cpu_s", None),
        ("fault proxy", "proxy_cpu_s", None),
    )
    for name, cpu_field, rss_field in resources:
        cpu_points = _series(samples, cpu_field)
        ct, cp = _rate([p[0] for p in cpu_points], [p[1] for p in cpu_points])
        cpu.plot(ct, [100.0 * v for v in cp], label=name)
        if rss_field is not None:
            memory = _series(samples, rss_field)
            mem.plot([p[0] for p in memory], [p[1] / 2**20 for p in memory], label=name)
    cpu.set_ylabel("CPU %")
    cpu.legend(fontsize="small")
    mem.set_ylabel("RSS MiB")
    mem.set_xlabel("s")
    mem.legend(fontsize="small")
    save(fig, "resources.png", "CPU and memory")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, of in (("p99", "loop_lag_p99_ms"), ("max", "loop_lag_max_ms")):
        points = _series(samples, of)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel("s")
    ax.set_ylabel("ms")
    ax.legend(fontsize="small")
    save(fig, "loop_lag.png", "otad event-loop lag (its retained status)")
    return written


def _series(samples: Sequence[Sample], name: str) -> list[tuple[float, float]]:
    """(t, value) of one field of the samples, where it was measured."""
    out = []
    for sample in samples:
        value = getattr(sample, name)
        if value is not None:
            out.append((sample.t, float(value)))
    return out


def _rate(t: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-second rate of a cumulative series (a counter that restarts counts from zero)."""
    out_t, out = [], []
    points = list(zip(t, values, strict=True))
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t1 > t0:
            out_t.append(t1)
            out.append(max(0.0, v1 - v0) / (t1 - t0))
    return out_t, out


# ----------------------------------------------------------------------------- files


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _markdown(report: Mapping[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    lines = [
        f"# Load test: {report['scenario']}",
        "",
        f"Result: **{'OK' if report['ok'] else 'FAILED'}**",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in (
        "hubs",
        "devices_targeted",
        "devices_confirmed",
        "alerts_published",
        "duration_s",
        "estimated_duration_s",
        "estimate_error",
        "image_bytes",
        "wan_block_bytes_sent",
        "wan_blocks_sent",
        "blocks_per_s",
        "retransmission_ratio",
        "otad_cpu_s",
        "otad_peak_rss_bytes",
        "broker_cpu_s",
        "loop_lag_p99_ms",
    ):
        lines.append(f"| {key} | {_fmt(report.get(key))} |")  # noqa: PERF401
    rtt = report["ack_rtt_ms"]
    lines.append(
        f"| ack round trip p50 / p90 / p99 ms | {_fmt(rtt['p50'])} / {_fmt(rtt['p90'])} / "
        f"{_fmt(rtt['p99'])} ({rtt['samples']} samples) |"
    )
    lines += [
        "",
        "## Stages",
        "",
        "| campaign | stage | hubs | targets | confirmed | failed | gate | estimated s |"
        " measured s |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in report["stages"]:
        lines.append(
            f"| {s['campaign']} | {s['name']} | {_fmt(s['hubs'])} | {_fmt(s['targets'])} | "
            f"{_fmt(s['confirmed'])} | {_fmt(s['failed'])} | {_fmt(s['gate_decision'])} | "
            f"{_fmt(s.get('estimated_s'))} | {_fmt(s.get('measured_s'))} |"
        )
    lines += ["", "## The plans' pacing", ""]
    for c in report["campaigns"]:
        model = c.get("estimate_model") or {}
        lines.append(
            f"* {c['label']}: planned with one CH's transfer at "
            f"{_fmt(model.get('transfer_blocks_per_s'))} blocks/s, all together at "
            f"{_fmt(model.get('fleet_blocks_per_s'))} blocks/s, activation to confirmation "
            f"{_fmt(model.get('activation_s'))} s; the all-together rate that would have made "
            f"its largest stage's estimate exact: {_fmt(c.get('implied_fleet_blocks_per_s'))}"
        )
    lines += ["", "## Confirmations and failures", ""]
    by_method = report["confirmations_by_method"]
    lines.append("Confirmed by: " + (", ".join(f"{n} {m}" for m, n in by_method.items()) or "none"))
    lines.append("")
    lines.append(
        "Failures: " + (", ".join(f"{n} {r}" for r, n in report["failures"].items()) or "none")
    )
    if report["faulty_hubs"]:
        lines += ["", "Hubs hit by faults: "
                  + ", ".join(f"{n} {c}" for c, n in report["faulty_hubs"].items())]  # fmt: skip
    if report["faults_applied"]:
        lines += ["", "## Faults applied", "", "| at s | fault | hubs |", "|---|---|---|"]
        for f in report["faults_applied"]:
            lines.append(f"| {f['at_s']:.1f} | {f['kind']} | {f.get('hubs', 0)} |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in report["notes"]]
    lines += ["", "## Plots", ""]
    for name, title in plots:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines) + "\n"


def write_report(record: RunRecord, out: Path) -> dict[str, Any]:
    """Write ``report.json``, the PNGs and ``report.md`` into ``out``; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(record)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plots = _plots(record, report, out)
    (out / "report.md").write_text(_markdown(report, plots))
    return report


def benchmark_section(report: Mapping[str, Any], command: str, when: str,
                      versions: Mapping[str, str]) -> str:  # fmt: skip
    """A dated ``BENCHMARKS.md`` section of one load test (``python -m loadtest run --record``):
    the command, the versions and the figures of its report."""
    lag = report.get("loop_lag_p99_ms")
    rtt = report.get("ack_rtt_ms") or {}
    rows = [
        ("verdict", "OK" if report.get("ok") else "FAILED"),
        ("premises (CHs)", f"{report.get('hubs'):,}"),
        ("devices targeted / confirmed",
         f"{report.get('devices_targeted'):,} / {report.get('devices_confirmed'):,}"),
        ("confirmations by proof", ", ".join(
            f"{n:,} {m}" for m, n in (report.get("confirmations_by_method") or {}).items())),
        ("failures by reason", ", ".join(
            f"{n} {r}" for r, n in (report.get("failures") or {}).items()) or "none"),
        ("failures by the fault on their CH", json.dumps(report.get("failures_by_fault") or {})),
        ("faulty hubs", json.dumps(report.get("faulty_hubs") or {})),
        ("duration / plan's estimate (s)",
         f"{_fmt(report.get('duration_s'))} / {_fmt(report.get('estimated_duration_s'))}"
         f" ({_fmt(report.get('estimate_error'))})"),
        ("WAN blocks sent / blocks/s", f"{_fmt(report.get('wan_blocks_sent'))} / "
         f"{_fmt(report.get('blocks_per_s'))}"),
        ("retransmission ratio", _fmt(report.get("retransmission_ratio"))),
        ("ack round trip p50 / p90 / p99 (ms)",
         f"{_fmt(rtt.get('p50'))} / {_fmt(rtt.get('p90'))} / {_fmt(rtt.get('p99'))}"),
        ("otad CPU (s) / peak RSS (MiB)", f"{_fmt(report.get('otad_cpu_s'))} / "
         f"{(report.get('otad_peak_rss_bytes') or 0) / 2**20:.0f}"),
        ("broker CPU (s)", _fmt(report.get("broker_cpu_s"))),
        ("otad event-loop lag p99, worst sample (ms)", _fmt(lag)),
    ]  # fmt: skip
    stages = [
        f"| {st['campaign']} {st['name']} | {_fmt(st.get('targets'))} | {_fmt(st['confirmed'])} "
        f"| {_fmt(st['failed'])} | {st.get('gate_decision') or '-'} | {_fmt(st.get('estimated_s'))}"
        f" | {_fmt(st.get('measured_s'))} |"
        for st in report.get("stages") or []
    ]
    lines = [
        f"## Load test {report.get('scenario')}: {when}",
        "",
        f"Command: `{command}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "| stage | targets | confirmed | failed | gate | estimated s | measured s |",
        "|---|---|---|---|---|---|---|",
        *stages,
        "",
    ]
    notes = report.get("notes") or []
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"
