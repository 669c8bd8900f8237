"""A fleet's premises scenario as otad must see it: its share of bridges, its devices' keys."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loadtest.hub import BRIDGE_SHARE, HubGroup, HubOptions, make_identity
from loadtest.premises import Premises
from loadtest.runner import FleetConfig
from otad.credentials import load_device_keys
from protocol.clock import UnixTime
from protocol.release.trust import TrustStore
from protocol.wire.messages import ALT_HAN_BRIDGES

ACTIVATION_KEY = ec.derive_private_key(4242, ec.SECP256R1())


def _share_with_bridges(config: FleetConfig) -> float:
    idents = [config.identity(i) for i in range(config.count)]
    with_bridges = [i for i in idents if any(d.device_type in ALT_HAN_BRIDGES for d in i.han)]
    return len(with_bridges) / len(idents)


def test_a_fleet_chooses_its_share_of_premises_with_bridges() -> None:
    default = FleetConfig("127.0.0.1", 1, "/nowhere", 2000)
    assert default.bridge_share == BRIDGE_SHARE
    assert 0.03 < _share_with_bridges(default) < 0.07
    raised = FleetConfig("127.0.0.1", 1, "/nowhere", 2000, bridge_share=0.5)
    assert 0.45 < _share_with_bridges(raised) < 0.55
    # the same hub is the same hub whatever the share: only whether it has bridges changes
    assert make_identity(0, 5).guid == make_identity(0, 5, bridge_share=1.0).guid
    assert FleetConfig.from_json(raised.to_json()) == raised


def _pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


async def test_the_device_keys_written_for_otad_are_the_keys_the_hubs_devices_sign_with(
    tmp_path: Path,
) -> None:
    config = FleetConfig("127.0.0.1", 1, str(tmp_path / "hubs"), 40, seed=3, bridge_share=1.0)
    written = config.write_device_keys(tmp_path / "keys")
    keys = load_device_keys(tmp_path / "keys")
    assert written == len(keys)
    # the premises each hub of a group really runs (seeded per hub by the group)
    group = HubGroup(
        options=HubOptions(host="127.0.0.1", port=1),
        trust=TrustStore(),
        state_dir=tmp_path / "hubs",
        seed=config.seed,
        indices=range(config.count),
        premises=config.premises(),
        bridge_share=config.bridge_share,
    )
    try:
        signers = cad = 0
        for index, guid in enumerate(group.guids):
            ident = group.identities[guid]
            assert ident == config.identity(index)
            premises = Premises(
                ident,
                trust=TrustStore(),
                activation_trust=TrustStore([ACTIVATION_KEY.public_key()]),
                now=UnixTime(1_780_000_000),
                config=group.premises_config(index),
            )
            for device_id in (guid, *premises.device_ids):
                public = premises.public_key(device_id)
                if public is None:  # CAD-joined: it cannot sign, otad has no key for it
                    assert f"{device_id}.pem" not in {p.name for p in (tmp_path / "keys").iterdir()}
                    cad += 1
                    continue
                assert (tmp_path / "keys" / f"{device_id}.pem").read_bytes() == _pem(public)
                signers += 1
        assert signers == written
        assert cad > 0
    finally:
        await group.close()
