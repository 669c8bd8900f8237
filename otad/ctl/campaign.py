"""``otactl campaign ...``: the operator's side of campaigns (staged roll-outs, issue 10).

Every action is one request of otad's control plane (``campaign.<action>``, the request and
result JSON as the campaign control API specifies them), printed for people or, with
``--json``, as the raw result:

* ``plan`` / ``create`` take a campaign spec built from flags (:func:`build_spec`) or from
  ``--spec FILE`` (JSON, or TOML by its ``.toml`` name), flags overriding the file;
* ``start`` / ``approve`` / ``hold`` / ``resume`` / ``abort`` / ``notice`` / ``expedite`` /
  ``retry`` move a campaign on (the actor otad records is this control client's authenticated
  identity; ``--reason`` says why);
* ``status`` / ``list`` / ``history`` / ``events`` show it; ``events --follow`` tails the live
  events (after replaying from ``--since``), and ``watch`` is the live view
  (:mod:`otad.ctl.campaignview`); both follow topics, never poll. With ``--json`` they print
  one JSON object a line (each event; each newer status).

Exit status (:func:`outcome_of`, the one place that decides it): 0 success; 1 failed (an error
answer, a timeout, otad or the broker unreachable; ``watch``: the campaign was aborted); 2 usage
(bad flags or spec file); 3 partial (``plan``: GUIDs the operator named explicitly are excluded or
unknown to otad; ``watch``: the campaign completed with failed targets). ``watch`` and
``events --follow`` end with 0 on Ctrl-C.

:func:`main` runs one ``otactl`` command line with its output on given streams (for tests and
scripts); ``otactl`` itself registers :func:`add_parser` and :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import re
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, TextIO

from otad.campaign.spec import MICRO_PILOT_SIZES, Deadlines, PayloadKind, StageKind, Thresholds
from otad.control import MAX_REQUEST_BYTES
from otad.ctl import campaignview
from otad.ctl.client import CtlClient, CtlError, CtlOffline, CtlTimeout, CtlUnreachable
from otad.ctl.connection import Connection
from otad.ctl.format import format_table as table
from otad.ctl.live import Message, WatchError, feed
from otad.events import iso_time
from otad.files import FileError, read_bounded
from otad.progress import format_bytes, format_duration
from protocol.errors import ProtocolError
from protocol.wire import topics
from protocol.wire.devices import DeviceType

#: ``campaign.events`` answers at most this many events a request; more are asked page by page.
EVENTS_PAGE_MAX: Final = 1000
EVENTS_DEFAULT_LIMIT: Final = 100
#: The largest spec file read (a GUID list of a few hundred thousand premises fits).
MAX_SPEC_BYTES: Final = MAX_REQUEST_BYTES
# The names below are the campaign engine's (otad.campaign.spec), so otactl refuses a typo at once.
PAYLOAD_KINDS: Final = tuple(k.value for k in PayloadKind)
STAGE_KINDS: Final = tuple(k.value for k in StageKind)
DEADLINE_PHASES: Final = tuple(f.name.removesuffix("_s") for f in dataclasses.fields(Deadlines))
THRESHOLD_RATES: Final = tuple(
    f.name for f in dataclasses.fields(Thresholds) if f.name.endswith("_rate")
)
THRESHOLD_LIMITS: Final = tuple(
    f.name for f in dataclasses.fields(Thresholds) if f.name not in THRESHOLD_RATES
)
SPEC_KEYS: Final = {
    "": {"id", "payload", "select", "stages", "policies", "seed"},
    "stages": {"name", "kind", "size", "share"},
    "payload": {"kind", "image"},
    "select": {
        "device_type", "hw_min", "hw_max", "fw_versions", "suppliers", "segments", "guids",
        "alt_han",
    },
    "policies": {
        "window", "timezone", "rate_per_minute", "ramp_factor", "ramp_every", "max_per_minute",
        "deadlines", "thresholds", "auto_gate_soak_s", "lost_after_s", "requires_ch_fw",
    },
    "policies.deadlines": {f"{p}_s" for p in DEADLINE_PHASES},
    "policies.thresholds": set(THRESHOLD_LIMITS + THRESHOLD_RATES),
}  # fmt: skip
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_Subparsers = Any  # argparse's _SubParsersAction is private


class Outcome(enum.IntEnum):
    """``otactl campaign``'s exit status."""

    OK = 0
    FAILED = 1
    USAGE = 2
    PARTIAL = 3


class CampaignUsageError(Exception):
    """Bad input found after argparse (a spec file, a GUID list): exit status 2."""


class CampaignCallFailed(Exception):  # noqa: N818 - what happened, reported as such
    """otad answered with an error, did not answer, or could not be reached: exit status 1.
    ``reason`` is the typed reason (a :class:`~protocol.errors.Reason` name, or ``TIMEOUT`` /
    ``UNREACHABLE``)."""

    def __init__(self, reason: str, detail: str) -> None:
        """``reason``: typed; ``detail``: one line for people."""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- links to otad

