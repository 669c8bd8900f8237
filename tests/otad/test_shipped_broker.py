"""The shipped broker files (systemd/mosquitto/): the packet limit against protocol's own limit,
the substitution that lets the tests run exactly that file, the ACL's shape and the drop-in."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loadtest.broker import SHIPPED_ACL, SHIPPED_CONFIG, BrokerError, MosquittoBroker, ShippedConfig
from otad.brokercheck import largest_packet_bytes
from protocol.wire.messages import Offer

DROP_IN = SHIPPED_CONFIG.parent / "mosquitto.service.d" / "hardening.conf"


def settings(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            pairs.append((key, value.strip()))
    return pairs


def test_max_packet_size_passes_the_largest_offer_with_a_margin_and_says_why() -> None:
    text = SHIPPED_CONFIG.read_text()
    (value,) = [v for k, v in settings(text) if k == "max_packet_size"]
    limit = int(value)
    # an Offer at protocol's own cap, as otad sends it (QoS 1 on a CH's down topic)
    assert largest_packet_bytes() > Offer.MAX_BYTES
    assert limit > largest_packet_bytes()
    assert limit - largest_packet_bytes() <= 64 * 1024  # a margin, not a hole
    assert "Offer.MAX_BYTES" in text
    assert f"{Offer.MAX_BYTES:,}" in text
    assert f"{largest_packet_bytes():,}" in text
    assert f"{limit - largest_packet_bytes():,}" in text


def test_plaintext_only_on_loopback_tls_with_certificates_and_no_anonymous() -> None:
    pairs = settings(SHIPPED_CONFIG.read_text())
    listeners = [v for k, v in pairs if k == "listener"]
    assert listeners == ["8883", "1883 127.0.0.1"]
    tls_block = pairs[
        pairs.index(("listener", "8883")) : pairs.index(("listener", "1883 127.0.0.1"))
    ]
    assert ("require_certificate", "true") in tls_block
    assert ("use_identity_as_username", "true") in tls_block
    assert {k for k, _ in tls_block} >= {"cafile", "certfile", "keyfile", "crlfile"}
    assert ("allow_anonymous", "false") in pairs
    assert ("allow_anonymous", "true") not in pairs
    assert ("per_listener_settings", "false") in pairs


def test_the_rendered_config_differs_only_in_ports_and_paths(tmp_path: Path) -> None:
    shipped = ShippedConfig(
        cafile=tmp_path / "ca.pem",
        certfile=tmp_path / "b.crt",
        keyfile=tmp_path / "b.key",
        crlfile=tmp_path / "crl.pem",
    )
    text = shipped.render(tmp_path, tls_port=18883, local_port=11883, log_path=tmp_path / "log")
    original, rendered = settings(SHIPPED_CONFIG.read_text()), settings(text)
    assert rendered[-1][0] == "user"
    assert len(rendered) == len(original) + 1
    changed = [(a, b) for a, b in zip(original, rendered, strict=False) if a != b]
    assert [a[0] for a, _ in changed] == [
        "listener",
        "cafile",
        "certfile",
        "keyfile",
        "crlfile",
        "listener",
        "password_file",
        "acl_file",
        "persistence_location",
        "pid_file",
        "log_dest",
    ]
    for (key, _), (new_key, new_value) in changed:
        assert new_key == key
        assert new_value in ("18883", "11883 127.0.0.1") or str(tmp_path) in new_value
    assert (tmp_path / "acl").read_text() == SHIPPED_ACL.read_text()
    assert (tmp_path / "passwd").read_text() == ""


def test_a_shipped_config_it_cannot_substitute_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "otad.conf"
    source.write_text(SHIPPED_CONFIG.read_text().replace("listener 8883", "listener 8884"))
    shipped = ShippedConfig(
        cafile=tmp_path / "ca",
        certfile=tmp_path / "c",
        keyfile=tmp_path / "k",
        crlfile=tmp_path / "r",
        source=source,
    )
    with pytest.raises(BrokerError, match="unexpected listener line 'listener 8884'"):
        shipped.render(tmp_path, tls_port=1, local_port=2, log_path=tmp_path / "log")
    source.write_text(SHIPPED_CONFIG.read_text().replace("acl_file", "#acl_file"))
    with pytest.raises(BrokerError, match="expected one 'acl_file' line"):
        shipped.render(tmp_path, tls_port=1, local_port=2, log_path=tmp_path / "log")


def test_a_shipped_broker_listens_on_loopback_only_for_plaintext() -> None:
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1 only"):
        MosquittoBroker(
            host="0.0.0.0",  # noqa: S104 - what is refused
            shipped=ShippedConfig(
                cafile=Path("a"), certfile=Path("b"), keyfile=Path("c"), crlfile=Path("d")
            ),
        )


def test_the_acl_confines_chs_to_their_own_direction_and_lets_only_otad_write_downlinks() -> None:
    lines = [line for line in SHIPPED_ACL.read_text().splitlines() if line and line[0] != "#"]
    patterns = [line for line in lines if line.startswith("pattern ")]
    assert patterns == [
        "pattern read ota/v1/ch/%u/down",
        "pattern write ota/v1/ch/%u/up",
        "pattern write ota/v1/ch/%u/state",
        "pattern read ota/v1/alerts/%u/#",
    ]
    users = [line.split()[1] for line in lines if line.startswith("user ")]
    assert users == ["otad"]  # operators and monitors are appended by name
    writes = {line.split()[2] for line in lines if re.match(r"topic (write|readwrite) ", line)}
    assert writes == {
        "ota/v1/ch/+/down",
        "ota/v1/events/#",
        "ota/v1/alerts/#",
        "ota/v1/otad/status",
        "ota/v1/campaigns/#",
        "ota/v1/otad/probe/#",
        "ota/v1/ctl/+/resp",
    }


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="make test installs systemd")
def test_the_hardening_drop_in_is_a_valid_unit_file(tmp_path: Path) -> None:
    unit = tmp_path / "mosquitto.service"
    unit.write_text(
        "[Unit]\nDescription=Mosquitto\n[Service]\nType=notify\n"
        "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf\n"
        + DROP_IN.read_text().split("[Service]", 1)[1]
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.strip() == "", output  # not even an ignored unknown or invalid setting
    assert "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/otad/otad.conf" in DROP_IN.read_text()
