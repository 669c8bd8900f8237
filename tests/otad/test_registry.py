"""The fleet registry through the real daemon's routing: checks, presence, persistence."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cbor2
import pytest
from shellkit import LIMITS, guids, shell

from otad.events import HubOffline, HubOnline, HubRefused
from otad.refusals import MAX_PER_SECOND
from otad.registry import Registry
from protocol.errors import Reason
from protocol.wire import cbor, topics
from protocol.wire.messages import (
    HanDevice,
    HubAnnounced,
    HubAnnouncedVersioned,
    HubWentOffline,
    Limits,
    Poll,
    Refused,
    declaring_minor,
    decode,
    minor_version,
)

GUID, OTHER = guids(2)
ESME = HanDevice("00000000000000E1", "ESME", "NATIVE", 0x0200, 1)


def _with_han_field(payload: bytes, name: str, value: object) -> bytes:
    """``payload`` with one field of its first HAN device changed on the wire (a value the
    typed :class:`HanDevice` would not even construct)."""
    fields = cbor2.loads(payload)
    fields["han"][0][name] = value
    return cbor.dumps(fields)


def announcement(**changes: object) -> HubAnnounced:
    base = HubAnnounced(
        guid=GUID, fw_version=0x01000000, hw_version=0x0100, supplier="SUPPLIER-A",
        segment="cell-0", limits=LIMITS, han=(ESME,),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


async def test_an_announcement_brings_a_hub_online_with_its_event_and_its_row(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        s.client.deliver(topics.state(GUID), announcement().encode())
        hub = s.registry.get(GUID)
        assert hub is not None
        assert hub.online
        assert hub.announcement == announcement()
        assert s.registry.online == 1
        await s.settle()
        (event,) = s.events_published()
        assert isinstance(event, HubOnline)
        assert (event.guid, event.segment, event.fw_version) == (GUID, "cell-0", 0x01000000)
        row = await s.store.hub(GUID)
        assert row is not None
        assert row.online
        assert row.limits == LIMITS
        assert [d.device_id for d in await s.store.han_devices(GUID)] == [ESME.device_id]
        # written behind, read back: a restarted otad knows the hub as it last announced itself
        again = Registry(s.store, s.events, on_change=lambda *change: None)
        await again.load()
        assert again.hubs[GUID].announcement == announcement()
        assert again.online == 1


async def test_presence_follows_the_will_and_the_next_announcement(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        s.client.deliver(topics.state(GUID), announcement().encode())
        s.clock.advance(1.0)
        s.client.deliver(topics.state(GUID), HubWentOffline(guid=GUID).encode(), True)
        hub = s.registry.get(GUID)
        assert hub is not None
        assert not hub.online
        assert s.registry.online == 0
        s.client.deliver(topics.state(GUID), HubWentOffline(guid=GUID).encode(), True)  # again
        s.clock.advance(1.0)
        s.client.deliver(topics.state(GUID), announcement(fw_version=2).encode())
        assert hub.online
        assert hub.announcement.fw_version == 2
        await s.settle()
        kinds = [type(e) for e in s.events_published()]
        assert kinds == [HubOnline, HubOffline, HubOnline]  # one offline for two wills
        row = await s.store.hub(GUID)
        assert row is not None
        assert (row.online, row.fw_version) == (True, 2)


async def test_a_known_retained_copy_changes_nothing_and_a_live_repeat_is_reported(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        seen: list[tuple[str, bool, bool, bool]] = []
        daemon_changed = s.registry._on_change

        def record(hub: object, was_online: bool, announced: bool, changed: bool) -> None:
            seen.append((getattr(hub, "guid", ""), was_online, announced, changed))
            daemon_changed(hub, was_online, announced, changed)

        s.registry._on_change = record
        payload = announcement().encode()
        s.client.deliver(topics.state(GUID), payload)
        s.client.deliver(topics.state(GUID), payload, True)  # the broker replays it: known
        s.client.deliver(topics.state(GUID), payload)  # live again: the CH reconnected
        assert seen == [(GUID, False, True, True), (GUID, True, True, False)]
        await s.settle()
        assert [type(e) for e in s.events_published()] == [HubOnline]


def _stranger_will() -> bytes:
    return HubWentOffline(guid=OTHER).encode()


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("ota/v1/ch/not-a-guid/state", announcement().encode(), Reason.BAD_IDENTIFIER),
        (topics.state(OTHER), announcement().encode(), Reason.BAD_IDENTIFIER),  # an impostor
        (topics.state(GUID), announcement(supplier="").encode(), Reason.MALFORMED),
        (topics.state(GUID), announcement(supplier=" Acme").encode(), Reason.MALFORMED),
        (topics.state(GUID), announcement(segment="cell\t1").encode(), Reason.MALFORMED),
        (topics.state(GUID), announcement(segment="x" * 65).encode(), Reason.MALFORMED),
        (topics.state(GUID), announcement(han=(ESME, ESME)).encode(), Reason.MALFORMED),
        (
            topics.state(GUID),
            _with_han_field(announcement().encode(), "device_type", "TOASTER"),
            Reason.MALFORMED,
        ),
        (
            topics.state(GUID),
            announcement(han=(dataclasses.replace(ESME, device_id="a/b"),)).encode(),
            Reason.BAD_IDENTIFIER,
        ),
        (topics.state(GUID), os.urandom(HubAnnounced.MAX_BYTES + 1), Reason.TOO_LARGE),
        (topics.state(GUID), Poll(nonce=1).encode(), Reason.UNKNOWN_TYPE),
        (topics.state(GUID), _stranger_will(), Reason.BAD_IDENTIFIER),
    ],
)
async def test_a_refused_state_message_is_counted_by_reason_and_changes_nothing(
    tmp_path: Path, topic: str, payload: bytes, reason: Reason
) -> None:
    async with shell(tmp_path) as s:
        before = dict(s.daemon.rejects.counts)
        assert s.client.deliver(topic, payload)
        assert s.registry.hubs == {}
        changed = {k: v - before[k] for k, v in s.daemon.rejects.counts.items() if v != before[k]}
        assert changed == {reason.name: 1}
        await s.settle()
        published = s.events_published()
        assert await s.store.hubs() == []
        if "not-a-guid" in topic:
            assert published == []  # no CH to name: journalled only
            return
        (refused,) = published  # monitors see it, on the CH's own event topic
        assert isinstance(refused, HubRefused)
        assert (refused.guid, refused.source, refused.reason) == (
            topic.split("/")[3], "state", reason.name,
        )  # fmt: skip
        assert refused.told is False  # a 1.0 CH would not understand a Refused
        assert s.client.take("ota/v1/ch/+/down") == []


@pytest.mark.parametrize(
    "changes",
    [
        {"supplier": "Acme Ltd"},
        {"supplier": "A+B", "segment": "c/1"},
        {"segment": "Süd-Netz #3"},
        {"limits": Limits(8, 8, 65536)},  # blocks of more than 8 bytes fail LIMITS_EXCEEDED
        {"limits": Limits(1024, 0, 65536)},
        {"limits": Limits(4096, 8, 1024)},
    ],
)
async def test_a_hub_with_any_printable_labels_or_any_limits_joins_the_fleet(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    async with shell(tmp_path) as s:
        s.client.deliver(topics.state(GUID), announcement(**changes).encode())
        hub = s.registry.get(GUID)
        assert hub is not None
        assert hub.online
        assert sum(s.daemon.rejects.counts.values()) == 0
        await s.settle()
        (online,) = s.events_published()
        assert isinstance(online, HubOnline)
        (row,) = await s.store.hubs()
        assert (row.supplier, row.segment, row.limits) == (
            hub.announcement.supplier, hub.announcement.segment, hub.announcement.limits,
        )  # fmt: skip


async def test_a_ch_of_protocol_1_1_is_told_why_it_was_refused_once_a_minute(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        bad = declaring_minor(announcement(supplier="Acme\tLtd"), 1)
        for _ in range(3):  # a CH that keeps announcing the same bad content
            s.client.deliver(topics.state(GUID), bad.encode(), False)
        told = s.client.take(topics.down(GUID))
        assert len(told) == 1  # rate-limited: one per CH and reason a minute
        refused = decode(told[0].payload)
        assert isinstance(refused, Refused)
        assert (refused.of, refused.reason) == (HubAnnouncedVersioned.TYPE, Reason.MALFORMED)
        assert "supplier" in refused.detail
        assert told[0].qos == Refused.QOS
        assert s.daemon.refusals.counts() == {"reported": 1, "told": 1, "suppressed": 2}
        assert s.daemon.rejects.counts["MALFORMED"] == 3  # every one journalled
        await s.settle()
        (event,) = s.events_published()
        assert isinstance(event, HubRefused)
        assert event.told is True
        # fixed: the same CH announces well and joins, as a CH of protocol 1.1
        s.client.deliver(topics.state(GUID), declaring_minor(announcement(), 1).encode())
        hub = s.registry.get(GUID)
        assert hub is not None
        assert minor_version(hub.announcement) == 1
        # its refused reports are told too: it declared 1.1 in its accepted announcement
        s.client.deliver(topics.up(GUID), Poll(nonce=7).encode())  # a CH never sends a Poll
        (told_up,) = s.client.take(topics.down(GUID))
        refused_up = decode(told_up.payload)
        assert isinstance(refused_up, Refused)
        assert (refused_up.of, refused_up.reason) == (Poll.TYPE, Reason.UNKNOWN_TYPE)
        s.client.deliver(topics.up(GUID), b"\xff")  # MALFORMED again, within the minute
        assert s.client.take(topics.down(GUID)) == []


async def test_the_declared_minor_version_survives_a_restart(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        s.client.deliver(topics.state(GUID), declaring_minor(announcement(), 1).encode())
        await s.registry.flushed()
        registry = Registry(s.store, s.events, on_change=lambda *_: None)
        await registry.load()
        hub = registry.get(GUID)
        assert hub is not None
        assert minor_version(hub.announcement) == 1
        assert hub.announcement == s.registry.hubs[GUID].announcement


async def test_a_cleared_retained_message_is_ignored(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:
        s.client.deliver(topics.state(GUID), announcement().encode())
        s.client.deliver(topics.state(GUID), b"", True)  # someone clears the retained copy
        hub = s.registry.get(GUID)
        assert hub is not None
        assert hub.online
        assert sum(s.daemon.rejects.counts.values()) == 0


async def test_refusals_past_the_global_rate_are_only_counted(tmp_path: Path) -> None:
    """More refused CHs in one instant than MAX_PER_SECOND: each is journalled, the first
    MAX_PER_SECOND are reported to monitors, the rest only counted as suppressed."""
    async with shell(tmp_path) as s:
        many = guids(int(MAX_PER_SECOND) + 50)
        for guid in many:
            bad = HubAnnounced(guid=guid, fw_version=1, hw_version=1, supplier="", segment="x")
            s.client.deliver(topics.state(guid), bad.encode())  # virtual time does not move
        assert s.daemon.rejects.counts["MALFORMED"] == len(many)
        assert s.daemon.refusals.counts() == {
            "reported": int(MAX_PER_SECOND), "told": 0, "suppressed": 50,
        }  # fmt: skip
        await s.settle()
        assert len(s.events_published()) == int(MAX_PER_SECOND)
