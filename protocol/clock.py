"""The protocol's two clocks, as two types, so that mypy refuses one where the other belongs.

* :data:`Monotonic` -- seconds on a clock that never jumps and starts anywhere (asyncio's
  ``loop.time()``). The WAN machines (:class:`~protocol.wan.sender.Sender`,
  :class:`~protocol.wan.receiver.Receiver`) run on it: round trips, retransmission timeouts and
  acknowledgement delays are differences, and a wall clock stepped by NTP would corrupt them.
* :data:`UnixTime` -- wall-clock seconds since 1970-01-01 00:00 UTC (``time.time()``). Signed
  data is dated in it (a manifest's ``created``/``expires``, an activation's ``execute_at``), so
  the trust check (:func:`~protocol.release.trust.verify_manifest`,
  :func:`~protocol.release.otaimg.verify`), the :class:`~protocol.device.device.Device` and the
  HAN machines (:class:`~protocol.han.server.HanServer`, :class:`~protocol.han.client.HanClient`,
  which hand their time to the device) run on it. The HAN frames carry it as ZigBee UTCTime:
  :func:`protocol.han.frames.zigbee_time` converts, in one place.

Both are ``NewType``\\ s of ``float``: nothing at run time, a distinct type to mypy. A shell
names its clock once, where it reads it (``Monotonic(loop.time())``, ``UnixTime(time.time())``);
a machine given ``loop.time()`` where it needs wall time (manifests that never expire,
activations that fire at once) is then a type error instead of a silent bug. Durations stay
plain ``float`` seconds; :func:`later` moves an instant by one and keeps its clock.
"""

from __future__ import annotations

from typing import NewType, TypeVar, cast

Monotonic = NewType("Monotonic", float)
"""Seconds on the monotonic clock (zero anywhere): the WAN machines' time."""

UnixTime = NewType("UnixTime", float)
"""Wall-clock seconds since 1970-01-01 00:00 UTC: the time of trust, the device and the HAN."""

_Instant = TypeVar("_Instant", Monotonic, UnixTime)


def later(instant: _Instant, seconds: float) -> _Instant:
    """``instant`` moved by ``seconds`` (negative: earlier), on the same clock."""
    return cast(_Instant, instant + seconds)
