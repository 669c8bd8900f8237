"""The simulated HAN link of a virtual premises, and the clock that lets HAN hours pass in seconds.

Two small parts, each with one job, used by :mod:`loadtest.premises`:

* :class:`HanClock` -- the **one place** where the time-acceleration factor lives. The shell (an
  asyncio virtual CH, or a virtual-time test) has one clock, wall seconds
  (:data:`~protocol.clock.UnixTime`); the HAN machines (:class:`~protocol.han.server.HanServer`,
  :class:`~protocol.han.client.HanClient`, :class:`~protocol.device.device.Device`) run on *HAN
  time*, also a :data:`~protocol.clock.UnixTime`, which starts equal to the shell's at ``epoch``
  and runs ``factor`` times as fast. With factor 1 HAN time *is* the shell's wall clock.
* :class:`HanLink` -- one device's radio link to its CH, in HAN time: both directions carry
  whole frames, one after the other at ``frame_rate`` frames a second (a frame waits for the one
  before it: airtime), each arriving ``latency`` seconds after it left, each lost with
  probability ``loss`` (seeded: the same seed loses the same frames). ``block_size`` (40-63
  bytes, ZigBee OTA's range) is the image-block payload the device asks for on this link.

Nothing here reads a clock or does I/O: the link says *when* a frame arrives (or that it is
lost); whoever owns the simulation delivers it then.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from protocol.clock import UnixTime
from protocol.han.frames import MAX_BLOCK_DATA, MIN_BLOCK_DATA

__all__ = ["Direction", "HanClock", "HanLink", "LinkConfig"]


@dataclass(frozen=True, slots=True)
class HanClock:
    """Shell time ⇄ HAN time: ``han = epoch + (shell - epoch) * factor``."""

    epoch: UnixTime
    factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError("the time-acceleration factor must be positive")

    def han(self, shell: UnixTime) -> UnixTime:
        """The HAN instant at shell instant ``shell``."""
        return UnixTime(self.epoch + (shell - self.epoch) * self.factor)

    def shell(self, han: UnixTime) -> UnixTime:
        """The shell instant at which HAN time reaches ``han``."""
        return UnixTime(self.epoch + (han - self.epoch) / self.factor)


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """One device's HAN link (times in HAN seconds)."""

    block_size: int = 50  # image-block payload the device asks for, bytes (40-63)
    frame_rate: float = 40.0  # frames a second each way (airtime: one frame after the other)
    loss: float = 0.0  # probability that any one frame is lost, either way
    latency: float = 0.02  # seconds from the end of a frame's airtime to its arrival

    def __post_init__(self) -> None:
        if not MIN_BLOCK_DATA <= self.block_size <= MAX_BLOCK_DATA:
            raise ValueError(f"block_size must be {MIN_BLOCK_DATA}..{MAX_BLOCK_DATA}")
        if not self.frame_rate > 0:
            raise ValueError("frame_rate must be positive")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.latency < 0:
            raise ValueError("latency must not be negative")


class Direction(Enum):
    """Which way a frame travels on a link."""

    TO_DEVICE = "to_device"
    TO_CH = "to_ch"


class HanLink:
    """One device ⇄ CH link: when each frame arrives, or that it is lost (module docstring)."""

    __slots__ = ("_free_at", "_rng", "config", "frames_lost", "frames_sent")

    def __init__(self, config: LinkConfig, seed: int | str) -> None:
        self.config = config
        self._rng = random.Random(seed)
        self._free_at = {d: UnixTime(0.0) for d in Direction}
        self.frames_sent = 0
        self.frames_lost = 0

    def transmit(self, direction: Direction, at: UnixTime) -> UnixTime | None:
        """Send one frame ``direction`` at HAN time ``at``; its arrival time, or ``None`` if lost.

        A lost frame still takes its airtime (it was sent; nobody heard it)."""
        airtime = 1.0 / self.config.frame_rate
        departure = max(at, self._free_at[direction])
        self._free_at[direction] = UnixTime(departure + airtime)
        self.frames_sent += 1
        if self.config.loss and self._rng.random() < self.config.loss:
            self.frames_lost += 1
            return None
        return UnixTime(departure + airtime + self.config.latency)
