"""The project's broker configs meet SPEC §1.1's table of Mosquitto settings.

The table (setting, required value, scope) is parsed from SPEC.md, so a requirement added there is
checked here at once. ``every broker`` rows apply to the test brokers' generated config
(``loadtest/broker.py``) and to the production example (``systemd/mosquitto/otad.conf``);
``production`` rows to the example only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadtest.broker import MosquittoBroker
from otad.brokercheck import largest_packet_bytes

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "protocol" / "SPEC.md").read_text()
EXAMPLE = ROOT / "systemd" / "mosquitto" / "otad.conf"


def requirement_rows() -> list[tuple[str, str, str]]:
    """(setting, required, scope) of every row of §1.1's settings table."""
    section = SPEC[SPEC.index("### 1.1 Broker requirements") : SPEC.index("### 1.2 ")]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+?) \| (every broker|production) \|$", section, re.M)
    assert rows, "SPEC §1.1 has no table of Mosquitto settings"
    return rows


def parse_config(text: str) -> dict[str, list[str]]:
    """Mosquitto config lines: setting -> every value it is given (comments and blanks skipped)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            settings.setdefault(key, []).append(value.strip())
    return settings


def problem(settings: dict[str, list[str]], setting: str, required: str) -> str | None:
    """Why ``settings`` do not meet ``required`` (alternatives joined by ``or``), or None."""
    values = settings.get(setting)
    value = values[-1] if values else None  # Mosquitto: the last line wins
    for alternative in re.findall(r"`([^`]+)`", required):
        if alternative == "absent" and value is None:
            return None
        if alternative == "set" and value:
            return None
        if alternative.startswith("≥ ") and value is not None and value.isdigit():
            if int(value) >= int(alternative[2:].replace(",", "")):
                return None
        elif value == alternative:
            return None
    return f"{setting} is {value!r}, SPEC §1.1 requires {required}"


def problems(text: str, scopes: set[str]) -> list[str]:
    settings = parse_config(text)
    found = [problem(settings, s, r) for s, r, scope in requirement_rows() if scope in scopes]
    return [p for p in found if p is not None]


def test_the_table_lists_the_settings_the_text_names() -> None:
    names = {setting for setting, _, _ in requirement_rows()}
    assert {"set_tcp_nodelay", "max_packet_size", "message_size_limit", "acl_file"} <= names
    assert {"max_inflight_messages", "max_queued_messages", "max_queued_bytes"} <= names


def test_the_packet_size_in_spec_is_otads_largest_packet() -> None:
    rows = {setting: required for setting, required, _ in requirement_rows()}
    assert rows["max_packet_size"] == f"`≥ {largest_packet_bytes():,}`"
    assert f"at least {largest_packet_bytes():,} bytes, otad's largest packet" in SPEC


def test_the_generated_test_broker_config_meets_every_broker_requirement(tmp_path: Path) -> None:
    broker = MosquittoBroker(workdir=tmp_path)
    assert problems(broker.config_text(), {"every broker"}) == []


def test_the_production_example_meets_every_requirement() -> None:
    assert problems(EXAMPLE.read_text(), {"every broker", "production"}) == []


@pytest.mark.parametrize(
    ("line", "doctored"),
    [
        ("set_tcp_nodelay true", "set_tcp_nodelay false"),
        ("max_packet_size 2101248", "max_packet_size 2098215"),
        ("max_queued_bytes 0", "max_queued_bytes 1048576"),
        ("allow_anonymous false", "allow_anonymous true"),
        ("acl_file /etc/mosquitto/otad/acl", "# acl_file /etc/mosquitto/otad/acl"),
        ("max_keepalive 300", "max_keepalive 60"),
        ("retain_available true", "retain_available false"),
        ("max_inflight_messages 1000", "max_inflight_messages 20"),
    ],
)
def test_a_config_breaking_a_requirement_is_noticed(line: str, doctored: str) -> None:
    text = EXAMPLE.read_text()
    assert text.count(f"\n{line}\n") == 1
    found = problems(text.replace(f"\n{line}\n", f"\n{doctored}\n"), {"every broker", "production"})
    assert len(found) == 1, found
    assert found[0].startswith(line.split()[0]), found


def test_a_deprecated_setting_is_noticed() -> None:
    text = EXAMPLE.read_text() + "message_size_limit 2098176\n"
    assert problems(text, {"every broker"}) == [
        "message_size_limit is '2098176', SPEC §1.1 requires `absent`"
    ]


def test_the_test_brokers_can_break_nagle_on_purpose(tmp_path: Path) -> None:
    broker = MosquittoBroker(workdir=tmp_path, tcp_nodelay=False)
    assert problems(broker.config_text(), {"every broker"}) == [
        "set_tcp_nodelay is 'false', SPEC §1.1 requires `true`"
    ]