Caller = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Links:
    """How the commands reach otad: ``session(args)`` a control session (a :data:`Caller`),
    ``subscribe(args, filters)`` a live feed of topics (:func:`otad.ctl.live.feed`)."""

    session: Callable[[argparse.Namespace], AbstractAsyncContextManager[Caller]]
    subscribe: Callable[
        [argparse.Namespace, Sequence[str]], AbstractAsyncContextManager[asyncio.Queue[Message]]
    ]


@contextlib.asynccontextmanager
async def _control_session(args: argparse.Namespace) -> AsyncIterator[Caller]:
    connection = _connection(args)
    try:
        async with CtlClient.connected_as(
            connection, timeout=args.timeout, require_online=True
        ) as ctl:

            async def call(cmd: str, call_args: dict[str, Any]) -> Any:
                try:
                    return await ctl.call(cmd, call_args)
                except CtlError as exc:
                    raise CampaignCallFailed(exc.reason, exc.detail) from None
                except CtlTimeout as exc:
                    raise CampaignCallFailed("TIMEOUT", str(exc)) from None

            yield call
    except CtlOffline as exc:
        raise CampaignCallFailed("OFFLINE", str(exc)) from None
    except CtlUnreachable as exc:
        raise CampaignCallFailed("UNREACHABLE", str(exc)) from None


def _live_feed(
    args: argparse.Namespace, filters: Sequence[str]
) -> AbstractAsyncContextManager[asyncio.Queue[Message]]:
    connection = _connection(args)
    return feed(
        connection.host,
        connection.port,
        filters,
        wait_s=args.timeout,
        name="otactl-campaign",
        settings=connection.settings(purpose="campaign", connect_timeout=args.timeout),
    )


def _connection(args: argparse.Namespace) -> Connection:
    """How otactl reaches the broker: its flags, ``OTACTL_*`` and its config file."""
    from otad.ctl import connection_of  # the command line's own resolution (no import cycle)

    return connection_of(args)


MQTT_LINKS: Final = Links(session=_control_session, subscribe=_live_feed)


# --------------------------------------------------------------------------- flag values


def _int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def parse_seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``6h``, ``7d``, ``1.5h`` -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or a number with s, m, h or d)"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _kind(text: str, kinds: Sequence[str], what: str) -> str:
    value = text.strip().lower().replace("-", "_")
    if value == "roll_out":
        value = "rollout"
    if value not in kinds:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: one of {', '.join(kinds)}")
    return value


def parse_stage(text: str) -> dict[str, Any]:
    """``NAME:KIND[:SIZE|SHARE%]`` -> a stage of the spec (no size: the targets that remain)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise argparse.ArgumentTypeError(f"stage {text!r}: NAME:KIND[:SIZE|SHARE%]")
    try:
        name = topics.check_level(parts[0])
    except ProtocolError:
        raise argparse.ArgumentTypeError(
            f"stage name {parts[0]!r}: letters, digits and _ . : - only"
        ) from None
    stage: dict[str, Any] = {"name": name, "kind": _kind(parts[1], STAGE_KINDS, "stage kind")}
    if len(parts) == 3:
        amount = parts[2].strip()
        if amount.endswith("%"):
            try:
                share = float(amount[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 < share <= 1:
                raise argparse.ArgumentTypeError(f"stage {text!r}: a share is 0-100%")
            stage["share"] = share
        else:
            size = _int(amount)
            if size == 0:
                raise argparse.ArgumentTypeError(f"stage {text!r}: a size is at least 1")
            stage["size"] = size
    if stage["kind"] == StageKind.MICRO_PILOT and stage.get("size") not in MICRO_PILOT_SIZES:
        low, high = MICRO_PILOT_SIZES[0], MICRO_PILOT_SIZES[-1]
        raise argparse.ArgumentTypeError(f"stage {text!r}: a micro-pilot has {low}-{high} CHs")
    return stage


def parse_ramp(text: str) -> dict[str, Any]:
    """``FACTOR:EVERY[:MAX]`` -> ``ramp_factor``, ``ramp_every`` (confirmations) and
    ``max_per_minute``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"ramp {text!r}: FACTOR:EVERY[:MAX]")
    ramp: dict[str, Any] = {
        "ramp_factor": _positive_float(parts[0]),
        "ramp_every": _int(parts[1]),
    }
    if len(parts) == 3:
        ramp["max_per_minute"] = _positive_float(parts[2])
    return ramp


def parse_deadline(text: str) -> tuple[str, float | None]:
    """``PHASE=SECONDS`` (a duration, or ``none``) -> the spec's deadline key and value."""
    phase, sep, value = text.partition("=")
    phase = phase.strip().lower().replace("-", "_").removesuffix("_s")
    if not sep or phase not in DEADLINE_PHASES:
        raise argparse.ArgumentTypeError(
            f"deadline {text!r}: PHASE=SECONDS, PHASE one of {', '.join(DEADLINE_PHASES)}"
        )
    if value.strip().lower() in ("none", "off"):
        return f"{phase}_s", None
    return f"{phase}_s", parse_seconds(value)


