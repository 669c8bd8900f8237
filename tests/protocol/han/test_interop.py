"""Interoperability of the HAN machines with standard OTA peers (review zigbee-interop.md),
in virtual time: zigpy-style refusals, servers without the manifest extension (fail fast),
SiLabs-style block refusals, ZCL forward compatibility, unicast ImageNotify, REQUIRE_MORE_IMAGE,
the per-client MinimumBlockPeriod unit and the configurable extension code (SPEC §8.1-8.4)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from hansim import (
    B1_ID,
    B2_ID,
    IMAGE_TYPE,
    NEW_VERSION,
    OLD_VERSION,
    T0,
    VENDOR,
    HanSim,
    held,
    node,
    release,
    serve,
)

from protocol.clock import UnixTime
from protocol.errors import Reason
from protocol.han.client import ClientConfig, ClientState, DownloadAborted, HanClient
from protocol.han.frames import (
    BlockPeriodUnit,
    DefaultResponse,
    Frame,
    ImageBlockRequest,
    ImageBlockWait,
    ImageNotify,
    ManifestBlockRequest,
    ManifestBlockWait,
    QueryNextImageRequest,
    QueryNextImageResponse,
    UpgradeEndRequest,
    ZclStatus,
    decode_frame,
)
from protocol.han.server import (
    HanServer,
    ImageDelivered,
    MoreImagesRequired,
    ServerConfig,
    SessionFailed,
)
from protocol.release.manifest import DeviceType

Answer = Callable[[bytes, float], list[bytes]]


def drive(
    client: HanClient, answer: Answer, until: float, latency: float = 0.02
) -> list[tuple[float, Frame]]:
    """Run ``client`` from T0 against a peer that answers each frame with ``answer``, frames
    taking ``latency`` one way; return what the client sent, with the times."""
    sent: list[tuple[float, Frame]] = []
    inbox: list[tuple[float, int, bytes]] = []
    order = itertools.count()

    def send(frames: list[bytes], now: float) -> None:
        for data in frames:
            sent.append((now, decode_frame(data)))
            for reply in answer(data, now + latency):
                heapq.heappush(inbox, (now + 2 * latency, next(order), reply))

    send(client.start(UnixTime(T0)), T0)
    for _ in range(100_000):
        deadline = client.next_deadline()
        options = [t for t in (deadline, inbox[0][0] if inbox else None) if t is not None]
        if not options or min(options) > until:
            return sent
        now = min(options)
        if inbox and inbox[0][0] == now:
            _, _, data = heapq.heappop(inbox)
            send(client.frame_received(data, UnixTime(now)), now)
        else:
            send(client.handle_timer(UnixTime(now)), now)
    raise AssertionError("did not settle")


def of(sent: list[tuple[float, Frame]], kind: type) -> list[float]:
    return [t - T0 for t, frame in sent if isinstance(frame, kind)]


# --------------------------------------------------------------------------- refusals


def zigpy_refusal(data: bytes, _now: float) -> list[bytes]:
    """zigpy's OTAManager with no image: NO_IMAGE_AVAILABLE followed by the image fields
    (ota/manager.py; the review's bytes 190602983412020b0002000000400000)."""
    frame = decode_frame(data)
    assert isinstance(frame, QueryNextImageRequest)
    return [bytes([0x19, frame.seq, 0x02, 0x98]) + bytes.fromhex("3412020b0002000000400000")]


def unreadable_refusal(data: bytes, _now: float) -> list[bytes]:
    """A refusal the client cannot read (status 0x42): what the appended fields used to be."""
    frame = decode_frame(data)
    assert isinstance(frame, QueryNextImageRequest)
    return [bytes([0x19, frame.seq, 0x02, 0x42])]


def test_a_zigpy_refusal_with_appended_fields_is_the_normal_backoff() -> None:
    b2 = node(B2_ID, DeviceType.B2)
    assert zigpy_refusal(QueryNextImageRequest(6, VENDOR, 0x0B02, 2).encode(), T0) == [
        bytes.fromhex("190602983412020b0002000000400000")
    ]
    sent = drive(b2.client, zigpy_refusal, T0 + 1200)
    # every query_interval (300 s after each refusal, which takes a 40 ms round trip)
    assert [round(t, 2) for t in of(sent, QueryNextImageRequest)] == [0, 300.04, 600.08, 900.12]
    assert b2.client.stats.timeouts == 0
    assert b2.client.stats.tolerated.trailing_bytes == 4
    assert b2.client.state is ClientState.IDLE


def test_an_unreadable_refusal_is_what_costs_29_queries_in_20_minutes() -> None:
    """The review's measurement (finding #5): a refusal the client drops times out each time."""
    b2 = node(B2_ID, DeviceType.B2)
    sent = drive(b2.client, unreadable_refusal, T0 + 1200)
    assert len(of(sent, QueryNextImageRequest)) == 29
    assert b2.client.stats.timeouts == 29


# --------------------------------------------------------------------------- no extension


def standard_server(*, manufacturer_answer: ZclStatus | None) -> Answer:
    """A ZCL OTA server offering a B2 image that does not speak the manifest extension: it
    answers a manufacturer-specific command with that Default Response status, or not at all."""

    def answer(data: bytes, _now: float) -> list[bytes]:
        frame = decode_frame(data)
        if isinstance(frame, QueryNextImageRequest):
            offer = QueryNextImageResponse(frame.seq, VENDOR, 0x0B02, NEW_VERSION, 4096)
            return [offer.encode()]
        if isinstance(frame, ManifestBlockRequest) and manufacturer_answer is not None:
            reply = DefaultResponse(frame.seq, 0x00, manufacturer_answer, True, 0xFFF1)
            return [reply.encode()]
        return []

    return answer


def test_a_server_without_the_extension_is_left_at_once_on_unsup() -> None:
    for status in (ZclStatus.UNSUP_MANUF_CLUSTER_COMMAND, ZclStatus.UNSUP_CLUSTER_COMMAND):
        b2 = node(B2_ID, DeviceType.B2)
        sent = drive(b2.client, standard_server(manufacturer_answer=status), T0 + 200)
        assert len(of(sent, ManifestBlockRequest)) == 1, status  # final, not retried
        assert of(sent, ImageBlockRequest) == []
        [end_at] = of(sent, UpgradeEndRequest)
        assert end_at < 0.1
        assert [f.status for _, f in sent if isinstance(f, UpgradeEndRequest)] == [ZclStatus.ABORT]
        assert b2.client.events()[-1] == DownloadAborted(Reason.UNKNOWN_TYPE)
        assert b2.client.state is ClientState.IDLE
        assert b2.store.writes == 0


def test_a_silent_server_without_the_extension_is_left_after_three_probes() -> None:
    b2 = node(B2_ID, DeviceType.B2)
    sent = drive(b2.client, standard_server(manufacturer_answer=None), T0 + 250)
    # (the review measured 10 requests over 207 s, then ABORT at 210 s)
    assert [round(t, 2) for t in of(sent, ManifestBlockRequest)] == [0.04, 5.04, 12.04]
    assert [round(t, 2) for t in of(sent, UpgradeEndRequest)] == [15.04]
    assert of(sent, ImageBlockRequest) == []
    assert of(sent, QueryNextImageRequest) == [0.0]
    deadline = b2.client.next_deadline()
    assert deadline is not None
    assert round(deadline - T0, 2) == 315.04  # the next query, at the ordinary interval
    assert b2.client.last_failure is Reason.UNKNOWN_TYPE


def test_a_silabs_style_block_refusal_by_default_response_aborts() -> None:
    """SiLabs' server refuses a block request with a Default Response NO_IMAGE_AVAILABLE."""
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(), r)
    b2 = node(B2_ID, DeviceType.B2)

    def answer(data: bytes, now: float) -> list[bytes]:
        frame = decode_frame(data)
        if isinstance(frame, ImageBlockRequest):
            no = DefaultResponse(frame.seq, 0x03, ZclStatus.NO_IMAGE_AVAILABLE, True)
            return [no.encode()]
        return [reply for _, reply in server.frame_received(B2_ID, data, UnixTime(now))]

    sent = drive(b2.client, answer, T0 + 60)
    assert len(of(sent, ImageBlockRequest)) == 1
    assert b2.client.last_failure is Reason.CANCELLED
    assert b2.client.state is ClientState.IDLE


