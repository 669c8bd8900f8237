"""A GB image (OTA header + unframed Manufacturer Image, SPEC §6.5) relayed by HanServer, in
virtual time: byte for byte to a device of ours and to a standard ZCL client, and activated on
the digest of exactly the bytes SPEC §8.7 names (the Manufacturer Image)."""

from __future__ import annotations

import hashlib
import random

from hansim import (
    B2_ID,
    IMAGE_TYPE,
    NEW_VERSION,
    OPS_KEY,
    RELEASE_KEY,
    RELEASE_TRUST,
    T0,
    VENDOR,
    HanSim,
    Release,
    activation,
    held,
    node,
    serve,
)

from protocol.clock import UnixTime
from protocol.device.activation import ActivationCommand, ActivationResponse, Outcome
from protocol.errors import Reason
from protocol.han.frames import (
    ImageBlockRequest,
    ImageBlockResponse,
    ImageBlockWait,
    QueryNextImageRequest,
    QueryNextImageResponse,
    decode_frame,
)
from protocol.han.server import ServerConfig
from protocol.release import otaimg, zigbee_ota
from protocol.release.manifest import DeviceType
from protocol.release.trust import verify_manifest
from protocol.release.zigbee_ota import OtaLayout


def gb_release(size: int = 6000) -> Release:
    firmware = random.Random(5).randbytes(size - 60)
    ota = zigbee_ota.wrap(
        firmware,
        manufacturer_code=VENDOR,
        image_type=IMAGE_TYPE[DeviceType.B2],
        file_version=NEW_VERSION,
        hw_min=1,
        hw_max=3,
        layout=OtaLayout.GBCS,
    )
    assert len(ota) == size
    assert ota[60:] == firmware
    signed = otaimg.build(
        ota,
        RELEASE_KEY,
        device_type=DeviceType.B2,
        sequence=6,
        block_size=1024,
        created=int(T0) - 60,
        expires=int(T0) + 86_400,
        layout=OtaLayout.GBCS,
    )
    manifest = verify_manifest(signed.signed_manifest, RELEASE_TRUST, now=UnixTime(T0))
    otaimg.check_image(manifest, signed.image)
    return Release(signed.image, manifest, signed.signed_manifest)


def relayed() -> tuple[Release, HanSim]:
    r = gb_release()
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(serve(ServerConfig(), r), [b2])
    sim.start()
    sim.run(T0 + 3600, held(b2))
    assert b2.device.holds_image
    return r, sim


def test_a_gb_image_reaches_the_device_byte_for_byte() -> None:
    r, sim = relayed()
    [b2] = sim.nodes
    assert bytes(b2.store.pending) == r.image
    assert r.manifest.body_layout is OtaLayout.GBCS


def test_activation_names_the_manufacturer_image_digest() -> None:
    r, sim = relayed()
    [b2] = sim.nodes
    assert r.manifest.activation_digest == hashlib.sha256(r.image[60:]).digest()
    # the whole-file digest (the WAN image id) is not what activation names
    whole = ActivationCommand(B2_ID, r.manifest.sha256, 1).sign(OPS_KEY)
    assert b2.device.activation_received(whole, sim.now) == [
        ActivationResponse(B2_ID, 1, Outcome.HASH_MISMATCH, 0x0100, Reason.HASH_MISMATCH)
    ]
    assert b2.device.holds_image  # named another image: kept
    response, _evidence = b2.device.activation_received(activation(b2, r, 2), sim.now)
    assert response == ActivationResponse(B2_ID, 2, Outcome.SUCCESS, NEW_VERSION)
    assert bytes(b2.store.active) == r.image


def test_the_device_rehashes_exactly_the_bytes_after_the_header() -> None:
    r, sim = relayed()
    [b2] = sim.nodes
    b2.store.pending[20] ^= 0x01  # the header string: not part of the Manufacturer Image
    response, _ = b2.device.activation_received(activation(b2, r, 1), sim.now)
    assert response.outcome is Outcome.SUCCESS

    r, sim = relayed()
    [b2] = sim.nodes
    b2.store.pending[60] ^= 0x01  # the Manufacturer Image's first byte
    [response] = b2.device.activation_received(activation(b2, r, 1), sim.now)
    assert response == ActivationResponse(
        B2_ID, 1, Outcome.HASH_MISMATCH, 0x0100, Reason.HASH_MISMATCH
    )
    assert not b2.device.holds_image  # stored bytes changed: discarded


def test_a_standard_client_fetches_a_gb_image_byte_for_byte() -> None:
    """No manifest, standard frames only, as a ZCL client (zigpy, SiLabs) would."""
    r = gb_release()
    server = serve(ServerConfig(minimum_block_period_ms=100), r)
    now = T0

    def ask(frame: QueryNextImageRequest | ImageBlockRequest) -> object:
        [(_, reply)] = server.frame_received(B2_ID, frame.encode(), UnixTime(now))
        return decode_frame(reply)

    offer = ask(QueryNextImageRequest(1, VENDOR, IMAGE_TYPE[DeviceType.B2], 0x0100, 2))
    assert isinstance(offer, QueryNextImageResponse)
    assert offer.image_size == len(r.image)
    got = bytearray()
    while len(got) < offer.image_size:
        now += 0.1
        reply = ask(
            ImageBlockRequest(
                2, VENDOR, offer.image_type, offer.file_version, len(got), 63, None, 100
            )
        )
        if isinstance(reply, ImageBlockWait):
            continue
        assert isinstance(reply, ImageBlockResponse)
        got += reply.data
    assert bytes(got) == r.image
    header = zigbee_ota.OtaHeader.parse(bytes(got))
    assert (header.file_version, header.total_image_size) == (NEW_VERSION, len(r.image))
