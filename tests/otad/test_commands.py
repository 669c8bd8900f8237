"""The control plane in memory: requests on the control session, typed answers, every command."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from shellkit import Shell, eventually, guids, shell

from protocol.errors import Reason

CLIENT = "ops-1"


async def request(s: Shell, cmd: str, args: dict[str, Any] | None = None, **extra: Any) -> Any:
    """Send one request as ``otactl`` would and return the decoded response."""
    request_id = f"r{s.daemon.control.served}"
    body: dict[str, Any] = {"v": 1, "id": request_id, "cmd": cmd, "args": args or {}}
    body.update(extra)
    before = len(s.control.published)
    assert s.control.deliver(f"ota/v1/ctl/{CLIENT}/req", json.dumps(body).encode())
    await eventually(lambda: len(s.control.published) > before)
    answer = s.control.published[-1]
    assert (answer.topic, answer.qos, answer.retain) == (f"ota/v1/ctl/{CLIENT}/resp", 1, False)
    response = json.loads(answer.payload)
    assert response["v"] == 1
    assert response["id"] == request_id
    return response


async def test_every_command_answers_on_the_control_session_and_none_on_the_data_session(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        fleet = guids(2)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        data_before = len(s.client.published)
        listed = await request(s, "image.list")
        assert listed["ok"]
        assert [i["sha256"] for i in listed["result"]] == [s.image.hex()]
        fleet_list = await request(s, "fleet.list")
        assert sorted(h["guid"] for h in fleet_list["result"]) == fleet
        assert all(h["online"] for h in fleet_list["result"])
        status = await request(s, "status")
        assert status["ok"]
        assert status["result"]["state"] == "online"
        assert len(s.client.published) == data_before  # answers never share the data session
        started = await request(s, "distribute", {"image": s.image.hex()[:12], "to": fleet[:1]})
        assert started["ok"]
        assert started["result"]["started"] == fleet[:1]
        rows = await request(s, "transfers", {"guid": fleet[0]})
        assert [r["guid"] for r in rows["result"]] == fleet[:1]
        again = await request(s, "image.import", {"data": base64.b64encode(
            s.release.path.read_bytes()).decode()})  # fmt: skip
        assert again["ok"]
        assert again["result"]["new"] is False


async def test_bad_requests_get_typed_errors_and_change_nothing(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        unknown = await request(s, "fleet.destroy")
        assert (unknown["ok"], unknown["error"]) == (False, Reason.UNKNOWN_TYPE.name)
        assert unknown["code"] == int(Reason.UNKNOWN_TYPE)
        no_image = await request(s, "distribute", {"image": "ffff", "all_matching": True})
        assert no_image["error"] == Reason.UNKNOWN_IMAGE.name
        bad_args = await request(s, "distribute", {"image": 7})
        assert bad_args["error"] == Reason.MALFORMED.name
        not_an_image = await request(s, "image.import", {"data": base64.b64encode(b"x").decode()})
        assert not_an_image["ok"] is False
        future = await request(s, "status", v=2)
        assert future["error"] == Reason.UNSUPPORTED_VERSION.name
        assert await s.store.transfers() == []
        assert len(await request_listing(s)) == 1


async def test_a_request_that_cannot_be_answered_is_only_counted(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        before = len(s.control.published)
        s.control.deliver(f"ota/v1/ctl/{CLIENT}/req", b"{not json")
        s.control.deliver(f"ota/v1/ctl/{CLIENT}/req", json.dumps({"cmd": "status"}).encode())
        s.control.deliver("ota/v1/ctl/bad+level/req", b"{}")
        counts = s.daemon.control.rejects.counts
        await eventually(lambda: counts["MALFORMED"] == 2)
        assert counts["BAD_IDENTIFIER"] == 1
        assert sum(counts.values()) == 3
        assert len(s.control.published) == before


async def request_listing(s: Shell) -> list[Any]:
    listed = await request(s, "image.list")
    result: list[Any] = listed["result"]
    return result


async def test_a_fleet_listing_above_the_response_limit_is_refused_and_served_in_pages(
    tmp_path: Path,
) -> None:
    # 5,000 load-test CHs made fleet.list ~3 MB (12,000 here: no HAN rows): the broker (SPEC §1.1)
    # cut otad's control session at every retry. Now the answer is a TOO_LARGE error naming its
    # size, and the listing comes in pages (otactl and the load test ask for pages).
    from otad.control import MAX_PAGE_ROWS, MAX_RESPONSE_BYTES

    async with shell(tmp_path) as s:
        fleet = guids(12_000)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.registry.flushed()
        whole = await request(s, "fleet.list")
        assert whole["ok"] is False
        assert whole["error"] == "TOO_LARGE"
        assert "pages" in whole["detail"]
        assert len(s.control.published[-1].payload) < MAX_RESPONSE_BYTES
        pages: list[str] = []
        while True:
            got = await request(s, "fleet.list", {"offset": len(pages), "limit": 2500})
            assert got["ok"], got
            pages += [h["guid"] for h in got["result"]]
            if len(got["result"]) < 2500:
                break
        assert pages == sorted(fleet)
        for bad, reason in (({"limit": 0}, "MALFORMED"), ({"offset": -1}, "MALFORMED"),
                            ({"limit": "9"}, "MALFORMED"),
                            ({"limit": MAX_PAGE_ROWS + 1}, "TOO_LARGE")):  # fmt: skip
            refused = await request(s, "fleet.list", bad)
            assert (refused["ok"], refused["error"]) == (False, reason), bad


async def test_a_summary_plan_has_counts_for_its_per_target_lists(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        fleet = guids(3)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.registry.flushed()
        spec = {"payload": {"kind": "distribute", "image": s.image.hex()},
                "stages": [{"name": "all", "kind": "rollout"}]}  # fmt: skip
        full = await request(s, "campaign.plan", spec)
        summary = await request(s, "campaign.plan", {**spec, "detail": "summary"})
        assert full["ok"], full
        assert summary["ok"], summary
        assert "members" not in summary["result"]
        assert "exclusions" not in summary["result"]
        assert summary["result"]["members_count"] == len(full["result"]["members"]) == 3
        assert summary["result"]["estimate"] == full["result"]["estimate"]
        bad = await request(s, "campaign.plan", {**spec, "detail": "everything"})
        assert (bad["ok"], bad["error"]) == (False, "MALFORMED")