# --------------------------------------------------------------------------- the server side


def ask(server: HanServer, data: str, now: float = T0) -> Frame:
    [(peer, reply)] = server.frame_received(B2_ID, bytes.fromhex(data), UnixTime(now))
    assert peer == B2_ID
    return decode_frame(reply)


def test_the_server_serves_forward_compatible_requests() -> None:
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(), r)
    offer = QueryNextImageResponse(1, VENDOR, 0x0B02, NEW_VERSION, 4096)
    base = "01 01 01 01 3412 020b 00010000 0200"
    assert ask(server, base) == offer
    assert ask(server, base + "00") == offer  # one trailing byte: was MALFORMED_COMMAND
    assert ask(server, "01 01 01 03 3412 020b 00010000 0200") == offer  # reserved fc bit 1
    assert ask(server, "21 01 01 01 3412 020b 00010000 0200") == offer  # reserved ZCL bit 5
    assert (server.tolerated.trailing_bytes, server.tolerated.reserved_bits) == (1, 2)
    # what touches security stays strict: a manifest request with a trailing byte is refused
    manifest_req = ManifestBlockRequest(4, VENDOR, 0x0B02, NEW_VERSION, 0, 50, 100).encode()
    refused = ask(server, (manifest_req + b"\0").hex())
    assert refused == DefaultResponse(4, 0x00, ZclStatus.MALFORMED_COMMAND, True, 0xFFF1)


