"""README's "### The broker" works as written on this Debian 12 machine, up to where systemd would
start the unit.

The section's ``sh`` blocks run, as they are, in a private mount and network namespace (so
``/etc/mosquitto``, ``/etc/systemd/system`` and ports 8883/1883 are the test's own). Only these
lines are replaced: ``make setup`` (the venv exists: ``make test`` made it), ``systemctl
daemon-reload && systemctl restart mosquitto`` (Mosquitto is started as the drop-in says: its
``ExecStart=`` as its ``User=``), ``systemctl reload mosquitto`` (its ``ExecReload``, a SIGHUP),
and ``/root/otad-pki`` becomes a directory of the test. Then an operator configured by the
README's ``otactl.toml`` reads otad's status through the installed broker, and clients the ACL
must stop are stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

CHECK = r"""
import asyncio, json, subprocess, sys
from mqttio import MqttConnectError, MqttSettings, create_client

PKI, HOST = sys.argv[1], sys.argv[2]


def tls(name, directory="issued"):
    return MqttSettings(client_id=f"{name}-check", host=HOST, port=8883,
                        tls_ca=f"{PKI}/services-ca.crt", tls_cert=f"{PKI}/{directory}/{name}.crt",
                        tls_key=f"{PKI}/{directory}/{name}.key", connect_timeout=3)


async def main():
    got = []
    otad = create_client("gmqtt", tls("otad"))
    await otad.connect(fail_fast=True)
    alice = create_client("gmqtt", tls("alice"))
    alice.set_message_handler(lambda topic, payload, retain: got.append(topic))
    await alice.subscribe("ota/v1/#", 1)
    await alice.connect(fail_fast=True)
    ch = create_client("gmqtt", tls("00DB1234567890AA", "hubs"))
    await ch.connect(fail_fast=True)
    ch.publish("ota/v1/otad/status", b'{"state": "online"}', 1, True)  # not a CH's to write
    otad.publish("ota/v1/ch/00DB1234567890AA/down", b"x", 1, False)  # not alice's to read
    status = {"v": 1, "state": "offline", "time": 1.0, "time_iso": "1970-01-01T00:00:01Z"}
    otad.publish("ota/v1/otad/status", json.dumps(status).encode(), 1, True)
    await asyncio.sleep(0.5)
    assert got == ["ota/v1/otad/status"], got
    for settings in (
        MqttSettings(client_id="anonymous", host="127.0.0.1", port=1883, connect_timeout=2),
        MqttSettings(client_id="nocert", host=HOST, port=8883, tls_ca=f"{PKI}/services-ca.crt",
                     connect_timeout=2),
    ):
        try:
            await create_client("gmqtt", settings).connect(fail_fast=True)
        except MqttConnectError:
            continue
        raise AssertionError(f"{settings.client_id} connected")
    for client in (otad, alice, ch):
        await client.disconnect()


asyncio.run(main())
print("CHECK PASSED")
"""


def broker_section_script(pki_dir: Path) -> str:
    section = README[README.index("### The broker") :]
    section = section[: min(section.index("\n## "), section.index("\n### ", 1))]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the broker section's two sh blocks"
    script = "\n".join(blocks)
    replacements = {
        "make setup ": "true ",
        "systemctl daemon-reload && systemctl restart mosquitto": "start_like_the_drop_in",
        "systemctl reload mosquitto ": "reload_like_the_unit ",
    }
    for old, new in replacements.items():
        assert script.count(old) == 1, old
        script = script.replace(old, new)
    return script.replace("/root/otad-pki", str(pki_dir))


def toml_of_section() -> str:
    section = README[README.index("### The broker") :]
    (toml,) = re.findall(r"```toml\n(.*?)```", section[: section.index("\n## ")], re.S)
    return toml


@pytest.mark.skipif(os.geteuid() != 0, reason="installs into /etc (in a private namespace)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_the_broker_section_works_as_written(tmp_path: Path) -> None:
    pki_dir = tmp_path / "otad-pki"
    for name in ("etc-mosquitto", "etc-systemd-system", "run", "var-lib-mosquitto", "home"):
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(0o755)
    home_config = tmp_path / "home" / ".config"
    home_config.mkdir(parents=True)
    alice_files = "/home/alice/.config/otad"
    toml = toml_of_section().replace(alice_files, f"{pki_dir}/issued")
    toml = toml.replace(f"{pki_dir}/issued/services-ca.crt", f"{pki_dir}/services-ca.crt")
    toml = toml.replace('"mqtt.example.net"', '"$(hostname -f)"')
    (tmp_path / "check.py").write_text(CHECK)
    inner = tmp_path / "inner.sh"
    inner.write_text(
        f"""set -euo pipefail
ip link set lo up
mount --bind {tmp_path}/etc-mosquitto /etc/mosquitto
mount --bind {tmp_path}/etc-systemd-system /etc/systemd/system
mount --bind {tmp_path}/var-lib-mosquitto /var/lib/mosquitto
mount -t tmpfs tmpfs /run
cd {ROOT}
DROP_IN=/etc/systemd/system/mosquitto.service.d/hardening.conf
start_like_the_drop_in() {{
  local user exec
  user=$(sed -n 's/^User=//p' $DROP_IN)
  exec=$(sed -n 's/^ExecStart=\\(.\\)/\\1/p' $DROP_IN)
  install -d -o "$user" -g "$user" /run/mosquitto /var/lib/mosquitto   # RuntimeDirectory, ...
  setpriv --reuid "$user" --regid "$user" --init-groups $exec > {tmp_path}/mosquitto.out 2>&1 &
  echo $! > {tmp_path}/mosquitto.pid
  sleep 1
  kill -0 "$(cat {tmp_path}/mosquitto.pid)"
}}
reload_like_the_unit() {{ kill -HUP "$(cat {tmp_path}/mosquitto.pid)"; sleep 0.5; }}
{broker_section_script(pki_dir)}
cat > {home_config}/otactl.toml <<EOF
{toml}EOF
{sys.executable} {tmp_path}/check.py {pki_dir} "$(hostname -f)"
set +e
HOME={tmp_path}/home {ROOT}/.venv/bin/otactl status --timeout 5
echo "otactl exit $?"
kill "$(cat {tmp_path}/mosquitto.pid)"
"""
    )
    result = subprocess.run(
        ["unshare", "--mount", "--net", "bash", str(inner)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CHECK PASSED" in output, output[-4000:]
    # the README's operator config reached the broker over TLS as alice and read the status
    assert "otad did not answer: it is offline" in output, output[-4000:]
    assert "as of 1970-01-01T00:00:01Z" in output, output[-4000:]
    assert "otactl exit 2" in output, output[-4000:]
    acl = (tmp_path / "etc-mosquitto" / "otad" / "acl").read_text()
    assert acl.endswith(
        "user alice\ntopic write ota/v1/ctl/alice/req\ntopic read ota/v1/ctl/alice/resp\n"
        "topic read ota/v1/otad/status\ntopic read ota/v1/campaigns/+/status\n"
        "topic read ota/v1/events/#\nuser grafana\ntopic read ota/v1/events/#\n"
        "topic read ota/v1/otad/status\ntopic read ota/v1/campaigns/+/status\n"
    )
    assert not Path("/etc/mosquitto/otad").exists()  # the namespace kept the host untouched
