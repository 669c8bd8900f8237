"""Load-test scenarios: a TOML file under ``loadtest/scenarios/``, validated into a
:class:`Scenario`, and the seeded timeline of fault actions it makes.

A scenario names everything a run varies; every key is optional except ``fleet.hubs``::

    name = "5k"
    seed = 7

    [fleet]
    hubs = 5000
    procs = 2                  # virtual-CH worker processes (default one per 2,500 CHs)
    bridge_share = 0.3         # premises with 2-3 Alt HAN bridges
    sleepy_gsme = true         # the GSME listens only when it wakes

    [images]
    ch_kib = 256               # CH firmware image
    bridge_kib = 16            # bridge firmware image (0: none)
    bridge_type = "B2"         # which bridges it is for (B1..B4)
    wan_block_size = 1024

    [han]
    block_size = 50            # ZigBee OTA image-block payload (40..63)
    frame_rate = 40.0          # frames per second each way
    loss = 0.0                 # share of HAN frames lost
    acceleration = 120.0       # HAN time runs this many times as fast
    max_transfers = 2          # concurrent HAN transfers per CH

    [campaign]
    stages = [{name = "micro-pilot", kind = "micro_pilot", size = 15},
              {name = "pilot", kind = "pilot", share = 0.1},
              {name = "roll-out", kind = "rollout"}]
    auto_gate_soak_s = 5.0
    rate_per_minute = 100000
    lost_after_s = 3600        # a CH offline this long after activation is LOST (category 1)
    timeout_s = 900
    thresholds = {category2_limit = 50, failed_rate = 0.2}   # issue 10's names
    deadlines = {wan_delivery_s = 600, activation_s = 300}    # issue 10's phases

    [pacing]                   # otad's plan estimate: this deployment's speeds ([campaigns])
    fleet_blocks_per_s = 7000  # every WAN transfer together, as measured on this machine kind
    transfer_blocks_per_s = 250
    activation_s = 3.0         # activation -> confirmed (a virtual CH reboots in about 2 s)
    han_bytes_per_s = 60000    # default: derived from [han] (Scenario.han_bytes_per_s)

    [faults]
    wan_latency_ms = 20        # each way, through the fault proxy
    wan_jitter_ms = 5
    wan_loss = 0.01            # share of non-retained QoS 0 PUBLISH packets dropped (blocks, SACKs)
    wan_acked_loss = 0.0       # share of QoS 1 ones the broker acknowledged and then lost
    wan_bandwidth_kib_s = 0    # per connection and direction (0: unlimited)
    wan_cuts = [{at_s = 40, share = 0.1}]            # connections cut (both sides closed)
    half_open = [{at_s = 50, share = 0.02, for_s = 20}]  # forwarding stops, sockets stay open
    flap_share = 0.05          # hubs that lose power and come back, again and again
    flap_every_s = 30
    flap_down_s = 5
    cloned_hubs = 0            # extra CHs announcing an existing CH's GUID
    self_test_failures = 0.0   # devices whose new image fails its self-test (rolls back)
    activation_answer_loss = 0.0
    broker_restart_at_s = [60]
    otad_kill_at_s = [90]      # SIGKILL, then otad is started again at once

Every error is a :class:`ScenarioError` naming the field (``faults.wan_loss: must be in
[0, 1)``); an unknown key is an error, so a typo never silently runs the default. The same
scenario and seed give the same :meth:`Scenario.timeline` (which hubs flap or are cut, when).
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otad.campaign.spec import MICRO_PILOT_SIZES

#: Where the shipped scenarios live.
SCENARIO_DIR = Path(__file__).with_name("scenarios")
#: Stage kinds the campaign contract (issue 10) knows.
STAGE_KINDS = ("micro_pilot", "pilot", "rollout")
BRIDGE_TYPES = ("B1", "B2", "B3", "B4")
#: Campaign thresholds and phase deadlines a scenario may set (issue 10's policy names).
THRESHOLDS = (
    "category1_limit",
    "category2_limit",
    "failed_rate",
    "rejected_rate",
    "timed_out_rate",
    "min_sample",
)
DEADLINES = ("wan_delivery_s", "han_transfer_s", "activation_s", "confirmation_s")
#: The pacing figures of otad's plan estimate (``[campaigns]`` of otad's configuration).
PACING = ("transfer_blocks_per_s", "fleet_blocks_per_s", "han_bytes_per_s", "activation_s")
#: Bounds a scenario may not exceed (what one machine's run can mean, not what otad can do).
MAX_HUBS = 100_000
MAX_IMAGE_KIB = 2048


class ScenarioError(ValueError):
    """A scenario is not valid; ``field`` names the offending key (dotted), the message why."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage of the campaign: a fixed ``size`` of targets, a ``share`` of them, or (neither)
    everything left."""

    name: str
    kind: str
    size: int | None = None
    share: float | None = None

    def to_spec(self) -> dict[str, Any]:
        """The stage as campaign.create takes it."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.size is not None:
            out["size"] = self.size
        if self.share is not None:
            out["share"] = self.share
        return out


