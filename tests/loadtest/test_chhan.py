"""The virtual CH's HAN side (loadtest/chhan.py): a held image relayed to its devices and
reported upstream as DeviceTransferReported; an Activate relayed to the device and its answers
reported as DeviceReported, with the evidence SPEC §8.8 gives each join mode."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from loadtest.chhan import HanSide
from loadtest.hub import HubIdentity, make_identity
from loadtest.premises import PremisesConfig
from otad.ctl.imagetool import DEFAULT_IMAGE_TYPE, DEFAULT_MANUFACTURER
from protocol.clock import UnixTime
from protocol.device.activation import (
    ActivationAlert,
    ActivationCommand,
    ActivationResponse,
    Outcome,
)
from protocol.release import otaimg, zigbee_ota
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore, verify_manifest
from protocol.wire.messages import (
    Activate,
    DeviceReported,
    DeviceTransferReported,
    DeviceTransferState,
    Evidence,
    Message,
    ReadVersion,
)

RELEASE_KEY = ec.generate_private_key(ec.SECP256R1())
OTAD_KEY = ec.generate_private_key(ec.SECP256R1())
TRUST = TrustStore([RELEASE_KEY.public_key()])
FAST = PremisesConfig(acceleration=2_000.0, link=PremisesConfig().link)


def signed_release(device_type: DeviceType, now: float) -> tuple[Manifest, bytes, bytes]:
    ota = zigbee_ota.wrap(
        random.Random(3).randbytes(1500),
        manufacturer_code=DEFAULT_MANUFACTURER,
        image_type=DEFAULT_IMAGE_TYPE,
        file_version=0x0300,
        hw_min=0,
        hw_max=0xFFFF,
    )
    signed = otaimg.build(ota, RELEASE_KEY, device_type=device_type, sequence=int(now),
                          block_size=1024, created=int(now) - 60,
                          expires=int(now) + 30 * 86_400)  # fmt: skip
    manifest = verify_manifest(signed.signed_manifest, TRUST, now=UnixTime(now))
    return manifest, signed.signed_manifest, signed.image


async def until(sent: list[Message], done: Callable[[], bool], wait_s: float = 20.0) -> None:
    async with asyncio.timeout(wait_s):
        while not done():  # noqa: ASYNC110 - the HAN side's timer changes plain state
            await asyncio.sleep(0.01)


def han_side(identity: HubIdentity, sent: list[Message]) -> HanSide:
    return HanSide(
        identity,
        trust=TRUST,
        activation_trust=TrustStore([OTAD_KEY.public_key()]),
        send=sent.append,
        loop=asyncio.get_running_loop(),
        config=FAST,
    )


def reports(sent: list[Message], device_id: str) -> list[DeviceTransferReported]:
    return [m for m in sent if isinstance(m, DeviceTransferReported) and m.device_id == device_id]


async def test_an_image_for_the_esme_is_relayed_and_its_activation_confirmed_by_signed_alert() -> (
    None
):
    identity = make_identity(0, 0)
    (esme,) = [d for d in identity.han if d.device_type is DeviceType.ESME]
    sent: list[Message] = []
    side = han_side(identity, sent)
    manifest, signed_manifest, image = signed_release(DeviceType.ESME, time.time())
    try:
        side.image_held(manifest, signed_manifest, image)
        await until(sent, lambda: any(r.state is DeviceTransferState.HELD
                                      for r in reports(sent, esme.device_id)))  # fmt: skip
        held = reports(sent, esme.device_id)[-1]
        assert (held.image, held.bytes_held, held.size, held.reason) == (
            manifest.sha256, manifest.size, manifest.size, 0,
        )  # fmt: skip
        # only the ESME: the other devices were not sent the image
        assert {r.device_id for r in sent if isinstance(r, DeviceTransferReported)} == {
            esme.device_id
        }
        digest = manifest.activation_digest
        command = ActivationCommand(device_id=esme.device_id, image_sha256=digest, counter=1)
        side.down_received(Activate(device_id=esme.device_id, command=command.sign(OTAD_KEY)))
        await until(sent, lambda: len([m for m in sent if isinstance(m, DeviceReported)]) >= 2)
        device = [m for m in sent if isinstance(m, DeviceReported)]
        response = ActivationResponse.decode(device[0].record)
        assert (response.outcome, response.running_fw_version) == (Outcome.SUCCESS, 0x0300)
        assert device[0].evidence is Evidence.DEVICE
        key = side.premises.public_key(esme.device_id)
        assert key is not None
        alert = ActivationAlert.verify(device[1].record, TrustStore([key]))  # signed by it
        assert (alert.device_id, alert.fw_version, alert.counter) == (esme.device_id, 0x0300, 1)
        # the CH's next announcement carries the version the ESME runs now, the others' as before
        assert {d.device_id: d.fw_version for d in side.inventory()} == {
            d.device_id: 0x0300 if d.device_id == esme.device_id else d.fw_version
            for d in identity.han
        }
        # a replay of the same command is refused by the device: nothing goes up for it
        before = len(sent)
        side.down_received(Activate(device_id=esme.device_id, command=command.sign(OTAD_KEY)))
        await until(sent, lambda: side.stats.refused_commands.get("REPLAYED") == 1)
        assert len(sent) == before
        # the read-back is the CH's evidence
        side.down_received(ReadVersion(device_id=esme.device_id, nonce=9))
        await until(sent, lambda: len(sent) > before)
        (read,) = sent[before:]
        assert isinstance(read, DeviceReported)
        assert read.evidence is Evidence.CH
    finally:
        side.close()


async def test_a_device_not_on_the_premises_and_an_image_for_none_of_its_devices() -> None:
    identity = make_identity(0, 0)
    sent: list[Message] = []
    side = han_side(identity, sent)
    assert DeviceType.B3 not in {d.device_type for d in identity.han}
    manifest, signed_manifest, image = signed_release(DeviceType.B3, time.time())
    side.image_held(manifest, signed_manifest, image)  # no B3 here: nothing relayed
    assert side.stats.relayed == 0
    side.down_received(ReadVersion(device_id="00000000DEADBEEF", nonce=1))
    assert side.stats.not_here == 1
    assert sent == []
    side.close()


async def test_a_relay_cut_by_a_power_cut_carries_on_when_the_ch_runs_again() -> None:
    identity = make_identity(0, 0)
    (esme,) = [d for d in identity.han if d.device_type is DeviceType.ESME]
    sent: list[Message] = []
    side = HanSide(
        identity,
        trust=TRUST,
        activation_trust=TrustStore([OTAD_KEY.public_key()]),
        send=sent.append,
        loop=asyncio.get_running_loop(),
        config=PremisesConfig(acceleration=4.0, link=PremisesConfig().link),  # ~0.2 s a relay
    )
    manifest, signed_manifest, image = signed_release(DeviceType.ESME, time.time())
    try:
        side.image_held(manifest, signed_manifest, image)
        side.close()  # the CH lost power as the relay began: its HAN timer is gone
        await asyncio.sleep(1.0)
        assert not any(r.state is DeviceTransferState.HELD for r in reports(sent, esme.device_id))
        side.resumed()
        await until(sent, lambda: any(r.state is DeviceTransferState.HELD
                                      for r in reports(sent, esme.device_id)))  # fmt: skip
    finally:
        side.close()
