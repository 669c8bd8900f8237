"""otactl campaign: what each command sends to otad for given flags, how it shows the answers,
and its exit status (0 ok, 1 failed, 2 usage, 3 partial)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from campaignjson import GUIDS, IMAGE, T0, decisions, event, history, plan, status

from otad.ctl import campaign
from otad.ctl.campaign import (
    CampaignCallFailed,
    Links,
    Outcome,
    format_history,
    format_list,
    format_plan,
    outcome_of,
)
from otad.ctl.campaignview import status_topic
from otad.ctl.live import Message
from protocol.wire import topics


class _Ctrl_C(asyncio.Queue[Message]):  # noqa: N801 - what it does
    """A feed that, once empty, raises KeyboardInterrupt as Ctrl-C would."""

    async def get(self) -> Message:
        if self.empty():
            raise KeyboardInterrupt
        return self.get_nowait()


class Otad:
    """otad's control side as the contract shapes it: records every request and answers it from
    recorded JSON (an answer may be a function of the args, or an exception to raise)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.filters: list[list[str]] = []
        self.feed: asyncio.Queue[Message] | None = None
        self.links = Links(session=self._session, subscribe=self._subscribe)

    async def call(self, cmd: str, args: dict[str, Any]) -> Any:
        self.requests.append((cmd, json.loads(json.dumps(args))))  # as it goes on the wire
        answer = self.answers[cmd]
        if isinstance(answer, Exception):
            raise answer
        return answer(args) if callable(answer) else answer

    @contextlib.asynccontextmanager
    async def _session(self, args: argparse.Namespace) -> AsyncIterator[Any]:
        yield self.call

    @contextlib.asynccontextmanager
    async def _subscribe(
        self, args: argparse.Namespace, filters: Any
    ) -> AsyncIterator[asyncio.Queue[Message]]:
        self.filters.append(list(filters))
        assert self.feed is not None
        yield self.feed


