"""The operator-tool side of the control plane (:mod:`otad.control`): one request, one answer.

>>> async with CtlClient("127.0.0.1", 1883) as ctl:            # doctest: +SKIP
...     hubs = await ctl.call("fleet.list")

:meth:`CtlClient.call` raises :class:`CtlError` with the daemon's typed reason when it refuses,
and :class:`CtlTimeout` when no answer comes in time (otad not running, or not connected to this
broker). A broker that cannot be reached raises :class:`CtlUnreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from types import TracebackType
from typing import Any

from mqttio import MqttClient, MqttConnectError, MqttSettings, create_client
from protocol.wire import topics

SCHEMA_VERSION = 1
DEFAULT_TIMEOUT = 10.0


class CtlError(Exception):
    """The daemon refused the request: ``reason`` is a :class:`~protocol.errors.Reason` name."""

    def __init__(self, reason: str, detail: str, code: int | None = None) -> None:
        """``reason`` and ``detail`` as the daemon sent them."""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.code = code


class CtlTimeout(Exception):  # noqa: N818 - the name says what happened
    """No answer within the timeout."""


class CtlUnreachable(Exception):  # noqa: N818
    """The broker could not be reached."""


class CtlClient:
    """A short-lived control connection (its own client name and response topic)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        library: str = "gmqtt",
        name: str | None = None,
    ) -> None:
        """``timeout`` bounds the connection and each :meth:`call`."""
        self.name = name or f"otactl-{os.getpid()}-{secrets.token_hex(4)}"
        topics.check_level(self.name)
        self.timeout = timeout
        self._client: MqttClient = create_client(
            library,
            MqttSettings(
                client_id=self.name,
                host=host,
                port=port,
                connect_timeout=timeout,
                reconnect_min=0.2,
                reconnect_max=1.0,
            ),
        )
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._client.set_message_handler(self._on_message)

    async def __aenter__(self) -> CtlClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and subscribe to the response topic; :class:`CtlUnreachable` on failure."""
        await self._client.subscribe(topics.ctl_response(self.name), 1)
        try:
            await asyncio.wait_for(self._client.connect(fail_fast=True), self.timeout)
        except (MqttConnectError, TimeoutError, OSError) as exc:
            raise CtlUnreachable(f"cannot reach the MQTT broker: {exc or 'timed out'}") from None

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            response = json.loads(payload)
        except ValueError:
            return
        if not isinstance(response, dict):
            return
        waiter = self._waiters.get(str(response.get("id")))
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    async def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its ``result``; raises :class:`CtlError` or
        :class:`CtlTimeout`."""
        request_id = secrets.token_hex(8)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        body = json.dumps(
            {"v": SCHEMA_VERSION, "id": request_id, "cmd": cmd, "args": args or {}},
            separators=(",", ":"),
        ).encode()
        try:
            self._client.publish(topics.ctl_request(self.name), body, 1, False)
            try:
                response = await asyncio.wait_for(waiter, self.timeout)
            except TimeoutError:
                raise CtlTimeout(
                    f"otad did not answer {cmd!r} within {self.timeout:g} s"
                    " (is it running and connected to this broker?)"
                ) from None
        finally:
            self._waiters.pop(request_id, None)
        if response.get("ok") is True:
            return response.get("result")
        raise CtlError(
            str(response.get("error", "INTERNAL")),
            str(response.get("detail", "")),
            response.get("code") if isinstance(response.get("code"), int) else None,
        )


async def call_once(
    host: str, port: int, cmd: str, args: dict[str, Any] | None = None, *, wait_s: float
) -> Any:
    """Connect, make one call (waiting up to ``wait_s`` for each step), disconnect."""
    async with CtlClient(host, port, timeout=wait_s) as ctl:
        return await ctl.call(cmd, args)


# --------------------------------------------------------------------------- otactl helpers


class CtlFailure(Exception):  # noqa: N818
    """What ``otactl`` reports on stderr (one line) before exiting with status 2."""


