"""The five machines share one driving convention (``protocol/__init__.py``): inputs named
``*_received(..., now)`` with ``now`` last on the machine's clock, one timer
(``next_deadline()``/``handle_timer(now)``), outcomes drained by ``events()``. Read from the
signatures, so a machine that drifts from it fails here.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

from protocol.clock import Monotonic, UnixTime
from protocol.device.device import Device
from protocol.han.client import HanClient
from protocol.han.server import HanServer
from protocol.wan.receiver import Receiver
from protocol.wan.sender import Sender

#: machine -> its clock
MACHINES: dict[type[Any], Any] = {
    Sender: Monotonic,
    Receiver: Monotonic,
    HanServer: UnixTime,
    HanClient: UnixTime,
    Device: UnixTime,
}

#: the machines that report outcomes through ``events()`` (the others return them)
WITH_EVENTS = {Sender, HanServer, HanClient}

#: inputs that do not depend on time, and why (see protocol/__init__.py)
TIME_FREE_INPUTS = {
    (Device, "image_data_received"),  # a block is checked against its signed hash
}


def public_methods(cls: type[Any]) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


def conventions_broken(cls: type[Any], clock: Any, *, with_events: bool) -> list[str]:
    """What in ``cls``'s public methods departs from the driving convention."""
    problems: list[str] = []
    methods = public_methods(cls)
    for name, method in methods.items():
        hints = typing.get_type_hints(method)
        parameters = list(inspect.signature(method).parameters)
        if name.startswith(("drain", "on_", "handle_")) and name != "handle_timer":
            problems.append(f"{cls.__name__}.{name}: not a name of the convention")
        if "now" in parameters and hints["now"] is not clock:
            got = getattr(hints["now"], "__name__", hints["now"])
            problems.append(f"{cls.__name__}.{name}: now is {got}, not {clock.__name__}")
        timed_input = name.endswith("_received") and (cls, name) not in TIME_FREE_INPUTS
        if timed_input and parameters[-1:] != ["now"]:
            problems.append(f"{cls.__name__}.{name}: now is not its last parameter")
    if "next_deadline" not in methods or "handle_timer" not in methods:
        problems.append(f"{cls.__name__}: no next_deadline()/handle_timer(now)")
    else:
        deadline = typing.get_type_hints(methods["next_deadline"])["return"]
        if deadline != clock | None:
            problems.append(f"{cls.__name__}.next_deadline returns {deadline}")
        if list(inspect.signature(methods["handle_timer"]).parameters) != ["self", "now"]:
            problems.append(f"{cls.__name__}.handle_timer takes more than now")
    if with_events != ("events" in methods):
        problems.append(f"{cls.__name__}: events() {'missing' if with_events else 'unexpected'}")
    if not any(name.endswith("_received") for name in methods):
        problems.append(f"{cls.__name__}: no *_received input")
    return problems


@pytest.mark.parametrize("cls", MACHINES, ids=lambda cls: cls.__name__)
def test_each_machine_follows_the_driving_convention(cls: type[Any]) -> None:
    assert conventions_broken(cls, MACHINES[cls], with_events=cls in WITH_EVENTS) == []


def test_a_machine_off_the_convention_is_noticed() -> None:
    class Drifted:
        def drain_events(self) -> list[object]:
            return []

        def frame_received(self, now: Monotonic, data: bytes) -> None:
            pass

        def next_deadline(self) -> Monotonic | None:
            return None

        def handle_timer(self, now: Monotonic, extra: int) -> None:
            pass

    problems = conventions_broken(Drifted, UnixTime, with_events=True)
    assert any("drain_events: not a name" in p for p in problems)
    assert any("frame_received: now is Monotonic, not UnixTime" in p for p in problems)
    assert any("frame_received: now is not its last" in p for p in problems)
    assert any("next_deadline returns" in p for p in problems)
    assert any("handle_timer takes more" in p for p in problems)
    assert any("events() missing" in p for p in problems)
