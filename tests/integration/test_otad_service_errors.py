"""What an operator sees when the deployment is wrong, against a real Mosquitto.

* a broker that refuses the credentials: an ERROR naming the refusal (both MQTT adapters), never
  "unreachable";
* a TLS failure (the broker's certificate from another CA): an ERROR naming TLS, both adapters;
* every missing or unreadable file the config names: one line each, exit 2, before anything
  starts; ``otad check-config`` prints the plan (trust key ids included) or the problems;
* a second otad on the same state directory: refused, exit 2; two otads sharing one client id
  on one broker: one of them stops with an ERROR and exit 1 instead of the take-over loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from otad_harness import Otad, otad_config
from tlskit import tls_listener_config, write_ca

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from mqttio import MqttConnectError, MqttSettings, create_client
from otad.config import default_client_id
from otad.keyfiles import load_private_key, load_public_key, write_keypair
from protocol.release.cose import key_id

pytestmark = pytest.mark.broker

PASSWORD = "correct horse battery staple"


def password_broker(tmp_path: Path) -> MosquittoBroker:
    """A Mosquitto that accepts only user ``otad`` with :data:`PASSWORD`."""
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "otad", PASSWORD],
        check=True,
        capture_output=True,
    )
    passwords.chmod(0o600)
    return MosquittoBroker(
        workdir=tmp_path / "mosquitto",
        allow_anonymous=False,
        extra_config=f"password_file {passwords}",
    )


def tls_broker(tmp_path: Path) -> tuple[MosquittoBroker, Path]:
    """A Mosquitto whose only listener is TLS with a certificate for 127.0.0.1; its CA file."""
    lines, ca = tls_listener_config(tmp_path / "pki")
    return MosquittoBroker(workdir=tmp_path / "mosquitto", extra_config=lines), ca.cert


async def wait_for_log(otad: Otad, text: str, wait_s: float = 20.0) -> str:
    deadline = time.monotonic() + wait_s
    while text not in (log := otad.log()):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log[-3000:]}"
        assert otad.alive, log[-3000:]
        await asyncio.sleep(0.1)
    return log


# --------------------------------------------------------------------------- the broker refuses


async def test_bad_password_is_a_named_permanent_refusal(tmp_path: Path, mqtt_library: str) -> None:
    broker = password_broker(tmp_path)
    broker.start()
    try:
        settings = MqttSettings(
            client_id="otad-auth-test", port=broker.port, username="otad", password="wrong"
        )
        client = create_client(mqtt_library, settings)
        with pytest.raises(MqttConnectError) as info:
            await client.connect(fail_fast=True)
        assert info.value.return_code in (4, 5)
        assert info.value.permanent
        assert info.value.reason in ("bad user name or password", "not authorised")
        assert info.value.reason in str(info.value)
        good = create_client(mqtt_library, MqttSettings(**{**vars(settings), "password": PASSWORD}))
        await good.connect(fail_fast=True)
        await good.disconnect()
    finally:
        broker.stop()


async def test_otad_with_a_bad_password_logs_an_error_naming_it(
    tmp_path: Path, mqtt_library: str
) -> None:
    broker = password_broker(tmp_path)
    broker.start()
    secret = tmp_path / "broker-password"
    secret.write_text("wrong\n")
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    config = otad_config(broker={"username": "otad", "password_file": str(secret)})
    otad = Otad(broker, tmp_path / "otad", release.trust_dir, library=mqtt_library, config=config)
    otad.start()
    try:
        log = await wait_for_log(otad, "ERROR")
        error = next(line for line in log.splitlines() if " ERROR " in line)
        assert "bad user name or password" in error or "not authorised" in error, error
        assert "unreachable" not in log
        assert "Traceback" not in log
        # fixed password: the next start connects
        assert otad.terminate() == 0
        secret.write_text(PASSWORD + "\n")
        otad.start()
        await wait_for_log(otad, "otad ready")
        assert otad.terminate() == 0
    finally:
        otad.stop_quietly()
        broker.stop()


async def test_tls_failure_is_named(tmp_path: Path, mqtt_library: str) -> None:
    broker, broker_ca = tls_broker(tmp_path)
    broker.start()
    try:
        other_ca = write_ca(tmp_path / "other", "another-ca").cert
        wrong = create_client(
            mqtt_library,
            MqttSettings(client_id="otad-tls-test", port=broker.port, tls_ca=str(other_ca)),
        )
        with pytest.raises(MqttConnectError) as info:
            await wrong.connect(fail_fast=True)
        assert info.value.tls
        assert info.value.permanent
        assert "TLS" in str(info.value)
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate" in str(info.value)
        right = create_client(
            mqtt_library,
            MqttSettings(client_id="otad-tls-test", port=broker.port, tls_ca=str(broker_ca)),
        )
        await right.connect(fail_fast=True)
        await right.disconnect()
    finally:
        broker.stop()


async def test_otad_against_a_broker_of_another_ca_logs_a_tls_error(tmp_path: Path) -> None:
    broker, _ = tls_broker(tmp_path)
    broker.start()
    other_ca = write_ca(tmp_path / "other", "another-ca").cert
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    config = otad_config(broker={"tls_ca": str(other_ca)})
    otad = Otad(broker, tmp_path / "otad", release.trust_dir, config=config)
    otad.start()
    try:
        log = await wait_for_log(otad, "ERROR")
        error = next(line for line in log.splitlines() if " ERROR " in line)
        assert "TLS failure" in error, error
        assert "Traceback" not in log
    finally:
        otad.stop_quietly()
        broker.stop()


# --------------------------------------------------------------------------- files


def run_otad(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otad", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


MISSING_FILE_CASES = [
    ("broker", "password_file", "broker.password_file"),
    ("broker", "tls_ca", "broker.tls_ca"),
    ("broker", "tls_cert", "broker.tls_cert"),
    ("broker", "tls_key", "broker.tls_key"),
    ("activation", "key", "activation.key"),
    ("activation", "device_keys", "activation.device_keys"),
    ("trust", "revoked_file", "trust.revoked_file"),
    ("trust", "dir", "trust.dir"),
]


@pytest.mark.parametrize(("section", "key", "named"), MISSING_FILE_CASES)
@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_missing_file_is_one_line_and_exit_2(
    tmp_path: Path, section: str, key: str, named: str, command: str
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    sections: dict[str, dict[str, object]] = {
        "store": {"state_dir": str(tmp_path / "state")},
        "trust": {"dir": str(release.trust_dir)},
    }
    if key == "tls_cert":
        sections["broker"] = {"tls_key": str(tmp_path / "also-missing.key")}
    if key == "tls_key":
        sections["broker"] = {"tls_cert": str(write_ca(tmp_path / "ca", "client").cert)}
    if key == "password_file":
        sections["broker"] = {"username": "otad"}
    sections.setdefault(section, {})[key] = str(tmp_path / "missing")
    config = tmp_path / "otad.toml"
    config.write_text(otad_config(**sections))
    args = ("run", "--config", str(config)) if command == "run" else ("check-config", str(config))
    result = run_otad(*args, "--broker", "127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines, result
    assert lines[0].startswith(f"otad: configuration: {named}: {tmp_path / 'missing'}")
    assert "Traceback" not in result.stderr
    assert all(line.startswith("otad: configuration: ") for line in lines), lines
    assert not (tmp_path / "state").exists()  # nothing started


def test_an_unreadable_password_file_and_a_mismatched_tls_key(tmp_path: Path) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    secret = tmp_path / "password"
    secret.write_text("x")
    secret.chmod(0)
    ca = write_ca(tmp_path / "ca", "ca").cert
    wrong_key = tmp_path / "wrong.key"
    write_keypair(wrong_key)
    config = tmp_path / "otad.toml"
    config.write_text(
        otad_config(
            broker={
                "username": "otad",
                "password_file": str(secret),
                "tls_ca": str(ca),
                "tls_cert": str(ca),
                "tls_key": str(wrong_key),
            },
            trust={"dir": str(release.trust_dir)},
            store={"state_dir": str(tmp_path / "state")},
        )
    )
    result = run_otad("check-config", str(config))
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        assert any("broker.password_file" in p and "Permission denied" in p for p in problems)
    assert any(p.startswith("otad: configuration: broker.tls_cert:") for p in problems), problems
    assert "Traceback" not in result.stderr


def test_check_config_prints_the_plan(tmp_path: Path) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    activation = tmp_path / "activation.pem"
    write_keypair(activation)
    config = tmp_path / "otad.toml"
    config.write_text(
        otad_config(
            broker={"host": "broker.example", "port": 8883},
            trust={"dir": str(release.trust_dir)},
            store={"state_dir": str(tmp_path / "state")},
            activation={"key": str(activation)},
            transfer={"window": 16},
        )
    )
    result = run_otad("check-config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    trusted = key_id(load_public_key(next(release.trust_dir.glob("*.pem")))).hex()
    assert "broker: broker.example:8883 with gmqtt, plaintext" in out
    assert f"trust: {release.trust_dir}: key ids {trusted}" in out
    assert key_id(load_private_key(activation).public_key()).hex() in out
    assert f"state: {tmp_path / 'state'} (will be created)" in out
    assert "window 16 blocks per CH" in out
    assert "client id: otad-" in out
    assert out.rstrip().endswith("configuration OK")
    assert not (tmp_path / "state").exists()


# --------------------------------------------------------------------------- a second otad


async def test_a_second_otad_on_the_same_state_directory_is_refused(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    first = Otad(broker, tmp_path / "a", release.trust_dir)
    first.start()
    try:
        await wait_for_log(first, "otad ready")
        second = Otad(broker, tmp_path / "b", release.trust_dir)
        second.state_dir = first.state_dir
        second.start()
        assert second.proc is not None
        assert second.proc.wait(30) == 2
        assert "in use by another otad process" in second.log()
        assert "Traceback" not in second.log()
        assert first.alive
        assert first.terminate() == 0
    finally:
        first.stop_quietly()


@pytest.mark.slow
async def test_two_otads_with_one_client_id_do_not_loop(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    release = make_release(tmp_path / "release", firmware_bytes=4096)
    config = otad_config(broker={"client_id": "otad-shared"})
    first = Otad(broker, tmp_path / "a", release.trust_dir, config=config)
    first.start()
    try:
        await wait_for_log(first, "otad ready")
        second = Otad(broker, tmp_path / "b", release.trust_dir, config=config)
        second.start()
        try:
            deadline = time.monotonic() + 60
            while first.alive and second.alive:
                assert time.monotonic() < deadline, first.log()[-2000:] + second.log()[-2000:]
                await asyncio.sleep(0.2)
            stopped = first if not first.alive else second
            assert stopped.proc is not None
            # refused either by the take-over count (exit 1) or, sooner, because the first's
            # status says it serves this broker (exit 2: the second stops, the first runs on)
            if stopped.proc.returncode == 1:
                assert "another client (a second otad?) uses this client id" in stopped.log()
            else:
                assert stopped.proc.returncode == 2
                assert stopped is second
                assert "another otad is online on this broker" in stopped.log()
                assert first.alive
        finally:
            second.stop_quietly()
    finally:
        first.stop_quietly()


def test_the_default_client_id_differs_per_state_directory(tmp_path: Path) -> None:
    a = default_client_id(tmp_path / "a", "meter-head-1")
    b = default_client_id(tmp_path / "b", "meter-head-1")
    assert a != b
    assert a.startswith("otad-meter-head-1-")
    assert len(a) == len("otad-meter-head-1-") + 8
    assert default_client_id(tmp_path / "a", "host/with#odd+chars").startswith(
        "otad-host_with_odd_chars-"
    )