def test_require_more_image_is_not_a_failure() -> None:
    r = release(DeviceType.B2, size=4096)
    server = serve(ServerConfig(), r)
    ask(server, "01 01 01 01 3412 020b 00010000 0200")
    end = UpgradeEndRequest(2, ZclStatus.REQUIRE_MORE_IMAGE, VENDOR, 0x0B02, NEW_VERSION)
    assert ask(server, end.encode().hex(), T0 + 1) == DefaultResponse(
        2, 0x06, ZclStatus.SUCCESS, True
    )
    events = server.events()
    assert events == [MoreImagesRequired(B2_ID, r.manifest.sha256, UnixTime(T0 + 1))]
    assert not any(isinstance(e, SessionFailed) for e in events)
    session = server.session(B2_ID)
    assert session is not None
    assert session.state.value == "delivered"
    # a later SUCCESS is still the ordinary end
    ok = UpgradeEndRequest(3, ZclStatus.SUCCESS, VENDOR, 0x0B02, NEW_VERSION)
    ask(server, ok.encode().hex(), T0 + 2)
    assert not any(isinstance(e, (SessionFailed, ImageDelivered)) for e in server.events())


# --------------------------------------------------------------------------- ImageNotify


def idle_after_a_refusal(peer: str, device_type: DeviceType) -> HanClient:
    """A client that queried once at T0 and was refused: IDLE, its next query 300 s away."""
    client = node(peer, device_type).client
    [query] = client.start(UnixTime(T0))
    seq = decode_frame(query).seq
    assert client.frame_received(bytes([0x19, seq, 0x02, 0x98]), UnixTime(T0 + 0.1)) == []
    assert client.state is ClientState.IDLE
    return client


