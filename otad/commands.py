"""The control plane's commands: what each ``otactl`` request does in the daemon.

:class:`otad.control.Control` receives a request, checks its envelope and calls the command named
by its ``cmd`` from :meth:`Commands.table` with its ``args``; a command returns a JSON-ready
result or raises :class:`~protocol.errors.ProtocolError`, which becomes a typed error response.
The arguments are untrusted and checked here (``MALFORMED`` otherwise).

``image.import``   args ``data`` (base64 of the ``.otaimg``) -> the image summary, ``new``
                   (verified against the trust store; an ``image.imported`` event when new)
``image.list``     -> list of image summaries
``distribute``     args ``image`` (digest or unique hex prefix), ``to`` (list of GUIDs) or
                   ``all_matching`` (true) -> ``{image, started, already, refused, devices,
                   campaign}`` (``devices``: HAN devices, or CHs for a CH image, now followed:
                   otad.devices; ``campaign``: the one-stage campaign it is, otad.campaigns)
``campaign.plan``  args: a campaign spec (otad.campaign.request) -> targets per stage,
                   exclusions with reasons, WAN bytes, the estimate; nothing created
                   (``detail: "summary"`` beside the spec: counts for the per-target lists)
``campaign.create`` args: a campaign spec -> its status (CREATED)
``campaign.start|approve|hold|resume|abort|notice|expedite|expedite.approve`` args ``id``
                   (``reason`` for approve/hold/abort, ``justification`` for expedite) ->
                   ``{id, state, decisions}``; the actor is the requesting client
``campaign.retry`` args ``id``, optional ``new_id`` -> the child campaign's status
``campaign.status`` args ``id``; ``campaign.list``; ``campaign.history`` args ``id``
``campaign.events`` optional args ``id``, ``since`` (seq), ``kinds``, ``limit`` -> events
``activate``       args ``image``, ``devices`` (list of device ids) or ``all_held`` (true),
                   optional ``at`` (unix s: future-dated) -> ``{image, issued, refused}``; each
                   issued command was committed durably before it was sent (SPEC §8.10)
``activate.cancel`` args ``image``, ``devices`` -> ``{image, issued, refused}`` (the cancels)
``credentials.replace`` args ``devices`` (list of device ids) -> ``{issued, refused}``: each
                   device told to replace its signing key (SPEC §8.11; otad.credentials),
                   the command committed durably before it was sent
``credentials.list`` -> one row per device whose credentials otad replaced or is replacing
``devices``        optional args ``image``, ``guid`` -> one row per (device, image), with its
                   ``credentials`` state (null: never replaced)
``firmware.version`` args ``device``, optional ``wait_s`` (default 10) -> the device's
                   ``VersionReport`` as its CH relayed it
``fleet.list``     -> list of CHs (announcement, online, first/last seen)
``fleet.forget``   args ``guids`` (list of GUIDs) -> ``{forgotten: [{guid, online, transfers,
                   devices}], refused: [{guid, error, detail}]}``: each CH removed from the
                   registry and the store with its ended transfers and device records, a
                   ``hub.forgotten`` event each (otad.registry); refused ``UNKNOWN_HUB``, or
                   ``HUB_BUSY`` while a transfer, a HAN relay, an activation or a credential
                   replacement of it is in progress. A CH that announces itself live again is
                   known again
``transfers``      optional args ``image``, ``guid`` -> list of per-CH transfer rows
``status``         -> the status snapshot, ``state: "online"``, and otad's resident memory

The listings (``fleet.list``, ``devices``, ``transfers``, ``credentials.list``) also take
``offset`` and ``limit`` (at most :data:`otad.control.MAX_PAGE_ROWS`): one page, in the
listing's order. A fleet's whole listing can outgrow a control response
(:data:`otad.control.MAX_RESPONSE_BYTES`; otad answers ``TOO_LARGE`` then): otactl asks for
pages (:func:`otad.ctl.client.call_all`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from otad.campaigns import Campaigns
from otad.catalogue import Catalogue
from otad.control import Command, arg_bytes_b64, arg_str, arg_str_list, current_actor, page
from otad.credentials import Credentials
from otad.devices import Devices
from otad.distribution import Distribution
from otad.events import ImageImported
from otad.outbox import EventPublisher
from otad.registry import Registry
from otad.rejects import RejectLog
from otad.status import StatusFields
from protocol.errors import ProtocolError, Reason
from protocol.wire import topics


class Commands:
    """The daemon's command functions, bound to the parts they work on."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        registry: Registry,
        distribution: Distribution,
        devices: Devices,
        credentials: Credentials,
        campaigns: Campaigns,
        events: EventPublisher,
        snapshot: Callable[[], StatusFields],
        status_changed: Callable[[], None],
        rejects: RejectLog,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``snapshot()`` gives the status fields; ``status_changed()`` asks for the retained
        status to be published again soon; ``wall_clock`` (unix s) dates what commands record."""
        self._catalogue = catalogue
        self._registry = registry
        self._distribution = distribution
        self._devices = devices
        self._credentials = credentials
        self._campaigns = campaigns
        self._events = events
        self._snapshot = snapshot
        self._status_changed = status_changed
        self._rejects = rejects
        self._wall_clock = wall_clock

    def table(self) -> dict[str, Command]:
        """Command name -> ``async fn(args) -> result`` (see the module docstring)."""
        return {
            "image.import": self.image_import,
            "image.list": self.image_list,
            "distribute": self.distribute,
            "fleet.list": self.fleet_list,
            "fleet.forget": self.fleet_forget,
            "transfers": self.transfers,
            "activate": self.activate,
            "activate.cancel": self.activate_cancel,
            "credentials.replace": self.credentials_replace,
            "credentials.list": self.credentials_list,
            "devices": self.devices,
            "firmware.version": self.firmware_version,
            "status": self.status,
            "campaign.plan": self.campaign_plan,
            "campaign.create": self.campaign_create,
            "campaign.start": self.campaign_start,
            "campaign.approve": self.campaign_approve,
            "campaign.hold": self.campaign_hold,
            "campaign.resume": self.campaign_resume,
            "campaign.abort": self.campaign_abort,
            "campaign.notice": self.campaign_notice,
            "campaign.expedite": self.campaign_expedite,
            "campaign.expedite.approve": self.campaign_expedite_approve,
            "campaign.retry": self.campaign_retry,
            "campaign.status": self.campaign_status,
            "campaign.list": self.campaign_list,
            "campaign.history": self.campaign_history,
            "campaign.events": self.campaign_events,
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
        return await self._campaigns.distribute(
            ref, guids, all_matching=all_matching, actor=_actor()
        )

    async def campaign_plan(self, args: dict[str, Any]) -> Any:
        """A dry run of ``campaign.create``; ``"detail": "summary"`` (beside the spec) leaves out
        the per-target lists (``members``, ``exclusions``) for their counts: a national fleet's
        plan in full outgrows a control response."""
        detail = args.get("detail", "full")
        if detail not in ("full", "summary"):
            raise ProtocolError(Reason.MALFORMED, "detail must be 'full' or 'summary'")
        plan = await self._campaigns.plan({k: v for k, v in args.items() if k != "detail"})
        if detail == "summary":
            excluded: dict[str, int] = {}
            for exclusion in plan.pop("exclusions"):
                excluded[exclusion["reason"]] = excluded.get(exclusion["reason"], 0) + 1
            plan["members_count"] = len(plan.pop("members"))
            plan["exclusions_by_reason"] = dict(sorted(excluded.items()))
        return plan

    async def campaign_create(self, args: dict[str, Any]) -> Any:
        """Create a campaign (nothing starts until ``campaign.start``)."""
        return await self._campaigns.create(args, _actor())

    async def campaign_start(self, args: dict[str, Any]) -> Any:
        """Start a created campaign: its first stage (or its notice wait)."""
        return await self._campaigns.start_campaign(_campaign_id(args), _actor())

    async def campaign_approve(self, args: dict[str, Any]) -> Any:
        """A recorded GO: at a gate the next stage starts; on hold the campaign resumes."""
        return await self._campaigns.approve(_campaign_id(args), _actor(), _reason(args))

    async def campaign_hold(self, args: dict[str, Any]) -> Any:
        """A NO-GO at a gate, or an operator's hold (a pause) while it runs."""
        return await self._campaigns.hold(_campaign_id(args), _actor(), _reason(args))

    async def campaign_resume(self, args: dict[str, Any]) -> Any:
        """Resume a paused campaign."""
        return await self._campaigns.resume(_campaign_id(args), _actor())

    async def campaign_abort(self, args: dict[str, Any]) -> Any:
        """Abort: what has not begun activating is cancelled; activated devices are left."""
        return await self._campaigns.abort(_campaign_id(args), _actor(), _reason(args))

    async def campaign_notice(self, args: dict[str, Any]) -> Any:
        """Record that the roll-out notice was published to the parties now."""
        return await self._campaigns.notice(_campaign_id(args), _actor())

    async def campaign_expedite(self, args: dict[str, Any]) -> Any:
        """Ask to waive the notice for an urgent security fix (a second approver must agree)."""
        return await self._campaigns.expedite(
            _campaign_id(args), _actor(), arg_str(args, "justification")
        )

    async def campaign_expedite_approve(self, args: dict[str, Any]) -> Any:
        """The second approver of an expedite request (not its requester)."""
        return await self._campaigns.expedite_approve(_campaign_id(args), _actor())

    async def campaign_retry(self, args: dict[str, Any]) -> Any:
        """A child campaign of the failed and timed-out targets."""
        new_id = args.get("new_id")
        if new_id is not None and not isinstance(new_id, str):
            raise ProtocolError(Reason.MALFORMED, "new_id must be a string")
        return await self._campaigns.retry(_campaign_id(args), new_id, _actor())

    async def campaign_status(self, args: dict[str, Any]) -> Any:
        """One campaign's status."""
        return self._campaigns.status(_campaign_id(args))

    async def campaign_list(self, args: dict[str, Any]) -> Any:
        """Every campaign."""
        return self._campaigns.listing()

    async def campaign_history(self, args: dict[str, Any]) -> Any:
        """One campaign's audit trail."""
        return self._campaigns.history(_campaign_id(args))

    async def campaign_events(self, args: dict[str, Any]) -> Any:
        """Events from the durable outbox: after ``since``, of ``kinds``, of campaign ``id``."""
        since = args.get("since", 0)
        limit = args.get("limit", 100)
        if type(since) is not int or since < 0:
            raise ProtocolError(Reason.MALFORMED, "since must be a sequence number")
        if type(limit) is not int or not 0 < limit <= 1000:
            raise ProtocolError(Reason.MALFORMED, "limit must be 1..1000")
        kinds = arg_str_list(args, "kinds") or None
        campaign = _campaign_id(args) if "id" in args else None
        return await self._events.replay(after=since, limit=limit, kinds=kinds, campaign=campaign)

    async def activate(self, args: dict[str, Any]) -> Any:
        """Sign and send an activation command to each device named (or holding the image)."""
        image = self._catalogue.resolve(arg_str(args, "image"))
        all_held = args.get("all_held", False)
        if not isinstance(all_held, bool):
            raise ProtocolError(Reason.MALFORMED, "all_held must be true or false")
        devices = arg_str_list(args, "devices")
        if all_held == bool(devices):
            raise ProtocolError(Reason.MALFORMED, "give either 'devices' or all_held")
        at = args.get("at")
        if at is not None and (type(at) is not int or not 0 <= at < 2**63):
            raise ProtocolError(Reason.MALFORMED, "at must be unix seconds (an integer)")
        return await self._devices.activate(image, devices, all_held=all_held, execute_at=at)

    async def activate_cancel(self, args: dict[str, Any]) -> Any:
        """Cancel the future-dated activations of an image on the devices named."""
        image = self._catalogue.resolve(arg_str(args, "image"))
        devices = arg_str_list(args, "devices")
        if not devices:
            raise ProtocolError(Reason.MALFORMED, "give 'devices'")
        return await self._devices.cancel(image, devices)

    async def credentials_replace(self, args: dict[str, Any]) -> Any:
        """Have each device named replace its signing key (SPEC §8.11)."""
        devices = arg_str_list(args, "devices")
        if not devices:
            raise ProtocolError(Reason.MALFORMED, "give 'devices'")
        return await self._credentials.replace(devices)

    async def credentials_list(self, args: dict[str, Any]) -> Any:
        """Every device's credential replacement (a page of them: :func:`otad.control.page`)."""
        return page(self._credentials.listing(), args)

    async def devices(self, args: dict[str, Any]) -> Any:
        """Every device's state per image, or those of one image and/or one premises."""
        rows = self._devices.listing()
        if "image" in args:
            image = self._catalogue.resolve(arg_str(args, "image")).hex
            rows = [r for r in rows if r["image"] == image]
        if "guid" in args:
            guid = arg_str(args, "guid")
            rows = [r for r in rows if r["guid"] == guid]
        return page(rows, args)

    async def firmware_version(self, args: dict[str, Any]) -> Any:
        """Read a device's running firmware version through its CH."""
        device = arg_str(args, "device")
        wait_s = args.get("wait_s", 10.0)
        if type(wait_s) not in (int, float) or not 0 < wait_s <= 300:
            raise ProtocolError(Reason.MALFORMED, "wait_s must be a number of seconds, 0..300")
        return await self._devices.read_version(device, float(wait_s))

    async def fleet_list(self, args: dict[str, Any]) -> Any:
        """Every known CH, by GUID (a page of them: :func:`otad.control.page`)."""
        hubs = self._registry.hubs
        return [hubs[g].to_json() for g in page(sorted(hubs), args)]

    async def fleet_forget(self, args: dict[str, Any]) -> Any:
        """Remove each CH named from the fleet, unless something of it is in progress."""
        guids = arg_str_list(args, "guids")
        if not guids:
            raise ProtocolError(Reason.MALFORMED, "give 'guids'")
        forgotten: list[dict[str, Any]] = []
        refused: list[dict[str, str]] = []
        for guid in dict.fromkeys(guids):
            try:
                topics.check_guid(guid)
                hub, transfers, devices = await self._registry.forget(
                    guid, self._wall_clock(), busy=self._busy_on
                )
            except ProtocolError as exc:
                refused.append({"guid": guid, "error": exc.reason.name, "detail": exc.detail})
                continue
            self._distribution.forget_hub(guid)
            self._devices.forget_hub(guid)
            forgotten.append(
                {"guid": guid, "online": hub.online, "transfers": transfers, "devices": devices}
            )
        if forgotten:
            self._status_changed()
        return {"forgotten": forgotten, "refused": refused}

    def _busy_on(self, guid: str) -> str | None:
        return (
            self._distribution.busy_on(guid)
            or self._devices.busy_on(guid)
            or self._credentials.busy_on(guid)
        )

    async def transfers(self, args: dict[str, Any]) -> Any:
        """Every transfer, or those of one image (``image``) and/or one CH (``guid``)."""
        rows = await self._distribution.listing()
        if "image" in args:
            image = self._catalogue.resolve(arg_str(args, "image")).hex
            rows = [r for r in rows if r["image"] == image]
        if "guid" in args:
            guid = arg_str(args, "guid")
            rows = [r for r in rows if r["guid"] == guid]
        return page(rows, args)

    async def status(self, args: dict[str, Any]) -> Any:
        """The status snapshot, as the retained status says it, and otad's memory."""
        return {"state": "online", **self._snapshot(), "rss_kib": rss_kib()}


def _actor() -> str:
    return current_actor() or "otad"


def _campaign_id(args: dict[str, Any]) -> str:
    return arg_str(args, "id")


def _reason(args: dict[str, Any]) -> str:
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise ProtocolError(Reason.MALFORMED, "reason must be a string of at most 500 characters")
    return reason


def rss_kib() -> int:
    """Resident set size of this process in KiB (Linux), or 0."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024