def run(otad: Otad, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = campaign.main(["campaign", *argv], out=out, err=err, links=otad.links)
    return code, out.getvalue(), err.getvalue()


def sent(*argv: str, answer: Any = None) -> tuple[str, dict[str, Any]]:
    """The one request ``otactl campaign ARGV`` sends."""
    otad = Otad(dict.fromkeys(_COMMANDS, answer if answer is not None else decisions()))
    code, _, err = run(otad, *argv)
    assert code == 0, err
    assert len(otad.requests) == 1
    return otad.requests[0]


_COMMANDS = [
    "campaign.plan", "campaign.create", "campaign.start", "campaign.approve", "campaign.hold",
    "campaign.resume", "campaign.abort", "campaign.notice", "campaign.expedite",
    "campaign.expedite.approve", "campaign.retry", "campaign.status", "campaign.list",
    "campaign.history", "campaign.events",
]  # fmt: skip


# --------------------------------------------------------------------------- the spec


def test_every_spec_flag_lands_where_the_contract_puts_it() -> None:
    cmd, spec = sent(
        "create", "--id", "fw-2026-12-ch", "--image", IMAGE[:12],
        "--mode", "distribute-then-activate",
        "--device-type", "ESME", "--hw-min", "1", "--hw-max", "0x0004",
        "--fw-version", "0x01020300", "--fw-version", "16909057",
        "--supplier", "S1", "--supplier", "S2", "--segment", "north", "--guid", GUIDS[0].lower(),
        "--no-alt-han",
        "--stage", "micro-pilot:micro_pilot:15", "--stage", "pilot:pilot:10%",
        "--stage", "roll-out:roll-out",
        "--window", "* 1-3 * * *", "--timezone", "Europe/London", "--rate", "30",
        "--ramp", "1.5:100:600", "--deadline", "wan_delivery=6h", "--deadline", "activation=none",
        "--threshold", "failed_rate=2%", "--threshold", "min_sample=20",
        "--threshold", "category1_limit=0", "--auto-gate", "30m", "--requires-ch-fw", "0x02000000",
        "--seed", "7",
        answer=status(),
    )  # fmt: skip
    assert cmd == "campaign.create"
    assert spec == {
        "id": "fw-2026-12-ch",
        "payload": {"kind": "distribute_then_activate", "image": IMAGE[:12]},
        "select": {
            "device_type": "ESME",
            "hw_min": 1,
            "hw_max": 4,
            "fw_versions": [0x01020300, 16909057],
            "suppliers": ["S1", "S2"],
            "segments": ["north"],
            "guids": [GUIDS[0]],
            "alt_han": False,
        },
        "stages": [
            {"name": "micro-pilot", "kind": "micro_pilot", "size": 15},
            {"name": "pilot", "kind": "pilot", "share": 0.1},
            {"name": "roll-out", "kind": "rollout"},
        ],
        "policies": {
            "window": "* 1-3 * * *",
            "timezone": "Europe/London",
            "rate_per_minute": 30.0,
            "ramp_factor": 1.5,
            "ramp_every": 100,
            "max_per_minute": 600.0,
            "deadlines": {"wan_delivery_s": 21600.0, "activation_s": None},
            "thresholds": {"failed_rate": 0.02, "min_sample": 20, "category1_limit": 0},
            "auto_gate_soak_s": 1800.0,
            "requires_ch_fw": 0x02000000,
        },
        "seed": 7,
    }


def test_a_bare_plan_sends_only_the_image_and_leaves_the_defaults_to_otad() -> None:
    assert sent("plan", "--image", "9f86", answer=plan()) == (
        "campaign.plan",
        {"payload": {"kind": "image", "image": "9f86"}},
    )
    assert sent("plan", "--mode", "credentials", "--device-type", "ESME", answer=plan()) == (
        "campaign.plan",
        {"payload": {"kind": "credentials"}, "select": {"device_type": "ESME"}},
    )


def test_a_toml_spec_file_with_flags_over_it(tmp_path: Path) -> None:
    spec_file = tmp_path / "campaign.toml"
    spec_file.write_text(
        'id = "fw-2026-12-ch"\nseed = 3\n'
        '[payload]\nkind = "image"\nimage = "9f86"\n'
        '[select]\nsuppliers = ["S1"]\n'
        '[[stages]]\nname = "pilot"\nkind = "pilot"\nsize = 5000\n'
        '[[stages]]\nname = "roll-out"\nkind = "rollout"\n'
        '[policies]\nrate_per_minute = 60\n'
        '[policies.thresholds]\nfailed_rate = 0.05\ntimed_out_rate = 0.1\n'
    )  # fmt: skip
    _, spec = sent(
        "plan", "--spec", str(spec_file), "--supplier", "S2", "--threshold", "failed_rate=0.01",
        answer=plan(),
    )  # fmt: skip
    assert spec == {
        "id": "fw-2026-12-ch",
        "seed": 3,
        "payload": {"kind": "image", "image": "9f86"},
        "select": {"suppliers": ["S2"]},
        "stages": [
            {"name": "pilot", "kind": "pilot", "size": 5000},
            {"name": "roll-out", "kind": "rollout"},
        ],
        "policies": {
            "rate_per_minute": 60,
            "thresholds": {"failed_rate": 0.01, "timed_out_rate": 0.1},
        },
    }


def test_a_json_spec_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "campaign.json"
    body = {"payload": {"kind": "image", "image": "9f86"}, "select": {"guids": GUIDS[:2]}}
    spec_file.write_text(json.dumps(body))
    assert sent("create", "--spec", str(spec_file), answer=status()) == ("campaign.create", body)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ('payload = {kind = "image", image = "9f"}\nstage = 1\n', "c.toml", "unknown key 'stage'"),
        ('[payload]\nkind = "image"\nimage = "9f"\n[policies]\nrate = 5\n', "c.toml",
         "unknown key 'rate' in [policies]"),
        ('{"payload": {"kind": "image", "image": "9f"}, "policies": {"thresholds": {"x": 1}}}',
         "c.json", "unknown key 'x' in [policies.thresholds]"),
        ("[payload\n", "c.toml", "not a valid spec file"),
        ('[[stages]]\nname = "p"\nkind = "pilot"\ncount = 5\n', "c.toml",
         "unknown key 'count' in [stages]"),
        ('{"stages": {"name": "p"}}', "c.json", "stages is a list of tables"),
        ("[1, 2]", "c.json", "a spec is an object"),
        ('{"select": 3, "payload": {"kind": "credentials"}}', "c.json", "select is a table"),
    ],
)  # fmt: skip
def test_a_bad_spec_file_is_a_usage_error_naming_what_is_wrong(
    tmp_path: Path, content: str, name: str, message: str
) -> None:
    spec_file = tmp_path / name
    spec_file.write_text(content)
    otad = Otad({})
    code, out, err = run(otad, "plan", "--spec", str(spec_file))
    assert (code, otad.requests) == (2, [])
    assert message in err
    assert "Traceback" not in err + out


