"""The operator-tool side of the control plane (:mod:`otad.control`): one request, one answer.

How ``otactl`` shows the answers is :mod:`otad.ctl.format`.

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
from otad.control import SCHEMA_VERSION
from protocol.wire import topics

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