def parse_threshold(text: str) -> tuple[str, int | float]:
    """``NAME=VALUE`` -> a threshold: a limit or sample (an integer), or a rate (0-1 or N%)."""
    name, sep, value = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if not sep or name not in THRESHOLD_LIMITS + THRESHOLD_RATES:
        known = ", ".join(THRESHOLD_LIMITS + THRESHOLD_RATES)
        raise argparse.ArgumentTypeError(f"threshold {text!r}: NAME=VALUE, NAME one of {known}")
    if name in THRESHOLD_LIMITS:
        return name, _int(value)
    value = value.strip()
    try:
        rate = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"threshold {text!r}: a rate is 0-1 or 0-100%")
    return name, rate


def _campaign_id(text: str) -> str:
    try:
        return topics.check_level(text)
    except ProtocolError:
        raise argparse.ArgumentTypeError(
            f"campaign id {text!r}: 1-64 letters, digits and _ . : - (it is a topic level)"
        ) from None


def _guid(text: str, where: str = "") -> str:
    try:
        return topics.check_guid(text.strip().upper())
    except ProtocolError:
        raise CampaignUsageError(
            f"{where}{text!r} is not a GUID (16 hex digits, the CH's EUI-64)"
        ) from None


# --------------------------------------------------------------------------- the spec


def read_guids_file(path: str) -> list[str]:
    """One GUID a line; blank lines and ``#`` comments are skipped."""
    try:
        data = read_bounded(path, MAX_SPEC_BYTES, what="a GUID list")
    except FileError as exc:
        raise CampaignUsageError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CampaignUsageError(f"{path}: not UTF-8 text") from None
    guids = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            guids.append(_guid(entry, f"{path}:{number}: "))
    if not guids:
        raise CampaignUsageError(f"{path}: no GUID in it")
    return guids


def read_spec_file(path: str) -> dict[str, Any]:
    """A campaign spec from a JSON file, or a TOML one (by its ``.toml`` name); keys checked."""
    try:
        data = read_bounded(path, MAX_SPEC_BYTES, what="a campaign spec")
    except FileError as exc:
        raise CampaignUsageError(str(exc)) from None
    try:
        if path.lower().endswith(".toml"):
            spec = tomllib.loads(data.decode("utf-8"))
        else:
            spec = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CampaignUsageError(f"{path}: not a valid spec file: {exc}") from None
    if not isinstance(spec, dict):
        raise CampaignUsageError(
            f"{path}: a spec is an object (a table), not {type(spec).__name__}"
        )
    _check_keys(spec, "", path)
    return spec


def _check_keys(node: dict[str, Any], where: str, path: str) -> None:
    unknown = sorted(set(node) - SPEC_KEYS[where])
    if unknown:
        known = ", ".join(sorted(SPEC_KEYS[where]))
        place = f"[{where}]" if where else "the top level"
        raise CampaignUsageError(f"{path}: unknown key {unknown[0]!r} in {place} (known: {known})")
    for key, value in node.items():
        child = f"{where}.{key}" if where else key
        if child == "stages":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise CampaignUsageError(f"{path}: stages is a list of tables (objects)")
            for stage in value:
                _check_keys(stage, child, path)
        elif child in SPEC_KEYS:
            if not isinstance(value, dict):
                raise CampaignUsageError(f"{path}: {child} is a table (an object)")
            _check_keys(value, child, path)


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec of ``campaign.plan``/``campaign.create``: ``--spec FILE`` if given, then each
    flag given overriding (or, for lists, replacing) the file's value."""
    spec = read_spec_file(args.spec) if args.spec else {}
    if args.id is not None:
        spec["id"] = args.id
    payload = spec.setdefault("payload", {})
    if args.image is not None:
        payload["image"] = args.image
    if args.mode is not None:
        payload["kind"] = args.mode
    elif payload.get("image") is not None:
        payload.setdefault("kind", "image")
    if not payload.get("kind"):
        raise CampaignUsageError("a campaign needs --image IMAGE (or --mode credentials)")
    if payload["kind"] == "credentials" and payload.get("image") is not None:
        raise CampaignUsageError("--mode credentials takes no --image")
    if payload["kind"] != "credentials" and not payload.get("image"):
        raise CampaignUsageError(f"--mode {payload['kind']} needs --image IMAGE")

    select = spec.setdefault("select", {})
    for key, value in (
        ("device_type", args.device_type),
        ("hw_min", args.hw_min),
        ("hw_max", args.hw_max),
        ("fw_versions", args.fw_version),
        ("suppliers", args.supplier),
        ("segments", args.segment),
        ("alt_han", args.alt_han),
    ):
        if value is not None:
            select[key] = value
    guids = list(args.guid or [])
    if args.guids_file is not None:
        guids += read_guids_file(args.guids_file)
    if guids:
        select["guids"] = list(dict.fromkeys(_guid(g, "--guid ") for g in guids))
    if not select:
        del spec["select"]

    if args.stage:
        spec["stages"] = list(args.stage)
    policies = spec.setdefault("policies", {})
    for key, value in (
        ("window", args.window),
        ("timezone", args.timezone),
        ("rate_per_minute", args.rate),
        ("auto_gate_soak_s", args.auto_gate),
        ("lost_after_s", args.lost_after),
        ("requires_ch_fw", args.requires_ch_fw),
    ):
        if value is not None:
            policies[key] = value
    if args.ramp is not None:
        policies.update(args.ramp)
    if args.deadline:
        policies.setdefault("deadlines", {}).update(dict(args.deadline))
    if args.threshold:
        policies.setdefault("thresholds", {}).update(dict(args.threshold))
    if not policies:
        del spec["policies"]
    if args.seed is not None:
        spec["seed"] = args.seed
    return spec


