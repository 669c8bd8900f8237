"""otad.campaigns on the in-memory daemon shell: ``distribute`` as a one-stage campaign, the
campaign named on every transfer event, one active campaign per device component (a second
image for the same CHs refused with the reason), and the audit trail's actor."""

from __future__ import annotations

import base64
from pathlib import Path

from shellkit import Shell, guids, shell
from test_commands import CLIENT, request

from loadtest.release import make_release
from otad.events import TransferHeld, TransferStarted
from protocol.errors import Reason
from protocol.wire import topics


async def other_image(s: Shell) -> str:
    """A second CH image, signed by the shell's key, imported."""
    release = make_release(s.release.path.parent, firmware_bytes=2048, key=s.release.key,
                           name="other", version=0x0200_0000)  # fmt: skip
    imported = await request(
        s, "image.import", {"data": base64.b64encode(release.path.read_bytes()).decode()}
    )
    assert imported["ok"], imported
    return str(imported["result"]["sha256"])


async def test_distribute_is_a_one_stage_campaign_named_on_its_transfer_events(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        fleet = guids(3)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.registry.flushed()
        started = await request(s, "distribute", {"image": s.image.hex(), "to": fleet})
        assert started["ok"], started
        campaign = started["result"]["campaign"]
        assert started["result"]["started"] == fleet
        # while its transfers run, the status says how far the WAN is (and that it moves)
        moving = await request(s, "campaign.status", {"id": campaign})
        blocks = s.distribution.progress_of(bytes.fromhex(s.image.hex()))
        assert blocks is not None
        assert moving["result"]["wan"]["blocks_total"] == blocks[1] > 0
        assert moving["result"]["stalled_s"] is None
        s.run_until(lambda: all(s.distribution.transfer_state(g, s.image) is not None
                                and s.distribution.transfer_state(g, s.image).value == "held"
                                for g in fleet))  # fmt: skip
        await s.settle()
        await s.daemon.devices.flushed()  # the CHs' device records: held by their CH
        events = s.events_published()
        held = [e for e in events if isinstance(e, TransferHeld)]
        assert {e.campaign for e in held} == {campaign}
        assert {e.campaign for e in events if isinstance(e, TransferStarted)} == {campaign}
        await s.daemon.campaigns.tick()
        status = await request(s, "campaign.status", {"id": campaign})
        assert status["result"]["state"] == "completed"
        assert status["result"]["counts"] == {"held": 3}
        assert status["result"]["payload"]["kind"] == "distribute"
        assert status["result"]["wan"] is None  # no transfer active
        retained = [p for p in s.client.published if p.topic == topics.campaign_status(campaign)]
        assert retained
        assert retained[-1].retain
        history = await request(s, "campaign.history", {"id": campaign})
        assert [h["kind"] for h in history["result"]] == ["stage_started", "completed"]
        assert history["result"][0]["actor"] == CLIENT  # the requesting client, not otad


async def test_a_second_image_for_chs_in_an_active_campaign_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        fleet = guids(2)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.registry.flushed()
        first = await request(s, "distribute", {"image": s.image.hex(), "to": fleet[:1]})
        owner = first["result"]["campaign"]
        other = await other_image(s)
        second = await request(s, "distribute", {"image": other, "to": fleet})
        assert second["ok"], second
        result = second["result"]
        assert result["started"] == fleet[1:]
        (refusal,) = result["refused"]
        assert refusal["guid"] == fleet[0]
        assert refusal["reason"] == Reason.CAMPAIGN_CONFLICT.name
        assert owner in refusal["detail"]
        again = await request(s, "distribute", {"image": s.image.hex(), "to": fleet[:1]})
        assert again["result"]["already"] == fleet[:1]  # the same image: already on its way
        planned = await request(
            s, "campaign.create", {"payload": {"kind": "distribute", "image": other},
                                   "stages": [{"name": "all", "kind": "pilot"}]},
        )  # fmt: skip
        assert not planned["ok"]
        assert planned["error"] == Reason.CAMPAIGN_CONFLICT.name


async def test_the_pacing_model_measures_ch_and_han_activations_apart(tmp_path: Path) -> None:
    # A bridge campaign's activations (over the HAN) say nothing of a CH's (a reboot): a CH
    # image's plan after a bridge campaign keeps the configured figure until CHs are measured.
    async with shell(tmp_path) as s:
        campaigns = s.daemon.campaigns
        configured = campaigns.pacing_model(for_ch=True).activation_s
        for took in (0.5, 0.6, 0.7, 0.8, 0.9):
            campaigns._samples["activation_s:han"].append(took)
        assert campaigns.pacing_model(for_ch=False).activation_s == 0.7
        assert campaigns.pacing_model(for_ch=True).activation_s == configured
        assert campaigns.pacing_model(for_ch=True).measured == ()
