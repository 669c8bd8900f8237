"""What otactl's live views share: a feed of JSON messages from topics, and an in-place screen.

* :func:`feed` subscribes (a private, short-lived MQTT session) to a few topic filters and puts
  every JSON object that arrives on an :class:`asyncio.Queue` as a :class:`Message`, retained
  ones included: the views follow otad's retained status topics and its events, they never poll.
* :class:`Screen` draws a frame of lines: on a TTY the previous frame is overwritten in place
  (ANSI cursor-up and erase; lines cut to the terminal's width), otherwise the frame is
  appended as plain lines (logs, CI), at most every ``plain_interval`` seconds unless the
  caller forces it.

Used by ``otactl watch`` (:mod:`otad.ctl.watch`), ``otactl campaign watch``
(:mod:`otad.ctl.campaignview`) and ``otactl campaign events --follow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mqttio import MqttConnectError, MqttSettings, create_client


class WatchError(Exception):
    """A live view cannot go on; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON object received on ``topic`` (``retained``: the broker's stored copy)."""

    topic: str
    body: dict[str, Any]
    retained: bool


@contextlib.asynccontextmanager
async def feed(
    host: str,
    port: int,
    filters: Sequence[str],
    *,
    wait_s: float,
    name: str = "otactl-live",
    settings: MqttSettings | None = None,
) -> AsyncIterator[asyncio.Queue[Message]]:
    """Subscribe to ``filters`` and yield the queue their JSON objects arrive on (anything else
    is dropped); :class:`WatchError` if the broker cannot be reached within ``wait_s``.
    ``settings``: how to connect (credentials, TLS), instead of plainly to ``host:port``."""
    messages: asyncio.Queue[Message] = asyncio.Queue()

    def on_message(topic: str, payload: bytes, retain: bool) -> None:
        with contextlib.suppress(ValueError):
            body = json.loads(payload)
            if isinstance(body, dict):
                messages.put_nowait(Message(topic, body, retain))

    client = create_client(
        "gmqtt",
        settings
        or MqttSettings(
            client_id=f"{name}-{os.getpid()}-{secrets.token_hex(3)}",
            host=host,
            port=port,
            connect_timeout=wait_s,
        ),
    )
    client.set_message_handler(on_message)
    for topic_filter in filters:
        await client.subscribe(topic_filter, 1)
    try:
        await asyncio.wait_for(client.connect(fail_fast=True), wait_s)
    except (MqttConnectError, TimeoutError, OSError) as exc:
        raise WatchError(f"cannot reach the MQTT broker: {exc or 'timed out'}") from None
    try:
        yield messages
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


class Screen:
    """A frame of lines redrawn in place on a TTY, appended as plain lines otherwise."""

    def __init__(
        self, stream: TextIO, *, tty: bool | None = None, plain_interval: float = 0.0
    ) -> None:
        """``plain_interval``: the least seconds between two plain (non-TTY) frames."""
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.plain_interval = plain_interval
        self._drawn = 0
        self._last_plain: float | None = None
        self._last_frame: list[str] = []

    def draw(self, lines: Sequence[str], *, force: bool = False) -> bool:
        """Show ``lines``; return whether anything was written. Plain mode writes a frame only
        when it differs from the last one written and ``plain_interval`` has passed (or
        ``force``)."""
        frame = list(lines)
        if self.tty:
            # a wrapped line would take two rows and the next redraw would start one row short
            columns = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
            out = [f"\x1b[{self._drawn}F"] if self._drawn else []
            out += [line[:columns] + "\x1b[K\n" for line in frame]
            if len(frame) < self._drawn:
                out.append("\x1b[J")  # erase what the longer last frame left below
            self.stream.write("".join(out))
            self.stream.flush()
            self._drawn = len(frame)
            return True
        now = time.monotonic()
        if frame == self._last_frame and not force:
            return False
        due = self._last_plain is None or now - self._last_plain >= self.plain_interval
        if not (due or force):
            return False
        self._last_plain = now
        self._last_frame = frame
        self.stream.write("".join(line + "\n" for line in frame))
        self.stream.flush()
        return True
