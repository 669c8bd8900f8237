"""``otactl campaign watch ID`` (and ``campaign status``): a campaign drawn for people.

:func:`render_status` turns one campaign status (the ``campaign.status`` JSON, also published
retained on ``ota/v1/campaigns/<id>/status``) into lines: a progress bar per stage (confirmed
over targets as ``#``, settled failures as ``x``), counts by state, the measured rate and the
ETA, failures by reason, the state in words with the command that moves it on, and
``STALLED for 2m10s`` -- when the status says so, or when nothing moved for
:data:`STALL_AFTER_S` while running, computed from ``last_change_at`` and the local clock, since
a dead otad publishes nothing --, then a short log of the last decisions.

:func:`watch_campaign` follows the retained status and the campaign's events (it never polls):
it redraws on every message and every second (the clocks move even when otad says nothing) and
returns the last status once the campaign is COMPLETED or ABORTED. Drawing in place on a TTY, or
as plain lines otherwise, is :class:`otad.ctl.live.Screen`'s; the exit status is decided by
:func:`otad.ctl.campaign.outcome_of`, the one place for that.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from otad.ctl.live import Message, Screen
from otad.events import iso_time
from otad.progress import format_duration
from protocol.wire import topics

#: Target states in the order a target passes them (the contract's count keys).
COUNT_KEYS: Final = (
    "pending", "started", "delivered", "held", "activating", "activated", "confirmed",
    "failed", "rejected", "timed_out", "rolled_back", "lost", "cancelled",
)  # fmt: skip
#: Settled states that are failures (what ``campaign retry`` and the ``x`` segments are about).
FAILED_KEYS: Final = ("failed", "rejected", "timed_out", "rolled_back", "lost")
#: Campaign states after which nothing more happens.
FINAL_STATES: Final = frozenset({"completed", "aborted"})
#: Running with no target changing state for this long is shown as STALLED (as otad does).
STALL_AFTER_S: Final = 60.0
#: otad republishes an active campaign's status at least every 10 s; silence beyond this is news.
SILENT_AFTER_S: Final = 30.0
#: Decisions kept in the view's log.
LOG_LINES: Final = 5
CAMPAIGN_EVENT_PREFIX: Final = "campaign."


def status_topic(campaign_id: str) -> str:
    """The retained status topic of one campaign (SPEC §3: protocol.wire.topics)."""
    return topics.campaign_status(campaign_id)


def failed_count(counts: dict[str, Any]) -> int:
    """Targets that settled as failures (FAILED, REJECTED, TIMED_OUT, ROLLED_BACK, LOST)."""
    return sum(int(counts.get(k) or 0) for k in FAILED_KEYS)


def stage_bar(confirmed: int, failed: int, total: int, width: int = 30) -> str:
    """``[####xx----]``: confirmed, then settled failures, then what is left, out of ``total``."""
    if total <= 0:
        return "[" + "-" * width + "]"
    done = min(width, round(width * confirmed / total))
    bad = min(width - done, round(width * failed / total))
    if failed and not bad and done < width:
        bad = 1  # one failure of a large stage still shows
    return "[" + "#" * done + "x" * bad + "-" * (width - done - bad) + "]"


def stalled_for(status: dict[str, Any], now: float) -> float | None:
    """Seconds the campaign has been stalled at ``now`` (wall clock), or None: otad's
    ``stalled_s`` brought forward to now, or, while running, the time since ``last_change_at``
    once it reaches :data:`STALL_AFTER_S`."""
    if status.get("state") != "running":
        return None
    last = status.get("last_change_at")
    idle = now - float(last) if isinstance(last, (int, float)) else None
    reported = status.get("stalled_s")
    published = status.get("published_at")
    if reported is None and status.get("wan") and isinstance(published, (int, float)):
        # otad saw its WAN transfers move when it published this: idle only since then
        idle = now - float(published)
    if isinstance(reported, (int, float)):
        updated = status.get("updated_at")
        since = now - float(updated) if isinstance(updated, (int, float)) else 0.0
        return max(float(reported) + max(0.0, since), idle or 0.0)
    if idle is not None and idle >= STALL_AFTER_S:
        return idle
    return None


def state_words(status: dict[str, Any], now: float) -> str:
    """The campaign's state in words, with the command that moves it on."""
    state = str(status.get("state", "?"))
    cid = status.get("id", "ID")
    failed = failed_count(status.get("counts") or {})
    if state == "created":
        return f"CREATED: nothing started yet; run `otactl campaign start {cid}`"
    if state == "running":
        return "RUNNING"
    if state == "awaiting_gate":
        return (
            f"AWAITING GATE after stage {status.get('stage')}: run"
            f" `otactl campaign approve {cid} --reason ...` (or `hold` for a NO-GO)"
        )
    if state == "awaiting_notice":
        not_before = status.get("rollout_not_before")
        if status.get("notice_at") is None or not isinstance(not_before, (int, float)):
            return (
                f"AWAITING NOTICE: none published; run `otactl campaign notice {cid}`"
                " (or `expedite` for an urgent security fix)"
            )
        return (
            f"AWAITING NOTICE until {iso_time(not_before)}"
            f" (in {format_duration(max(0.0, not_before - now))})"
        )
    if state == "on_hold":
        return (
            f"ON HOLD: {status.get('hold_reason') or '?'}; a recorded GO resumes it:"
            f" `otactl campaign approve {cid} --reason ...`"
        )
    if state == "paused":
        return (
            f"PAUSED: {status.get('hold_reason') or 'by an operator'};"
            f" `otactl campaign resume {cid}`"
        )
    if state == "completed":
        if failed:
            return f"COMPLETED with {failed} failed target(s): `otactl campaign retry {cid}`"
        return "COMPLETED"
    if state == "aborted":
        reason = status.get("hold_reason")
        return f"ABORTED: {reason}" if reason else "ABORTED"
    return state.upper()


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One decision of the campaign, from its history or a live campaign event."""

    at: float
    kind: str
    stage: str
    actor: str
    reason: str

    @classmethod
    def from_history(cls, entry: dict[str, Any]) -> LogEntry:
        """From a ``campaign.history`` row: ``{seq, at, kind, stage, actor, reason}``."""
        return cls(
            float(entry.get("at") or 0.0),
            _bare_kind(str(entry.get("kind", "?"))),
            str(entry.get("stage") or ""),
            str(entry.get("actor") or ""),
            str(entry.get("reason") or ""),
        )

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> LogEntry:
        """From a campaign event as published on ``ota/v1/events/campaign.<kind>``."""
        at = event.get("at", event.get("time"))
        return cls(
            float(at) if isinstance(at, (int, float)) else 0.0,
            _bare_kind(str(event.get("kind", "?"))),
            str(event.get("stage") or ""),
            str(event.get("actor") or ""),
            str(event.get("reason") or ""),
        )

    def line(self) -> str:
        """``02:01:13Z  gate_decided  pilot  by alice: looks good``."""
        when = iso_time(self.at)[11:19] + "Z" if self.at else "?"
        parts = [when, self.kind]
        if self.stage:
            parts.append(self.stage)
        text = "  ".join(parts)
        if self.actor:
            text += f"  by {self.actor}"
        if self.reason:
            text += f": {self.reason}"
        return text


def _bare_kind(kind: str) -> str:
    return kind.removeprefix(CAMPAIGN_EVENT_PREFIX)


def render_status(
    status: dict[str, Any],
    *,
    now: float,
    log: Iterable[LogEntry] = (),
    otad_offline: bool = False,
    width: int = 30,
) -> list[str]:
    """The lines showing ``status`` at wall time ``now`` (see the module docstring)."""
    cid = status.get("id", "?")
    payload = status.get("payload") or {}
    image = str(payload.get("image") or "")
    what = str(payload.get("kind", "?"))
    if image:
        what += f" {image[:12]}"
    if isinstance(payload.get("fw_version"), int) and payload.get("fw_version"):
        what += f" fw 0x{payload['fw_version']:08x}"
    head = f"campaign {cid}: {what}"
    if status.get("parent"):
        head += f" (retry of {status['parent']})"
    lines = [head]
    stages = status.get("stages") or []
    name_width = max((len(str(s.get("name", ""))) for s in stages), default=0)
    for stage in stages:
        counts = stage.get("counts") or {}
        total = int(stage.get("targets") or 0)
        confirmed = int(counts.get("confirmed") or 0)
        failed = failed_count(counts)
        pct = 100.0 * confirmed / total if total else 0.0
        mark = ">" if stage.get("name") == status.get("stage") else " "
        bar = stage_bar(confirmed, failed, total, width)
        text = (
            f"{mark} {stage.get('name', '')!s:<{name_width}}  {bar}"
            f" {pct:5.1f}%  {confirmed}/{total} confirmed"
        )
        if failed:
            text += f", {failed} failed"
        gate = stage.get("gate")
        if gate:
            text += f"  gate {str(gate).upper().replace('_', '-')}"
        elif stage.get("settled_at") is not None:
            text += "  settled"
        elif stage.get("started_at") is None:
            text += "  not started"
        lines.append(text)
    counts = status.get("counts") or {}
    shown = [f"{k} {counts[k]}" for k in COUNT_KEYS if counts.get(k)]
    shown += [f"{k} {n}" for k, n in sorted(counts.items()) if k not in COUNT_KEYS and n]
    lines.append(
        f"targets {status.get('targets', 0)} (excluded {status.get('excluded', 0)},"
        f" blocked by dependency {status.get('blocked', 0)})"
    )
    lines.append(f"  {', '.join(shown) or 'none'}")
    rate = status.get("confirmed_per_minute")
    pacing = status.get("rate_per_minute")
    rate_text = f"rate {float(rate):.1f} confirmed/min" if isinstance(rate, (int, float)) else ""
    if isinstance(pacing, (int, float)):
        rate_text += f" (pacing {float(pacing):g} started/min)"
    stalled = stalled_for(status, now)
    if stalled is not None:
        when = f"STALLED for {format_duration(stalled)}"
    elif status.get("state") == "running":
        when = f"ETA {format_duration(status.get('eta_s'))} (stage {status.get('stage')})"
    else:
        when = ""
    lines.append("  ".join(t for t in (rate_text.strip(), when) if t) or "rate -")
    wan = status.get("wan")
    if isinstance(wan, dict) and wan.get("blocks_total"):
        acked, total = int(wan.get("blocks_acked", 0)), int(wan["blocks_total"])
        lines.append(f"WAN: {acked:,} of {total:,} blocks of the active transfers acknowledged"
                     f" ({acked / total:.0%})")  # fmt: skip
    failures = status.get("failures") or {}
    if failures:
        ranked = sorted(failures.items(), key=lambda kv: (-int(kv[1]), kv[0]))
        lines.append("failures: " + ", ".join(f"{reason} {n}" for reason, n in ranked))
    lines.append(state_words(status, now))
    updated = status.get("updated_at")
    if otad_offline:
        lines.append(
            "otad is OFFLINE (its retained status says so): nothing moves until it is back"
        )
    elif (
        status.get("state") not in FINAL_STATES
        and isinstance(updated, (int, float))
        and now - updated >= SILENT_AFTER_S
    ):
        lines.append(
            f"no status from otad for {format_duration(now - updated)}"
            " (is it running and connected to this broker?)"
        )
    entries = list(log)
    if entries:
        lines.append("last decisions:")
        lines += [f"  {e.line()}" for e in entries]
    return lines


class CampaignView:
    """What ``watch`` knows of one campaign: its latest status, its last decisions, whether otad
    is online. Feed it messages (:meth:`received`); draw :meth:`render`."""

    def __init__(
        self, campaign_id: str, status: dict[str, Any], history: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Start from a status and history otad answered (``campaign.status``/``.history``)."""
        self.campaign_id = campaign_id
        self.status = status
        self.otad_offline = False
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=LOG_LINES)
        for entry in history:
            self._note(LogEntry.from_history(entry))

    def _note(self, entry: LogEntry) -> None:
        key = (entry.kind, entry.stage, entry.actor, entry.reason, round(entry.at))
        if any((e.kind, e.stage, e.actor, e.reason, round(e.at)) == key for e in self.log):
            return  # the same decision from the history and its live event
        self.log.append(entry)

    @property
    def finished(self) -> bool:
        """The campaign completed or was aborted."""
        return self.status.get("state") in FINAL_STATES

    def received(self, message: Message) -> bool:
        """Take one message in; return whether the campaign's state (or otad's) changed."""
        body = message.body
        if message.topic == topics.OTAD_STATUS:
            offline = body.get("state") != "online"
            changed = offline != self.otad_offline
            self.otad_offline = offline
            return changed
        if message.topic == status_topic(self.campaign_id):
            if body.get("id") != self.campaign_id:
                return False
            if float(body.get("updated_at") or 0) < float(self.status.get("updated_at") or 0):
                return False  # an older copy (the retained one, after the answer we asked for)
            changed = body.get("state") != self.status.get("state")
            self.status = body
            return changed
        kind = str(body.get("kind", ""))
        if kind.startswith(CAMPAIGN_EVENT_PREFIX) and body.get("campaign") == self.campaign_id:
            self._note(LogEntry.from_event(body))
        return False

    def render(self, now: float) -> list[str]:
        """The view's lines at wall time ``now``."""
        return render_status(self.status, now=now, log=self.log, otad_offline=self.otad_offline)


def watch_filters(campaign_id: str) -> list[str]:
    """What ``watch`` subscribes to: the campaign's retained status, otad's (to tell when it is
    offline), and the events without a CH level (the campaign's own are among them)."""
    return [status_topic(campaign_id), topics.OTAD_STATUS, f"{topics.ROOT}/events/+"]


async def watch_campaign(
    view: CampaignView,
    messages: asyncio.Queue[Message],
    out: TextIO,
    *,
    tty: bool | None = None,
    tick_s: float = 1.0,
    plain_interval: float = 10.0,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Draw ``view`` as messages arrive (and every ``tick_s``) until the campaign completes or is
    aborted; return its last status. Ctrl-C ends it from outside (``KeyboardInterrupt``)."""
    screen = Screen(out, tty=tty, plain_interval=plain_interval)
    screen.draw(view.render(clock()), force=True)
    while not view.finished:
        try:
            message: Message | None = await asyncio.wait_for(messages.get(), tick_s)
        except TimeoutError:
            message = None
        changed = view.received(message) if message is not None else False
        screen.draw(view.render(clock()), force=changed or view.finished)
    return view.status
