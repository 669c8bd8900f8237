"""How ``otactl`` connects: flags > ``OTACTL_*`` > config file > defaults, ``--broker`` on either
side of the command and without a port, ``--version``, and a fast exit when otad's retained
status says offline (otad/ctl/connection.py, otad/ctl/__init__.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.broker import MosquittoBroker
from mqttio import MqttSettings, create_client
from otad import ctl
from otad.ctl import pki
from otad.ctl.connection import ConnectionConfigError, resolve
from protocol.wire import topics


def connection(argv: list[str], env: dict[str, str] | None = None) -> ctl.Connection:
    args = ctl.build_parser().parse_args(argv)
    return ctl.connection_of(args, env or {"HOME": "/nonexistent"})


def test_defaults_without_flags_env_or_file() -> None:
    got = connection(["status"])
    assert (got.host, got.port, got.username, got.tls_ca) == ("127.0.0.1", 1883, None, None)
    assert got.name.startswith("otactl-")


@pytest.mark.parametrize(
    "argv",
    [
        ["--broker", "mqtt.example:1884", "status"],
        ["status", "--broker", "mqtt.example:1884"],
        ["fleet", "list", "--broker", "mqtt.example:1884", "--json"],
        ["--broker", "elsewhere:1", "status", "--broker", "mqtt.example:1884"],
    ],
)
def test_broker_anywhere_on_the_line(argv: list[str]) -> None:
    got = connection(argv)
    assert (got.host, got.port) == ("mqtt.example", 1884)


def test_a_host_without_port_takes_the_default_port_of_its_transport(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    assert connection(["status", "--broker", "mqtt.example"]).port == 1883
    assert connection(["status", "--broker", "mqtt.example", "--tls-ca", str(ca)]).port == 8883
    assert connection(["status", "--broker", "[::1]"]).host == "::1"


def test_flags_beat_env_beat_the_file(tmp_path: Path) -> None:
    config = tmp_path / "otactl.toml"
    config.write_text('broker = "file:1"\nusername = "file-user"\nclient_name = "file-name"\n')
    env = {"OTACTL_CONFIG": str(config), "HOME": "/nonexistent"}
    got = connection(["status"], env)
    assert (got.host, got.port, got.username, got.name) == ("file", 1, "file-user", "file-name")
    env |= {"OTACTL_BROKER": "env:2", "OTACTL_USERNAME": "env-user"}
    got = connection(["status"], env)
    assert (got.host, got.port, got.username, got.name) == ("env", 2, "env-user", "file-name")
    got = connection(["status", "--broker", "flag:3", "--client-name", "flag-name"], env)
    assert (got.host, got.port, got.username, got.name) == ("flag", 3, "env-user", "flag-name")


def test_the_default_config_files_are_looked_for(tmp_path: Path) -> None:
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg" / "otactl.toml").write_text('broker = "xdg-host"\n')
    got = connection(["status"], {"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert got.host == "xdg-host"
    (tmp_path / "home" / ".config").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "otactl.toml").write_text('broker = "home-host"\n')
    assert connection(["status"], {"HOME": str(tmp_path / "home")}).host == "home-host"


def test_the_name_defaults_to_the_username_then_the_certificates_cn(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    got = connection(["status", "--username", "alice", "--password-file", str(password)])
    assert (got.name, got.password) == ("alice", "s3cret")
    pki.init_pki(tmp_path / "ca")
    issued = pki.issue(tmp_path / "ca", pki.Role.OPERATOR, "bob", tmp_path)
    flags = ["--tls-ca", str(tmp_path / "ca" / "services-ca.crt")]
    got = connection(
        ["status", *flags, "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]
    )
    assert got.name == "bob"
    assert got.username is None
    assert got.port == 8883
    settings = got.settings(purpose="ctl", connect_timeout=1.0)
    assert settings.uses_tls
    assert settings.client_id.startswith("bob.ctl-")
    other = got.settings(purpose="ctl", connect_timeout=1.0)
    assert other.client_id != settings.client_id  # two otactl of one operator: two sessions


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        (["--password-file", "{tmp}/pw"], None, "--password-file needs --username"),
        (["--username", "u", "--password-file", "{tmp}/missing"], None, "No such file"),
        (["--username", "u", "--password-file", "{tmp}/big"], None, "larger than 4096 bytes"),
        (["--tls-cert", "{tmp}/pw"], None, "--tls-cert and --tls-key go together"),
        (["--tls-ca", "{tmp}/missing"], None, "--tls-ca .*not a readable file"),
        (["--broker", "::1:1883x"], None, None),
        (["--client-name", "a/b"], None, "not a safe topic level"),
        ([], 'brokr = "x"\n', "unknown key 'brokr'"),
        ([], "broker = 1883\n", "broker must be a string"),
        ([], "broker = \n", "is not TOML"),
    ],
)
def test_bad_settings_are_one_line_each(
    tmp_path: Path, argv: list[str], config: str | None, message: str | None
) -> None:
    (tmp_path / "pw").write_text("x")
    (tmp_path / "big").write_text("x" * 4097)
    env = {"HOME": "/nonexistent"}
    if config is not None:
        (tmp_path / "otactl.toml").write_text(config)
        env["OTACTL_CONFIG"] = str(tmp_path / "otactl.toml")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if message is None:  # argparse refuses it as usage (exit 2)
        with pytest.raises(SystemExit):
            ctl.build_parser().parse_args([*argv, "status"])
        return
    with pytest.raises(ctl.CtlFailure, match=message):
        connection(["status", *argv], env)


def test_a_named_config_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectionConfigError, match="not found"):
        resolve({}, {}, config=str(tmp_path / "nope.toml"))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("otactl (otad) 0.")


@pytest.mark.broker
def test_it_fails_fast_when_otads_retained_status_says_offline(broker: MosquittoBroker) -> None:
    async def publish_offline() -> None:
        client = create_client("gmqtt", MqttSettings(client_id="fake-otad", port=broker.port))
        await client.connect(fail_fast=True)
        status = {"v": 1, "state": "offline", "time": 1.0, "time_iso": "1970-01-01T00:00:01Z"}
        client.publish(topics.OTAD_STATUS, json.dumps(status).encode(), 1, True)
        await asyncio.sleep(0.2)
        await client.disconnect()

    asyncio.run(publish_offline())
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "otad.ctl", "status", "--broker", broker.address, "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == ctl.EXIT_OFFLINE, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "otad did not answer: it is offline" in result.stderr
    assert "1970-01-01T00:00:01Z" in result.stderr
    assert elapsed < 10, elapsed  # far below --timeout 30