def explicit_guids(spec: dict[str, Any]) -> list[str]:
    """The GUIDs the operator named (``select.guids``), in order."""
    guids = (spec.get("select") or {}).get("guids") or []
    return [str(g) for g in guids]


# --------------------------------------------------------------------------- outcome


def outcome_of(action: str, result: Any, *, spec: dict[str, Any] | None = None) -> Outcome:
    """The exit status of a successful answer to ``action`` (an error is always
    :attr:`Outcome.FAILED`, bad input :attr:`Outcome.USAGE`; see the module docstring)."""
    if action == "plan" and spec is not None and isinstance(result, dict):
        missing = requested_but_left_out(explicit_guids(spec), result)
        return Outcome.PARTIAL if missing else Outcome.OK
    if action == "watch" and isinstance(result, dict):
        if result.get("state") == "aborted":
            return Outcome.FAILED
        if campaignview.failed_count(result.get("counts") or {}):
            return Outcome.PARTIAL
    return Outcome.OK


def requested_but_left_out(guids: Sequence[str], plan: dict[str, Any]) -> dict[str, str]:
    """Of the GUIDs the operator named, those the plan excludes (GUID -> the first reason) or
    that otad does not know (``"not known to otad"``)."""
    if not guids:
        return {}
    members = {m.get("guid") for m in plan.get("members") or []}
    reasons: dict[str, str] = {}
    for exclusion in plan.get("exclusions") or []:
        reasons.setdefault(str(exclusion.get("guid")), str(exclusion.get("reason")))
    left_out = {}
    for guid in guids:
        if guid in reasons:
            left_out[guid] = reasons[guid]
        elif guid not in members:
            left_out[guid] = "not known to otad"
    return left_out


# --------------------------------------------------------------------------- human output


def _when(at: Any) -> str:
    return iso_time(float(at)) if isinstance(at, (int, float)) else "-"


def format_plan(plan: dict[str, Any], *, verbose: bool = False, asked: Sequence[str] = ()) -> str:
    """``campaign plan``: targets per stage, exclusions by reason, WAN bytes, the estimate."""
    payload = plan.get("payload") or {}
    what = str(payload.get("kind", "?"))
    if payload.get("image"):
        what += f" {str(payload['image'])[:12]}"
    if payload.get("fw_version"):
        what += f" fw 0x{int(payload['fw_version']):08x}"
    lines = [
        f"plan {plan.get('id', '?')}: {what}: {plan.get('targets', 0)} target(s)"
        f" at {plan.get('hubs', 0)} premises"
    ]
    estimate = plan.get("estimate") or {}
    timing = {str(s.get("name")): s for s in estimate.get("stages") or []}
    rows = []
    for stage in plan.get("stages") or []:
        est = timing.get(str(stage.get("name")), {})
        rows.append(
            [
                str(stage.get("name", "")),
                str(stage.get("kind", "")),
                str(stage.get("targets", 0)),
                str(stage.get("hubs", 0)),
                f"+{format_duration(est.get('start_s'))}",
                format_duration(est.get("distribute_s")),
                format_duration(est.get("activate_s")),
                format_duration(est.get("soak_s")),
                format_duration(est.get("total_s")),
            ]
        )
    headers = [
        "STAGE", "KIND", "TARGETS", "HUBS", "STARTS", "DISTRIBUTE", "ACTIVATE", "SOAK", "TOTAL",
    ]  # fmt: skip
    lines.append(table(headers, rows))
    wan = int(plan.get("wan_bytes") or 0)
    lines.append(f"WAN: {format_bytes(wan)} ({wan} bytes, image x distinct CHs)")
    lines.append(f"estimate: {format_duration(estimate.get('total_s'))} in all")
    lines += [f"  assuming {a}" for a in estimate.get("assumptions") or []]
    exclusions = plan.get("exclusions") or []
    summary = plan.get("exclusions_by_reason")
    if isinstance(summary, dict) and summary:
        lines.append(f"excluded: {sum(int(n) for n in summary.values())}")
        for reason, n in sorted(summary.items(), key=lambda kv: (-int(kv[1]), kv[0])):
            lines.append(f"  {int(n):>7}  {reason}")
    elif exclusions:
        lines.append(f"excluded: {len(exclusions)}")
        by_reason = Counter(str(e.get("reason")) for e in exclusions)
        for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:>7}  {reason}")
            if verbose:
                lines += [
                    f"           {_excluded_one(e)}"
                    for e in exclusions
                    if str(e.get("reason")) == reason
                ]
    else:
        lines.append("excluded: none")
    left_out = requested_but_left_out(asked, plan)
    if left_out:
        lines.append(f"{len(left_out)} of the {len(asked)} GUID(s) named are left out:")
        lines += [f"  {guid}: {reason}" for guid, reason in left_out.items()]
    return "\n".join(lines)


