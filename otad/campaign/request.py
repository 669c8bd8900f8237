"""A campaign spec from the JSON of a control request (``campaign.plan`` / ``campaign.create``).

The request's ``args`` are untrusted: every field is checked here and a bad one is a
``MALFORMED`` :class:`~protocol.errors.ProtocolError` naming it (``TOO_LARGE`` for a list past
its cap), never a traceback. The shape (``docs/CAMPAIGNS.md`` and ``otactl campaign --help``)::

    {"id": "fw-2026-12", "payload": {"kind": "image", "image": "<digest or prefix>"},
     "select": {"device_type": "CH", "hw_min": 0, "hw_max": 65535, "fw_versions": [16],
                "suppliers": ["S-A"], "segments": ["cell-1"], "guids": [...], "alt_han": true},
     "stages": [{"name": "micro-pilot", "kind": "micro_pilot", "size": 15},
                {"name": "pilot", "kind": "pilot", "size": 5000},
                {"name": "roll-out", "kind": "rollout"}],
     "policies": {"window": "* 1-3 * * *", "timezone": "Europe/London", "rate_per_minute": 60,
                  "ramp_factor": 1.0, "ramp_every": 0, "max_per_minute": 1000,
                  "deadlines": {"wan_delivery_s": 21600, ...}, "thresholds": {...},
                  "auto_gate_soak_s": 600, "lost_after_s": 3600, "requires_ch_fw": 288},
     "seed": 7}

The image itself is resolved by the caller (the catalogue); this module only reads its
reference. Defaults: the device type, hardware range and firmware version of the image's
manifest, and the SECMP0024 plan of :data:`DEFAULT_STAGES`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from otad.campaign.spec import (
    CampaignSpec,
    Deadlines,
    Dependency,
    Payload,
    PayloadKind,
    Policies,
    Rate,
    Selection,
    StageKind,
    StageSpec,
    Thresholds,
)
from otad.campaign.window import ActivationWindow
from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.wire import topics
from protocol.wire.devices import DeviceType

#: The stage plan when a request gives none (SECMP0024: 10-20 CHs, about 5,000, the rest).
DEFAULT_STAGES: Final = (
    StageSpec("micro-pilot", StageKind.MICRO_PILOT, size=15),
    StageSpec("pilot", StageKind.PILOT, size=5000),
    StageSpec("roll-out", StageKind.ROLLOUT),
)
MAX_LIST: Final = 1_000_000  # entries of one list argument (GUIDs of a whole fleet fit)
MAX_STAGES: Final = 64
_KEYS: Final = frozenset({"id", "payload", "select", "stages", "policies", "seed"})
_D = TypeVar("_D", Deadlines, Thresholds)
_E = TypeVar("_E", PayloadKind, StageKind)


@dataclasses.dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the request's defaults come from: the image's manifest."""

    digest: str  # hex
    device_type: DeviceType
    hw_min: int
    hw_max: int
    fw_version: int


def payload_of(args: Mapping[str, Any]) -> tuple[PayloadKind, str | None]:
    """The payload kind and the image reference (None for credentials) of a request."""
    payload = _obj(args.get("payload"), "payload")
    _only(payload, {"kind", "image"}, "payload")
    kind = _enum(PayloadKind, payload.get("kind", PayloadKind.IMAGE.value), "payload.kind")
    if kind is PayloadKind.CREDENTIALS:
        if "image" in payload:
            raise _bad("payload.image: a credential replacement installs no image")
        return kind, None
    image = payload.get("image")
    if not isinstance(image, str) or not image:
        raise _bad("payload.image must be an image digest (or a unique hex prefix)")
    return kind, image


