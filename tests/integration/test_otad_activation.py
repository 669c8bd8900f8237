"""From "the CH holds it" to "the device runs it, proven", end to end: a real otad subprocess, a
real Mosquitto, and virtual premises (loadtest/premises.py behind loadtest/chhan.py) whose CHs
relay images over their HAN, carry signed activation commands and report back (SPEC §8.10).
Everything is checked from outside: otactl, the monitoring and alert feeds, the wiretap on the
CHs' down topics, and the devices' own state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from otad_harness import otactl, otactl_json, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from loadtest.runner import FleetConfig
from otad.events import TransferHeld
from protocol.release.manifest import DeviceType

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PREMISES = 100
HAN_ACCELERATION = 200.0  # five minutes of HAN time in 1.5 s


def activation_keys(workdir: Path) -> tuple[Path, Path]:
    """otad's activation key (private PEM) and a trust directory with its public half, which
    the virtual devices trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = workdir / "activation.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    trust = workdir / "activation-trust"
    trust.mkdir()
    (trust / "otad.pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, trust


async def wait_devices(
    broker: MosquittoBroker, done: Any, wait_s: float, image: str
) -> list[dict[str, Any]]:
    """Poll ``otactl devices --json`` (of ``image``) until ``done(rows)``; return the rows."""
    deadline = time.monotonic() + wait_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = otactl_json(broker, "devices", "--image", image)
        if done(rows):
            return rows
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"devices not done after {wait_s:.0f} s: {sorted(r['state'] for r in rows)}"
    )


@pytest.mark.timeout(240)
async def test_an_image_for_b2_reaches_every_b2_and_nothing_else_and_every_b2_is_confirmed(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(
        tmp_path / "release", firmware_bytes=3 * 1024, device_type=DeviceType.B2, version=0x0200
    )
    private, trust = activation_keys(tmp_path)
    device_keys = tmp_path / "device-keys"
    fleet_config = FleetConfig(
        host=broker.host, port=broker.port, state_dir="", count=PREMISES, bridge_share=1.0
    )
    assert fleet_config.write_device_keys(device_keys) > 0
    config = otad_config(activation={"key": str(private), "device_keys": str(device_keys)})
    async with otad_with_fleet(
        broker,
        tmp_path,
        release,
        hubs=PREMISES,
        config=config,
        bridge_share=1.0,
        activation_trust_dir=trust,
        han_acceleration=HAN_ACCELERATION,
    ) as setup:
        monitor, fleet = setup.monitor, setup.fleet
        b2 = {
            d.device_id: (fleet_config.identity(i).guid, d.join_mode.value)
            for i in range(PREMISES)
            for d in fleet_config.identity(i).han
            if d.device_type is DeviceType.B2
        }
        carriers = {guid for guid, _mode in b2.values()}
        assert 0 < len(carriers) < PREMISES  # some premises have a B2, some do not
        assert {mode for _guid, mode in b2.values()} == {"CAD", "PPMID"}
        assert otactl(broker, "image", "import", str(release.path)).returncode == 0
        dist = otactl_json(broker, "distribute", release.sha256, "--all-matching")
        assert set(dist["started"]) == carriers  # only premises with a B2
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= len(carriers), 60)
        rows = await wait_devices(
            broker,
            lambda rs: len(rs) == len(b2) and all(r["state"] == "held_by_device" for r in rs),
            60,
            release.sha256,
        )
        assert {r["device_id"] for r in rows} == set(b2)  # every B2, and nothing else
        # one WAN copy per CH, however many of its devices need it
        for guid in carriers:
            assert monitor.block_bytes[guid] <= 1.05 * release.size, guid
        activated = otactl(broker, "activate", release.sha256, "--all-held")
        assert activated.returncode == 0, activated.stderr
        rows = await wait_devices(
            broker,
            lambda rs: all(r["state"] in ("confirmed", "failed", "timed_out") for r in rs),
            90,
            release.sha256,
        )
        stats = await fleet.stats()
    assert [r for r in rows if r["state"] != "confirmed"] == []
    proofs = {r["device_id"]: r["proof"] for r in rows}
    for device_id, (_guid, mode) in b2.items():
        # a PPMID-joined bridge signs its alert; a CAD-joined one cannot: the CH's evidence
        assert proofs[device_id] == ("signed_alert" if mode == "PPMID" else "ch_evidence"), mode
    assert all(s.held.get(release.sha256) == release.sha256 for g, s in stats.items()
               if g in carriers)  # fmt: skip
    by_proof = {p: sum(1 for v in proofs.values() if v == p) for p in set(proofs.values())}
    print(f"\n{PREMISES} premises, {len(carriers)} with a B2, {len(b2)} B2 devices confirmed: "
          f"{by_proof}")  # fmt: skip
