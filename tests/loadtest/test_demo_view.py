"""The demo's live view: phases per device from otad's ``otactl devices`` rows."""

from __future__ import annotations

from types import SimpleNamespace

from loadtest.demo import PHASES, ImageProgress, phase_of

IMAGE = "ab" * 32


def row(device_id: str, state: str, guid: str = "CH01", image: str = IMAGE) -> dict[str, str]:
    return {"device_id": device_id, "guid": guid, "state": state, "image": image}


def test_phases_follow_the_device_state_and_a_ch_needs_no_han_relay() -> None:
    assert [phase_of(row("D1", s)) for s in ("offered", "held_by_ch", "han_transfer")] == [0, 1, 1]
    assert [phase_of(row("D1", s)) for s in ("held_by_device", "activation_pending")] == [2, 2]
    assert [phase_of(row("D1", s)) for s in ("activated", "confirmed")] == [3, 4]
    assert phase_of(row("CH01", "held_by_ch")) == 2  # the CH is its own device
    assert phase_of(row("D1", "failed")) == 0


def test_a_device_that_failed_late_still_counts_in_the_phases_it_passed_and_is_done() -> None:
    progress = ImageProgress("B2", SimpleNamespace(sha256=bytes.fromhex(IMAGE)), expected=2)
    progress.update([row("D1", "offered"), row("D2", "offered"), row("X", "held", image="cd")])
    assert not progress.all_held
    progress.update([row("D1", "held_by_device"), row("D2", "held_by_device")])
    assert progress.all_held
    assert not progress.all_final
    assert [progress.reached(p) for p in range(len(PHASES))] == [2, 2, 0, 0]
    progress.update([row("D1", "confirmed"), row("D2", "failed")])
    assert progress.all_final
    assert [progress.reached(p) for p in range(len(PHASES))] == [2, 2, 1, 1]
    assert progress.done() == 2 * len(PHASES)
    assert progress.count("failed") == 1


def test_not_every_device_listed_is_not_final() -> None:
    progress = ImageProgress("CH", SimpleNamespace(sha256=bytes.fromhex(IMAGE)), expected=3)
    progress.update([row("CH01", "confirmed", guid="CH01"), row("CH02", "failed", guid="CH02")])
    assert not progress.all_final
    assert not progress.all_held
