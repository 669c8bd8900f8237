"""The shipped unit, systemd/otad.service, as systemd itself reads it.

``systemd-analyze verify`` checks that every ExecStart=/ExecStartPre= binary exists, and the
shipped file names /usr/local/bin/otad (where the README installs it), which a test machine
does not have. So the test verifies a copy of the shipped file in which *only* that path is
replaced, by the otad console script of the environment running the tests (a real, executable
otad); every other line is the shipped file's, byte for byte, which the test asserts too. The
copy keeps the name otad.service, so unit-name checks see the real name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tlskit import write_ca

from otad.keyfiles import write_keypair

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "otad.service"
EXAMPLE = REPO / "systemd" / "otad.example.toml"
INSTALLED_OTAD = "/usr/local/bin/otad"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package systemd)"
)


def otad_script() -> Path:
    """The otad console script of the running environment."""
    script = Path(sys.executable).parent / "otad"
    assert script.is_file(), f"no otad console script at {script} (pip install -e .)"
    return script


def unit_copy(tmp_path: Path) -> Path:
    """systemd/otad.service with only the otad binary's path substituted (module docstring)."""
    text = UNIT.read_text()
    assert INSTALLED_OTAD in text
    copy_text = text.replace(INSTALLED_OTAD, str(otad_script()))
    original_lines = text.splitlines()
    copied_lines = copy_text.splitlines()
    assert len(original_lines) == len(copied_lines)
    changed = [(a, b) for a, b in zip(original_lines, copied_lines, strict=True) if a != b]
    assert changed
    assert all(a.replace(INSTALLED_OTAD, str(otad_script())) == b for a, b in changed)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    copy = unit_dir / "otad.service"
    copy.write_text(copy_text)
    return copy


def settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the shipped unit (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify also warns about other units it loads (e.g. mosquitto.service of the host): only
    # lines about otad.service count
    complaints = [line for line in result.stderr.splitlines() if "otad.service" in line]
    assert complaints == [], result.stderr


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for otad\.service: (\d+\.\d+)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


@needs_analyze
def test_security_gate_catches_a_weakened_unit(tmp_path: Path) -> None:
    """The score parsed above moves: the same unit without its sandboxing scores above 2."""
    assert SYSTEMD_ANALYZE is not None
    copy = unit_copy(tmp_path)
    kept = ("[", "Type=", "ExecStart=", "Description=")
    lines = [line for line in copy.read_text().splitlines() if line.startswith(kept)]
    copy.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for otad\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) > MAX_EXPOSURE


def test_unit_settings_the_service_relies_on() -> None:
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    from otad.cli import EXIT_CONFIG
    from otad.daemon import EXIT_START_FAILED

    assert s["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] == [str(EXIT_START_FAILED)]
    assert s["DynamicUser"] == ["yes"]
    assert s["StateDirectory"] == ["otad"]
    assert s["StateDirectoryMode"] == ["0700"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStartPre"] == [f"{INSTALLED_OTAD} check-config /etc/otad/otad.toml"]
    assert s["ExecStart"] == [f"{INSTALLED_OTAD} run --config /etc/otad/otad.toml"]
    assert s["MemoryDenyWriteExecute"] == ["yes"]
    watchdog = s["WatchdogSec"][0]
    assert watchdog.endswith("s")
    assert int(watchdog[:-1]) >= 10


def test_credentials_match_the_example_config() -> None:
    """Every credential path the example config names is one the unit loads, and back."""
    loaded = {v.partition(":")[0] for v in settings()["LoadCredential"]}
    named = set(re.findall(r"/run/credentials/otad\.service/([\w.-]+)", EXAMPLE.read_text()))
    assert named == loaded
    assert "$STATE_DIRECTORY" in EXAMPLE.read_text()


README = REPO / "README.md"


def readme_install_toml() -> str:
    """The otad.toml the README's "otad as a systemd service" section writes."""
    text = README.read_text()
    section = text[text.index("### otad as a systemd service") :]
    match = re.search(r"cat > /etc/otad/otad\.toml <<'TOML'\n(.*?)\nTOML\n", section, re.DOTALL)
    assert match, "the README's install section writes /etc/otad/otad.toml"
    return match.group(1) + "\n"


def test_the_readme_install_config_passes_check_config(tmp_path: Path) -> None:
    """The README's otad.toml, with only /etc/otad and the unit's credentials directory moved
    under tmp_path, and the files the README puts there made: check-config accepts it, and
    every credential it names is one the unit loads."""
    toml = readme_install_toml()
    loaded = {v.partition(":")[0] for v in settings()["LoadCredential"]}
    assert set(re.findall(r"/run/credentials/otad\.service/([\w.-]+)", toml)) == loaded
    etc, creds = tmp_path / "etc-otad", tmp_path / "credentials"
    (etc / "trust").mkdir(parents=True)
    creds.mkdir()
    release_key = write_keypair(tmp_path / "release.pem")
    (etc / "trust" / "release.pub.pem").write_bytes(release_key.public_path.read_bytes())
    write_keypair(creds / "activation.pem")
    (creds / "broker-password").write_text("secret\n")
    ca = write_ca(tmp_path / "pki", "broker-ca")
    (etc / "broker-ca.pem").write_bytes(ca.cert.read_bytes())
    client = write_ca(tmp_path / "pki", "otad")  # any certificate with its key will do here
    (etc / "otad.crt").write_bytes(client.cert.read_bytes())
    (creds / "otad.key").write_bytes(
        client.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = tmp_path / "otad.toml"
    config.write_text(
        toml.replace("/run/credentials/otad.service", str(creds)).replace("/etc/otad", str(etc))
    )
    result = subprocess.run(
        [str(otad_script()), "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"STATE_DIRECTORY": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "broker: localhost:8883 with gmqtt, TLS" in result.stdout
    assert f"state: {tmp_path / 'state'}" in result.stdout
