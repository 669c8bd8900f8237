"""HanClient on its own: stale answers, retries, ImageNotify jitter, no unsigned activation."""

from __future__ import annotations

from hansim import (
    B2_ID,
    NEW_VERSION,
    OLD_VERSION,
    OPS_KEY,
    T0,
    VENDOR,
    HanSim,
    held,
    node,
    release,
    serve,
)

from protocol.errors import Reason
from protocol.han.client import (
    ClientState,
    ManifestRejected,
)
from protocol.han.frames import (
    ImageNotify,
    QueryNextImageRequest,
    QueryNextImageResponse,
    UpgradeEndResponse,
    decode_frame,
)
from protocol.han.server import (
    HanServer,
    ProgressiveImage,
    ServerConfig,
)
from protocol.release.cose import sign1
from protocol.release.manifest import DeviceType

# --------------------------------------------------------------------------- client unit


def test_client_ignores_stale_and_foreign_answers() -> None:
    b2 = node(B2_ID, DeviceType.B2)
    [data] = b2.client.start(T0)
    request = decode_frame(data)
    assert isinstance(request, QueryNextImageRequest)
    assert (request.file_version, request.hardware_version) == (OLD_VERSION, 2)
    late = QueryNextImageResponse((request.seq + 1) & 0xFF, VENDOR, 0x0B02, NEW_VERSION, 100)
    assert b2.client.frame_received(late.encode(), T0 + 0.1) == []
    assert b2.client.stats.stale == 1
    assert b2.client.state is ClientState.QUERYING
    assert b2.client.frame_received(b"\xff\x00", T0 + 0.1) == []  # noise
    # timeout then retry after the 2 s backoff
    assert b2.client.next_deadline() == T0 + 3
    assert b2.client.handle_timer(T0 + 3) == []
    assert b2.client.next_deadline() == T0 + 5
    [retry] = b2.client.handle_timer(T0 + 5)
    assert isinstance(decode_frame(retry), QueryNextImageRequest)


def test_client_never_activates_on_an_upgrade_end_response() -> None:
    r = release(DeviceType.B2, size=4096)
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(serve(ServerConfig(), r), [b2])
    sim.start()
    sim.run(T0 + 600, held(b2))
    now_frame = UpgradeEndResponse(9, VENDOR, 0x0B02, NEW_VERSION, 100, 100)  # "upgrade now"
    assert b2.client.frame_received(now_frame.encode(), sim.now) == []
    sim.run(sim.now + 600)
    assert b2.device.running.fw_version == OLD_VERSION
    assert b2.device.holds_image
    assert b2.client.state is ClientState.WAITING_ACTIVATION


def test_image_notify_triggers_a_query_subject_to_jitter() -> None:
    b2 = node(B2_ID, DeviceType.B2)
    mine = ImageNotify(1, 100, VENDOR, 0x0B02, NEW_VERSION).encode()
    other = ImageNotify(2, 100, VENDOR, 0x0B01, NEW_VERSION).encode()
    same = ImageNotify(3, 100, VENDOR, 0x0B02, OLD_VERSION).encode()
    assert b2.client.frame_received(other, T0) == []
    assert b2.client.frame_received(same, T0) == []
    [query_frame] = b2.client.frame_received(mine, T0)
    assert isinstance(decode_frame(query_frame), QueryNextImageRequest)
    # jitter 1: about 1 in 100 clients answers
    answered = 0
    for i in range(300):
        c = node(f"00124B000001{i:04X}", DeviceType.B2).client
        answered += bool(c.frame_received(ImageNotify(1, 1).encode(), T0))
    assert answered <= 12


def test_sign1_garbage_in_the_manifest_slot_is_rejected() -> None:
    # a CH that serves bytes that are not a COSE_Sign1 at all
    r = release(DeviceType.B2, size=4096)
    server = HanServer()
    server.add_image(sign1(b"\xa0", OPS_KEY), r.manifest, ProgressiveImage(4096, r.image))
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 600, lambda: b2.client.state is ClientState.IDLE and bool(sim.log))
    assert ManifestRejected(Reason.UNKNOWN_KEY_ID) in sim.client_events(B2_ID)
    assert b2.store.writes == 0
