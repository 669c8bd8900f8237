"""Control plane: request/response over MQTT between ``otactl`` (or any operator tool) and otad.

A tool picks a client name (a safe topic level), subscribes to ``ota/v1/ctl/<client>/resp`` and
publishes requests on ``ota/v1/ctl/<client>/req`` (QoS 1). Who may use which client name is a
matter of broker ACLs. Messages are JSON, schema version 1::

    request   {"v": 1, "id": "<= 64 chars", "cmd": "fleet.list", "args": {...}}
    success   {"v": 1, "id": ..., "ok": true, "result": ...}
    failure   {"v": 1, "id": ..., "ok": false, "error": "UNKNOWN_IMAGE", "code": 101,
               "detail": "no image starts with 12ab"}

``error`` is a :class:`~protocol.errors.Reason` name (``code`` its number), so scripts can branch
on it. The commands and what they do are :mod:`otad.commands`; this module is their transport.

A request that names an unknown command or has bad arguments is answered with a typed error; one
that is not JSON, too large, or has no ``id`` cannot be answered and is only logged (with its
reason). Requests run as tasks (they are rare and may wait for the store or a worker thread; a
large one is parsed in a worker thread); at most :data:`MAX_CONCURRENT` at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mqttio import MqttClient, NotConnected
from otad.jsonwire import dumps
from otad.rejects import RejectLog
from protocol.errors import ProtocolError, Reason
from protocol.release.otaimg import MAX_OTAIMG_BYTES
from protocol.wire import topics

log = logging.getLogger("otad.control")

SCHEMA_VERSION = 1
"""The control plane's ``v``, of requests and responses (otactl's client sends this one)."""
MAX_REQUEST_BYTES = (MAX_OTAIMG_BYTES * 4) // 3 + 64 * 1024
MAX_CONCURRENT = 8
#: Largest response payload otad publishes. The broker passes packets up to SPEC §1.1's size
#: (2,098,216 bytes) and disconnects a client that sends a larger one -- otad's control session,
#: again at every retry. A larger answer is replaced by a ``TOO_LARGE`` error naming its size;
#: the listing commands take ``offset`` and ``limit`` (:func:`page`) so that none need be.
MAX_RESPONSE_BYTES = 2_000_000
#: Most rows one page of a listing may ask for.
MAX_PAGE_ROWS = 10_000
INLINE_PARSE_BYTES = 256 * 1024  # larger requests are parsed in a worker thread
_PREFIX = f"{topics.ROOT}/ctl/"
_SUFFIX = "/req"

Command = Callable[[dict[str, Any]], Awaitable[Any]]

_ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("otad.control.actor")


def current_actor() -> str:
    """Who sent the control request being served: its client name, the topic level of
    ``ota/v1/ctl/<client>/req`` (with the shipped broker ACL, the client's authenticated
    username or certificate CN: no client can write another's request topic). The campaign
    engine records it as the actor of every decision; "" outside a request."""
    return _ACTOR.get("")


class Control:
    """Serves control requests with the daemon's command functions
    (:meth:`otad.commands.Commands.table`)."""

    def __init__(
        self,
        client: MqttClient,
        commands: dict[str, Command],
        *,
        rejects: RejectLog | None = None,
    ) -> None:
        """``commands`` maps a command name to ``async fn(args) -> JSON-ready result``; a
        :class:`ProtocolError` it raises becomes a typed error response."""
        self._client = client
        self._commands = commands
        self.rejects = rejects or RejectLog(log)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.served = 0
        self.outcomes: dict[tuple[str, str], int] = {(name, "ok"): 0 for name in commands}
        """Requests answered, by (command, outcome): ``ok`` or the error's reason name; a
        command name otad does not know counts as ``unknown`` (bounded label values)."""

    def request_received(self, topic: str, payload: bytes) -> None:
        """MQTT handler part for ``ota/v1/ctl/+/req``: validate, then run the command as a
        task."""
        client = topic[len(_PREFIX) : -len(_SUFFIX)]
        try:
            topics.check_level(client)
        except ProtocolError as exc:
            self.rejects.reject(f"control request on {topic[:80]!r}", exc.reason, exc.detail)
            return
        if len(payload) > MAX_REQUEST_BYTES:
            self.rejects.reject(
                f"control request of {client}", Reason.TOO_LARGE, f"{len(payload)} B"
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._parse_and_serve(client, payload), name=f"otad.ctl.{client}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _parse_and_serve(self, client: str, payload: bytes) -> None:
        what = f"control request of {client}"
        try:
            if len(payload) > INLINE_PARSE_BYTES:  # an image import: keep the loop free
                request = await asyncio.to_thread(json.loads, payload)
            else:
                request = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            self.rejects.reject(what, Reason.MALFORMED, str(exc))
            return
        if not isinstance(request, dict):
            self.rejects.reject(what, Reason.MALFORMED, "not an object")
            return
        request_id = request.get("id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
            self.rejects.reject(what, Reason.MALFORMED, "no valid id")
            return
        await self._serve(client, request_id, request)

    async def _serve(self, client: str, request_id: str, request: dict[str, Any]) -> None:
        _ACTOR.set(client)  # this task's context: the command reads it (current_actor)
        async with self._slots:
            try:
                response = {"ok": True, "result": await self._run(request)}
                outcome = "ok"
                log.info("%s by %s: ok", str(request.get("cmd"))[:40], client)
            except ProtocolError as exc:
                log.info("%s by %s: %s", str(request.get("cmd"))[:40], client, exc.reason.name)
                response = _error(exc.reason, exc.detail)
                outcome = exc.reason.name
            except Exception as exc:
                log.exception("control command %r failed", request.get("cmd"))
                response = _error(Reason.INTERNAL, f"{type(exc).__name__}: {exc}")
                outcome = Reason.INTERNAL.name
        response.update({"v": SCHEMA_VERSION, "id": request_id})
        payload = dumps(response)
        if len(payload) > MAX_RESPONSE_BYTES:
            name = str(request.get("cmd"))[:40]
            log.warning("%s by %s: answer of %d bytes not sent: too large", name, client,
                        len(payload))  # fmt: skip
            outcome = Reason.TOO_LARGE.name
            response = _error(Reason.TOO_LARGE, f"the answer to {name} is {len(payload):,} bytes,"
                              f" above the {MAX_RESPONSE_BYTES:,} a control response may be: ask"
                              " for less (a listing in pages: offset, limit; a campaign plan:"
                              " detail summary)")  # fmt: skip
            response.update({"v": SCHEMA_VERSION, "id": request_id})
            payload = dumps(response)
        self.served += 1
        cmd = request.get("cmd")
        key = (cmd if isinstance(cmd, str) and cmd in self._commands else "unknown", outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        try:
            self._client.publish(topics.ctl_response(client), payload, 1, False)
        except NotConnected:
            log.warning("cannot answer control request %s of %s: not connected", request_id, client)

    async def _run(self, request: dict[str, Any]) -> Any:
        if request.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ProtocolError(Reason.UNSUPPORTED_VERSION, f"request version {request.get('v')!r}")
        cmd = request.get("cmd")
        command = self._commands.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            raise ProtocolError(Reason.UNKNOWN_TYPE, f"unknown command {str(cmd)[:40]!r}")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError(Reason.MALFORMED, "args must be an object")
        return await command(args)

    async def close(self) -> None:
        """Wait for the requests being served (cancelled if they take more than 5 s)."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(self._tasks, timeout=5.0)
        for task in pending:
            task.cancel()


def _error(reason: Reason, detail: str) -> dict[str, Any]:
    return {"ok": False, "error": reason.name, "code": int(reason), "detail": detail[:500]}


def page(rows: list[Any], args: dict[str, Any]) -> list[Any]:
    """One page of a listing (rows in its stable order): ``offset`` rows skipped (default 0),
    at most ``limit`` returned (default all, at most :data:`MAX_PAGE_ROWS`). A row added or
    removed between two requests shifts the rows after it by one: a client pages until a page
    comes back short (:func:`otad.ctl.client.call_all`)."""
    offset = _arg_count(args, "offset") or 0
    limit = _arg_count(args, "limit")
    if limit is None:
        return rows[offset:]
    if limit < 1:
        raise ProtocolError(Reason.MALFORMED, "argument 'limit' must be at least 1")
    if limit > MAX_PAGE_ROWS:
        raise ProtocolError(Reason.TOO_LARGE, f"argument 'limit' is above {MAX_PAGE_ROWS}")
    return rows[offset : offset + limit]


def _arg_count(args: dict[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ProtocolError(Reason.MALFORMED, f"argument {name!r} must be a whole number >= 0")
    return value


def arg_str(args: dict[str, Any], name: str) -> str:
    """A required string argument (``MALFORMED`` otherwise)."""
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(Reason.MALFORMED, f"argument {name!r} must be a non-empty string")
    return value


async def arg_bytes_b64(args: dict[str, Any], name: str) -> bytes:
    """A required base64 argument, decoded (``MALFORMED`` otherwise); a large one in a worker
    thread."""
    text = arg_str(args, name)
    try:
        if len(text) > INLINE_PARSE_BYTES:
            return await asyncio.to_thread(base64.b64decode, text, validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(Reason.MALFORMED, f"argument {name!r} is not base64") from None


def arg_str_list(args: dict[str, Any], name: str) -> list[str]:
    """An optional list of strings (``MALFORMED`` otherwise)."""
    value = args.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(Reason.MALFORMED, f"argument {name!r} must be a list of strings")
    if len(value) > 1_000_000:
        raise ProtocolError(Reason.TOO_LARGE, f"argument {name!r} has too many entries")
    return list(value)