def spec_from_request(
    args: Mapping[str, Any],
    *,
    campaign_id: str,
    image: ImageFacts | None,
    created_at: UnixTime,
) -> CampaignSpec:
    """The :class:`CampaignSpec` a request asks for (``image``: the resolved image, None for a
    credential replacement). Raise ``ProtocolError(MALFORMED)`` naming the first bad field."""
    _only(args, _KEYS, "args")
    kind, _ = payload_of(args)
    if image is None:
        payload = Payload(kind, "credentials", 0)
    else:
        payload = Payload(kind, image.digest, image.fw_version)
    select = _obj(args.get("select", {}), "select")
    selection = _selection(select, image)
    if kind is PayloadKind.CREDENTIALS and selection.device_type is DeviceType.CH:
        raise _bad("select.device_type: a CH holds no device credentials to replace")
    stages = _stages(args.get("stages"))
    policies = _policies(_obj(args.get("policies", {}), "policies"))
    seed = args.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise _bad("seed must be a non-negative integer")
    try:
        return CampaignSpec(
            campaign_id, payload, selection, stages, policies, seed=seed, created_at=created_at
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None


def check_campaign_id(value: object) -> str:
    """A campaign id: one topic level (it names ``ota/v1/campaigns/<id>/status``)."""
    if not isinstance(value, str):
        raise _bad("id must be a string")
    try:
        return topics.check_level(value)
    except ProtocolError as exc:
        raise ProtocolError(Reason.BAD_IDENTIFIER, f"campaign id: {exc.detail}") from None


# --- parts --------------------------------------------------------------------------------


def _selection(select: Mapping[str, Any], image: ImageFacts | None) -> Selection:
    _only(
        select,
        {"device_type", "hw_min", "hw_max", "fw_versions", "suppliers", "segments", "guids",
         "alt_han"},
        "select",
    )  # fmt: skip
    default_type = image.device_type.value if image is not None else None
    raw_type = select.get("device_type", default_type)
    if raw_type is None:
        raise _bad("select.device_type is required for a credential replacement")
    try:
        device_type = DeviceType.parse(raw_type)
    except ProtocolError:
        raise _bad(f"select.device_type: unknown device type {raw_type!r}") from None
    if image is not None and device_type is not image.device_type:
        raise _bad(
            f"select.device_type {device_type.value}: the image is for {image.device_type.value}"
        )
    hw_min = _int(select.get("hw_min", image.hw_min if image else 0), "select.hw_min", 0xFFFF)
    hw_max = _int(select.get("hw_max", image.hw_max if image else 0xFFFF), "select.hw_max", 0xFFFF)
    if hw_min > hw_max:
        raise _bad("select.hw_min is above select.hw_max")
    if image is not None and (hw_min < image.hw_min or hw_max > image.hw_max):
        raise _bad(
            f"select hardware 0x{hw_min:04x}..0x{hw_max:04x} is wider than the image's"
            f" 0x{image.hw_min:04x}..0x{image.hw_max:04x}"
        )
    guids = _strings(select.get("guids"), "select.guids")
    if guids is not None:
        for guid in guids:
            try:
                topics.check_guid(guid)
            except ProtocolError as exc:
                raise ProtocolError(Reason.BAD_IDENTIFIER, f"select.guids: {exc.detail}") from None
    alt_han = select.get("alt_han")
    if alt_han is not None and type(alt_han) is not bool:
        raise _bad("select.alt_han must be true, false or absent")
    fw_versions = select.get("fw_versions")
    if fw_versions is not None:
        if not isinstance(fw_versions, list) or len(fw_versions) > MAX_LIST:
            raise _bad("select.fw_versions must be a list of integers")
        fw_versions = [_int(v, "select.fw_versions[]", 2**32 - 1) for v in fw_versions]
    return Selection(
        device_type,
        hw_min,
        hw_max,
        None if fw_versions is None else frozenset(fw_versions),
        _frozen(_strings(select.get("suppliers"), "select.suppliers")),
        _frozen(_strings(select.get("segments"), "select.segments")),
        _frozen(guids),
        None,
        alt_han,
    )


def _stages(value: object) -> tuple[StageSpec, ...]:
    if value is None:
        return DEFAULT_STAGES
    if not isinstance(value, list) or not 0 < len(value) <= MAX_STAGES:
        raise _bad(f"stages must be a list of 1-{MAX_STAGES} stages")
    out: list[StageSpec] = []
    for i, raw in enumerate(value):
        where = f"stages[{i}]"
        stage = _obj(raw, where)
        _only(stage, {"name", "kind", "size", "share"}, where)
        name = stage.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not name.isprintable():
            raise _bad(f"{where}.name must be 1-64 printable characters")
        kind = _enum(StageKind, stage.get("kind"), f"{where}.kind")
        size = stage.get("size")
        if size is not None:
            size = _int(size, f"{where}.size", 10**9)
        share = stage.get("share")
        if share is not None:
            share = _number(share, f"{where}.share")
            if not 0 < share <= 1:
                raise _bad(f"{where}.share must be in (0, 1]")
        out.append(StageSpec(name, kind, size, share))
    return tuple(out)


def _policies(raw: Mapping[str, Any]) -> Policies:
    _only(
        raw,
        {"window", "timezone", "rate_per_minute", "ramp_factor", "ramp_every", "max_per_minute",
         "deadlines", "thresholds", "auto_gate_soak_s", "lost_after_s", "requires_ch_fw"},
        "policies",
    )  # fmt: skip
    base = Policies()
    try:
        window = ActivationWindow(
            str(raw.get("window", base.window.cron)),
            str(raw.get("timezone", base.window.timezone)),
        )
    except (ValueError, KeyError) as exc:
        raise _bad(f"policies.window: {exc}") from None
    rate = Rate(
        _number(raw.get("rate_per_minute", base.rate.per_minute), "policies.rate_per_minute"),
        _number(raw.get("ramp_factor", base.rate.ramp_factor), "policies.ramp_factor"),
        _int(raw.get("ramp_every", base.rate.ramp_every), "policies.ramp_every", 10**9),
        _number(raw.get("max_per_minute", base.rate.max_per_minute), "policies.max_per_minute"),
    )
    if rate.ramp_factor < 1:
        raise _bad("policies.ramp_factor must be at least 1")
    deadlines = _dataclass_of(Deadlines, raw.get("deadlines", {}), "policies.deadlines")
    thresholds = _dataclass_of(Thresholds, raw.get("thresholds", {}), "policies.thresholds")
    soak = raw.get("auto_gate_soak_s")
    requires = raw.get("requires_ch_fw")
    return Policies(
        window=window,
        rate=rate,
        deadlines=deadlines,
        thresholds=thresholds,
        auto_gate_soak_s=None if soak is None else _number(soak, "policies.auto_gate_soak_s"),
        lost_after_s=_number(raw.get("lost_after_s", base.lost_after_s), "policies.lost_after_s"),
        dependency=None
        if requires is None
        else Dependency(_int(requires, "policies.requires_ch_fw", 2**32 - 1)),
    )


def _dataclass_of(cls: type[_D], value: object, where: str) -> _D:
    raw = _obj(value, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _only(raw, set(fields), where)
    kwargs: dict[str, Any] = {}
    for name, item in raw.items():
        if item is None and "None" in str(fields[name].type):
            kwargs[name] = None
        elif "int" in str(fields[name].type) and "float" not in str(fields[name].type):
            kwargs[name] = _int(item, f"{where}.{name}", 10**9)
        else:
            kwargs[name] = _number(item, f"{where}.{name}")
    return cls(**kwargs)


# --- checks -------------------------------------------------------------------------------


def _bad(detail: str) -> ProtocolError:
    return ProtocolError(Reason.MALFORMED, detail)


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(f"{where} must be an object")
    return value


def _only(value: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _bad(f"{where}: unknown field {unknown[0]!r}")


def _int(value: object, where: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise _bad(f"{where} must be an integer 0..{maximum}")
    return value


def _number(value: object, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(f"{where} must be a non-negative number")
    if not math.isfinite(value) or value < 0:
        raise _bad(f"{where} must be a non-negative number")
    return float(value)


def _strings(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{where} must be a list of strings")
    if len(value) > MAX_LIST:
        raise ProtocolError(Reason.TOO_LARGE, f"{where} has more than {MAX_LIST} entries")
    return list(value)


def _frozen(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _enum(cls: type[_E], value: object, where: str) -> _E:
    try:
        return cls(str(value)) if isinstance(value, str) else cls("\0")
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise _bad(f"{where} must be one of {choices}") from None
