"""The operator-tool side of the control plane (:mod:`otad.control`): one request, one answer.

How ``otactl`` shows the answers is :mod:`otad.ctl.format`.

>>> async with CtlClient("127.0.0.1", 1883) as ctl:            # doctest: +SKIP
...     hubs = await ctl.call("fleet.list")

:meth:`CtlClient.call` raises :class:`CtlError` with the daemon's typed reason when it refuses,
and :class:`CtlTimeout` when no answer comes in time (otad not running, or not connected to this
broker). A broker that cannot be reached raises :class:`CtlUnreachable`.

With ``require_online`` (what ``otactl`` asks for) the client also reads otad's retained status
(``ota/v1/otad/status``) and raises :class:`CtlOffline` at once, instead of waiting out the
timeout, when it says otad is offline. How to authenticate is
:class:`otad.ctl.connection.Connection` (``CtlClient.connected_as``).
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
from otad.control import SCHEMA_VERSION
from otad.ctl.connection import Connection
from protocol.wire import topics

DEFAULT_TIMEOUT = 10.0
#: The commands whose answer is a paged listing (:func:`otad.control.page`): :func:`call_once`
#: gathers every page of them.
LISTINGS = frozenset({"fleet.list", "devices", "transfers", "credentials.list"})


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


class CtlOffline(Exception):  # noqa: N818
    """otad's retained status says it is offline: no request would be answered."""


STATUS_WAIT_S = 0.5
"""How long :meth:`CtlClient.call` waits for the retained status after connecting (it arrives
right behind the SUBACK; only a broker on which otad never ran has none)."""


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
        settings: MqttSettings | None = None,
        require_online: bool = False,
    ) -> None:
        """``timeout`` bounds the connection and each :meth:`call`. ``settings`` replaces the
        plain connection to ``host:port`` (credentials, TLS; :meth:`connected_as` builds them);
        ``require_online``: see the module docstring."""
        self.name = name or f"otactl-{os.getpid()}-{secrets.token_hex(4)}"
        topics.check_level(self.name)
        self.timeout = timeout
        self.require_online = require_online
        self._client: MqttClient = create_client(
            library,
            settings
            or MqttSettings(
                client_id=self.name,
                host=host,
                port=port,
                connect_timeout=timeout,
                reconnect_min=0.2,
                reconnect_max=1.0,
            ),
        )
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._status: asyncio.Future[dict[str, Any]] | None = None
        self._client.set_message_handler(self._on_message)

    @classmethod
    def connected_as(
        cls, connection: Connection, *, timeout: float = DEFAULT_TIMEOUT, require_online: bool
    ) -> CtlClient:
        """A client connecting as ``connection`` says (its name, credentials and TLS)."""
        return cls(
            connection.host,
            connection.port,
            timeout=timeout,
            name=connection.name,
            settings=connection.settings(purpose="ctl", connect_timeout=timeout),
            require_online=require_online,
        )

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
        if self.require_online:
            self._status = asyncio.get_running_loop().create_future()
            await self._client.subscribe(topics.OTAD_STATUS, 1)
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
        if topic == topics.OTAD_STATUS:
            if self._status is not None and not self._status.done():
                self._status.set_result(response)
            return
        waiter = self._waiters.get(str(response.get("id")))
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    async def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its ``result``; raises :class:`CtlError` or
        :class:`CtlTimeout` (:class:`CtlOffline` with ``require_online``)."""
        if self._status is not None:
            await self._check_online()
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

    async def _check_online(self) -> None:
        assert self._status is not None
        with contextlib.suppress(TimeoutError):
            status = await asyncio.wait_for(asyncio.shield(self._status), STATUS_WAIT_S)
            if status.get("state") == "offline":
                since = status.get("time_iso")
                raise CtlOffline(
                    "otad did not answer: it is offline (its retained status on this broker"
                    " says so"
                    + (f", as of {since}" if isinstance(since, str) else "")
                    + "): start it, or check --broker"
                )


PAGE_ROWS = 2000
"""Rows :meth:`CtlClient.call_all` asks for at a time (a fleet row is about 0.5 KiB: a page
stays far below the control response's limit, :data:`otad.control.MAX_RESPONSE_BYTES`)."""


async def call_all(
    ctl: CtlClient, cmd: str, args: dict[str, Any] | None = None, *, page_rows: int = PAGE_ROWS
) -> list[Any]:
    """Every row of a listing command (``fleet.list``, ``devices``, ``transfers``,
    ``credentials.list``), asked for a page at a time until one comes back short."""
    rows: list[Any] = []
    while True:
        got = await ctl.call(cmd, {**(args or {}), "offset": len(rows), "limit": page_rows})
        if not isinstance(got, list):
            raise CtlError("MALFORMED", f"{cmd} answered {type(got).__name__}, not a list")
        rows += got
        if len(got) < page_rows:
            return rows


async def call_once(
    host: str,
    port: int,
    cmd: str,
    args: dict[str, Any] | None = None,
    *,
    wait_s: float,
    connection: Connection | None = None,
) -> Any:
    """Connect (plainly to ``host:port``, or as ``connection`` says, then requiring otad
    online), make one call (waiting up to ``wait_s`` for each step), disconnect."""
    ctl = (
        CtlClient(host, port, timeout=wait_s)
        if connection is None
        else CtlClient.connected_as(connection, timeout=wait_s, require_online=True)
    )
    async with ctl:
        if cmd in LISTINGS:
            return await call_all(ctl, cmd, args)
        return await ctl.call(cmd, args)