DEFAULT_STAGES = (
    StagePlan("micro-pilot", "micro_pilot", size=15),
    StagePlan("pilot", "pilot", share=0.1),
    StagePlan("roll-out", "rollout"),
)


@dataclass(frozen=True, slots=True)
class TimedShare:
    """A fault that hits ``share`` of the hubs at ``at_s`` (for ``for_s`` where it lasts)."""

    at_s: float
    share: float
    for_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Faults:
    """What goes wrong during the run."""

    wan_latency_ms: float = 0.0
    wan_jitter_ms: float = 0.0
    wan_loss: float = 0.0
    wan_acked_loss: float = 0.0
    wan_bandwidth_kib_s: float = 0.0
    wan_cuts: tuple[TimedShare, ...] = ()
    half_open: tuple[TimedShare, ...] = ()
    flap_share: float = 0.0
    flap_every_s: float = 30.0
    flap_down_s: float = 5.0
    cloned_hubs: int = 0
    self_test_failures: float = 0.0
    activation_answer_loss: float = 0.0
    broker_restart_at_s: tuple[float, ...] = ()
    otad_kill_at_s: tuple[float, ...] = ()

    @property
    def needs_proxy(self) -> bool:
        """Whether the hubs must reach the broker through the fault proxy."""
        return bool(
            self.wan_latency_ms
            or self.wan_jitter_ms
            or self.wan_loss
            or self.wan_acked_loss
            or self.wan_bandwidth_kib_s
            or self.wan_cuts
            or self.half_open
        )


