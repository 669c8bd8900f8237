"""The distribution, in memory on virtual time: the real daemon, real senders and receivers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shellkit import LIMITS, guids, shell

from otad.config import TransferConfig
from otad.events import (
    DistributionResumed,
    DistributionStalled,
    TransferFailed,
    TransferHeld,
    TransferStalled,
    TransferStarted,
)
from otad.store import TransferState
from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import Manifest
from protocol.wan.receiver import TransferPhase
from protocol.wire.messages import Block, Cancel, ImageHeld, Limits, Offer, Poll, decode


async def test_a_distribution_offers_streams_and_ends_with_every_ch_holding_the_image(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=20 * 1024) as s:
        fleet = guids(3)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        result = await s.distribute()
        assert sorted(result["started"]) == fleet
        assert result["refused"] == result["already"] == []
        offers = [p for p in s.client.published if p.topic.endswith("/down")]
        assert {p.qos for p in offers} == {1}  # asks go at QoS 1 ...
        s.run_until(lambda: all(s.distribution.transfers[(g, s.image)].state
                                is TransferState.HELD for g in fleet))  # fmt: skip
        await s.settle()
        for guid in fleet:
            ch = s.chs[guid]
            assert hashlib.sha256(ch.hub.assembled(s.image)).digest() == s.image
            assert sum(type(m) is Offer for m in ch.received) == 1
            row = await s.recorded(guid)
            assert row is not None
            assert row.state is TransferState.HELD
            assert row.blocks_acked == row.blocks_total == s.release.blocks
            assert row.held_sha256 == s.image
        events = s.events_published()
        assert {e.guid for e in events if isinstance(e, TransferStarted)} == set(fleet)
        held = [e for e in events if isinstance(e, TransferHeld)]
        assert {e.guid for e in held} == set(fleet)
        assert all(e.matches and e.sha256 == s.release.sha256 for e in held)
        assert s.distribution.counts()["held"] == 3


async def test_blocks_go_at_qos_0_within_the_window_and_none_twice_on_a_clean_link(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=40 * 1024) as s:
        (guid,) = guids(1)
        ch = s.add_ch(guid)
        s.announce(guid)
        await s.distribute(guid)
        (offer,) = s.client.published
        assert offer.qos == 1
        transfer = s.distribution.transfers[(guid, s.image)]
        most_in_flight = 0

        def held() -> bool:
            nonlocal most_in_flight
            most_in_flight = max(most_in_flight, transfer.sender.in_flight)
            return transfer.state is TransferState.HELD

        s.run_until(held)
        kinds = {(type(decode(p.payload)).__name__, p.qos) for p in s.downlink}
        assert kinds == {("Offer", 1), ("Block", 0)}
        assert 1 < most_in_flight <= LIMITS.window
        assert sum(type(m) is Block for m in ch.received) == s.release.blocks  # none twice


async def test_a_reconnect_of_otad_resynchronises_with_a_poll_not_a_second_offer(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=64 * 1024) as s:
        fleet = guids(2)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.distribute()
        s.run_until(lambda: all(s.distribution.transfers[(g, s.image)].sender.blocks_acked > 10
                                for g in fleet))  # fmt: skip
        s.client.reachable = False
        s.client.lose_connection()
        await s.client.until_connected(False)
        assert s.distribution.scheduler.paused
        s.run_for(5.0)  # nothing can be sent meanwhile
        s.client.reachable = True
        await s.client.until_connected(True)  # the supervisor reconnects
        s.run_until(lambda: all(s.distribution.transfers[(g, s.image)].state
                                is TransferState.HELD for g in fleet))  # fmt: skip
        for guid in fleet:
            received = s.chs[guid].received
            assert sum(type(m) is Offer for m in received) == 1
            assert sum(type(m) is Poll for m in received) >= 1  # asked what it holds
            assert sum(type(m) is Block for m in received) <= s.release.blocks + LIMITS.window


async def test_a_ch_that_restarts_and_announces_again_is_resumed_where_it_was(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=64 * 1024) as s:
        (guid,) = guids(1)
        ch = s.add_ch(guid)
        s.announce(guid)
        await s.distribute(guid)
        s.run_until(lambda: s.distribution.transfers[(guid, s.image)].sender.blocks_acked > 20)
        s.drop(guid)  # its last will: the transfer is suspended
        s.run_for(30.0)  # what was in flight arrives
        sent_while_away = len(ch.received)
        s.run_for(30.0)
        assert len(ch.received) == sent_while_away  # nothing is sent to a CH that cannot hear
        ch.hub.restart()
        s.announce(guid)
        s.run_until(lambda: s.distribution.transfers[(guid, s.image)].state is TransferState.HELD)
        assert sum(type(m) is Block for m in ch.received) <= s.release.blocks + LIMITS.window


async def test_a_ch_that_refuses_ends_its_transfer_rejected_with_the_reason(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        refusing, fine = guids(2)
        s.add_ch(refusing, verify=_refuse)
        s.add_ch(fine)
        for guid in (refusing, fine):
            s.announce(guid)
        await s.distribute()
        s.run_until(lambda: s.distribution.counts()["held"] == 1
                    and s.distribution.counts()["rejected"] == 1)  # fmt: skip
        await s.settle()
        (failed,) = [e for e in s.events_published() if isinstance(e, TransferFailed)]
        assert (failed.guid, failed.reason) == (refusing, "UNKNOWN_KEY_ID")
        row = await s.recorded(refusing)
        assert row is not None
        assert (row.state, row.reason) == (TransferState.REJECTED, "UNKNOWN_KEY_ID")


async def test_a_hung_ch_is_flagged_stalled_then_times_out(tmp_path: Path) -> None:
    transfer = TransferConfig(stall_after_s=5.0, max_rto_without_progress=3, rto_max=4.0)
    async with shell(tmp_path, transfer=transfer, firmware_bytes=64 * 1024) as s:
        hung, fine = guids(2)
        for guid in (hung, fine):
            s.add_ch(guid)
            s.announce(guid)
        await s.distribute()
        s.run_until(lambda: s.distribution.transfers[(hung, s.image)].sender.blocks_acked > 8)
        s.chs[hung].silent = True  # connected, answers nothing
        s.run_for(6.0)
        assert s.distribution.check_stalls(s.clock.now) == 1
        await s.events.flush()
        (stalled,) = [e for e in s.events_published() if isinstance(e, TransferStalled)]
        assert stalled.guid == hung
        assert s.distribution.check_stalls(s.clock.now) == 1  # one event per episode
        s.run_until(lambda: s.distribution.counts()["timed_out"] == 1, max_s=120.0)
        await s.settle()
        failed = [e for e in s.events_published() if isinstance(e, TransferFailed)]
        assert [(e.guid, e.reason) for e in failed] == [(hung, "TIMED_OUT")]
        row = await s.recorded(hung)
        assert row is not None
        assert row.state is TransferState.TIMED_OUT
        assert s.distribution.counts()["held"] == 1
        # no Cancel: the hung CH keeps what it received, for a later distribution (SPEC §7.7)
        assert not [m for m in s.chs[hung].received if isinstance(m, Cancel)]


async def test_a_lost_image_held_costs_one_poll_and_the_ch_keeps_its_image(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=32 * 1024) as s:
        (guid,) = guids(1)
        ch = s.add_ch(guid)
        ch.lose = lambda reply: isinstance(reply, ImageHeld) and not ch.lost
        s.announce(guid)
        await s.distribute()
        s.run_until(lambda: s.distribution.transfers[(guid, s.image)].state
                    is TransferState.HELD, max_s=60.0)  # fmt: skip
        await s.settle()
        assert [type(m) for m in ch.lost] == [ImageHeld]  # the first report never reached otad
        row = await s.recorded(guid)
        assert row is not None
        assert (row.state, row.held_sha256) == (TransferState.HELD, s.image)
        assert ch.hub.receiver.phase(s.image) is TransferPhase.HELD  # and the CH kept it
        assert hashlib.sha256(ch.hub.assembled(s.image)).digest() == s.image
        after_blocks = ch.received[max(i for i, m in enumerate(ch.received)
                                       if isinstance(m, Block)) + 1 :]  # fmt: skip
        assert [type(m) for m in after_blocks] == [Poll]  # one probe, answered with ImageHeld
        assert not [m for m in ch.received if isinstance(m, Cancel)]


async def test_a_distribution_whose_chs_all_drop_off_is_stalled_and_resumes(
    tmp_path: Path,
) -> None:
    transfer = TransferConfig(stall_after_s=5.0)
    async with shell(tmp_path, transfer=transfer, firmware_bytes=64 * 1024) as s:
        fleet = guids(2)
        for guid in fleet:
            s.add_ch(guid)
            s.announce(guid)
        await s.distribute()
        s.run_until(lambda: all(s.distribution.transfers[(g, s.image)].sender.blocks_acked > 8
                                for g in fleet))  # fmt: skip
        for guid in fleet:
            s.drop(guid)
        s.run_for(6.0)
        assert s.distribution.check_stalls(s.clock.now) == 0  # offline: suspended, not stalled
        await s.events.flush()
        (stalled,) = [e for e in s.events_published() if isinstance(e, DistributionStalled)]
        assert (stalled.active, stalled.offline) == (2, 2)
        for guid in fleet:
            s.chs[guid].hub.restart()
            s.announce(guid)
        s.run_for(1.0)  # they answer, blocks move again
        s.distribution.check_stalls(s.clock.now)
        await s.events.flush()
        assert [type(e) for e in s.events_published()].count(DistributionResumed) == 1
        s.run_until(lambda: s.distribution.counts()["held"] == 2)


def _refuse(signed: bytes, at: UnixTime) -> Manifest:
    raise ProtocolError(Reason.UNKNOWN_KEY_ID, "not a key this CH trusts")


async def test_a_ch_whose_limits_cannot_carry_the_image_gets_a_transfer_that_fails_at_once(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=8 * 1024, block_size=1024) as s:
        small, fine = guids(2)
        s.add_ch(small, limits=Limits(512, 8, 65536))  # blocks of 1 KiB do not fit
        s.add_ch(fine)
        for guid in (small, fine):
            s.announce(guid)
        assert s.registry.get(small) is not None  # in the fleet despite its limits
        result = await s.distribute()
        assert sorted(result["started"]) == sorted([small, fine])
        assert result["refused"] == []
        s.run_until(lambda: s.distribution.counts()["held"] == 1)
        await s.settle()
        row = await s.recorded(small)
        assert row is not None
        assert (row.state, row.reason) == (TransferState.FAILED, "LIMITS_EXCEEDED")
        (failed,) = [e for e in s.events_published() if isinstance(e, TransferFailed)]
        assert (failed.guid, failed.reason) == (small, "LIMITS_EXCEEDED")
        assert s.chs[small].received == []  # nothing was offered to it