def run_command(
    broker: tuple[str, int], cmd: str, args: dict[str, Any] | None, *, timeout: float
) -> Any:
    """Make one call from synchronous code (``otactl``); raise :class:`CtlFailure` with a
    one-line message for every way it can fail."""
    try:
        return asyncio.run(call_once(broker[0], broker[1], cmd, args, wait_s=timeout))
    except CtlError as exc:
        raise CtlFailure(f"otad refused {cmd}: {exc.reason}: {exc.detail}") from None
    except (CtlTimeout, CtlUnreachable) as exc:
        raise CtlFailure(str(exc)) from None


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def format_fleet(hubs: list[dict[str, Any]]) -> str:
    """``otactl fleet list`` as a table."""
    rows = [
        [
            h["guid"],
            "online" if h["online"] else "offline",
            f"0x{h['fw_version']:08x}",
            f"0x{h['hw_version']:04x}",
            h["supplier"],
            h["segment"],
            f"{h['limits']['window']}/{h['limits']['max_block']}",
            ",".join(d["device_type"] for d in h["han"]) or "-",
        ]
        for h in hubs
    ]
    headers = ["GUID", "STATE", "FIRMWARE", "HW", "SUPPLIER", "SEGMENT", "WIN/BLOCK", "HAN"]
    online = sum(1 for h in hubs if h["online"])
    return f"{_table(headers, rows)}\n{len(hubs)} hub(s), {online} online"


def format_transfers(rows: list[dict[str, Any]]) -> str:
    """``otactl transfers`` as a table."""
    table = []
    for r in rows:
        held = r.get("held_sha256")
        if held is None:
            held_text = "-"
        else:
            held_text = f"{held[:12]} ({'ok' if r.get('matches') else 'MISMATCH'})"
        table.append(
            [
                r["guid"],
                r["image"][:12],
                r["state"] if not r.get("reason") else f"{r['state']}:{r['reason']}",
                f"{r['blocks_acked']}/{r['blocks_total']}",
                str(r["bytes_sent"]),
                held_text,
            ]
        )
    headers = ["GUID", "IMAGE", "STATE", "ACKED/TOTAL", "BYTES SENT", "HELD SHA-256"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return f"{_table(headers, table)}\n{len(rows)} transfer(s): {summary}"


def format_import(result: dict[str, Any]) -> str:
    """``otactl image import`` summary line."""
    verb = "imported" if result.get("new") else "already imported"
    return (
        f"{verb} {result['sha256']}: {result['device_type']} fw 0x{result['fw_version']:08x}"
        f" hw 0x{result['hw_min']:04x}-0x{result['hw_max']:04x}, {result['size']} bytes,"
        f" {result['blocks']}x{result['block_size']}"
    )


def format_distribute(result: dict[str, Any]) -> str:
    """``otactl distribute`` summary (one line, then one line per refused target)."""
    lines = [
        f"image {result['image'][:16]}: {len(result['started'])} started,"
        f" {len(result['already'])} already running or done, {len(result['refused'])} refused"
    ]
    lines += [f"  {r['guid']}: {r['error']}: {r['detail']}" for r in result["refused"]]
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    """``otactl status``: a few lines a person reads at a glance."""
    hubs = status.get("hubs", {})
    transfers = status.get("transfers", {})
    scheduler = status.get("scheduler", {})
    lag = status.get("loop_lag", {})
    busy = ", ".join(f"{k} {v}" for k, v in sorted(transfers.items()) if v) or "none"
    lines = [
        f"otad {status.get('version', '?')} (pid {status.get('pid', '?')}) "
        f"{status.get('state', '?')}, {status.get('library', '?')}",
        f"hubs: {hubs.get('online', 0)} online of {hubs.get('known', 0)} known; "
        f"images: {status.get('images', 0)}",
        f"transfers: {busy}; stalled: {status.get('stalled', 0)}",
        f"scheduler: {scheduler.get('blocks_in_flight', 0)}/{scheduler.get('budget', '?')} "
        f"blocks in flight, {scheduler.get('handshakes', 0)} asks unanswered, "
        f"{scheduler.get('pending', 0)} waiting for admission, "
        f"{scheduler.get('queued', 0)} queued for budget, "
        f"{scheduler.get('throttled', 0)} for segment tokens; longest wait now "
        f"{scheduler.get('longest_wait_s', 0)} s",
        f"event-loop lag: p50 {lag.get('p50_ms', 0)} ms, p99 {lag.get('p99_ms', 0)} ms, "
        f"max {lag.get('max_ms', 0)} ms over {lag.get('window_s', 0)} s",
    ]
    for image, entry in sorted(status.get("distributions", {}).items()):
        states = ", ".join(f"{k} {v}" for k, v in sorted(entry.get("transfers", {}).items()))
        flag = "  STALLED" if entry.get("stalled") else ""
        lines.append(f"  {image[:16]}: {states}{flag}")
    return "\n".join(lines)
