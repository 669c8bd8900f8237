"""The control plane's commands: what each ``otactl`` request does in the daemon.

:class:`otad.control.Control` receives a request, checks its envelope and calls the command named
by its ``cmd`` from :meth:`Commands.table` with its ``args``; a command returns a JSON-ready
result or raises :class:`~protocol.errors.ProtocolError`, which becomes a typed error response.
The arguments are untrusted and checked here (``MALFORMED`` otherwise).

``image.import``   args ``data`` (base64 of the ``.otaimg``) -> the image summary, ``new``
                   (verified against the trust store; an ``image.imported`` event when new)
``image.list``     -> list of image summaries
``distribute``     args ``image`` (digest or unique hex prefix), ``to`` (list of GUIDs) or
                   ``all_matching`` (true) -> ``{image, started, already, refused}``
``fleet.list``     -> list of CHs (announcement, online, first/last seen)
``transfers``      optional args ``image``, ``guid`` -> list of per-CH transfer rows
``status``         -> the status snapshot, ``state: "online"``, and otad's resident memory
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from otad.catalogue import Catalogue
from otad.control import Command, arg_bytes_b64, arg_str, arg_str_list
from otad.distribution import Distribution
from otad.events import ImageImported
from otad.outbox import EventPublisher
from otad.registry import Registry
from otad.rejects import RejectLog
from otad.status import StatusFields
from protocol.errors import ProtocolError, Reason


class Commands:
    """The daemon's command functions, bound to the parts they work on."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        registry: Registry,
        distribution: Distribution,
        events: EventPublisher,
        snapshot: Callable[[], StatusFields],
        status_changed: Callable[[], None],
        rejects: RejectLog,
    ) -> None:
        """``snapshot()`` gives the status fields; ``status_changed()`` asks for the retained
        status to be published again soon."""
        self._catalogue = catalogue
        self._registry = registry
        self._distribution = distribution
        self._events = events
        self._snapshot = snapshot
        self._status_changed = status_changed
        self._rejects = rejects

    def table(self) -> dict[str, Command]:
        """Command name -> ``async fn(args) -> result`` (see the module docstring)."""
        return {
            "image.import": self.image_import,
            "image.list": self.image_list,
            "distribute": self.distribute,
            "fleet.list": self.fleet_list,
            "transfers": self.transfers,
            "status": self.status,
        }

    async def image_import(self, args: dict[str, Any]) -> Any:
        """Verify and store an ``.otaimg``; emit ``image.imported`` if it is new."""
        data = await arg_bytes_b64(args, "data")
        try:
            image, new = await self._catalogue.import_image(data)
        except ProtocolError as exc:
            self._rejects.reject(f"image import ({len(data)} bytes)", exc.reason, exc.detail)
            raise
        if new:
            m = image.manifest
            self._events.emit(
                ImageImported(
                    time=image.imported_at,
                    image=image.hex,
                    device_type=m.device_type.value,
                    fw_version=m.fw_version,
                    sequence=m.sequence,
                    size=m.size,
                    block_size=m.block_size,
                    blocks=m.block_count,
                )
            )
            self._status_changed()
        return {**image.to_json(), "new": new}

    async def image_list(self, args: dict[str, Any]) -> Any:
        """Every imported image."""
        return [img.to_json() for img in self._catalogue.images.values()]

    async def distribute(self, args: dict[str, Any]) -> Any:
        """Start sending an image to the CHs named in ``to``, or to every matching CH."""
        ref = arg_str(args, "image")
        all_matching = args.get("all_matching", False)
        if not isinstance(all_matching, bool):
            raise ProtocolError(Reason.MALFORMED, "all_matching must be true or false")
        guids = arg_str_list(args, "to")
        if all_matching == bool(guids):
            raise ProtocolError(Reason.MALFORMED, "give either 'to' (GUIDs) or all_matching")
        return await self._distribution.distribute(ref, guids, all_matching=all_matching)

    async def fleet_list(self, args: dict[str, Any]) -> Any:
        """Every known CH, by GUID."""
        hubs = self._registry.hubs
        return [hubs[g].to_json() for g in sorted(hubs)]

    async def transfers(self, args: dict[str, Any]) -> Any:
        """Every transfer, or those of one image (``image``) and/or one CH (``guid``)."""
        rows = await self._distribution.listing()
        if "image" in args:
            image = self._catalogue.resolve(arg_str(args, "image")).hex
            rows = [r for r in rows if r["image"] == image]
        if "guid" in args:
            guid = arg_str(args, "guid")
            rows = [r for r in rows if r["guid"] == guid]
        return rows

    async def status(self, args: dict[str, Any]) -> Any:
        """The status snapshot, as the retained status says it, and otad's memory."""
        return {"state": "online", **self._snapshot(), "rss_kib": rss_kib()}


def rss_kib() -> int:
    """Resident set size of this process in KiB (Linux), or 0."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024