def _excluded_one(exclusion: dict[str, Any]) -> str:
    guid, device = exclusion.get("guid"), exclusion.get("device_id")
    return str(guid) if device in (None, guid) else f"{guid} device {device}"


def format_decisions(result: dict[str, Any]) -> str:
    """What a command led to: the campaign's state, then one line per decision."""
    lines = [f"campaign {result.get('id', '?')}: {str(result.get('state', '?')).upper()}"]
    for decision in result.get("decisions") or []:
        entry = campaignview.LogEntry.from_history(decision)
        lines.append(f"  {_when(decision.get('at'))}  {entry.line().split('  ', 1)[-1]}")
    return "\n".join(lines)


def format_list(rows: list[dict[str, Any]]) -> str:
    """``campaign list`` as a table."""
    table_rows = []
    for r in rows:
        payload = r.get("payload") or {}
        what = str(payload.get("kind", "?"))
        if payload.get("image"):
            what += f" {str(payload['image'])[:12]}"
        table_rows.append(
            [
                str(r.get("id", "")),
                str(r.get("state", "")).upper(),
                str(r.get("stage") or "-"),
                what,
                str(r.get("targets", 0)),
                str(r.get("confirmed", 0)),
                str(r.get("failed", 0)),
                _when(r.get("created_at")),
                _when(r.get("updated_at")),
            ]
        )
    headers = [
        "ID", "STATE", "STAGE", "PAYLOAD", "TARGETS", "CONFIRMED", "FAILED", "CREATED", "UPDATED",
    ]  # fmt: skip
    return f"{table(headers, table_rows)}\n{len(rows)} campaign(s)"


def format_history(rows: list[dict[str, Any]]) -> str:
    """``campaign history``: the audit trail as a table (times in ISO 8601 UTC)."""
    table_rows = [
        [
            _when(r.get("at")),
            str(r.get("kind", "")),
            str(r.get("stage") or "-"),
            str(r.get("actor") or "-"),
            str(r.get("reason") or "-"),
        ]
        for r in rows
    ]
    return f"{table(['AT', 'KIND', 'STAGE', 'ACTOR', 'REASON'], table_rows)}\n{len(rows)} entries"


_EVENT_SHOWN_FIRST: Final = ("v", "seq", "key", "kind", "time", "time_iso", "campaign")


def format_event(event: dict[str, Any]) -> str:
    """One event on one line: time, seq, kind, campaign, then its other fields."""
    when = event.get("time_iso") or _when(event.get("time"))
    head = f"{when}  #{event.get('seq', '?')}  {event.get('kind', '?')}"
    if event.get("campaign"):
        head += f"  [{event['campaign']}]"
    rest = [
        f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}"
        for k, v in event.items()
        if k not in _EVENT_SHOWN_FIRST
    ]
    return "  ".join([head, *rest]) if rest else head


def event_matches(event: dict[str, Any], campaign: str | None, kinds: Sequence[str]) -> bool:
    """Whether ``event`` passes the ``--campaign`` and ``--kind`` filters."""
    if campaign is not None and event.get("campaign") != campaign:
        return False
    return not kinds or event.get("kind") in kinds


def event_filters(kinds: Sequence[str]) -> list[str]:
    """The topics ``events --follow`` subscribes to: only the kinds asked for, else every event
    (``ota/v1/events/+`` and, for those about one CH, ``ota/v1/events/+/+``)."""
    prefix = f"{topics.ROOT}/events"
    if not kinds:
        return [f"{prefix}/+", f"{prefix}/+/+"]
    return [f for kind in kinds for f in (f"{prefix}/{kind}", f"{prefix}/{kind}/+")]


# --------------------------------------------------------------------------- the parser