def test_a_unicast_image_notify_is_always_answered() -> None:
    client = idle_after_a_refusal(B2_ID, DeviceType.B2)
    # a reinstall of the running version: filtered when broadcast...
    same = ImageNotify(9, 1, VENDOR, IMAGE_TYPE[DeviceType.B2], OLD_VERSION).encode()
    assert client.frame_received(same, UnixTime(T0 + 1)) == []
    # ... answered at once when unicast, whatever its fields and jitter
    [query] = client.unicast_received(same, UnixTime(T0 + 2))
    assert isinstance(decode_frame(query), QueryNextImageRequest)
    other = idle_after_a_refusal(B1_ID, DeviceType.B1)
    foreign = ImageNotify(10, 1, 0x0001, 0x0001, NEW_VERSION).encode()
    assert other.frame_received(foreign, UnixTime(T0 + 1)) == []
    [query] = other.unicast_received(foreign, UnixTime(T0 + 1))
    assert isinstance(decode_frame(query), QueryNextImageRequest)


# --------------------------------------------------------------------------- period unit


def test_the_minimum_block_period_unit_is_per_client() -> None:
    r = release(DeviceType.B2, size=2048)
    server = serve(ServerConfig(minimum_block_period_ms=100), r)
    server.set_block_period_unit(B2_ID, BlockPeriodUnit.SECONDS)
    assert server.block_period_unit(B1_ID) is BlockPeriodUnit.MILLISECONDS
    seconds = ClientConfig(block_period_unit=BlockPeriodUnit.SECONDS)
    b2 = node(B2_ID, DeviceType.B2, config=seconds)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 3600, held(b2))
    assert b2.device.holds_image
    assert bytes(b2.store.pending) == r.image
    waits = [
        s.frame
        for s in sim.log
        if s.dst == B2_ID and isinstance(s.frame, (ImageBlockWait, ManifestBlockWait))
    ]
    assert waits
    assert {w.minimum_block_period for w in waits} == {1}  # 100 ms told as 1 s, rounded up
    assert b2.client.minimum_block_period_ms == 1000
    requests = [
        s.frame for s in sim.log if s.src == B2_ID and isinstance(s.frame, ImageBlockRequest)
    ]
    assert {q.minimum_block_period for q in requests[1:]} == {1}  # declared in seconds
    assert min(sim.block_request_gaps(B2_ID)[1:]) >= 1.0 - 1e-6
    assert server.session(B2_ID) is not None


def test_a_seconds_client_the_server_takes_for_milliseconds_would_crawl() -> None:
    """Why the unit is known per client: told "100" a seconds client waits 100 s a block."""
    r = release(DeviceType.B2, size=2048)
    server = serve(ServerConfig(minimum_block_period_ms=100), r)
    seconds = ClientConfig(block_period_unit=BlockPeriodUnit.SECONDS)
    b2 = node(B2_ID, DeviceType.B2, config=seconds)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 300)
    assert b2.client.minimum_block_period_ms == 100_000
    assert not b2.device.holds_image


# --------------------------------------------------------------------------- extension code


def test_the_extension_code_is_configured_on_both_sides() -> None:
    r = release(DeviceType.B2, size=2048)
    owned = ServerConfig(extension_code=0x1001)
    b2 = node(B2_ID, DeviceType.B2, config=ClientConfig(extension_code=0x1001))
    sim = HanSim(serve(owned, r), [b2])
    sim.start()
    sim.run(T0 + 600, held(b2))
    assert b2.device.holds_image
    # a device configured with another code gets UNSUP_MANUF_CLUSTER_COMMAND and stops at once
    other = node(B1_ID, DeviceType.B2)
    sim = HanSim(serve(owned, r), [other])
    sim.start()
    sim.run(T0 + 60)
    assert (
        len([s for s in sim.log if s.src == B1_ID and isinstance(s.frame, ManifestBlockRequest)])
        == 1
    )
    assert other.client.last_failure is Reason.UNKNOWN_TYPE
    assert other.store.writes == 0
