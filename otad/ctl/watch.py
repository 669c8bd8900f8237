"""``otactl watch``: live progress of every distribution, from otad's retained status.

It does not poll the daemon: it subscribes to ``ota/v1/otad/status`` (retained, republished by
otad whenever it changes, at most every 2 s), the same feed any monitoring tool reads, and draws
one progress line per image with transfers in progress: blocks acknowledged over the whole
distribution, CHs holding the image, an ETA from the recent rate, and ``STALLED for ...``
instead of an ETA when otad reports the distribution stalled (``distribution.stalled``) or
nothing moves.

Exit status: 0 once every watched distribution has no transfer left in progress and none
failed; 1 if some failed or were refused; 2 when otad is offline or never answers; 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from mqttio import MqttSettings
from otad.ctl.live import Message, Screen, WatchError, feed
from otad.progress import ProgressBar
from protocol.wire import topics

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
_ENDED_BADLY = ("failed", "rejected", "timed_out", "cancelled")
__all__ = ["WatchError", "distribution_line", "watch"]


def distribution_line(image: str, entry: dict[str, Any]) -> tuple[int, int, str]:
    """(done blocks, total blocks, extra text) of one image's status entry."""
    per = int(entry.get("blocks_per_transfer") or 0)
    states: dict[str, int] = entry.get("transfers", {})
    active = states.get("active", 0)
    held = states.get("held", 0)
    bad = sum(states.get(s, 0) for s in _ENDED_BADLY)
    done = held * per + int(entry.get("blocks_acked", 0))
    total = (active + held) * per
    extra = f"held {held}/{active + held + bad}  active {active}"
    if bad:
        extra += f"  failed {bad}"
    if entry.get("stalled_transfers"):
        extra += f"  stalled {entry['stalled_transfers']}"
    return done, total, extra


async def watch(
    host: str,
    port: int,
    *,
    image: str | None = None,
    once: bool = False,
    wait_s: float = 10.0,
    stream: TextIO | None = None,
    settings: MqttSettings | None = None,
) -> int:
    """Run the watch (see the module docstring); return the exit status. ``settings``: how to
    connect (credentials, TLS), instead of plainly to ``host:port``."""
    out = stream if stream is not None else sys.stdout
    async with feed(
        host, port, [topics.OTAD_STATUS], wait_s=wait_s, name="otactl-watch", settings=settings
    ) as queue:
        return await _follow(queue, image, once, wait_s, out)


async def _follow(
    messages: asyncio.Queue[Message],
    image: str | None,
    once: bool,
    wait_s: float,
    out: TextIO,
) -> int:
    bars: dict[str, ProgressBar] = {}
    seen: dict[str, dict[str, Any]] = {}
    screen = Screen(out)
    while True:
        try:
            message = await asyncio.wait_for(messages.get(), wait_s if not seen else 3 * wait_s)
        except TimeoutError:
            raise WatchError(
                "no status from otad (is it running and connected to this broker?)"
            ) from None
        status = message.body
        if status.get("state") != "online":
            raise WatchError("otad is offline (its retained status says so)")
        current: dict[str, dict[str, Any]] = {
            sha: entry
            for sha, entry in status.get("distributions", {}).items()
            if image is None or sha.startswith(image.lower())
        }
        seen.update(current)
        if not seen:
            out.write("no distribution in progress\n")
            return EXIT_OK
        lines = []
        finished = True
        failed = False
        for sha, entry in seen.items():
            live = current.get(sha)
            if live is None:  # no longer in the status: nothing active any more
                live = {**entry, "transfers": {**entry.get("transfers", {}), "active": 0}}
            done, total, extra = distribution_line(sha, live)
            bar = bars.get(sha)
            if bar is None:
                bar = bars[sha] = ProgressBar(total, label=sha[:12], stream=out, tty=screen.tty)
            bar.total = total
            stalled = bool(live.get("stalled"))
            lines.append(bar.render(done, extra, time.monotonic(), stalled=stalled))
            states = live.get("transfers", {})
            finished = finished and not states.get("active")
            failed = failed or any(states.get(s) for s in _ENDED_BADLY)
        screen.draw(lines, force=True)
        if once or finished:
            return EXIT_FAILED if failed else EXIT_OK
