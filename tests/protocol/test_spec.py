"""SPEC.md is the normative copy of the protocol: its tables are read here and compared with the
code, so a disagreement fails a test instead of lingering in one of the two.

Compared: §3 the message table (type code, name, QoS, cap, every field with its kind and bound)
and the nested records and their text values; §4 the reason codes; §6.2 the manifest's keys and
their bounds; §7.12 the WAN defaults; §8.3/§8.4 the HAN server's and client's defaults; §8.7 the
activation messages' type codes and fields; and the edge table beside every state diagram
(§7.10, §8.3, §8.4, §8.6) against the machine's TRANSITIONS, with every state drawn in the
diagram. Each comparison returns the problems it found; each is also run on a doctored copy of
SPEC to show that it notices a wrong line.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

import protocol
from protocol.clock import UnixTime
from protocol.device import activation
from protocol.device import device as device_module
from protocol.errors import Reason
from protocol.han import client as client_module
from protocol.han import server as server_module
from protocol.han.client import ClientConfig
from protocol.han.server import ServerConfig
from protocol.release.manifest import Manifest, ManifestV2
from protocol.wan import receiver as receiver_module
from protocol.wan import sender as sender_module
from protocol.wan.receiver import Receiver
from protocol.wan.sender import Sender
from protocol.wire import codec
from protocol.wire.codec import FieldSpec
from protocol.wire.devices import DeviceType, JoinMode
from protocol.wire.limits import MAX_U16, MAX_U32, MAX_U64
from protocol.wire.messages import (
    MESSAGE_TYPES,
    DeviceTransferState,
    Evidence,
    HanDevice,
    Limits,
)

SPEC = (Path(protocol.__file__).parent / "SPEC.md").read_text(encoding="utf-8")

# --------------------------------------------------------------------------- reading SPEC.md

Row = list[str]


def section(text: str, number: str) -> str:
    """The body of section ``number`` ("3", "7.12"), up to the next heading of any level."""
    match = re.search(rf"^#{{2,3}} {re.escape(number)}[. ].*$", text, re.MULTILINE)
    assert match, f"SPEC has no section {number}"
    rest = text[match.end() :]
    following = re.search(r"^#{2,3} ", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def tables(text: str) -> list[list[Row]]:
    """Every Markdown table in ``text``: its rows (header first) as stripped cells."""
    found: list[list[Row]] = []
    current: list[Row] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table_with_header(text: str, *header: str) -> list[Row]:
    """The rows (without the header) of the one table in ``text`` with this header."""
    matching = [table for table in tables(text) if tuple(table[0]) == header]
    assert len(matching) == 1, f"expected one table headed {header}, found {len(matching)}"
    return matching[0][1:]


def ticked(cell: str) -> list[str]:
    """The `backticked` names of a cell, outside any parentheses."""
    return re.findall(r"`([^`]+)`", re.sub(r"\([^()]*\)", "", cell))


def number(text: str) -> int:
    return int(text.replace(",", ""))


def compare(what: str, spec: object, code: object) -> list[str]:
    if spec == code:
        return []
    if isinstance(spec, dict) and isinstance(code, dict):  # name only what differs
        keys = sorted({*spec, *code} - {k for k in spec if k in code and spec[k] == code[k]})
        spec, code = {k: spec.get(k) for k in keys}, {k: code.get(k) for k in keys}
    return [f"{what}: SPEC says {spec!r}, the code {code!r}"]


# --------------------------------------------------------------------------- §3 messages


def spec_field(description: str) -> tuple[Any, ...]:
    """A field as SPEC §3 writes it ("bytes, 32 B", "int, ≤ 65,535", "array of R, ≤ 16")."""
    patterns: list[tuple[str, Callable[[re.Match[str]], tuple[Any, ...]]]] = [
        (r"bytes, ([\d,]+) B", lambda m: ("bytes", number(m[1]), None)),
        (r"bytes, ≤ ([\d,]+) B", lambda m: ("bytes", None, number(m[1]))),
        (r"int, ≤ ([\d,]+)", lambda m: ("uint", number(m[1]))),
        (r"str, ≤ ([\d,]+) chars", lambda m: ("text", number(m[1]))),
        (r"bool", lambda m: ("bool",)),
        (r"EUI-64", lambda m: ("eui64",)),
        (r"array of (\w+), ≤ ([\d,]+)", lambda m: ("array", m[1], number(m[2]))),
        (r"(\w+)", lambda m: ("named", m[1])),
    ]
    for pattern, build in patterns:
        match = re.fullmatch(pattern, description)
        if match:
            return build(match)
    return ("unreadable", description)


def code_field(spec: FieldSpec) -> tuple[Any, ...]:
    """The same reading of a field the codec declares."""
    if spec.kind == "bytes":
        return ("bytes", spec.length, None) if spec.length else ("bytes", None, spec.maximum)
    if spec.kind in ("uint", "text"):
        return (spec.kind, spec.maximum)
    if spec.kind == "array":
        assert spec.record is not None
        return ("array", spec.record.__name__, spec.maximum)
    if spec.kind == "record":
        assert spec.record is not None
        return ("named", spec.record.__name__)
    if spec.kind == "enum":
        assert spec.enum is not None
        return ("named", spec.enum.__name__)
    return (spec.kind,)


def field_problems(owner: str, cell: str, record: type[Any]) -> list[str]:
    in_spec = re.findall(r"`(\w+)` \(([^()]*)\)", cell)
    declared = codec.schema(record).fields
    problems = compare(f"{owner} fields", [name for name, _ in in_spec], [f.name for f in declared])
    for (name, description), spec in zip(in_spec, declared, strict=False):
        problems += compare(f"{owner}.{name}", spec_field(description), code_field(spec))
    return problems


def message_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "3"), "t", "message", "QoS", "cap (bytes)", "fields")
    problems = compare("type codes", sorted(number(row[0]) for row in rows), sorted(MESSAGE_TYPES))
    for code_cell, name_cell, qos, cap, fields in rows:
        cls = MESSAGE_TYPES.get(number(code_cell))
        if cls is None:
            continue
        name = ticked(name_cell)[0]
        problems += compare(f"t {code_cell}", name, cls.__name__)
        problems += compare(f"{name} QoS", number(qos), cls.QOS)
        problems += compare(f"{name} cap", number(cap), cls.MAX_BYTES)
        problems += field_problems(name, fields, cls)
    return problems


def nested_record_problems(text: str) -> list[str]:
    body = section(text, "3")
    records = {"Limits": Limits, "HanDevice": HanDevice}
    rows = table_with_header(body, "record", "fields")
    problems = compare("nested records", [ticked(row[0])[0] for row in rows], list(records))
    for name_cell, fields in rows:
        name = ticked(name_cell)[0]
        if name in records:
            problems += field_problems(name, fields, records[name])
    enums: dict[str, type[Enum]] = {
        "DeviceType": DeviceType,
        "JoinMode": JoinMode,
        "DeviceTransferState": DeviceTransferState,
        "Evidence": Evidence,
    }
    for name_cell, values in table_with_header(body, "type", "values"):
        enum = enums[ticked(name_cell)[0]]
        problems += compare(f"{enum.__name__} values", ticked(values), [m.value for m in enum])
    return problems


def test_the_message_table_is_the_code() -> None:
    assert message_problems(SPEC) == []


def test_the_nested_records_and_text_values_are_the_code() -> None:
    assert nested_record_problems(SPEC) == []


@pytest.mark.parametrize(
    ("line", "doctored"),
    [
        ("| 2 | `Block` | 0 | 65,792 |", "| 2 | `Block` | 0 | 65,793 |"),
        ("| 16 | `TransferAcked` | 0 |", "| 16 | `TransferAcked` | 1 |"),
        ("`index` (int, ≤ 4,294,967,295)", "`index` (int, ≤ 65,535)"),
        ("`detail` (str, ≤ 256 chars)", "`detail` (str, ≤ 255 chars)"),
        ("| 33 | `HubWentOffline`", "| 34 | `HubWentOffline`"),
        ("`record` (bytes, ≤ 512 B)", "`record` (bytes, ≤ 256 B)"),
        ("`state` (DeviceTransferState)", "`state` (str, ≤ 16 chars)"),
        ("`credit` (int, ≤ 65,535) |", "`credit` (int, ≤ 65,535), `extra` (bool) |"),
    ],
)
def test_a_wrong_message_line_is_noticed(line: str, doctored: str) -> None:
    assert line in SPEC
    assert message_problems(SPEC.replace(line, doctored, 1))


@pytest.mark.parametrize(
    ("line", "doctored"),
    [
        ("`buffer` (int, ≤ 4,294,967,295)", "`buffer` (int, ≤ 65,535)"),
        ("| `HanDevice` | `device_id` (EUI-64)", "| `HanDevice` | `device_id` (str, ≤ 16 chars)"),
        ("| `JoinMode` | `CAD` `PPMID` `NATIVE` |", "| `JoinMode` | `CAD` `NATIVE` |"),
        ("| `Evidence` | `device` `ch` |", "| `Evidence` | `device` |"),
    ],
)
def test_a_wrong_nested_record_line_is_noticed(line: str, doctored: str) -> None:
    assert line in SPEC
    assert nested_record_problems(SPEC.replace(line, doctored, 1))


# --------------------------------------------------------------------------- §4 reasons


def reason_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "4"), "code", "name")
    in_spec = {number(code): ticked(name)[0] for code, name in rows}
    return compare("reason codes", in_spec, {reason.value: reason.name for reason in Reason})


def test_the_reason_table_is_the_code() -> None:
    assert reason_problems(SPEC) == []


def test_a_renumbered_reason_is_noticed() -> None:
    assert reason_problems(SPEC.replace("| 44 | `EXPIRED` |", "| 47 | `EXPIRED` |", 1))
    assert reason_problems(SPEC.replace("| 127 | `INTERNAL` |\n", "", 1))


# --------------------------------------------------------------------------- §6.2, §8.7 records


_RANGES = {"u16": MAX_U16, "u32": MAX_U32, "u64": MAX_U64}


def manifest_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "6.2"), "key", "type", "range", "meaning")
    schema = codec.schema(Manifest)
    problems = compare(
        "manifest keys", sorted(ticked(row[0])[0] for row in rows), sorted(schema.order)
    )
    fields = {spec.name: spec for spec in schema.fields}
    for key_cell, kind, bounds, _meaning in rows:
        spec = fields.get(ticked(key_cell)[0])
        if spec is None:
            continue
        kinds = {"uint": "uint", "bytes": "bytes", "text": "enum"}
        problems += compare(f"manifest {spec.name} type", kinds.get(kind, kind), spec.kind)
        bound = bounds.split(",")[0]
        if bound in _RANGES:
            problems += compare(f"manifest {spec.name} range", _RANGES[bound], spec.maximum)
        elif match := re.fullmatch(r"([\d,]+) \.\. ([\d,]+)( MiB)?", bounds):
            top = number(match[2]) * (1 << 20 if match[3] else 1)
            problems += compare(f"manifest {spec.name} range", top, spec.maximum)
        elif match := re.fullmatch(r"([\d,]+) B", bounds):
            problems += compare(f"manifest {spec.name} length", number(match[1]), spec.length)
        elif spec.kind == "enum":
            assert spec.enum is not None
            problems += compare(
                "manifest device types", ticked(bounds), [m.value for m in spec.enum]
            )
    return problems


def manifest_v2_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "6.2"), "v 2 key", "type", "range", "meaning")
    v1 = {spec.name for spec in codec.schema(Manifest).fields}
    added = {spec.name: spec for spec in codec.schema(ManifestV2).fields if spec.name not in v1}
    problems = compare("manifest v2 keys", sorted(ticked(row[0])[0] for row in rows), sorted(added))
    for key_cell, kind, bounds, _meaning in rows:
        spec = added.get(ticked(key_cell)[0])
        if spec is None:
            continue
        kinds = {"bytes": "bytes", "text": "enum"}
        problems += compare(f"manifest v2 {spec.name} type", kinds.get(kind, kind), spec.kind)
        if spec.kind == "enum":
            assert spec.enum is not None
            problems += compare("manifest v2 layouts", ticked(bounds), [m.value for m in spec.enum])
        elif match := re.fullmatch(r"(\d+) B", bounds):
            problems += compare(f"manifest v2 {spec.name} length", int(match[1]), spec.length)
    return problems


def activation_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "8.7"), "`t`", "class", "fields", "signed by")
    problems: list[str] = []
    for code_cell, class_cell, fields, _signer in rows:
        cls = getattr(activation, ticked(class_cell)[0], None)
        if cls is None:
            problems.append(f"no activation class {class_cell}")
            continue
        problems += compare(f"{cls.__name__} t", ticked(code_cell)[0], cls.TYPE)
        declared = [spec.name for spec in codec.schema(cls).fields]
        problems += compare(f"{cls.__name__} fields", ticked(fields), declared)
    classes = {ticked(row[1])[0] for row in rows}
    records = {name for name, value in vars(activation).items() if _is_activation_record(value)}
    return problems + compare("activation messages", sorted(classes), sorted(records))


def _is_activation_record(value: object) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, activation.ActivationRecord)
        and value is not activation.ActivationRecord
    )


def test_the_manifest_table_is_the_code() -> None:
    assert manifest_problems(SPEC) == []


def test_the_manifest_v2_table_is_the_code() -> None:
    assert manifest_v2_problems(SPEC) == []
    assert manifest_v2_problems(SPEC.replace("| `subelements` `gbcs` |", "| `gbcs` |"))
    assert manifest_v2_problems(
        SPEC.replace(
            "| `activation_sha256` | bytes | 32 B |", "| `activation_sha256` | bytes | 16 B |"
        )
    )


def test_the_activation_table_is_the_code() -> None:
    assert activation_problems(SPEC) == []


def test_wrong_manifest_and_activation_lines_are_noticed() -> None:
    assert manifest_problems(SPEC.replace("| `hw_max` | uint | u16 |", "| `hw_max` | uint | u32 |"))
    assert manifest_problems(
        SPEC.replace("| `size` | uint | 1 .. 64 MiB |", "| `size` | uint | 1 .. 32 MiB |")
    )
    assert activation_problems(
        SPEC.replace("`device_id`, `fw_version`, `boot_count`, `counter`", "`device_id`, `counter`")
    )
    assert activation_problems(SPEC.replace("| `version_report` |", "| `version_reported` |"))


# --------------------------------------------------------------------------- defaults


_UNITS = {"ms": 0.001, "s": 1.0, "KiB": 1024.0, "bytes": 1.0, "sends": 1.0, "": 1.0}


def quantity(cell: str) -> float | None:
    """The leading number of a cell in base units (seconds, bytes), or None if it has none."""
    match = re.match(r"([\d.,]+)\s*(ms|s|KiB|bytes|sends)?\b", cell)
    return None if match is None else float(match[1].replace(",", "")) * _UNITS[match[2] or ""]


def in_base_units(name: str, value: float) -> float:
    return value * 0.001 if name.endswith("_ms") else value


def signature_default(cls: type[Any], name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


def config_default(cls: type[Any], name: str) -> Any:
    fields = {field.name: field for field in dataclasses.fields(cls)}
    return fields[name].default


def default_problems(rows: list[Row], lookup: Callable[[str, str], Any]) -> list[str]:
    problems: list[str] = []
    for row in rows:
        name = ticked(row[0])[0]
        where = ticked(row[2])[0] if len(row) > 2 else ""
        value = lookup(name, where)
        if row[1] == "⌈`limits.window` / 2⌉":  # Receiver's ack_every: derived from the window
            problems += compare(f"{name} default", None, value)
            for window in (1, 5, 16):
                limits = Limits(1024, window, 1 << 20)
                got = Receiver(limits, _never_verified)._ack_every
                problems += compare(f"{name} at window {window}", math.ceil(window / 2), got)
            continue
        if isinstance(value, Enum):  # a unit or a mode: its value, ticked
            problems += compare(f"{name} default", ticked(row[1])[:1], [value.value])
            continue
        if hex_match := re.match(r"`?0x([0-9A-Fa-f]+)`?", row[1]):  # a code point
            problems += compare(f"{name} default", int(hex_match[1], 16), value)
            continue
        expected = quantity(row[1])
        if expected is None:
            problems.append(f"{name}: no default readable in {row[1]!r}")
        elif value is None or not math.isclose(expected, in_base_units(name, value)):
            problems.append(f"{name}: SPEC says {row[1]!r}, the code {value!r}")
    return problems


def _never_verified(signed: bytes, at: UnixTime) -> Manifest:
    raise AssertionError("reading a default verifies no manifest")


def wan_default_problems(text: str) -> list[str]:
    rows = table_with_header(section(text, "7.12"), "parameter", "default", "where")
    classes = {"Sender": Sender, "Receiver": Receiver}
    return default_problems(rows, lambda name, where: signature_default(classes[where], name))


def han_default_problems(text: str) -> list[str]:
    server = table_with_header(section(text, "8.3"), "server tunable (`ServerConfig`)", "default")
    client = table_with_header(section(text, "8.4"), "client tunable (`ClientConfig`)", "default")
    problems = default_problems(server, lambda name, _: config_default(ServerConfig, name))
    problems += default_problems(client, lambda name, _: config_default(ClientConfig, name))
    named = {ticked(row[0])[0] for row in server}, {ticked(row[0])[0] for row in client}
    tunables = (
        {field.name for field in dataclasses.fields(ServerConfig)},
        {field.name for field in dataclasses.fields(ClientConfig)},
    )
    return problems + compare("HAN tunables", named, tunables)


def test_the_wan_defaults_are_the_code() -> None:
    assert wan_default_problems(SPEC) == []


def test_the_han_defaults_are_the_code() -> None:
    assert han_default_problems(SPEC) == []


def test_a_wrong_default_is_noticed() -> None:
    wan = section(SPEC, "7.12")
    assert "| `max_timeouts` (momentum) | 10 |" in wan
    assert wan_default_problems(SPEC.replace("(momentum) | 10 |", "(momentum) | 8 |", 1))
    assert wan_default_problems(SPEC.replace("| `min_rto` | 0.2 s |", "| `min_rto` | 200 s |", 1))
    assert wan_default_problems(SPEC.replace("⌈`limits.window` / 2⌉", "`limits.window`", 1))
    assert han_default_problems(
        SPEC.replace("| `session_timeout` | 60 s |", "| `session_timeout` | 30 s |", 1)
    )
    assert han_default_problems(
        SPEC.replace(
            "| `minimum_block_period_ms` | 100 ms |", "| `minimum_block_period_ms` | 100 s |", 1
        )
    )
    assert han_default_problems(SPEC.replace("| `max_wait` | 3600 s |\n", "", 1))


# --------------------------------------------------------------------------- state machines

MACHINES: dict[str, dict[Any, frozenset[Any]]] = {
    "SenderState": sender_module.TRANSITIONS,
    "TransferPhase": receiver_module.TRANSITIONS,
    "SessionState": server_module.TRANSITIONS,
    "ClientState": client_module.TRANSITIONS,
    "SlotState": device_module.SLOT_TRANSITIONS,
    "ActivationState": device_module.ACTIVATION_TRANSITIONS,
}


def edge_problems(text: str, enum_name: str) -> list[str]:
    """SPEC's edge table for ``enum_name`` against the code's, and its diagram's states."""
    marker = f"Every edge of `{enum_name}`"
    at = text.find(marker)
    if at < 0:
        return [f"SPEC lists no edges of {enum_name}"]
    rows = tables(text[at:])[0]
    assert rows[0] == ["from", "to", "on"]
    table = MACHINES[enum_name]
    states = {state.name: state for state in table}
    in_spec: set[tuple[str, str]] = {(row[0], row[1]) for row in rows[1:]}
    in_code = {(a.name, b.name) for a, targets in table.items() for b in targets}
    problems = [
        f"{enum_name}: SPEC lists {a} -> {b}, the code has no such edge"
        for a, b in sorted(in_spec - in_code)
    ]
    problems += [
        f"{enum_name}: the code has {a} -> {b}, SPEC does not list it"
        for a, b in sorted(in_code - in_spec)
    ]
    diagram = re.findall(r"```\n(.*?)```", text[:at], re.DOTALL)[-1]
    problems += [
        f"{enum_name}: the diagram does not draw {name}"
        for name in states
        if not re.search(rf"\b{name}\b", diagram)
    ]
    return problems


@pytest.mark.parametrize("enum_name", MACHINES)
def test_spec_lists_exactly_the_edges_of_each_machine(enum_name: str) -> None:
    assert edge_problems(SPEC, enum_name) == []


def test_a_missing_or_invented_edge_is_noticed() -> None:
    row = "| STREAMING | COMPLETE | `ImageHeld` with the manifest's digest |\n"
    assert row in SPEC
    assert edge_problems(SPEC.replace(row, "", 1), "SenderState")
    invented = "| HELD | RECEIVING | a second Offer |\n"
    receiving = "| VERIFYING | HELD | `image_hashed` with the manifest's digest (`ImageHeld`) |\n"
    assert edge_problems(SPEC.replace(receiving, receiving + invented, 1), "TransferPhase")
    assert edge_problems(
        SPEC.replace("Every edge of `ClientState`", "Edges of `ClientState`"), "ClientState"
    )