def _add_spec_flags(parser: argparse.ArgumentParser) -> None:
    spec = parser.add_argument_group("the campaign (overriding --spec)")
    spec.add_argument("--spec", metavar="FILE", help="a campaign spec, JSON or TOML (.toml)")
    spec.add_argument("--id", type=_campaign_id, help="campaign id (default: otad makes one)")
    spec.add_argument("--image", metavar="IMAGE", help="image SHA-256 or a unique hex prefix")
    spec.add_argument(
        "--mode",
        type=lambda t: _kind(t, PAYLOAD_KINDS, "mode"),
        metavar="MODE",
        help=f"one of {', '.join(PAYLOAD_KINDS)} (default image)",
    )
    spec.add_argument(
        "--device-type",
        choices=[d.value for d in DeviceType],
        metavar="TYPE",
        help="default: the image's",
    )
    spec.add_argument("--hw-min", type=_int, help="lowest hardware version (default: manifest's)")
    spec.add_argument("--hw-max", type=_int, help="highest hardware version")
    spec.add_argument(
        "--fw-version", type=_int, action="append", metavar="VERSION",
        help="only devices running this firmware now (repeat)",
    )  # fmt: skip
    spec.add_argument("--supplier", action="append", help="only this supplier's (repeat)")
    spec.add_argument("--segment", action="append", help="only this segment (repeat)")
    spec.add_argument("--guid", action="append", metavar="GUID", help="only this premises (repeat)")
    spec.add_argument("--guids-file", metavar="FILE", help="GUIDs, one a line (# comments)")
    spec.add_argument(
        "--alt-han",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only premises with (--alt-han) or without (--no-alt-han) an Alt HAN bridge",
    )
    spec.add_argument(
        "--stage", type=parse_stage, action="append", metavar="NAME:KIND[:SIZE|SHARE%]",
        help="a stage (repeat, in order; KIND micro_pilot, pilot or rollout; no size: the rest)."
        " Default: micro-pilot:micro_pilot:15, pilot:pilot:5000, roll-out:rollout",
    )  # fmt: skip
    spec.add_argument("--window", metavar="CRON", help="activation window, e.g. '* 1-3 * * *'")
    spec.add_argument("--timezone", metavar="TZ", help="of the window (default Europe/London)")
    spec.add_argument("--rate", type=_positive_float, metavar="N", help="CHs started per minute")
    spec.add_argument(
        "--ramp", type=parse_ramp, metavar="FACTOR:EVERY[:MAX]",
        help="multiply the rate by FACTOR after every EVERY confirmations, up to MAX a minute",
    )  # fmt: skip
    spec.add_argument(
        "--deadline", type=parse_deadline, action="append", metavar="PHASE=SECONDS",
        help=f"phase deadline (repeat; PHASE {', '.join(DEADLINE_PHASES)}; 6h, 90m, none)",
    )  # fmt: skip
    spec.add_argument(
        "--threshold", type=parse_threshold, action="append", metavar="NAME=VALUE",
        help="hold threshold (repeat): category1_limit=0, failed_rate=2%%, min_sample=20...",
    )  # fmt: skip
    spec.add_argument(
        "--auto-gate", type=parse_seconds, metavar="SOAK_S",
        help="GO automatically after this soak when the thresholds hold (e.g. 30m)",
    )  # fmt: skip
    spec.add_argument(
        "--lost-after", type=parse_seconds, metavar="SECONDS",
        help="an activated device whose CH stays offline this long is a category-1 incident"
             " (default 1h)",
    )  # fmt: skip
    spec.add_argument(
        "--requires-ch-fw", type=_int, metavar="VERSION",
        help="targets wait until their CH runs this firmware (SECMP0007)",
    )  # fmt: skip
    spec.add_argument("--seed", type=_int, help="seed of the stage membership")


def _add_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("campaign_id", type=_campaign_id, metavar="ID")


def add_parser(groups: _Subparsers) -> None:
    """Register ``otactl campaign ACTION ...`` (every leaf sets ``command="campaign"``)."""
    from otad.ctl import _add_daemon_options  # otactl's connection options, one home

    campaign = groups.add_parser("campaign", help="staged roll-outs: plan, run, gate, watch")
    actions = campaign.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        _add_daemon_options(parser, json_flag=True)
        parser.set_defaults(command="campaign")
        return parser

    plan = leaf("plan", "dry run: targets per stage, exclusions, WAN bytes, duration estimate")
    _add_spec_flags(plan)
    plan.add_argument("--verbose", "-v", action="store_true", help="list every exclusion")
    plan.add_argument("--summary", action="store_true",
                      help="counts instead of every target and exclusion (a national fleet's "
                      "plan in full is too large for one control answer)")  # fmt: skip
    _add_spec_flags(leaf("create", "create a campaign (nothing starts until `start`)"))
    _add_id(leaf("start", "start the first stage"))
    approve = leaf("approve", "a recorded GO: at a gate the next stage starts; on hold, resumes")
    _add_id(approve)
    approve.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    hold = leaf("hold", "a NO-GO at a gate, or pause a running campaign")
    _add_id(hold)
    hold.add_argument("--reason", required=True, help="why (recorded)")
    _add_id(leaf("resume", "resume a paused campaign (a threshold hold needs `approve`)"))
    abort = leaf("abort", "cancel what has not started activating; activated devices stay")
    _add_id(abort)
    abort.add_argument("--reason", required=True, help="why (recorded)")
    _add_id(leaf("notice", "record that the roll-out notice was published (7 days run)"))
    expedite = leaf("expedite", "waive the notice for an urgent security fix: two approvers")
    _add_id(expedite)
    which = expedite.add_mutually_exclusive_group(required=True)
    which.add_argument("--justification", help="first approver: why it is urgent")
    which.add_argument(
        "--approve", action="store_true", help="second approver (not the first) approves"
    )
    retry = leaf("retry", "a child campaign of the FAILED and TIMED_OUT targets")
    _add_id(retry)
    retry.add_argument("--new-id", type=_campaign_id, metavar="ID", help="the child's id")
    _add_id(leaf("status", "one campaign: stages, counts, rate, ETA, state"))
    leaf("list", "every campaign")
    _add_id(leaf("history", "the audit trail: who decided what, when, why"))
    events = leaf("events", "campaign events: replay from --since, or --follow live")
    events.add_argument("--campaign", type=_campaign_id, metavar="ID", help="only this campaign's")
    events.add_argument(
        "--kind", action="append", default=[], metavar="KIND", help="only this kind (repeat)"
    )
    events.add_argument("--since", type=_int, metavar="SEQ", help="replay from this sequence")
    events.add_argument(
        "--limit", type=_int, default=EVENTS_DEFAULT_LIMIT, metavar="N",
        help=f"at most N events replayed (default {EVENTS_DEFAULT_LIMIT})",
    )  # fmt: skip
    events.add_argument("--follow", "-f", action="store_true", help="then print live events")
    _add_id(leaf("watch", "live view until the campaign completes or aborts (Ctrl-C leaves)"))


