"""docs/events.schema.json and docs/EVENTS.md say what the classes make, and nothing else."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from shellkit import shell
from test_events import one_of_each, published

from otad.distribution import DistributionStatus
from otad.events import EVENT_TYPES, MonitorEvent
from otad.looplag import LoopLagStatus
from otad.scheduler import SchedulerStatus
from otad.schema import feed_schema
from otad.status import HubCounts, LostStatus, Status, lost_status

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCHEMA = json.loads((DOCS / "events.schema.json").read_text())
EVENTS_MD = (DOCS / "EVENTS.md").read_text()


def validate(instance: Any, schema: dict[str, Any], root: dict[str, Any] = SCHEMA) -> list[str]:
    """The problems of ``instance`` against the subset of JSON Schema the feed uses."""
    if "$ref" in schema:
        return validate(instance, root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root)
    if "oneOf" in schema:
        fits = [s for s in schema["oneOf"] if not validate(instance, s, root)]
        return [] if len(fits) == 1 else [f"matches {len(fits)} of oneOf"]
    if "const" in schema and instance != schema["const"]:
        return [f"{instance!r} is not {schema['const']!r}"]
    if "enum" in schema and instance not in schema["enum"]:
        return [f"{instance!r} not in {schema['enum']}"]
    kinds = schema.get("type")
    if kinds is not None:
        names = {
            "integer": lambda v: type(v) is int,
            "number": lambda v: type(v) in (int, float),
            "string": lambda v: isinstance(v, str),
            "boolean": lambda v: type(v) is bool,
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "null": lambda v: v is None,
        }
        if not any(names[k](instance) for k in ([kinds] if isinstance(kinds, str) else kinds)):
            return [f"{instance!r} is not {kinds}"]
    problems = []
    if isinstance(instance, str) and not re.search(schema.get("pattern", ""), instance):
        problems.append(f"{instance!r} does not match {schema['pattern']}")
    if "minimum" in schema and instance < schema["minimum"]:
        problems.append(f"{instance} < {schema['minimum']}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(instance):
            problems += [f"[{index}]: {p}" for p in validate(item, schema["items"], root)]
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        problems += [f"no {k!r}" for k in schema.get("required", []) if k not in instance]
        for key, value in instance.items():
            sub = properties.get(key, schema.get("additionalProperties", True))
            if isinstance(sub, dict):
                problems += [f"{key}: {p}" for p in validate(value, sub, root)]
    return problems


def test_the_schema_file_is_what_the_classes_generate() -> None:
    assert feed_schema() == SCHEMA, "regenerate: python -m otad.schema > docs/events.schema.json"


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: e.KIND)
def test_every_published_event_fits_the_schema_and_only_its_kind(event: MonitorEvent) -> None:
    body = json.loads(published(event, 5))
    assert validate(body, SCHEMA) == []
    assert validate(body, SCHEMA["$defs"][event.KIND]) == []
    assert set(SCHEMA["$defs"][event.KIND]["required"]) == set(body)  # every key, no other
    wrong = {**body, "seq": "5"}
    assert validate(wrong, SCHEMA) != []


async def test_a_status_and_a_last_will_fit_the_schema(tmp_path: Path) -> None:
    async with shell(tmp_path) as s:  # a real daemon's status, with a distribution in it
        s.add_ch("0011223344556677")
        s.announce("0011223344556677")
        await s.distribute()
        s.run_for(0.05)
        status = json.loads(s.status.body("online"))
    assert status["distributions"]  # the nested parts are there to check
    assert validate(status, SCHEMA) == []
    assert validate(status, SCHEMA["$defs"]["status"]) == []
    assert set(status) == set(typing.get_type_hints(Status))
    will = json.loads(lost_status("1.2.3", 1767225600.0))
    assert validate(will, SCHEMA["$defs"]["status.lost"]) == []
    assert set(will) == set(typing.get_type_hints(LostStatus))
    assert validate({**status, "state": "asleep"}, SCHEMA) != []
    assert validate({**status, "broker_warnings": ["fine", 1]}, SCHEMA) != []


def markdown_table_after(heading: str) -> dict[str, str]:
    """The first table after ``heading`` in EVENTS.md: first column -> type column."""
    start = EVENTS_MD.index(heading)
    rows: dict[str, str] = {}
    for line in EVENTS_MD[start:].splitlines()[1:]:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
        elif rows:
            break
    return rows


@pytest.mark.parametrize("kind", list(EVENT_TYPES))
def test_events_md_lists_every_field_of_every_kind_with_its_type(kind: str) -> None:
    schema = SCHEMA["$defs"][kind]["properties"]
    documented = markdown_table_after(f"### `{kind}`")
    envelope = {"v", "kind", "seq", "key", "time", "time_iso"}
    assert set(documented) == set(schema) - envelope
    for name, text in documented.items():
        assert text == schema[name]["type"], f"{kind}.{name}"


def test_events_md_lists_the_envelope_the_status_and_its_parts() -> None:
    assert set(markdown_table_after("## What every event carries")) == {
        "v", "kind", "seq", "key", "time", "time_iso",
    }  # fmt: skip
    assert set(markdown_table_after("## The retained status")) == set(typing.get_type_hints(Status))
    for heading, typed in [
        ("`hubs`:", HubCounts),
        ("Each entry of `distributions`", DistributionStatus),
        ("`scheduler` (", SchedulerStatus),
        ("`loop_lag` (", LoopLagStatus),
        ("**When otad is gone.**", LostStatus),
    ]:
        assert set(markdown_table_after(heading)) == set(typing.get_type_hints(typed)), heading


def test_every_event_field_has_a_description() -> None:
    for cls in EVENT_TYPES.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.KIND}.{f.name}"
