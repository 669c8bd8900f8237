"""A transfer's recorded state, and which final state each failure reason ends in (SPEC 7.11)."""

from __future__ import annotations

import pytest

from otad.store import TransferState
from protocol.errors import Reason


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        (Reason.TIMED_OUT, TransferState.TIMED_OUT),  # momentum: the CH stopped answering
        (Reason.CANCELLED, TransferState.CANCELLED),
        (Reason.IMAGE_HASH, TransferState.FAILED),
        (Reason.LIMITS_EXCEEDED, TransferState.FAILED),
        (Reason.INTERNAL, TransferState.FAILED),
        (Reason.WRONG_DEVICE_TYPE, TransferState.REJECTED),  # the CH's refusal, passed through
        (Reason.HARDWARE_OUT_OF_RANGE, TransferState.REJECTED),
        (Reason.ROLLBACK, TransferState.REJECTED),
        (Reason.EXPIRED, TransferState.REJECTED),
        (Reason.WRONG_IMAGE, TransferState.REJECTED),
        (Reason.STORAGE_FULL, TransferState.REJECTED),
    ],
)
def test_each_failure_reason_ends_in_one_final_state(reason: Reason, state: TransferState) -> None:
    assert TransferState.for_reason(reason) is state


def test_every_reason_ends_in_a_final_state() -> None:
    assert {TransferState.for_reason(r) for r in Reason} == set(TransferState) - {
        TransferState.ACTIVE,
        TransferState.HELD,
    }
