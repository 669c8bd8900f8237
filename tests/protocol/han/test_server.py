"""HanServer on its own: selection, pacing, cut-through, sessions, bad frames, UpgradeEnd."""

from __future__ import annotations

from hansim import (
    B1_ID,
    B2_ID,
    IMAGE_TYPE,
    NEW_VERSION,
    OLD_VERSION,
    T0,
    VENDOR,
    release,
    serve,
)

from protocol.han.frames import (
    UPGRADE_TIME_WAIT,
    DefaultResponse,
    Frame,
    ImageBlockAbort,
    ImageBlockRequest,
    ImageBlockResponse,
    ImageBlockWait,
    ImageNotify,
    QueryNextImageRefused,
    QueryNextImageRequest,
    QueryNextImageResponse,
    UpgradeEndRequest,
    UpgradeEndResponse,
    ZclStatus,
    decode_frame,
    zigbee_time,
)
from protocol.han.server import (
    HanServer,
    ImageDelivered,
    ProgressiveImage,
    ServerConfig,
    SessionFailed,
    SessionTimedOut,
)
from protocol.release.manifest import DeviceType

# --------------------------------------------------------------------------- server unit

# frames carry ZigBee UTCTime: seconds since 2000-01-01 UTC (SPEC §8.1); T0 is 2025-06-15
UTC_T0 = zigbee_time(T0)
assert UTC_T0 == 803_315_200


def query(
    server: HanServer,
    peer: str,
    version: int = OLD_VERSION,
    hw: int | None = 2,
    image_type: int = IMAGE_TYPE[DeviceType.B2],
) -> Frame:
    frame = QueryNextImageRequest(1, VENDOR, image_type, version, hw)
    [(to, data)] = server.frame_received(peer, frame.encode(), T0)
    assert to == peer
    return decode_frame(data)


def test_server_offers_only_to_matching_clients() -> None:
    r = release(DeviceType.B2, size=4096)
    server = HanServer()
    server.add_image(r.signed, r.manifest, ProgressiveImage(len(r.image), r.image), targets=[B2_ID])
    assert query(server, B2_ID) == QueryNextImageResponse(
        1, VENDOR, IMAGE_TYPE[DeviceType.B2], NEW_VERSION, 4096
    )
    no = QueryNextImageRefused(1, ZclStatus.NO_IMAGE_AVAILABLE)
    assert query(server, B1_ID) == no  # not a target
    assert query(server, B2_ID, hw=9) == no  # hardware outside 1..3
    assert query(server, B2_ID, version=NEW_VERSION) == no  # already runs it
    assert query(server, B2_ID, image_type=0x0B01) == no
    notify = server.image_notify(r.manifest.sha256, [B1_ID, B2_ID])
    assert [(p, decode_frame(d)) for p, d in notify] == [
        (B2_ID, ImageNotify(1, 100, VENDOR, IMAGE_TYPE[DeviceType.B2], NEW_VERSION))
    ]


def block_request(offset: int = 0, period: int | None = 100, seq: int = 1) -> bytes:
    return ImageBlockRequest(
        seq, VENDOR, IMAGE_TYPE[DeviceType.B2], NEW_VERSION, offset, 63, None, period
    ).encode()


def ask(server: HanServer, peer: str, data: bytes, now: float) -> Frame:
    [(_, reply)] = server.frame_received(peer, data, now)
    return decode_frame(reply)


def test_server_caps_blocks_paces_and_holds_back_missing_bytes() -> None:
    r = release(DeviceType.B2, size=4096)
    source = ProgressiveImage(len(r.image), r.image[:1000])
    server = HanServer(ServerConfig(max_data_size=40, minimum_block_period_ms=250, data_retry_s=2))
    server.add_image(r.signed, r.manifest, source)
    reply = ask(server, B2_ID, block_request(period=None), T0)
    assert reply == ImageBlockWait(1, UTC_T0, UTC_T0, 250)  # learn the period
    reply = ask(server, B2_ID, block_request(period=250), T0 + 0.25)
    assert isinstance(reply, ImageBlockResponse)
    assert reply.data == r.image[:40]
    reply = ask(server, B2_ID, block_request(offset=990, period=250), T0 + 0.5)
    assert reply == ImageBlockWait(1, UTC_T0, UTC_T0 + 2, 250)  # cut-through: not here yet
    source.append(r.image[1000:])
    reply = ask(server, B2_ID, block_request(offset=4090, period=250), T0 + 3)
    assert isinstance(reply, ImageBlockResponse)
    assert reply.data == r.image[4090:]
    # past the end: ABORT, a status SiLabs' client treats as final (review #14)
    assert ask(server, B2_ID, block_request(offset=4096), T0 + 4) == ImageBlockAbort(
        1, ZclStatus.ABORT
    )
    other = ImageBlockRequest(1, VENDOR, 0x0B02, 0x0777, 0, 50).encode()
    assert ask(server, B2_ID, other, T0) == ImageBlockAbort(1, ZclStatus.NO_IMAGE_AVAILABLE)