# --------------------------------------------------------------------------- the commands


@dataclass(frozen=True, slots=True)
class _Io:
    out: TextIO
    err: TextIO
    links: Links


def _emit(io: _Io, args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    text = json.dumps(result, indent=2, sort_keys=True) if args.json else human(result)
    io.out.write(text + "\n")
    io.out.flush()


async def _one(io: _Io, args: argparse.Namespace, cmd: str, call_args: dict[str, Any]) -> Any:
    async with io.links.session(args) as call:
        return await call(cmd, call_args)


#: The actions that are one request with an id and a decisions answer: (cmd, flags -> args).
_MOVES: Final[dict[str, Callable[[argparse.Namespace], tuple[str, dict[str, Any]]]]] = {
    "start": lambda a: ("campaign.start", {"id": a.campaign_id}),
    "approve": lambda a: ("campaign.approve", {"id": a.campaign_id, "reason": a.reason}),
    "hold": lambda a: ("campaign.hold", {"id": a.campaign_id, "reason": a.reason}),
    "resume": lambda a: ("campaign.resume", {"id": a.campaign_id}),
    "abort": lambda a: ("campaign.abort", {"id": a.campaign_id, "reason": a.reason}),
    "notice": lambda a: ("campaign.notice", {"id": a.campaign_id}),
    "expedite": lambda a: (
        ("campaign.expedite.approve", {"id": a.campaign_id})
        if a.approve
        else ("campaign.expedite", {"id": a.campaign_id, "justification": a.justification})
    ),
}


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control request (command, args) an action sends (``events``: its first page;
    ``watch``: none, it follows topics)."""
    action = args.action
    if action == "plan" and args.summary:
        return "campaign.plan", {**build_spec(args), "detail": "summary"}
    if action in ("plan", "create"):
        return f"campaign.{action}", build_spec(args)
    if action in _MOVES:
        return _MOVES[action](args)
    if action == "retry":
        retry_args = {"id": args.campaign_id}
        if args.new_id is not None:
            retry_args["new_id"] = args.new_id
        return "campaign.retry", retry_args
    if action in ("status", "history"):
        return f"campaign.{action}", {"id": args.campaign_id}
    if action == "list":
        return "campaign.list", {}
    if action == "events":
        return "campaign.events", _events_args(args, args.since, args.limit)
    raise CampaignUsageError(f"campaign {action}: no request")


def _events_args(args: argparse.Namespace, since: int | None, limit: int) -> dict[str, Any]:
    call_args: dict[str, Any] = {"limit": max(1, min(limit, EVENTS_PAGE_MAX))}
    if args.campaign is not None:
        call_args["id"] = args.campaign
    if since is not None:
        call_args["since"] = since
    if args.kind:
        call_args["kinds"] = list(args.kind)
    return call_args


async def _replay(
    call: Caller, args: argparse.Namespace, since: int | None, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` events from ``since``, page by page (a page is at most
    :data:`EVENTS_PAGE_MAX`); de-duplicated by ``seq``, so it is right whether otad counts
    ``since`` in or not (a next page starts at the last ``seq`` seen and asks for one more)."""
    events: list[dict[str, Any]] = []
    seen: set[Any] = set()
    overlap = 0
    while len(events) < limit:
        want = min(EVENTS_PAGE_MAX, limit - len(events) + overlap)
        page = await call("campaign.events", _events_args(args, since, want))
        page = [e for e in page or [] if isinstance(e, dict)]
        fresh = [e for e in page if e.get("seq") not in seen]
        seen.update(e.get("seq") for e in fresh)
        events += fresh[: limit - len(events)]
        seqs = [e["seq"] for e in page if isinstance(e.get("seq"), int)]
        if not fresh or len(page) < want or not seqs:
            break
        since, overlap = max(seqs), 1
    return events


async def _events(io: _Io, args: argparse.Namespace) -> Outcome:
    def show(event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True) if args.json else format_event(event)
        io.out.write(line + "\n")
        io.out.flush()

    if not args.follow:
        async with io.links.session(args) as call:
            events = await _replay(call, args, args.since, args.limit)
        _emit(io, args, events, lambda rows: "\n".join(map(format_event, rows)) or "no events")
        return Outcome.OK
    async with io.links.subscribe(args, event_filters(args.kind)) as messages:
        last_seq = -1
        if args.since is not None:
            async with io.links.session(args) as call:
                for event in await _replay(call, args, args.since, args.limit):
                    show(event)
                    last_seq = max(last_seq, int(event.get("seq") or 0))
        while True:
            message = await messages.get()
            event = message.body
            seq = event.get("seq")
            if isinstance(seq, int) and seq <= last_seq:
                continue  # replayed already (or a duplicate on the wire)
            if event_matches(event, args.campaign, args.kind):
                show(event)
            if isinstance(seq, int):
                last_seq = max(last_seq, seq)


async def _watch(io: _Io, args: argparse.Namespace) -> Outcome:
    cid = args.campaign_id
    async with io.links.subscribe(args, campaignview.watch_filters(cid)) as messages:
        async with io.links.session(args) as call:
            status = await call("campaign.status", {"id": cid})
            history = await call("campaign.history", {"id": cid})
        view = campaignview.CampaignView(cid, status, history[-campaignview.LOG_LINES :])
        if args.json:
            final = await _watch_json(io, view, messages)
        else:
            final = await campaignview.watch_campaign(view, messages, io.out)
    return outcome_of("watch", final)


async def _watch_json(
    io: _Io, view: campaignview.CampaignView, messages: asyncio.Queue[Message]
) -> dict[str, Any]:
    """``watch --json``: each newer status as one JSON line, until the campaign ends."""
    shown: dict[str, Any] | None = None
    while True:
        if view.status is not shown:
            shown = view.status
            io.out.write(json.dumps(shown, sort_keys=True) + "\n")
            io.out.flush()
        if view.finished:
            return view.status
        view.received(await messages.get())


async def _dispatch(io: _Io, args: argparse.Namespace) -> Outcome:
    action = args.action
    if action == "watch":
        return await _watch(io, args)
    if action == "events":
        return await _events(io, args)
    cmd, call_args = request_of(args)
    encoded = len(json.dumps(call_args, separators=(",", ":")))
    if encoded > MAX_REQUEST_BYTES - 1024:
        raise CampaignUsageError(
            f"the request is {encoded} bytes, over otad's {MAX_REQUEST_BYTES}: name fewer GUIDs"
        )
    result = await _one(io, args, cmd, call_args)
    if action == "plan":
        asked = explicit_guids(call_args)
        _emit(io, args, result, lambda r: format_plan(r, verbose=args.verbose, asked=asked))
        return outcome_of("plan", result, spec=call_args)
    if action == "list":
        _emit(io, args, result, format_list)
    elif action == "history":
        _emit(io, args, result, format_history)
    elif action in ("create", "status", "retry"):
        _emit(io, args, result, lambda s: "\n".join(_status_lines(s)))
    else:
        _emit(io, args, result, format_decisions)
    return outcome_of(action, result)


def _status_lines(status: dict[str, Any]) -> list[str]:
    return campaignview.render_status(status, now=time.time())


def run(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    links: Links = MQTT_LINKS,
) -> int:
    """Run the parsed ``otactl campaign ...`` command; return its exit status."""
    io = _Io(out or sys.stdout, err or sys.stderr, links)
    try:
        return int(asyncio.run(_dispatch(io, args)))
    except KeyboardInterrupt:
        if args.action in ("watch", "events"):
            return int(Outcome.OK)  # leaving a live view is how it ends
        raise
    except CampaignUsageError as exc:
        io.err.write(f"otactl campaign {args.action}: {exc}\n")
        return int(Outcome.USAGE)
    except (CampaignCallFailed, WatchError) as exc:
        reason = exc.reason if isinstance(exc, CampaignCallFailed) else "UNREACHABLE"
        detail = exc.detail if isinstance(exc, CampaignCallFailed) else str(exc)
        if getattr(args, "json", False):
            io.out.write(json.dumps({"error": reason, "detail": detail}, sort_keys=True) + "\n")
        io.err.write(f"otactl campaign {args.action}: {reason}: {detail}\n")
        return int(Outcome.FAILED)
    except Exception as exc:  # never a traceback for the operator
        io.err.write(
            f"otactl campaign {args.action}: internal error: {type(exc).__name__}: {exc}\n"
        )
        return int(Outcome.FAILED)


def main(
    argv: Sequence[str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    links: Links = MQTT_LINKS,
) -> int:
    """Run one ``otactl`` command line that is a ``campaign`` command (``["--broker", "h:p",
    "campaign", "status", "ID"]``) with its output on ``out``/``err``; return the exit status
    (argparse's usage errors included: 2)."""
    from otad.ctl import build_parser

    err_stream = err or sys.stderr
    try:
        with contextlib.redirect_stderr(err_stream), contextlib.redirect_stdout(out or sys.stdout):
            args = build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else int(Outcome.USAGE)
    if args.command != "campaign":
        err_stream.write("otactl: campaign.main runs campaign commands only\n")
        return int(Outcome.USAGE)
    return run(args, out=out, err=err, links=links)
