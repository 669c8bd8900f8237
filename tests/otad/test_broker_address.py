"""The one HOST:PORT grammar of every command line that names the broker."""

from __future__ import annotations

import pytest

from mqttio import parse_broker, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("broker.example:1884", ("broker.example", 1884)),
        ("c", ("c", None)),
        ("[::1]:1999", ("::1", 1999)),
        ("[::1]", ("::1", None)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ],
)
def test_host_port_grammar(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "host:", "a:b:c", "[::1", "host:port", "::1:1883", "h:0", "h:65536", "h:123456"]
)
def test_host_port_grammar_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="expected HOST"):
        split_host_port(bad)


def test_a_broker_address_needs_its_port() -> None:
    assert parse_broker("mqtt.example:8883") == ("mqtt.example", 8883)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_broker("nohost")