def test_server_holds_a_legacy_client_to_the_period_by_arrival_times() -> None:
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(minimum_block_period_ms=500), r)
    assert isinstance(ask(server, B2_ID, block_request(period=None), T0), ImageBlockWait)
    assert isinstance(ask(server, B2_ID, block_request(period=None), T0 + 0.5), ImageBlockResponse)
    assert isinstance(ask(server, B2_ID, block_request(period=None), T0 + 0.7), ImageBlockWait)
    assert isinstance(ask(server, B2_ID, block_request(period=None), T0 + 1.0), ImageBlockResponse)


def test_silent_session_times_out_and_frees_its_slot() -> None:
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(max_sessions=1, session_timeout=60, busy_retry_s=10), r)
    assert isinstance(ask(server, B1_ID, block_request(), T0), ImageBlockResponse)
    assert ask(server, B2_ID, block_request(), T0 + 1) == ImageBlockWait(
        1, UTC_T0 + 1, UTC_T0 + 11, 100
    )
    assert server.next_deadline() == T0 + 60
    server.handle_timer(T0 + 59)
    assert server.transferring == 1
    server.handle_timer(T0 + 60)
    assert server.transferring == 0
    assert isinstance(server.events()[-1], SessionTimedOut)
    assert isinstance(ask(server, B2_ID, block_request(), T0 + 61), ImageBlockResponse)


def test_server_answers_bad_frames_with_a_default_response() -> None:
    server = serve(ServerConfig(), release(DeviceType.B2, size=4096))
    malformed = bytes.fromhex("01 33 03 02 3412")
    assert ask(server, B2_ID, malformed, T0) == DefaultResponse(
        0x33, 0x03, ZclStatus.MALFORMED_COMMAND, True
    )
    assert ask(server, B2_ID, bytes.fromhex("01 34 04 00"), T0) == DefaultResponse(
        0x34, 0x04, ZclStatus.UNSUP_CLUSTER_COMMAND, True
    )
    assert ask(server, B2_ID, bytes.fromhex("05 3412 35 09"), T0) == DefaultResponse(
        0x35, 0x09, ZclStatus.UNSUP_MANUF_CLUSTER_COMMAND, True, 0x1234
    )
    assert server.frame_received(B2_ID, b"\x01", T0) == []  # not even a header
    assert server.frame_received(B2_ID, bytes.fromhex("19 36 99"), T0) == []  # a response
    assert server.frame_received(B2_ID, ImageBlockWait(1, 0, 0, 0).encode(), T0) == []


def test_upgrade_end_is_idempotent_and_errors_are_reported() -> None:
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(), r)
    end = UpgradeEndRequest(5, ZclStatus.SUCCESS, VENDOR, 0x0B02, NEW_VERSION).encode()
    for _ in range(2):
        assert ask(server, B2_ID, end, T0) == UpgradeEndResponse(
            5, VENDOR, 0x0B02, NEW_VERSION, UTC_T0, UPGRADE_TIME_WAIT
        )
    assert [type(e) for e in server.events()] == [ImageDelivered]
    bad = UpgradeEndRequest(6, ZclStatus.INVALID_IMAGE, VENDOR, 0x0B02, NEW_VERSION).encode()
    assert ask(server, B1_ID, bad, T0) == DefaultResponse(6, 0x06, ZclStatus.SUCCESS, True)
    assert server.events() == [SessionFailed(B1_ID, r.manifest.sha256, ZclStatus.INVALID_IMAGE, T0)]
