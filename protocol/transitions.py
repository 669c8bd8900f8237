"""Transitions as data: how every state machine of the protocol changes state.

Each machine lists its allowed edges in a table, ``TRANSITIONS: Final[dict[State,
frozenset[State]]]`` beside its state enum, and enters every state through one function that
calls :func:`checked`. An edge missing from the table raises
:class:`~protocol.errors.IllegalTransitionError` at once, at the line that tried it, instead of
leaving the machine in a state its diagram does not have. SPEC.md draws each diagram and lists
its edges (§7.10, §8.3, §8.4, §8.6); a test compares those lists with the tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

from protocol.errors import IllegalTransitionError

_State = TypeVar("_State", bound=Enum)


def checked(
    table: Mapping[_State, frozenset[_State]], machine: str, current: _State, new: _State
) -> _State:
    """Return ``new`` if ``current -> new`` is an edge of ``table``; else raise
    :class:`~protocol.errors.IllegalTransitionError` naming ``machine``."""
    if new not in table[current]:
        raise IllegalTransitionError(machine, current, new)
    return new
