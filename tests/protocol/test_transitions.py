"""Transitions as data: every machine enters exactly the edges of its table, and no other.

Each case builds a real machine, puts it in each of its states in turn, and asks its enter
function for each target state: an edge of the table must be taken, any other must raise
IllegalTransitionError and leave the state as it was. (That the machines only ever take listed
edges is what every other test of them checks: an unlisted edge would raise there.) SPEC's
copies of the tables are compared with these in test_spec.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from simlink import make_release

from protocol.clock import UnixTime
from protocol.device import device as device_module
from protocol.device.activation import ActivationCommand
from protocol.device.device import (
    ActivationState,
    Device,
    DeviceIdentity,
    FirmwareInfo,
    MemorySlotStore,
    SlotState,
)
from protocol.errors import IllegalTransitionError, ProtocolError
from protocol.han import client as client_module
from protocol.han import server as server_module
from protocol.han.client import ClientState, HanClient
from protocol.han.server import OfferedImage, ProgressiveImage, SessionState, _Session
from protocol.release.trust import TrustStore
from protocol.wan import receiver as receiver_module
from protocol.wan import sender as sender_module
from protocol.wan.receiver import TransferPhase, _Transfer
from protocol.wan.sack import Bitmap
from protocol.wan.sender import Sender, SenderState
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.messages import Limits

RELEASE = make_release(4 * 64, 64, seed=7)


def a_device() -> Device:
    identity = DeviceIdentity("0011223344556677", DeviceType.B2, 1, 0x1234, 0x0B02, JoinMode.CAD)
    key = ec.derive_private_key(0x7157, ec.SECP256R1())
    return Device(
        identity,
        TrustStore([key.public_key()]),
        MemorySlotStore(),
        running=FirmwareInfo(1, 1),
    )


COMMAND = ActivationCommand("0011223344556677", bytes(32), 1, execute_at=2_000_000_000)


@dataclass(frozen=True)
class Machine:
    """How to drive one machine's enter function directly."""

    name: str
    table: dict[Any, frozenset[Any]]
    states: type[Enum]
    build: Callable[[], Any]
    force: Callable[[Any, Any], None]  # put the machine in a state without an edge
    enter: Callable[[Any, Any], None]  # the machine's own enter function
    read: Callable[[Any], Any]


def force_activation(device: Device, state: ActivationState) -> None:
    device._scheduled = COMMAND if state is ActivationState.SCHEDULED else None


def schedule(device: Device, state: ActivationState) -> None:
    device._schedule(COMMAND if state is ActivationState.SCHEDULED else None)


MACHINES = [
    Machine(
        "Sender",
        sender_module.TRANSITIONS,
        SenderState,
        lambda: Sender(RELEASE.manifest, Limits(64, 4, 1024), now=0.0),
        lambda sender, state: setattr(sender, "_state", state),
        lambda sender, state: sender._enter(state),
        lambda sender: sender.state,
    ),
    Machine(
        "Receiver",
        receiver_module.TRANSITIONS,
        TransferPhase,
        lambda: _Transfer(
            RELEASE.signed, RELEASE.manifest, Bitmap(RELEASE.manifest.block_count), UnixTime(0.0)
        ),
        lambda transfer, phase: setattr(transfer, "phase", phase),
        lambda transfer, phase: transfer.enter(phase),
        lambda transfer: transfer.phase,
    ),
    Machine(
        "HanServer",
        server_module.TRANSITIONS,
        SessionState,
        lambda: _Session(
            "00124B00000000B1",
            OfferedImage(
                RELEASE.manifest, RELEASE.signed, ProgressiveImage(len(RELEASE.image)), None
            ),
            1_750_000_000.0,
        ),
        lambda session, state: setattr(session, "state", state),
        lambda session, state: session.enter(state),
        lambda session: session.state,
    ),
    Machine(
        "HanClient",
        client_module.TRANSITIONS,
        ClientState,
        lambda: HanClient(a_device()),
        lambda client, state: setattr(client, "_state", state),
        lambda client, state: client._enter(state),
        lambda client: client.state,
    ),
    Machine(
        "Device slot",
        device_module.SLOT_TRANSITIONS,
        SlotState,
        a_device,
        lambda device, state: setattr(device, "_slot_state", state),
        lambda device, state: device._enter_slot(state),
        lambda device: device.slot_state,
    ),
    Machine(
        "Device activation",
        device_module.ACTIVATION_TRANSITIONS,
        ActivationState,
        a_device,
        force_activation,
        schedule,
        lambda device: device.activation_state,
    ),
]
IDS = [machine.name for machine in MACHINES]


@pytest.mark.parametrize("machine", MACHINES, ids=IDS)
def test_the_table_has_a_row_for_every_state(machine: Machine) -> None:
    assert set(machine.table) == set(machine.states)
    assert all(targets <= set(machine.states) for targets in machine.table.values())


@pytest.mark.parametrize("machine", MACHINES, ids=IDS)
def test_every_legal_edge_enters_and_every_other_raises(machine: Machine) -> None:
    taken = refused = 0
    for current in machine.states:
        for new in machine.states:
            instance = machine.build()
            machine.force(instance, current)
            if new in machine.table[current]:
                machine.enter(instance, new)
                assert machine.read(instance) is new
                taken += 1
                continue
            with pytest.raises(IllegalTransitionError) as info:
                machine.enter(instance, new)
            assert (info.value.machine, info.value.current, info.value.new) == (
                machine.name,
                current,
                new,
            )
            assert machine.read(instance) is current  # nothing changed
            refused += 1
    assert taken == sum(map(len, machine.table.values()))
    assert refused == len(machine.states) ** 2 - taken


def test_an_illegal_transition_is_a_bug_not_a_protocol_error() -> None:
    assert issubclass(IllegalTransitionError, RuntimeError)
    assert not issubclass(IllegalTransitionError, ProtocolError)
    message = str(IllegalTransitionError("Sender", SenderState.FAILED, SenderState.OFFERING))
    assert message == "Sender: no transition FAILED -> OFFERING"