def test_a_missing_spec_file_and_a_missing_image_are_usage_errors(tmp_path: Path) -> None:
    otad = Otad({})
    code, _, err = run(otad, "plan", "--spec", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "nope.toml" in err
    code, _, err = run(otad, "create", "--supplier", "S1")
    assert code == 2
    assert "needs --image" in err
    code, _, err = run(otad, "create", "--mode", "credentials", "--image", "9f86")
    assert code == 2
    assert "takes no --image" in err
    assert otad.requests == []


def test_guids_from_a_file_and_flags_merged_in_order_without_repeats(tmp_path: Path) -> None:
    listing = tmp_path / "pilot.txt"
    listing.write_text(f"# pilot premises\n{GUIDS[1]}\n\n{GUIDS[2].lower()}  # shop\n{GUIDS[0]}\n")
    _, spec = sent(
        "plan", "--image", "9f86", "--guid", GUIDS[0], "--guids-file", str(listing), answer=plan()
    )
    assert spec["select"] == {"guids": [GUIDS[0], GUIDS[1], GUIDS[2]]}


@pytest.mark.parametrize(
    ("content", "message"),
    [("00DB1234\n", "pilot.txt:1: '00DB1234' is not a GUID"),
     (f"{GUIDS[0]}\nnot-a-guid\n", "pilot.txt:2:"),
     ("# nothing\n\n", "no GUID in it")],
)  # fmt: skip
def test_a_bad_guids_file_is_a_usage_error_with_its_line(
    tmp_path: Path, content: str, message: str
) -> None:
    listing = tmp_path / "pilot.txt"
    listing.write_text(content)
    otad = Otad({})
    code, _, err = run(otad, "plan", "--image", "9f86", "--guids-file", str(listing))
    assert (code, otad.requests) == (2, [])
    assert message in err


def test_a_guid_list_over_the_request_limit_is_refused_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # otad's real limit is ~92 MB (about 4.8 million GUIDs); the same check at a small limit
    monkeypatch.setattr(campaign, "MAX_REQUEST_BYTES", 20_000)
    listing = tmp_path / "fleet.txt"
    fits = 20_000 // 19 - 100  # '"XXXXXXXXXXXXXXXX",' is 19 bytes
    listing.write_text("".join(f"{i:016X}\n" for i in range(fits)))
    assert len(sent("create", "--image", "9f86", "--guids-file", str(listing),
                    answer=status())[1]["select"]["guids"]) == fits  # fmt: skip
    listing.write_text("".join(f"{i:016X}\n" for i in range(fits + 100)))
    otad = Otad({})
    code, _, err = run(otad, "create", "--image", "9f86", "--guids-file", str(listing))
    assert (code, otad.requests) == (2, [])
    assert "over otad's 20000: name fewer GUIDs" in err


def test_a_guids_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(campaign, "MAX_SPEC_BYTES", 1_000)
    listing = tmp_path / "fleet.txt"
    listing.write_text("".join(f"{i:016X}\n" for i in range(60)))  # 1,020 bytes
    otad = Otad({})
    code, _, err = run(otad, "plan", "--image", "9f86", "--guids-file", str(listing))
    assert (code, otad.requests) == (2, [])
    assert "fleet.txt" in err


@pytest.mark.parametrize(
    "flag",
    [
        ["--stage", "pilot"], ["--stage", "pilot:canary:5"], ["--stage", "pilot:pilot:0"],
        ["--stage", "pilot:pilot:101%"], ["--stage", "pilot:pilot:0%"], ["--stage", "a/b:pilot"],
        ["--stage", "pilot:pilot:-3"], ["--stage", "mp:micro_pilot"],
        ["--stage", "mp:micro_pilot:9"], ["--stage", "mp:micro_pilot:21"],
        ["--stage", "mp:micro_pilot:10%"], ["--ramp", "2"], ["--ramp", "0:10"],
        ["--deadline", "install=3h"], ["--deadline", "activation"], ["--deadline", "han=3x"],
        ["--threshold", "failed_rate=120%"], ["--threshold", "failure=0.1"],
        ["--threshold", "min_sample=-1"], ["--rate", "0"], ["--rate", "inf"],
        ["--auto-gate", "soon"], ["--hw-min", "-1"], ["--device-type", "TOASTER"],
        ["--mode", "push"], ["--id", "a/b"], ["--id", "x" * 65],
    ],
)  # fmt: skip
def test_bad_flag_values_are_usage_errors_and_send_nothing(flag: list[str]) -> None:
    otad = Otad({})
    code, _, err = run(otad, "plan", "--image", "9f86", *flag)
    assert (code, otad.requests) == (2, [])
    assert "error: argument" in err


def test_durations_shares_and_rates_in_operator_units() -> None:
    assert campaign.parse_seconds("90") == 90
    assert campaign.parse_seconds("1.5h") == 5400
    assert campaign.parse_seconds("7d") == 7 * 86400
    assert campaign.parse_stage("pilot:pilot:12.5%") == {"name": "pilot", "kind": "pilot",
                                                         "share": 0.125}  # fmt: skip
    assert campaign.parse_stage("mp:micro-pilot:0x10")["size"] == 16
    assert campaign.parse_stage("mp:micro_pilot:10")["size"] == 10
    assert campaign.parse_stage("mp:micro_pilot:20")["size"] == 20
    assert campaign.THRESHOLD_LIMITS == ("category1_limit", "category2_limit", "min_sample")
    assert campaign.DEADLINE_PHASES == ("wan_delivery", "han_transfer", "activation",
                                        "confirmation")  # fmt: skip
    assert campaign.parse_threshold("timed_out_rate=0.1") == ("timed_out_rate", 0.1)
    assert campaign.parse_deadline("han-transfer_s=24h") == ("han_transfer_s", 86400.0)
    assert campaign.parse_ramp("2:50") == {"ramp_factor": 2.0, "ramp_every": 50}


# --------------------------------------------------------------------------- the moves


@pytest.mark.parametrize(
    ("argv", "request_"),
    [
        (["start", "c1"], ("campaign.start", {"id": "c1"})),
        (["approve", "c1", "--reason", "15/15 ok"],
         ("campaign.approve", {"id": "c1", "reason": "15/15 ok"})),
        (["hold", "c1", "--reason", "supplier call"],
         ("campaign.hold", {"id": "c1", "reason": "supplier call"})),
        (["resume", "c1"], ("campaign.resume", {"id": "c1"})),
        (["abort", "c1", "--reason", "bad build"],
         ("campaign.abort", {"id": "c1", "reason": "bad build"})),
        (["notice", "c1"], ("campaign.notice", {"id": "c1"})),
        (["expedite", "c1", "--justification", "CVE-2026-1"],
         ("campaign.expedite", {"id": "c1", "justification": "CVE-2026-1"})),
        (["expedite", "c1", "--approve"], ("campaign.expedite.approve", {"id": "c1"})),
        (["status", "c1"], ("campaign.status", {"id": "c1"})),
        (["history", "c1"], ("campaign.history", {"id": "c1"})),
        (["list"], ("campaign.list", {})),
        (["retry", "c1"], ("campaign.retry", {"id": "c1"})),
        (["retry", "c1", "--new-id", "c1-retry"],
         ("campaign.retry", {"id": "c1", "new_id": "c1-retry"})),
    ],
)  # fmt: skip
def test_each_command_sends_the_contract_request(
    argv: list[str], request_: tuple[str, dict[str, Any]]
) -> None:
    answer: Any = {
        "status": status(), "retry": status(), "history": history(),
        "list": [],
    }.get(argv[0], decisions())  # fmt: skip
    assert sent(*argv, answer=answer) == request_


@pytest.mark.parametrize(
    "argv",
    [["approve", "c1"], ["hold", "c1"], ["abort", "c1"], ["expedite", "c1"],
     ["expedite", "c1", "--approve", "--justification", "x"], ["start"], ["frobnicate", "c1"]],
)  # fmt: skip
def test_decisions_without_their_reason_are_usage_errors(argv: list[str]) -> None:
    otad = Otad({})
    code, _, _ = run(otad, *argv)
    assert (code, otad.requests) == (2, [])


def test_a_move_prints_the_state_and_what_it_led_to() -> None:
    otad = Otad({"campaign.approve": decisions("running", "gate_decided")})
    code, out, _ = run(otad, "approve", "fw-2026-12-ch", "--reason", "15/15")
    assert code == 0
    assert out.splitlines() == [
        "campaign fw-2026-12-ch: RUNNING",
        "  2026-12-02T02:00:00.000Z  gate_decided  micro-pilot  by alice: 15/15",
    ]


def test_json_prints_the_raw_result() -> None:
    for argv, cmd, answer in [
        (["approve", "c1", "--reason", "ok"], "campaign.approve", decisions()),
        (["status", "c1"], "campaign.status", status()),
        (["plan", "--image", "9f86"], "campaign.plan", plan()),
        (["history", "c1"], "campaign.history", history()),
        (["list"], "campaign.list", [{"id": "c1"}]),
    ]:
        code, out, _ = run(Otad({cmd: answer}), *argv, "--json")
        assert (code, json.loads(out)) == (0, answer)


# --------------------------------------------------------------------------- failures, exit codes


@pytest.mark.parametrize(
    "error",
    [
        CampaignCallFailed("CAMPAIGN_REFUSED", "the second approver is the requester"),
        CampaignCallFailed("UNKNOWN_CAMPAIGN", "no campaign c9"),
        CampaignCallFailed("TIMEOUT", "otad did not answer 'campaign.start' within 10 s"),
        CampaignCallFailed("UNREACHABLE", "cannot reach the MQTT broker"),
    ],
)
def test_an_error_answer_fails_with_1_and_its_typed_reason(error: CampaignCallFailed) -> None:
    otad = Otad({"campaign.expedite.approve": error})
    code, out, err = run(otad, "expedite", "c1", "--approve")
    assert code == 1
    assert err == f"otactl campaign expedite: {error.reason}: {error.detail}\n"
    assert out == ""
    code, out, _ = run(otad, "expedite", "c1", "--approve", "--json")
    assert (code, json.loads(out)) == (1, {"error": error.reason, "detail": error.detail})


def test_a_misshapen_answer_fails_with_1_never_a_traceback() -> None:
    code, _, err = run(Otad({"campaign.status": [{"id": "c1"}]}), "status", "c1")
    assert code == 1
    assert "internal error" in err
    assert "Traceback" not in err


def test_plan_is_partial_when_guids_named_are_excluded_or_unknown() -> None:
    answer = plan()
    # GUIDS[0] is a member; GUIDS[4] is excluded; 00DB...FFFF is not known to otad at all
    code, out, _ = run(
        Otad({"campaign.plan": answer}), "plan", "--image", "9f86",
        "--guid", GUIDS[0], "--guid", GUIDS[4], "--guid", "00DB12345678FFFF",
    )  # fmt: skip
    assert code == 3
    assert "2 of the 3 GUID(s) named are left out:" in out
    assert f"  {GUIDS[4]}: supplier S3 not selected" in out
    assert "  00DB12345678FFFF: not known to otad" in out
    code, _, _ = run(Otad({"campaign.plan": answer}), "plan", "--image", "9f86", "--guid", GUIDS[1])
    assert code == 0
    # exclusions the operator did not ask for explicitly are a plan, not a partial result
    code, _, _ = run(Otad({"campaign.plan": answer}), "plan", "--image", "9f86")
    assert code == 0


def test_outcome_of_watch_results() -> None:
    assert outcome_of("watch", status(state="completed", counts={"confirmed": 5})) is Outcome.OK
    assert outcome_of("watch", status(state="completed")) is Outcome.PARTIAL  # 10 failed
    assert outcome_of("watch", status(state="aborted", counts={})) is Outcome.FAILED
    assert outcome_of("start", decisions()) is Outcome.OK


# --------------------------------------------------------------------------- human output


def test_plan_shows_stages_exclusions_by_reason_wan_bytes_and_the_estimate() -> None:
    text = format_plan(plan())
    lines = text.splitlines()
    assert lines[0] == (
        f"plan fw-2026-12-ch: image {IMAGE[:12]} fw 0x01020304: 4 target(s) at 4 premises"
    )
    assert lines[1].split() == [
        "STAGE", "KIND", "TARGETS", "HUBS", "STARTS", "DISTRIBUTE", "ACTIVATE", "SOAK", "TOTAL",
    ]  # fmt: skip
    assert lines[2].split() == ["pilot", "pilot", "2", "2", "+0s", "2m00s", "1h00m", "24h00m",
                                "25h02m"]  # fmt: skip
    assert lines[3].split()[:5] == ["roll-out", "rollout", "2", "2", "+25h02m"]
    assert "WAN: 12.0 MiB (12582912 bytes, image x distinct CHs)" in lines
    assert "estimate: 217h00m in all" in lines
    assert "  assuming 60 CHs started a minute" in lines
    assert "excluded: 3" in lines
    # grouped by reason, the largest group first, with counts
    assert lines.index("        2  supplier S3 not selected") < lines.index(
        "        1  hardware 0x0009 outside 0x0001..0x0004"
    )
    assert GUIDS[4] not in text
    verbose = format_plan(plan(), verbose=True)
    assert f"           {GUIDS[4]}" in verbose.splitlines()
    assert "00DB1234567800AA" in verbose


def test_plan_verbose_names_the_device_when_it_is_not_the_ch() -> None:
    answer = {**plan(), "exclusions": [{"guid": GUIDS[0], "device_id": "00DB0000000000E1",
                                        "reason": "no ESME on the HAN"}]}  # fmt: skip
    assert f"           {GUIDS[0]} device 00DB0000000000E1" in format_plan(answer, verbose=True)


def test_plan_with_nothing_excluded() -> None:
    answer = {**plan(), "exclusions": []}
    assert "excluded: none" in format_plan(answer).splitlines()


def test_history_is_a_table_with_iso_utc_times() -> None:
    lines = format_history(history()).splitlines()
    assert lines[0].split() == ["AT", "KIND", "STAGE", "ACTOR", "REASON"]
    assert lines[1].split() == ["2026-12-02T00:00:00.000Z", "stage_started", "micro-pilot",
                                "alice", "-"]  # fmt: skip
    assert lines[2].split()[:4] == ["2026-12-02T01:00:00.000Z", "gate_decided", "micro-pilot",
                                    "bob"]  # fmt: skip
    assert lines[2].endswith("15 of 15 confirmed")
    assert lines[-1] == "2 entries"


def test_list_is_a_table() -> None:
    rows = [
        {"id": "fw-a", "state": "awaiting_gate", "stage": "pilot",
         "payload": {"kind": "image", "image": IMAGE, "fw_version": 1}, "targets": 5015,
         "confirmed": 5003, "failed": 12, "created_at": T0, "updated_at": T0 + 60},
    ]  # fmt: skip
    lines = format_list(rows).splitlines()
    assert lines[1].split() == [
        "fw-a", "AWAITING_GATE", "pilot", "image", IMAGE[:12], "5015", "5003", "12",
        "2026-12-02T02:00:00.000Z", "2026-12-02T02:01:00.000Z",
    ]  # fmt: skip
    assert lines[-1] == "1 campaign(s)"


def test_status_prints_the_campaign_view_once() -> None:
    code, out, _ = run(Otad({"campaign.status": status()}), "status", "fw-2026-12-ch")
    assert code == 0
    assert out.startswith(f"campaign fw-2026-12-ch: image {IMAGE[:12]} fw 0x01020304\n")
    assert "pilot" in out
    assert "\x1b[" not in out


# --------------------------------------------------------------------------- events


@pytest.mark.parametrize("inclusive", [True, False])
def test_events_replay_pages_past_the_1000_limit_and_drops_repeats(inclusive: bool) -> None:
    # whether otad counts `since` in or not, every event once, in order, no more than asked
    def page(args: dict[str, Any]) -> list[dict[str, Any]]:
        start = args.get("since", 0) + (0 if inclusive else 1)
        return [event(s) for s in range(start, min(start + args["limit"], 5000))]

    otad = Otad({"campaign.events": page})
    code, out, _ = run(otad, "events", "--campaign", "c1", "--kind", "campaign.held",
                       "--since", "10", "--limit", "2500", "--json")  # fmt: skip
    assert code == 0
    seqs = [e["seq"] for e in json.loads(out)]
    first = 10 if inclusive else 11
    assert seqs == list(range(first, first + 2500))
    assert all(args["limit"] <= 1000 for _, args in otad.requests)
    if inclusive:
        assert [args for _, args in otad.requests] == [
            {"id": "c1", "since": 10, "kinds": ["campaign.held"], "limit": 1000},
            {"id": "c1", "since": 1009, "kinds": ["campaign.held"], "limit": 1000},
            {"id": "c1", "since": 2008, "kinds": ["campaign.held"], "limit": 502},
        ]


def test_events_replay_of_nothing_says_so() -> None:
    assert run(Otad({"campaign.events": []}), "events", "--since", "99")[:2] == (0, "no events\n")
    assert run(Otad({"campaign.events": []}), "events", "--json")[:2] == (0, "[]\n")


def test_events_replay_of_fewer_than_asked_is_one_request() -> None:
    otad = Otad({"campaign.events": lambda args: [event(s) for s in range(3)]})
    code, out, _ = run(otad, "events", "--limit", "50", "--json")
    assert (code, len(json.loads(out)), len(otad.requests)) == (0, 3, 1)


def test_events_replay_stops_when_otad_has_no_more() -> None:
    otad = Otad({"campaign.events": lambda args: [event(1), event(2)]})
    code, out, _ = run(otad, "events")
    assert code == 0
    assert otad.requests == [("campaign.events", {"limit": 100})]
    lines = out.splitlines()
    assert lines[0].startswith("2026-12-02T02:00:00.000Z  #1  campaign.held  [fw-2026-12-ch]")
    assert "actor=otad" in lines[0]
    assert "reason=failed_rate 0.06 > 0.05" in lines[0]


def test_events_follow_replays_then_prints_live_matching_events_once() -> None:
    otad = Otad(
        {"campaign.events": lambda args: [event(5), event(6)] if args["since"] == 5 else []}
    )
    otad.feed = _Ctrl_C()
    prefix = f"{topics.ROOT}/events"
    for seq, kind, cid in [
        (6, "campaign.held", "fw-2026-12-ch"),  # replayed already
        (7, "campaign.resumed", "fw-2026-12-ch"),
        (8, "campaign.held", "another"),  # another campaign's
        (9, "transfer.failed", "fw-2026-12-ch"),  # not a kind asked for
        (10, "campaign.held", "fw-2026-12-ch"),
        (10, "campaign.held", "fw-2026-12-ch"),  # a duplicate on the wire
    ]:
        otad.feed.put_nowait(Message(f"{prefix}/{kind}", event(seq, kind, cid), False))
    code, out, _ = run(
        otad, "events", "--follow", "--since", "5", "--campaign", "fw-2026-12-ch",
        "--kind", "campaign.held", "--kind", "campaign.resumed", "--json",
    )  # fmt: skip
    assert code == 0  # Ctrl-C ends a tail
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [5, 6, 7, 10]
    assert otad.filters == [
        [f"{prefix}/campaign.held", f"{prefix}/campaign.held/+",
         f"{prefix}/campaign.resumed", f"{prefix}/campaign.resumed/+"],
    ]  # fmt: skip


def test_events_follow_without_filters_takes_every_event_topic() -> None:
    otad = Otad({})
    otad.feed = _Ctrl_C()
    otad.feed.put_nowait(
        Message("ota/v1/events/transfer.failed/00DB", event(3, "transfer.failed"), False)
    )
    code, out, _ = run(otad, "events", "-f")
    assert code == 0
    assert otad.requests == []  # no --since: nothing replayed
    assert otad.filters == [[f"{topics.ROOT}/events/+", f"{topics.ROOT}/events/+/+"]]
    assert "#3  transfer.failed" in out


# --------------------------------------------------------------------------- watch


def _watch(otad: Otad, *messages: dict[str, Any]) -> tuple[int, str, str]:
    cid = "fw-2026-12-ch"
    otad.feed = _Ctrl_C()
    for body in messages:
        otad.feed.put_nowait(Message(status_topic(cid), body, False))
    return run(otad, "watch", cid)


def _watching(first: dict[str, Any]) -> Otad:
    return Otad({"campaign.status": first, "campaign.history": history()})


def test_watch_asks_once_then_follows_the_status_to_completion() -> None:
    done = status(state="completed", updated_at=T0 + 5, counts={"confirmed": 5015})
    otad = _watching(status())
    code, out, _ = _watch(otad, done)
    assert code == 0
    assert otad.requests == [
        ("campaign.status", {"id": "fw-2026-12-ch"}),
        ("campaign.history", {"id": "fw-2026-12-ch"}),
    ]
    assert otad.filters == [
        ["ota/v1/campaigns/fw-2026-12-ch/status", "ota/v1/otad/status", "ota/v1/events/+"]
    ]
    assert "RUNNING" in out
    assert out.splitlines().count("COMPLETED") == 1  # the last frame's state
    assert "15 of 15 confirmed" in out  # the history's decisions in the log


def test_watch_exit_status_follows_how_the_campaign_ended() -> None:
    with_failures = status(state="completed", updated_at=T0 + 5)
    assert _watch(_watching(status()), with_failures)[0] == 3
    aborted = status(state="aborted", updated_at=T0 + 5, hold_reason="bad build")
    code, out, _ = _watch(_watching(status()), aborted)
    assert code == 1
    assert "ABORTED: bad build" in out
    # already over when asked: one frame, no waiting
    code, _, _ = _watch(_watching(status(state="completed", counts={})))
    assert code == 0


def test_watch_json_prints_each_newer_status_as_a_line() -> None:
    older = status(updated_at=T0 - 1)
    newer = status(state="awaiting_gate", updated_at=T0 + 1)
    done = status(state="completed", updated_at=T0 + 2, counts={"confirmed": 1})
    otad = _watching(status())
    otad.feed = _Ctrl_C()
    for body in (older, newer, done):
        otad.feed.put_nowait(Message(status_topic("fw-2026-12-ch"), body, False))
    code, out, _ = run(otad, "watch", "fw-2026-12-ch", "--json")
    assert code == 0
    assert [json.loads(line)["state"] for line in out.splitlines()] == [
        "running", "awaiting_gate", "completed",
    ]  # fmt: skip


def test_watch_ends_with_0_on_ctrl_c() -> None:
    code, out, _ = _watch(_watching(status()))
    assert code == 0
    assert "RUNNING" in out


def test_watch_of_an_unknown_campaign_fails_with_1() -> None:
    otad = Otad({"campaign.status": CampaignCallFailed("UNKNOWN_CAMPAIGN", "no campaign x")})
    code, _, err = _watch(otad)
    assert code == 1
    assert "UNKNOWN_CAMPAIGN" in err


def test_the_otactl_console_entry_knows_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    import otad.ctl as ctl

    with pytest.raises(SystemExit) as exited:
        ctl.main(["campaign", "--help"])
    assert exited.value.code == 0
    assert "watch" in capsys.readouterr().out
    assert ctl.HANDLERS["campaign"] is campaign.run


def test_a_summary_plan_asks_for_counts_and_shows_exclusions_by_reason() -> None:
    assert sent("plan", "--image", "9f86", "--summary", answer=plan()) == (
        "campaign.plan",
        {"payload": {"kind": "image", "image": "9f86"}, "detail": "summary"},
    )
    answer = {k: v for k, v in plan().items() if k not in ("members", "exclusions")}
    answer |= {"members_count": 4, "exclusions_by_reason": {"supplier S3 not selected": 2,
                                                            "hardware outside": 1}}  # fmt: skip
    lines = format_plan(answer).splitlines()
    assert "excluded: 3" in lines
    assert lines.index("        2  supplier S3 not selected") < lines.index(
        "        1  hardware outside"
    )
