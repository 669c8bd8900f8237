"""``fleet.forget``: a CH that was never real leaves the registry and the store, with a
``hub.forgotten`` event; nothing in progress is ever forgotten; a retained copy of its
announcement does not bring it back, across restarts, and a live announcement does."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from shellkit import Shell, guids, shell
from test_commands import request
from test_devices import GUID as PREMISES
from test_devices import premises

from otad.devices import DeviceState
from otad.events import HubForgotten, HubOnline
from otad.metrics import take_figures
from otad.store import TransferState
from protocol.wire import topics


async def forget(s: Shell, *targets: str) -> dict[str, Any]:
    """``otactl fleet forget`` over the control session; the result."""
    answer = await request(s, "fleet.forget", {"guids": list(targets)})
    assert answer["ok"], answer
    result: dict[str, Any] = answer["result"]
    return result


async def events_of(s: Shell, kind: type[Any]) -> list[Any]:
    await s.settle()
    return [e for e in s.events_published() if isinstance(e, kind)]


async def test_a_never_real_hub_is_forgotten_with_its_ended_transfer_and_an_event(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        fake, real = guids(2)
        for guid in (fake, real):
            s.add_ch(guid)
            s.announce(guid, retain=True)
        await s.distribute()
        t = s.distribution.transfers[(fake, s.image)]
        s.run_until(
            lambda: all(x.state is TransferState.HELD for x in s.distribution.transfers.values())
        )
        await s.settle()
        before = take_figures(s.daemon._metrics_sources())
        assert before.transfers["held"] == 2

        result = await forget(s, fake)

        assert result == {
            "forgotten": [{"guid": fake, "online": True, "transfers": 1, "devices": 0}],
            "refused": [],
        }
        assert s.registry.get(fake) is None
        assert fake in s.registry.forgotten
        assert await s.store.hub(fake) is None
        assert await s.store.han_devices(fake) == []
        assert await s.store.transfer(fake, s.image) is None
        assert await s.store.transfer(real, s.image) is not None
        assert t.state is TransferState.HELD
        after = take_figures(s.daemon._metrics_sources())
        assert after.transfers["held"] == 1
        assert (after.hubs_known, after.hubs_online) == (1, 1)
        assert s.distribution.distributions(s.clock.now)[s.image.hex()]["transfers"]["held"] == 1
        fleet = await request(s, "fleet.list")
        assert [h["guid"] for h in fleet["result"]] == [real]
        (event,) = await events_of(s, HubForgotten)
        assert (event.guid, event.online, event.transfers, event.devices) == (fake, True, 1, 0)
        again = await forget(s, fake)
        assert again["forgotten"] == []
        assert [r["error"] for r in again["refused"]] == ["UNKNOWN_HUB"]


async def test_bad_and_unknown_guids_are_refused_one_by_one_and_the_rest_forgotten(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        a, b, never = guids(3)
        for guid in (a, b):
            s.add_ch(guid)
            s.announce(guid)
        result = await forget(s, a, "not/a+guid", never, a, b)
        assert [f["guid"] for f in result["forgotten"]] == [a, b]
        assert [(r["guid"], r["error"]) for r in result["refused"]] == [
            ("not/a+guid", "BAD_IDENTIFIER"),
            (never, "UNKNOWN_HUB"),
        ]
        empty = await request(s, "fleet.forget", {"guids": []})
        assert (empty["ok"], empty["error"]) == (False, "MALFORMED")
        wrong = await request(s, "fleet.forget", {"guids": "0011223344550000"})
        assert (wrong["ok"], wrong["error"]) == (False, "MALFORMED")
        assert s.registry.hubs == {}


async def test_a_hub_with_an_active_transfer_is_refused_busy_and_keeps_sending(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        (guid,) = guids(1)
        s.add_ch(guid)
        s.announce(guid)
        await s.distribute()
        s.run_for(0.05)
        t = s.distribution.transfers[(guid, s.image)]
        assert t.state is TransferState.ACTIVE
        result = await forget(s, guid)
        assert result["forgotten"] == []
        ((refusal),) = result["refused"]
        assert refusal["error"] == "HUB_BUSY"
        assert "active" in refusal["detail"]
        assert s.registry.get(guid) is not None
        assert guid not in s.registry.forgotten
        s.run_until(lambda: t.state is TransferState.HELD)
        # ended, its final state not yet committed: still refused
        assert (await forget(s, guid))["refused"][0]["error"] == "HUB_BUSY"
        await s.settle()
        assert [f["guid"] for f in (await forget(s, guid))["forgotten"]] == [guid]


async def test_a_retained_announcement_does_not_bring_it_back_a_live_one_does_even_after_a_restart(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        (guid,) = guids(1)
        s.add_ch(guid)
        s.announce(guid, retain=True)
        await forget(s, guid)
        s.announce(guid, retain=True)  # the broker replays it (otad reconnected)
        await s.registry.flushed()
        assert s.registry.get(guid) is None
        release, clock, chs = s.release, s.clock, s.chs
    async with shell(tmp_path, release=release, clock=clock) as s:
        s.chs = chs
        assert guid in s.registry.forgotten
        assert await s.store.forgotten_hubs() == {guid}
        s.announce(guid, retain=True)
        await s.registry.flushed()
        assert s.registry.get(guid) is None
        s.announce(guid)  # live: the CH connected
        await s.registry.flushed()
        hub = s.registry.get(guid)
        assert hub is not None
        assert hub.online
        assert guid not in s.registry.forgotten
        assert await s.store.forgotten_hubs() == set()
        assert await s.store.hub(guid) is not None
        assert [e.guid for e in await events_of(s, HubOnline)] == [guid]
        client_down = s.client.take(topics.down(guid))
        assert client_down == []  # nothing was sent to it on the way


async def test_a_premises_relaying_or_activating_is_refused_until_its_devices_are_done(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path) as p:
        sh = p.sh
        await sh.settle()
        # the CH holds the image, the HAN relay to its devices is awaited (a deadline runs)
        busy = (await forget(sh, PREMISES))["refused"]
        assert [r["error"] for r in busy] == ["HUB_BUSY"]
        assert "held_by_ch" in busy[0]["detail"]
        await p.relay()
        await p.until(lambda: all(p.state(d) is DeviceState.HELD_BY_DEVICE for d in p.devices))
        at = int(sh.daemon._wall_clock()) + 3600
        await p.activate(*p.devices, at=at)
        await p.until(lambda: all(p.state(d) is DeviceState.ACTIVATION_PENDING for d in p.devices))
        busy = (await forget(sh, PREMISES))["refused"]
        assert [r["error"] for r in busy] == ["HUB_BUSY"]
        assert "activation_pending" in busy[0]["detail"]
        await p.until(
            lambda: all(p.state(d) is DeviceState.CONFIRMED for d in p.devices), max_s=7200
        )
        await sh.settle()
        devices = len(sh.daemon.devices.records)
        result = await forget(sh, PREMISES)
        assert [f["devices"] for f in result["forgotten"]] == [devices]
        assert sh.daemon.devices.records == {}
        assert sum(sh.daemon.devices.state_counts.values()) == 0
        assert await sh.store.devices() == []
        # the activation counters must never be issued again: their commands stay recorded
        db = sqlite3.connect(f"file:{tmp_path / 'state' / 'otad.db'}?mode=ro", uri=True)
        with contextlib.closing(db):
            (kept,) = db.execute("SELECT count(*) FROM activation_commands").fetchone()
        assert kept >= len(p.devices)
        assert (await request(sh, "devices"))["result"] == []
