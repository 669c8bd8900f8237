"""Inbound MQTT packets, bounded: what a client reads from its broker before its library sees it.

A broker without ``max_packet_size`` passes a packet of any size (MQTT allows 256 MiB). gmqtt
reassembles one by appending every read to a buffer that it re-slices after each parse, so an
80 MiB PUBLISH read 8 KiB at a time copies the growing buffer ten thousand times: measured, the
packet had not arrived after 120 s, and the loop spent its time copying. Whatever the broker
lets through, a client must spend a bounded time on a packet it will refuse.

:class:`InboundFilter` is the sans-IO gate between the socket and the library's parser. It reads
only MQTT's fixed header (type byte and remaining length, MQTT 3.1.1 §2.2) of each packet and:

* passes a packet of at most ``whole_above`` bytes straight through, byte for byte, as it comes
  (the hot path: acknowledgements, blocks; the input object itself when nothing was cut);
* gathers a larger one, up to ``max_packet`` bytes, in one ``bytearray`` and hands it over whole,
  so the library appends and parses it once (linear time, whatever its size);
* drops a packet above ``max_packet`` as it streams past (nothing of it is kept but the first
  bytes of a PUBLISH, enough for its topic and packet id) and reports it as a
  :class:`DroppedPacket`, so the adapter can log it and acknowledge a QoS 1 PUBLISH (the broker
  would otherwise hold one of its in-flight slots for that client).

State machine, per packet (``_state``)::

    HEADER --header complete, size <= whole_above--> THROUGH (bytes go through as they come)
    HEADER --header complete, size <= max_packet---> WHOLE  (bytes gathered, handed over at end)
    HEADER --header complete, size > max_packet----> DROP   (bytes skipped, reported at end)
    THROUGH | WHOLE | DROP --last byte of the packet--> HEADER

A fixed header whose remaining length runs past four bytes is malformed (§2.2.3):
:class:`MalformedPacketError`, and the adapter drops the connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["DroppedPacket", "InboundFilter", "MalformedPacketError"]

_PUBLISH: Final = 3
#: Bytes of a dropped PUBLISH's body kept for its topic and packet id (2 + 65,535 + 2 at most).
_PUBLISH_PREFIX: Final = 2 + 65_535 + 2


class MalformedPacketError(ValueError):
    """The byte stream is not MQTT (a remaining length longer than four bytes)."""


class _State(enum.Enum):
    HEADER = "header"
    THROUGH = "through"
    WHOLE = "whole"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class DroppedPacket:
    """A packet above the limit, skipped: its type (MQTT control packet type, 3 for PUBLISH),
    size (fixed header included), and for a PUBLISH its QoS, topic (as far as it was readable,
    None if not) and packet id (None at QoS 0)."""

    packet_type: int
    size: int
    qos: int
    topic: str | None
    packet_id: int | None


class InboundFilter:
    """The gate between a socket and an MQTT library's parser (see the module docstring)."""

    def __init__(self, *, max_packet: int, whole_above: int) -> None:
        """``max_packet``: the largest packet (bytes, fixed header included) handed over;
        ``whole_above``: packets larger than this are handed over in one piece."""
        if max_packet < 2:
            raise ValueError(f"max_packet must be >= 2, got {max_packet}")
        if whole_above < 2:
            raise ValueError(f"whole_above must be >= 2, got {whole_above}")
        self.max_packet = max_packet
        self._whole_above = whole_above
        self._state = _State.HEADER
        self._head = bytearray()  # the fixed header read so far (held back until complete)
        self._left = 0  # bytes of the current packet's body still to come
        self._whole = bytearray()
        self._size = 0
        self._prefix = bytearray()
        self.dropped: list[DroppedPacket] = []
        """Packets dropped since the caller last cleared this list."""
        self.dropped_total = 0
        """Packets dropped since this filter was made."""

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes read from the socket; return what the library may parse (``data``
        itself when nothing was held back, gathered or cut)."""
        n = len(data)
        i = 0
        start = 0  # where the run of bytes passed through from ``data`` began
        out: list[bytes] = []
        while i < n:
            state = self._state
            if state is _State.THROUGH:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._state = _State.HEADER
                continue
            if state is _State.WHOLE:
                take = min(self._left, n - i)
                self._whole += data[i : i + take]
                i += take
                self._left -= take
                if not self._left:
                    out.append(bytes(self._whole))
                    self._whole = bytearray()
                    self._state = _State.HEADER
                start = i
                continue
            if state is _State.DROP:
                take = min(self._left, n - i)
                room = _PUBLISH_PREFIX - len(self._prefix)
                if room > 0 and self._head[0] >> 4 == _PUBLISH:
                    self._prefix += data[i : i + min(take, room)]
                i += take
                self._left -= take
                if not self._left:
                    self._report_drop()
                    self._state = _State.HEADER
                start = i
                continue
            # HEADER: the type byte, then 1-4 bytes of remaining length
            header_at = i
            had = len(self._head)
            while i < n:
                self._head.append(data[i])
                i += 1
                if len(self._head) >= 2 and not self._head[-1] & 0x80:
                    break
                if len(self._head) > 4 and self._head[-1] & 0x80:
                    raise MalformedPacketError("remaining length longer than four bytes")
            else:
                if len(self._head) < 2 or self._head[-1] & 0x80:
                    # the header runs on in the next read: hold it back until it is complete
                    if header_at > start:
                        out.append(data[start:header_at])
                    start = n
                    continue
            length = 0
            for k, byte in enumerate(self._head[1:]):
                length |= (byte & 0x7F) << (7 * k)
            size = len(self._head) + length
            if size <= self._whole_above:
                if had:  # the part held back from the previous read goes first
                    if header_at > start:
                        out.append(data[start:header_at])
                    out.append(bytes(self._head[:had]))
                    start = header_at
                self._head.clear()
                self._left = length
                self._state = _State.THROUGH if length else _State.HEADER
                continue
            if header_at > start:
                out.append(data[start:header_at])
            start = i
            self._left = length
            self._size = size
            if size <= self.max_packet:
                self._whole = bytearray(self._head)
                self._head.clear()
                self._state = _State.WHOLE
            else:
                self._prefix = bytearray()
                self._state = _State.DROP
        if not out:
            return data if start == 0 else data[start:]
        if start < n:
            out.append(data[start:])
        return b"".join(out)

    def _report_drop(self) -> None:
        first = self._head[0]
        packet_type, flags = first >> 4, first & 0x0F
        topic: str | None = None
        packet_id: int | None = None
        qos = 0
        if packet_type == _PUBLISH:
            qos = (flags >> 1) & 0x03
            prefix = self._prefix
            if len(prefix) >= 2:
                name_len = int.from_bytes(prefix[:2], "big")
                if len(prefix) >= 2 + name_len:
                    topic = bytes(prefix[2 : 2 + name_len]).decode("utf-8", "replace")
                    if qos and len(prefix) >= 4 + name_len:
                        packet_id = int.from_bytes(prefix[2 + name_len : 4 + name_len], "big")
        self.dropped.append(DroppedPacket(packet_type, self._size, qos, topic, packet_id))
        self.dropped_total += 1
        self._head.clear()
        self._prefix = bytearray()