@dataclass(frozen=True, slots=True)
class FaultAction:
    """One thing the runner does at ``at_s`` seconds after the campaign started: ``kind`` is
    ``cut``, ``half_open``, ``resume``, ``hub_down``, ``hub_up``, ``broker_restart`` or
    ``otad_kill``; ``hubs`` the hub indices it applies to (empty: not hub-specific)."""

    at_s: float
    kind: str
    hubs: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario (see the module docstring for every field)."""

    name: str
    hubs: int
    seed: int = 0
    procs: int | None = None
    bridge_share: float = 0.25
    sleepy_gsme: bool = True
    ch_kib: int = 256
    bridge_kib: int = 16
    bridge_type: str = "B2"
    wan_block_size: int = 1024
    han_block_size: int = 50
    han_frame_rate: float = 40.0
    han_loss: float = 0.0
    han_acceleration: float = 120.0
    han_max_transfers: int = 2
    stages: tuple[StagePlan, ...] = DEFAULT_STAGES
    auto_gate_soak_s: float = 5.0
    rate_per_minute: float = 100_000.0
    lost_after_s: float | None = None  # None: otad's default
    timeout_s: float = 900.0
    thresholds: Mapping[str, float] = field(default_factory=dict)
    deadlines: Mapping[str, float] = field(default_factory=dict)
    pacing: Mapping[str, float] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)

    @property
    def han_bytes_per_s(self) -> float:
        """What one HAN relay moves per shell second on this scenario's link: a ZigBee OTA
        client asks for one block at a time, each a request and a response frame (airtime and
        latency each way), never faster than the server's minimum block period; HAN time runs
        ``han_acceleration`` times as fast."""
        from loadtest.hanlink import LinkConfig
        from loadtest.premises import PremisesConfig

        round_trip = 2.0 * (1.0 / self.han_frame_rate + LinkConfig().latency)
        per_block = max(round_trip, PremisesConfig().minimum_block_period_ms / 1000.0)
        return self.han_block_size / per_block * self.han_acceleration

    def otad_pacing(self) -> dict[str, float]:
        """otad's ``[campaigns]`` pacing for this run: the scenario's ``[pacing]`` figures (the
        deployment's measured speeds, as an operator sets them), the HAN rate derived from the
        link where it gives none (:attr:`han_bytes_per_s`); otad's defaults for the rest."""
        return {"han_bytes_per_s": round(self.han_bytes_per_s, 1), **self.pacing}

    def timeline(self) -> list[FaultAction]:
        """The fault actions of the run, in time order; a pure function of the scenario (its
        seed included). Cut and half-open hubs, and the flapping ones, are seeded samples of
        the fleet; a flapping hub goes down every ``flap_every_s`` (at a seeded phase) for
        ``flap_down_s``, until the timeout."""
        rng = random.Random(f"otad-loadtest/timeline/{self.seed}")
        faults = self.faults
        actions = [
            FaultAction(cut.at_s, "cut", _sample(rng, self.hubs, cut.share))
            for cut in faults.wan_cuts
        ]
        for hang in faults.half_open:
            hubs = _sample(rng, self.hubs, hang.share)
            actions.append(FaultAction(hang.at_s, "half_open", hubs))
            actions.append(FaultAction(hang.at_s + hang.for_s, "resume", hubs))
        flappers = _sample(rng, self.hubs, faults.flap_share)
        for hub in flappers:
            at = rng.uniform(0.0, faults.flap_every_s)
            while at < self.timeout_s:
                actions.append(FaultAction(round(at, 3), "hub_down", (hub,)))
                actions.append(FaultAction(round(at + faults.flap_down_s, 3), "hub_up", (hub,)))
                at += faults.flap_every_s
        actions += [FaultAction(at, "broker_restart") for at in faults.broker_restart_at_s]
        actions += [FaultAction(at, "otad_kill") for at in faults.otad_kill_at_s]
        order = {"hub_up": 0, "resume": 0}
        actions.sort(key=lambda a: (a.at_s, order.get(a.kind, 1), a.kind, a.hubs))
        return actions

    def flapping_hubs(self) -> frozenset[int]:
        """Indices of the hubs that flap."""
        return frozenset(h for a in self.timeline() if a.kind == "hub_down" for h in a.hubs)

    def campaign_spec(self, image: str, campaign_id: str) -> dict[str, Any]:
        """The campaign.plan / campaign.create arguments for ``image`` (issue 10's spec)."""
        policies: dict[str, Any] = {
            "window": "* * * * *",
            "rate_per_minute": self.rate_per_minute,
            "max_per_minute": max(self.rate_per_minute, 1.0),
            "auto_gate_soak_s": self.auto_gate_soak_s,
        }
        if self.lost_after_s is not None:
            policies["lost_after_s"] = self.lost_after_s
        if self.thresholds:
            policies["thresholds"] = dict(self.thresholds)
        if self.deadlines:
            policies["deadlines"] = dict(self.deadlines)
        return {
            "id": campaign_id,
            "payload": {"kind": "image", "image": image},
            "stages": [s.to_spec() for s in self.stages],
            "policies": policies,
            "seed": self.seed,
        }


def _sample(rng: random.Random, count: int, share: float) -> tuple[int, ...]:
    n = round(count * share)
    return tuple(sorted(rng.sample(range(count), min(n, count))))


# ----------------------------------------------------------------------------- parsing


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file (a bare name looks in :data:`SCENARIO_DIR`)."""
    candidate = Path(path)
    if not candidate.exists() and not candidate.suffix:
        candidate = SCENARIO_DIR / f"{path}.toml"
    try:
        text = candidate.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError("file", f"no scenario {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError("file", f"cannot read {candidate}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("file", f"{candidate.name} is not valid TOML: {exc}") from None
    return parse_scenario(data, default_name=candidate.stem)


def parse_scenario(data: Mapping[str, Any], *, default_name: str = "scenario") -> Scenario:
    """Validate a scenario's TOML tables into a :class:`Scenario`."""
    top = _Table(data, "")
    name = top.string("name", None) or default_name
    seed = top.integer("seed", 0, low=0)
    fleet = top.table("fleet", required=True)
    images = top.table("images")
    han = top.table("han")
    campaign = top.table("campaign")
    faults_t = top.table("faults")
    top_pacing = top.table("pacing")
    top.done()

    hubs = fleet.integer("hubs", None, low=1, high=MAX_HUBS)
    if hubs is None:
        raise ScenarioError(fleet.path("hubs"), "is required")
    procs = fleet.integer("procs", None, low=1, high=64)
    scenario_fields: dict[str, Any] = {
        "name": name,
        "seed": seed,
        "hubs": hubs,
        "procs": procs,
        "bridge_share": fleet.share("bridge_share", 0.25),
        "sleepy_gsme": fleet.boolean("sleepy_gsme", True),
    }
    fleet.done()
    scenario_fields |= {
        "ch_kib": images.integer("ch_kib", 256, low=1, high=MAX_IMAGE_KIB),
        "bridge_kib": images.integer("bridge_kib", 16, low=0, high=MAX_IMAGE_KIB),
        "bridge_type": images.choice("bridge_type", "B2", BRIDGE_TYPES),
        "wan_block_size": images.integer("wan_block_size", 1024, low=64, high=65536),
    }
    images.done()
    scenario_fields |= {
        "han_block_size": han.integer("block_size", 50, low=40, high=63),
        "han_frame_rate": han.number("frame_rate", 40.0, low=0.1, high=10_000.0),
        "han_loss": han.share("loss", 0.0, below_one=True),
        "han_acceleration": han.number("acceleration", 120.0, low=1.0, high=100_000.0),
        "han_max_transfers": han.integer("max_transfers", 2, low=1, high=16),
    }
    han.done()
    stages = _stages(campaign, hubs)
    soak = campaign.number("auto_gate_soak_s", 5.0, low=0.0, high=86_400.0)
    scenario_fields |= {
        "stages": stages,
        "auto_gate_soak_s": soak if soak is not None else 5.0,
        "rate_per_minute": campaign.number("rate_per_minute", 100_000.0, low=1.0, high=1e7),
        "timeout_s": campaign.number("timeout_s", 900.0, low=1.0, high=7 * 86_400.0),
        "lost_after_s": campaign.number("lost_after_s", None, low=1.0, high=7 * 86_400.0),
        "thresholds": _named_numbers(campaign.table("thresholds"), THRESHOLDS),
        "deadlines": _named_numbers(campaign.table("deadlines"), DEADLINES),
    }
    campaign.done()
    pacing = top_pacing
    scenario_fields["pacing"] = {
        name: value
        for name in PACING
        if (value := pacing.number(name, None, low=0.001, high=1e9)) is not None
    }
    pacing.done()
    scenario_fields["faults"] = _faults(faults_t, hubs)
    faults_t.done()
    return Scenario(**scenario_fields)


def _stages(campaign: _Table, hubs: int) -> tuple[StagePlan, ...]:
    raw = campaign.raw("stages")
    if raw is None:
        return DEFAULT_STAGES
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(campaign.path("stages"), "must be a non-empty list of tables")
    out: list[StagePlan] = []
    names: set[str] = set()
    for n, item in enumerate(raw):
        where = f"{campaign.path('stages')}[{n}]"
        if not isinstance(item, dict):
            raise ScenarioError(where, "must be a table {name, kind, size | share}")
        stage = _Table(item, where)
        name = stage.string("name", None)
        if name is None:
            raise ScenarioError(f"{where}.name", "is required")
        if name in names:
            raise ScenarioError(f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        kind = stage.choice("kind", None, STAGE_KINDS)
        if kind is None:
            raise ScenarioError(f"{where}.kind", f"is required (one of {', '.join(STAGE_KINDS)})")
        size = stage.integer("size", None, low=1, high=MAX_HUBS)
        share = stage.share("share", None)
        stage.done()
        if size is not None and share is not None:
            raise ScenarioError(where, "give size or share, not both")
        if share is not None and not share > 0:
            raise ScenarioError(f"{where}.share", "must be above 0")
        last = n == len(raw) - 1
        if size is None and share is None and not last:
            raise ScenarioError(where, "only the last stage may take everything left")
        if kind == "micro_pilot" and (size is None or size not in MICRO_PILOT_SIZES):
            low, high = MICRO_PILOT_SIZES[0], MICRO_PILOT_SIZES[-1]
            raise ScenarioError(f"{where}.size", f"a micro-pilot has {low}-{high} targets")
        out.append(StagePlan(name, kind, size, share))
    return tuple(out)


def _named_numbers(table: _Table, names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        if name.endswith("_rate"):
            value = table.share(name, None)
        else:
            value = table.number(name, None, low=0.0, high=7 * 86_400.0)
        if value is not None:
            out[name] = int(value) if name.endswith(("_limit", "min_sample")) else value
    table.done()
    return out


def _timed(table: _Table, key: str, *, lasting: bool) -> tuple[TimedShare, ...]:
    raw = table.raw(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ScenarioError(table.path(key), "must be a list of tables {at_s, share}")
    out = []
    for n, item in enumerate(raw):
        where = f"{table.path(key)}[{n}]"
        if not isinstance(item, dict):
            raise ScenarioError(where, "must be a table {at_s, share}")
        entry = _Table(item, where)
        at = entry.number("at_s", None, low=0.0, high=7 * 86_400.0)
        share = entry.share("share", None)
        if at is None or share is None:
            raise ScenarioError(where, "needs at_s and share")
        for_s = entry.number("for_s", 10.0, low=0.0, high=86_400.0) if lasting else 0.0
        entry.done()
        out.append(TimedShare(at, share, for_s or 0.0))
    return tuple(out)


def _faults(table: _Table, hubs: int) -> Faults:
    faults = Faults(
        wan_latency_ms=table.number("wan_latency_ms", 0.0, low=0.0, high=60_000.0) or 0.0,
        wan_jitter_ms=table.number("wan_jitter_ms", 0.0, low=0.0, high=60_000.0) or 0.0,
        wan_loss=table.share("wan_loss", 0.0, below_one=True) or 0.0,
        wan_acked_loss=table.share("wan_acked_loss", 0.0, below_one=True) or 0.0,
        wan_bandwidth_kib_s=table.number("wan_bandwidth_kib_s", 0.0, low=0.0, high=1e6) or 0.0,
        wan_cuts=_timed(table, "wan_cuts", lasting=False),
        half_open=_timed(table, "half_open", lasting=True),
        flap_share=table.share("flap_share", 0.0) or 0.0,
        flap_every_s=table.number("flap_every_s", 30.0, low=1.0, high=86_400.0) or 30.0,
        flap_down_s=table.number("flap_down_s", 5.0, low=0.1, high=86_400.0) or 5.0,
        cloned_hubs=table.integer("cloned_hubs", 0, low=0, high=hubs) or 0,
        self_test_failures=table.share("self_test_failures", 0.0) or 0.0,
        activation_answer_loss=table.share("activation_answer_loss", 0.0) or 0.0,
        broker_restart_at_s=table.times("broker_restart_at_s"),
        otad_kill_at_s=table.times("otad_kill_at_s"),
    )
    if faults.flap_share and faults.flap_down_s >= faults.flap_every_s:
        raise ScenarioError(table.path("flap_down_s"), "must be shorter than flap_every_s")
    return faults


class _Table:
    """One TOML table being validated: typed getters that name the field in their errors, and
    :meth:`done` refusing any key nobody asked for."""

    def __init__(self, data: Any, prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise ScenarioError(prefix or "scenario", "must be a table")
        self._data = dict(data)
        self._prefix = prefix
        self._seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._data.get(key)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ScenarioError(self.path(unknown[0]), "unknown key")

    def table(self, key: str, *, required: bool = False) -> _Table:
        raw = self.raw(key)
        if raw is None:
            if required:
                raise ScenarioError(self.path(key), "is required")
            raw = {}
        return _Table(raw, self.path(key))

    def string(self, key: str, default: str | None) -> str | None:
        raw = self.raw(key)
        if raw is None:
            return default
        if not isinstance(raw, str) or not raw.strip():
            raise ScenarioError(self.path(key), "must be a non-empty string")
        return raw

    def choice(self, key: str, default: str | None, options: Sequence[str]) -> str | None:
        value = self.string(key, default)
        if value is not None and value not in options:
            raise ScenarioError(self.path(key), f"{value!r} is not one of {', '.join(options)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self.raw(key)
        if raw is None:
            return default
        if not isinstance(raw, bool):
            raise ScenarioError(self.path(key), "must be true or false")
        return raw

    def integer(
        self, key: str, default: int | None, *, low: int, high: int | None = None
    ) -> int | None:
        raw = self.raw(key)
        if raw is None:
            return default
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ScenarioError(self.path(key), "must be an integer")
        if raw < low or (high is not None and raw > high):
            bound = f"{low}..{high}" if high is not None else f"at least {low}"
            raise ScenarioError(self.path(key), f"{raw} is out of range ({bound})")
        return raw

    def number(
        self,
        key: str,
        default: float | None,
        *,
        low: float,
        high: float,
    ) -> float | None:
        raw = self.raw(key)
        if raw is None:
            return default
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ScenarioError(self.path(key), "must be a number")
        if not low <= raw <= high:
            raise ScenarioError(self.path(key), f"{raw} is out of range ({low:g}..{high:g})")
        return float(raw)

    def share(self, key: str, default: float | None, *, below_one: bool = False) -> float | None:
        raw = self.raw(key)
        if raw is None:
            return default
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ScenarioError(self.path(key), "must be a number")
        if not 0.0 <= raw <= 1.0 or (below_one and raw >= 1.0):
            raise ScenarioError(self.path(key), f"must be in [0, 1{')' if below_one else ']'}")
        return float(raw)

    def times(self, key: str) -> tuple[float, ...]:
        raw = self.raw(key)
        if raw is None:
            return ()
        if not isinstance(raw, list) or any(
            isinstance(t, bool) or not isinstance(t, int | float) or t < 0 for t in raw
        ):
            raise ScenarioError(self.path(key), "must be a list of seconds (>= 0)")
        return tuple(sorted(float(t) for t in raw))
