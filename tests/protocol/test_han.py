"""HAN: ZigBee OTA Upgrade cluster frames, the CH's server and the device's client.

Frames are checked byte for byte, round-tripped and fuzzed. The machines are unit-tested, then
run against each other over a simulated HAN link in virtual time (seeded latency and loss):
full delivery to Alt HAN bridges with MinimumBlockPeriod and WAIT_FOR_DATA back-pressure (busy
server, cut-through), lossy links, device-side refusals, and the hand-over to activation.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.device.activation import (
    ActivationAlert,
    ActivationCommand,
    ActivationResponse,
    Outcome,
)
from protocol.device.activation import VersionReport as VersionReportMsg
from protocol.device.device import (
    AlertRaised,
    Device,
    DeviceIdentity,
    FirmwareInfo,
    JoinMode,
    MemorySlotStore,
    SlotState,
)
from protocol.errors import ProtocolError, Reason
from protocol.han.client import (
    ClientConfig,
    ClientState,
    DownloadAborted,
    HanClient,
    ImageOffered,
    ImageReceived,
    ManifestAccepted,
    ManifestRejected,
    UpgradeEndAcknowledged,
)
from protocol.han.frames import (
    MAX_FRAME_BYTES,
    UPGRADE_TIME_WAIT,
    DefaultResponse,
    Frame,
    ImageBlockAbort,
    ImageBlockRequest,
    ImageBlockResponse,
    ImageBlockWait,
    ImageNotify,
    ManifestBlockAbort,
    ManifestBlockRequest,
    ManifestBlockResponse,
    ManifestBlockWait,
    QueryNextImageRefused,
    QueryNextImageRequest,
    QueryNextImageResponse,
    UpgradeEndRequest,
    UpgradeEndResponse,
    ZclStatus,
    decode_frame,
)
from protocol.han.server import (
    HanServer,
    ImageDelivered,
    ProgressiveImage,
    ServerConfig,
    SessionFailed,
    SessionStarted,
    SessionState,
    SessionTimedOut,
)
from protocol.release import otaimg, zigbee_ota
from protocol.release.cose import sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore, verify_manifest

# --------------------------------------------------------------------------- frames

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
block = st.binary(min_size=0, max_size=63)
fail = st.sampled_from([ZclStatus.ABORT, ZclStatus.NO_IMAGE_AVAILABLE, ZclStatus.MALFORMED_COMMAND])


@st.composite
def image_notifies(draw: st.DrawFn) -> ImageNotify:
    ptype = draw(st.integers(0, 3))
    ids = [draw(u16), draw(u16), draw(u32)]
    present: list[int | None] = [v if i < ptype else None for i, v in enumerate(ids)]
    return ImageNotify(draw(u8), draw(st.integers(1, 100)), *present)


FRAMES = st.one_of(
    image_notifies(),
    st.builds(QueryNextImageRequest, u8, u16, u16, u32, st.none() | u16),
    st.builds(QueryNextImageResponse, u8, u16, u16, u32, u32),
    st.builds(
        QueryNextImageRefused,
        u8,
        st.sampled_from([ZclStatus.NO_IMAGE_AVAILABLE, ZclStatus.NOT_AUTHORIZED]),
    ),
    st.builds(
        ImageBlockRequest,
        u8,
        u16,
        u16,
        u32,
        u32,
        st.integers(1, 255),
        st.none() | u64,
        st.none() | u16,
    ),
    st.builds(ImageBlockResponse, u8, u16, u16, u32, u32, block),
    st.builds(ImageBlockWait, u8, u32, u32, u16),
    st.builds(ImageBlockAbort, u8, fail),
    st.builds(
        UpgradeEndRequest,
        u8,
        st.sampled_from([ZclStatus.SUCCESS, ZclStatus.ABORT, ZclStatus.INVALID_IMAGE]),
        u16,
        u16,
        u32,
    ),
    st.builds(UpgradeEndResponse, u8, u16, u16, u32, u32, u32),
    st.builds(ManifestBlockRequest, u8, u16, u16, u32, u32, st.integers(1, 255), u16),
    st.builds(ManifestBlockResponse, u8, u16, u16, u32, u32, u32, block),
    st.builds(ManifestBlockWait, u8, u16, u32, u32, u16),
    st.builds(ManifestBlockAbort, u8, u16, fail),
    st.builds(DefaultResponse, u8, u8, st.sampled_from(ZclStatus), st.booleans(), st.none() | u16),
)


@settings(max_examples=300, deadline=None)
@given(frame=FRAMES)
def test_every_frame_round_trips(frame: Frame) -> None:
    data = frame.encode()
    assert len(data) <= MAX_FRAME_BYTES
    assert decode_frame(data) == frame


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=140))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@settings(max_examples=300, deadline=None)
@given(
    frame=FRAMES,
    edits=st.lists(st.tuples(st.integers(0, 200), u8), max_size=4),
    cut=st.integers(0, 90),
    extra=st.binary(max_size=3),
)
def test_fuzz_mutated_frames_raise_only_protocol_errors(
    frame: Frame, edits: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    data = bytearray(frame.encode())
    for position, value in edits:
        data[position % len(data)] = value
    mutated = bytes(data[: max(cut, 1)]) + extra
    try:
        again = decode_frame(mutated)
    except ProtocolError:
        return
    assert decode_frame(again.encode()) == again  # whatever decodes is a well-formed frame


def test_frames_are_little_endian_zcl() -> None:
    request = ImageBlockRequest(0x42, 0x1234, 0x5678, 0x01020304, 0x100, 50, None, 200)
    assert request.encode() == bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 32 c800")
    response = ImageBlockResponse(0x42, 0x1234, 0x5678, 0x01020304, 0x100, b"\xaa\xbb")
    assert response.encode() == bytes.fromhex("19 42 05 00 3412 7856 04030201 00010000 02 aabb")
    wait = ImageBlockWait(7, 1000, 1010, 100)
    assert wait.encode() == bytes.fromhex("19 07 05 97 e8030000 f2030000 6400")
    manifest_req = ManifestBlockRequest(9, 0x1234, 0x0B02, 2, 0, 50, 100)
    assert manifest_req.encode() == bytes.fromhex("05 3412 09 00 020b 02000000 00000000 32 6400")
    end = UpgradeEndResponse(3, 0x1234, 0x0B02, 2, 500, UPGRADE_TIME_WAIT)
    assert end.encode().endswith(bytes.fromhex("f4010000 ffffffff"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 32 c800 00"), Reason.MALFORMED),
        (bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 32 c8"), Reason.MALFORMED),
        (bytes.fromhex("01 42 03 06 3412 7856 04030201 00010000 32 c800"), Reason.MALFORMED),
        (bytes.fromhex("01 42 03 02 3412 7856 04030201 00010000 00 c800"), Reason.MALFORMED),
        (bytes.fromhex("21 42 01 00 3412 7856 04030201"), Reason.MALFORMED),  # reserved bit
        (bytes.fromhex("02 42 01 00 3412 7856 04030201"), Reason.MALFORMED),  # frame type 2
        (bytes.fromhex("01 42 04 00"), Reason.UNKNOWN_TYPE),  # ImagePageRequest: not spoken
        (bytes.fromhex("05 3412 42 07 00"), Reason.UNKNOWN_TYPE),  # unknown mfr command
        (bytes.fromhex("00 42 01"), Reason.UNKNOWN_TYPE),  # global ReadAttributes
        (bytes.fromhex("01 42 01 02 3412 7856 04030201"), Reason.MALFORMED),  # QNI fc bit 1
        (bytes.fromhex("19 42 00 00 00"), Reason.MALFORMED),  # jitter 0
        (bytes.fromhex("19 42 00 04 64"), Reason.MALFORMED),  # payload type 4
        (bytes.fromhex("19 42 00 01 64 34"), Reason.MALFORMED),  # truncated mfr code
        (bytes.fromhex("01 42 06 97 3412 7856 04030201"), Reason.MALFORMED),  # End: WAIT status
        (bytes.fromhex("19 42 05 00 3412 7856 04030201 00010000 05 aabb"), Reason.MALFORMED),
        (bytes.fromhex("19 42 05 42"), Reason.MALFORMED),  # unknown status
        (bytes.fromhex("19 42 02 00 3412"), Reason.MALFORMED),
        (bytes.fromhex("18 42 0b 01 42"), Reason.MALFORMED),  # Default Response, bad status
        (b"\x19\x42\x05\x00" + bytes(130), Reason.TOO_LARGE),
        (b"", Reason.MALFORMED),
    ],
)
def test_decoding_is_strict(data: bytes, expected: Reason) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.reason is expected


def test_local_frame_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="query_jitter"):
        ImageNotify(1, 0).encode()
    with pytest.raises(ValueError, match="prefix"):
        ImageNotify(1, 50, None, 2).encode()
    with pytest.raises(ValueError, match="file_offset"):
        ImageBlockRequest(1, 1, 1, 1, -1, 50).encode()
    with pytest.raises(ValueError, match="UpgradeEnd"):
        UpgradeEndRequest(1, ZclStatus.WAIT_FOR_DATA, 1, 1, 1).encode()


# --------------------------------------------------------------------------- fixtures

RELEASE_KEY = ec.derive_private_key(0x4A11, ec.SECP256R1())
OPS_KEY = ec.derive_private_key(0x4A12, ec.SECP256R1())
RELEASE_TRUST = TrustStore([RELEASE_KEY.public_key()])
VENDOR = 0x1234
IMAGE_TYPE = {
    DeviceType.B1: 0x0B01,
    DeviceType.B2: 0x0B02,
    DeviceType.B3: 0x0B03,
    DeviceType.B4: 0x0B04,
}
T0 = 1_750_000_000.0
OLD_VERSION, NEW_VERSION = 0x0100, 0x0200
EPS = 1e-6  # float resolution of absolute unix times (~2.4e-7 s at T0)


@dataclass(frozen=True)
class Release:
    image: bytes  # the ZigBee OTA file
    manifest: Manifest
    signed: bytes


def release(
    device_type: DeviceType,
    *,
    size: int = 16 * 1024,
    sequence: int = 6,
    fw_version: int = NEW_VERSION,
    image_type: int | None = None,
    seed: int = 1,
) -> Release:
    """A signed release: an OTA file of exactly ``size`` bytes and its manifest."""
    overhead = (
        len(
            zigbee_ota.wrap(
                b"x", manufacturer_code=VENDOR, image_type=1, file_version=1, hw_min=1, hw_max=3
            )
        )
        - 1
    )
    firmware = random.Random(seed).randbytes(size - overhead)
    ota = zigbee_ota.wrap(
        firmware,
        manufacturer_code=VENDOR,
        image_type=IMAGE_TYPE[device_type] if image_type is None else image_type,
        file_version=fw_version,
        hw_min=1,
        hw_max=3,
        header_string=f"{device_type.value} test image",
    )
    signed = otaimg.build(
        ota,
        RELEASE_KEY,
        device_type=device_type,
        sequence=sequence,
        block_size=1024,
        created=int(T0) - 60,
        expires=int(T0) + 30 * 86_400,
    )
    manifest = verify_manifest(signed.signed_manifest, RELEASE_TRUST, now=int(T0))
    assert len(ota) == size
    return Release(signed.image, manifest, signed.signed_manifest)


@dataclass
class Node:
    """A simulated HAN device: its firmware slots, verifier/activator and OTA client."""

    peer: str
    device: Device
    client: HanClient
    store: MemorySlotStore
    key: ec.EllipticCurvePrivateKey | None


def node(
    peer: str,
    device_type: DeviceType,
    join_mode: JoinMode = JoinMode.CAD,
    *,
    config: ClientConfig | None = None,
) -> Node:
    identity = DeviceIdentity(peer, device_type, 2, VENDOR, IMAGE_TYPE[device_type], join_mode)
    key = ec.derive_private_key(int(peer, 16), ec.SECP256R1()) if join_mode.can_sign else None
    store = MemorySlotStore(b"factory image")
    device = Device(
        identity,
        RELEASE_TRUST,
        store,
        running=FirmwareInfo(OLD_VERSION, 5),
        activation_trust=TrustStore([OPS_KEY.public_key()]),
        signing_key=key,
    )
    client = HanClient(device, config, rng=random.Random(int(peer, 16)))
    return Node(peer, device, client, store, key)


@dataclass
class Sent:
    at: float
    src: str
    dst: str
    frame: Any  # a decoded Frame; Any so tests read fields of the kind they filtered for
    dropped: bool


@dataclass
class HanSim:
    """A HAN in virtual time: one CH server, its clients, a link with latency and seeded loss."""

    server: HanServer
    nodes: list[Node]
    seed: int = 1
    drop: float = 0.0
    latency: float = 0.005  # per frame, plus airtime at 250 kbit/s
    now: float = T0
    log: list[Sent] = field(default_factory=list)
    events: list[tuple[float, Any]] = field(default_factory=list)
    max_transferring: int = 0
    _rng: random.Random = field(init=False)
    _heap: list[tuple[float, int, str, str, bytes]] = field(default_factory=list)
    _hooks: list[tuple[float, int, Callable[[HanSim], None]]] = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.by_peer = {n.peer: n for n in self.nodes}

    def transmit(self, src: str, dst: str, data: bytes) -> None:
        lost = self._rng.random() < self.drop
        self.log.append(Sent(self.now, src, dst, decode_frame(data), lost))
        if not lost:
            arrival = self.now + self.latency + len(data) * 8 / 250_000
            heapq.heappush(self._heap, (arrival, self._next(), src, dst, data))

    def at(self, when: float, hook: Callable[[HanSim], None]) -> None:
        heapq.heappush(self._hooks, (when, self._next(), hook))

    def _next(self) -> int:
        self._n += 1
        return self._n

    def _collect(self) -> None:
        for server_event in self.server.drain_events():
            self.events.append((self.now, server_event))
        for n in self.nodes:
            for client_event in n.client.drain_events():
                self.events.append((self.now, (n.peer, client_event)))
        self.max_transferring = max(self.max_transferring, self.server.transferring)

    def start(self) -> None:
        for n in self.nodes:
            for data in n.client.start(self.now):
                self.transmit(n.peer, "CH", data)
        self._collect()

    def run(self, until: float, done: Callable[[], bool] | None = None) -> None:
        for _ in range(2_000_000):
            if done is not None and done():
                return
            options: list[tuple[float, int, str]] = []
            if self._heap:
                options.append((self._heap[0][0], 0, "frame"))
            if self._hooks:
                options.append((self._hooks[0][0], 1, "hook"))
            deadline = self.server.next_deadline()
            if deadline is not None:
                options.append((deadline, 2, "server"))
            for i, n in enumerate(self.nodes):
                for kind, d in (
                    ("client", n.client.next_deadline()),
                    ("device", n.device.next_deadline()),
                ):
                    if d is not None:
                        options.append((d, 3 + i, f"{kind}:{n.peer}"))
            if not options or min(options)[0] > until:
                self.now = until
                return
            when, _, what = min(options)
            self.now = max(self.now, when)
            if what == "frame":
                _, _, src, dst, data = heapq.heappop(self._heap)
                if dst == "CH":
                    for peer, reply in self.server.frame_received(src, data, self.now):
                        self.transmit("CH", peer, reply)
                else:
                    for reply in self.by_peer[dst].client.frame_received(data, self.now):
                        self.transmit(dst, "CH", reply)
            elif what == "hook":
                heapq.heappop(self._hooks)[2](self)
            elif what == "server":
                for peer, reply in self.server.handle_timer(self.now):
                    self.transmit("CH", peer, reply)
            else:
                kind, peer = what.split(":")
                n = self.by_peer[peer]
                if kind == "client":
                    for reply in n.client.handle_timer(self.now):
                        self.transmit(peer, "CH", reply)
                else:
                    n.device.handle_timer(self.now)
            self._collect()
        raise AssertionError("simulation did not settle")

    # -------------------------------------------------------------- measurements

    def frames(self, src: str, kind: type[Any]) -> list[Sent]:
        return [s for s in self.log if s.src == src and isinstance(s.frame, kind)]

    def block_request_gaps(self, peer: str) -> list[float]:
        times = [
            s.at
            for s in self.log
            if s.src == peer and isinstance(s.frame, (ImageBlockRequest, ManifestBlockRequest))
        ]
        return [b - a for a, b in itertools.pairwise(times)]

    def wait_violations(self, peer: str) -> int:
        """Block requests sent before a WAIT_FOR_DATA answer allowed them."""
        kinds = (ImageBlockRequest, ManifestBlockRequest)
        last_request_at, allowed_at, violations = 0.0, 0.0, 0
        for s in self.log:
            if s.src == peer and isinstance(s.frame, kinds):
                violations += s.at < allowed_at - EPS
                last_request_at = s.at
            elif (
                s.dst == peer
                and not s.dropped
                and isinstance(s.frame, (ImageBlockWait, ManifestBlockWait))
            ):
                delay = s.frame.request_time - s.frame.current_time
                allowed_at = last_request_at + delay
        return violations

    def server_event_time(self, kind: type[Any], peer: str) -> float:
        return next(t for t, e in self.events if isinstance(e, kind) and e.peer == peer)

    def client_events(self, peer: str) -> list[Any]:
        return [
            e for _, (p, e) in ((t, x) for t, x in self.events if isinstance(x, tuple)) if p == peer
        ]


def held(*nodes: Node) -> Callable[[], bool]:
    return lambda: all(n.client.state is ClientState.WAITING_ACTIVATION for n in nodes)


def serve(config: ServerConfig, *releases: Release, source: Any = None) -> HanServer:
    server = HanServer(config)
    for r in releases:
        server.add_image(r.signed, r.manifest, source or ProgressiveImage(len(r.image), r.image))
    return server


def activation(n: Node, r: Release, counter: int, **kwargs: Any) -> bytes:
    return ActivationCommand(n.peer, r.manifest.sha256, counter, **kwargs).sign(OPS_KEY)


# --------------------------------------------------------------------------- full exchanges

B1_ID, B2_ID, B3_ID, B4_ID = (f"00124B00000000B{i}" for i in range(1, 5))


def test_full_exchange_to_a_cad_bridge_then_activation_with_a_version_report() -> None:
    r = release(DeviceType.B2, size=16 * 1024)
    b2 = node(B2_ID, DeviceType.B2, JoinMode.CAD)
    server = serve(ServerConfig(max_data_size=50, minimum_block_period_ms=200), r)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 3600, held(b2))
    assert b2.client.state is ClientState.WAITING_ACTIVATION

    # delivered: 50-byte blocks, digest matches, nothing but verified bytes in the slot
    data = sim.frames("CH", ImageBlockResponse)
    assert {len(s.frame.data) for s in data[:-1]} == {50}
    assert bytes(b2.store.pending) == r.image
    assert hashlib.sha256(b2.store.pending).digest() == r.manifest.sha256
    assert b2.device.slot_state is SlotState.HELD
    # the manifest came first: every manifest request precedes every image request
    manifest_times = [s.at for s in sim.frames(B2_ID, ManifestBlockRequest)]
    image_times = [s.at for s in sim.frames(B2_ID, ImageBlockRequest)]
    assert max(manifest_times) < min(image_times)
    assert sim.client_events(B2_ID) == [
        ImageOffered(NEW_VERSION, len(r.image)),
        ManifestAccepted(r.manifest),
        ImageReceived(r.manifest.sha256),
        UpgradeEndAcknowledged(UPGRADE_TIME_WAIT),
    ]

    # MinimumBlockPeriod: learned once, then honoured by every block request
    assert b2.client.minimum_block_period_ms == 200
    assert sim.wait_violations(B2_ID) == 0
    assert min(sim.block_request_gaps(B2_ID)) >= 0.2 - EPS
    info = server.session(B2_ID)
    assert info is not None
    assert info.state is SessionState.DELIVERED
    assert info.period_waits == 1
    assert info.bytes_served == len(r.image)
    blocks = -(-len(r.image) // 50)
    duration = sim.server_event_time(ImageDelivered, B2_ID) - T0
    assert blocks * 0.2 <= duration <= blocks * 0.2 * 1.15

    # UpgradeEnd answered "wait" (0xFFFFFFFF): hours pass, nothing activates
    ends = sim.frames("CH", UpgradeEndResponse)
    assert ends
    assert {s.frame.upgrade_time for s in ends} == {UPGRADE_TIME_WAIT}
    sim.run(sim.now + 2.5 * 3600)
    assert b2.device.running.fw_version == OLD_VERSION
    assert b2.device.holds_image
    assert len(sim.frames(B2_ID, UpgradeEndRequest)) == 3  # first + two hourly re-asks
    assert [t for t, e in sim.events if isinstance(e, ImageDelivered)] == [
        sim.server_event_time(ImageDelivered, B2_ID)
    ]  # re-asks are idempotent on the server

    # the signed activation command (relayed by the CH outside the OTA cluster)
    out = b2.device.activation_received(activation(b2, r, counter=1), sim.now)
    assert out == [
        ActivationResponse(B2_ID, 1, Outcome.SUCCESS, NEW_VERSION),
        VersionReportMsg(B2_ID, NEW_VERSION, 1, 1),  # CAD: the CH's evidence, unsigned
    ]
    assert bytes(b2.store.active) == r.image
    # the client notices, returns to IDLE, and the server has nothing newer to offer
    activated_at = sim.now
    sim.run(sim.now + 3600 + 400)
    assert b2.client.state is ClientState.IDLE
    refused = [s for s in sim.frames("CH", QueryNextImageRefused) if s.at > activated_at]
    assert refused
    assert refused[0].frame.status is ZclStatus.NO_IMAGE_AVAILABLE


def test_ppmid_joined_bridge_confirms_with_a_signed_alert() -> None:
    r = release(DeviceType.B3, size=8 * 1024)
    b3 = node(B3_ID, DeviceType.B3, JoinMode.PPMID)
    sim = HanSim(serve(ServerConfig(), r), [b3])
    sim.start()
    sim.run(T0 + 3600, held(b3))
    response, evidence = b3.device.activation_received(activation(b3, r, counter=7), sim.now)
    assert response == ActivationResponse(B3_ID, 7, Outcome.SUCCESS, NEW_VERSION)
    assert isinstance(evidence, AlertRaised)
    assert b3.key is not None
    alert = ActivationAlert.verify(evidence.signed, TrustStore([b3.key.public_key()]))
    assert (alert.device_id, alert.fw_version, alert.image_sha256, alert.counter) == (
        B3_ID,
        NEW_VERSION,
        r.manifest.sha256,
        7,
    )


def test_busy_server_makes_the_third_client_wait_and_it_still_completes() -> None:
    releases = [
        release(t, size=8 * 1024, seed=i)
        for i, t in enumerate((DeviceType.B1, DeviceType.B2, DeviceType.B4))
    ]
    nodes = [node(B1_ID, DeviceType.B1), node(B2_ID, DeviceType.B2), node(B4_ID, DeviceType.B4)]
    server = serve(ServerConfig(max_sessions=2, minimum_block_period_ms=100), *releases)
    sim = HanSim(server, nodes)
    sim.start()
    sim.run(T0 + 3600, held(*nodes))
    assert all(n.client.state is ClientState.WAITING_ACTIVATION for n in nodes)
    for n, r in zip(nodes, releases, strict=True):
        assert bytes(n.store.pending) == r.image
        assert min(sim.block_request_gaps(n.peer)) >= 0.1 - EPS
    assert sim.max_transferring == 2
    infos = {n.peer: server.session(n.peer) for n in nodes}
    waited = [p for p, i in infos.items() if i is not None and i.busy_waits > 0]
    assert waited == [B4_ID]  # first come, first served
    first_done = min(sim.server_event_time(ImageDelivered, p) for p in (B1_ID, B2_ID))
    admitted = sim.server_event_time(SessionStarted, B4_ID)
    assert admitted >= first_done
    # refused twice, B4 asked again only busy_retry_s (10 s) later each time, never earlier
    asks = [s.at for s in sim.frames(B4_ID, ManifestBlockRequest) if s.at < admitted]
    assert len(asks) == 3  # two refused, the third admitted
    assert min(b - a for a, b in itertools.pairwise(asks)) >= 10 - EPS
    assert all(sim.wait_violations(n.peer) == 0 for n in nodes)
    # the waiter asked again only when told to: busy_retry_s apart, not in a tight loop
    assert nodes[2].client.stats.waits <= 4


def test_cut_through_serves_bytes_as_they_arrive_from_the_wan() -> None:
    r = release(DeviceType.B2, size=16 * 1024)
    b2 = node(B2_ID, DeviceType.B2)
    source = ProgressiveImage(len(r.image))
    server = serve(ServerConfig(minimum_block_period_ms=100), r, source=source)
    sim = HanSim(server, [b2])
    wan_block, wan_period = 1024, 4.0  # the WAN delivers 256 B/s, the HAN takes 500 B/s

    def feed(s: HanSim) -> None:
        start = source.available
        source.append(r.image[start : start + wan_block])
        if source.available < len(r.image):
            s.at(s.now + wan_period, feed)

    sim.at(T0, feed)
    sim.start()
    sim.run(T0 + 3600, held(b2))
    assert bytes(b2.store.pending) == r.image
    info = server.session(B2_ID)
    assert info is not None
    assert info.data_waits > 0
    assert sim.wait_violations(B2_ID) == 0  # re-asked data_retry_s after each WAIT_FOR_DATA
    wan_done = T0 + wan_period * (len(r.image) // wan_block - 1)
    han_done = sim.server_event_time(ImageDelivered, B2_ID)
    han_airtime = len(r.image) / 50 * 0.1
    # cut-through: finishes shortly after the last WAN byte, not WAN time + HAN time
    assert han_done - wan_done < 5.0
    assert han_done - T0 < (wan_done - T0 + han_airtime) * 0.75


def test_lossy_link_completes_through_client_retries() -> None:
    r = release(DeviceType.B2, size=16 * 1024)
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(serve(ServerConfig(), r), [b2], seed=42, drop=0.10)
    sim.start()
    sim.run(T0 + 6 * 3600, held(b2))
    assert b2.client.state is ClientState.WAITING_ACTIVATION
    assert bytes(b2.store.pending) == r.image
    dropped = sum(s.dropped for s in sim.log)
    assert dropped / len(sim.log) == pytest.approx(0.10, abs=0.03)
    assert b2.client.stats.timeouts >= dropped * 0.9  # every loss cost one timeout
    assert b2.client.stats.stale <= b2.client.stats.timeouts
    assert min(sim.block_request_gaps(B2_ID)) >= 0.1 - EPS
    assert not [e for e in sim.client_events(B2_ID) if isinstance(e, DownloadAborted)]


def test_client_backs_off_then_aborts_after_ten_consecutive_errors() -> None:
    r = release(DeviceType.B2, size=8 * 1024)
    b2 = node(B2_ID, DeviceType.B2)
    server = serve(ServerConfig(), r)
    sim = HanSim(server, [b2])
    silence_at = T0 + 10.0

    def cut_link(s: HanSim) -> None:
        s.drop = 1.0

    sim.at(silence_at, cut_link)
    sim.start()
    sim.run(T0 + 3600, lambda: b2.client.state is ClientState.IDLE and sim.now > silence_at)
    lost = [s for s in sim.log if s.src == B2_ID and s.at >= silence_at]
    assert [type(s.frame) for s in lost] == [ImageBlockRequest] * 10 + [UpgradeEndRequest]
    gaps = [b.at - a.at for a, b in itertools.pairwise(lost)]
    # 3 s message timeout + backoff 2, 4, 8, 16, then capped at 30; abort on the 10th timeout
    assert gaps == pytest.approx([5, 7, 11, 19, 33, 33, 33, 33, 33, 3])
    assert {s.frame.file_offset for s in lost[:-1]} == {lost[0].frame.file_offset}
    end = lost[-1].frame
    assert isinstance(end, UpgradeEndRequest)
    assert end.status is ZclStatus.ABORT
    aborted = [e for e in sim.client_events(B2_ID) if isinstance(e, DownloadAborted)]
    assert aborted == [DownloadAborted(Reason.TIMED_OUT)]
    # the link comes back: the next periodic query resumes from the last verified block
    sim.drop = 0.0
    resumed_from = b2.device.stored_bytes
    assert resumed_from > 0
    sim.run(sim.now + 3600, held(b2))
    assert bytes(b2.store.pending) == r.image
    after = [
        s.frame.file_offset for s in sim.frames(B2_ID, ImageBlockRequest) if s.at > lost[-1].at
    ]
    assert after[0] == resumed_from


def test_corrupt_block_on_the_han_is_fetched_again_alone() -> None:
    r = release(DeviceType.B2, size=8 * 1024)
    b2 = node(B2_ID, DeviceType.B2)

    class OneBadRead(ProgressiveImage):
        corrupted = False

        def read(self, offset: int, length: int) -> bytes | None:
            data = super().read(offset, length)
            if data is not None and offset >= 3000 and not self.corrupted:
                self.corrupted = True
                return bytes([data[0] ^ 0x80]) + data[1:]
            return data

    server = serve(ServerConfig(), r, source=OneBadRead(len(r.image), r.image))
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 3600, held(b2))
    assert bytes(b2.store.pending) == r.image
    assert b2.client.stats.block_hash_errors == 1
    info = server.session(B2_ID)
    assert info is not None
    # only the one 1024-byte manifest block was sent twice
    assert info.bytes_served - len(r.image) <= 1024 + 50


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"device_type": DeviceType.B1, "image_type": IMAGE_TYPE[DeviceType.B2]},
            Reason.WRONG_DEVICE_TYPE,
        ),
        ({"sequence": 4, "fw_version": 0x0300}, Reason.ROLLBACK),
        ({"sequence": 5, "fw_version": 0x0300}, Reason.REPLAYED),
    ],
    ids=["wrong-device-type", "rollback", "replay"],
)
def test_device_refuses_a_bad_manifest_before_any_block_is_requested(
    kwargs: dict[str, Any], expected: Reason
) -> None:
    device_type = kwargs.pop("device_type", DeviceType.B2)
    r = release(device_type, size=8 * 1024, **kwargs)
    b2 = node(B2_ID, DeviceType.B2)
    server = serve(ServerConfig(), r)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 600, lambda: b2.client.state is ClientState.IDLE and bool(sim.log))
    sim.run(sim.now + 5)  # let the UpgradeEnd(INVALID_IMAGE) reach the CH
    assert ManifestRejected(expected) in sim.client_events(B2_ID)
    assert sim.frames(B2_ID, ImageBlockRequest) == []
    assert (b2.store.writes, b2.store.erases) == (0, 0)
    assert b2.device.slot_state is SlotState.EMPTY
    ends = sim.frames(B2_ID, UpgradeEndRequest)
    assert [s.frame.status for s in ends] == [ZclStatus.INVALID_IMAGE]
    failed = [e for _, e in sim.events if isinstance(e, SessionFailed)]
    assert [(e.peer, e.status) for e in failed] == [(B2_ID, ZclStatus.INVALID_IMAGE)]


def test_manifest_that_disagrees_with_the_offer_is_refused() -> None:
    r = release(DeviceType.B2, size=8 * 1024)
    forged = Manifest(
        **{**{f: getattr(r.manifest, f) for f in r.manifest.__slots__}, "fw_version": 0x0999}
    )
    server = HanServer(ServerConfig())
    # the CH announces version 0x0999 but serves the manifest of 0x0200
    server.add_image(r.signed, forged, ProgressiveImage(len(r.image), r.image))
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 600, lambda: b2.client.state is ClientState.IDLE and bool(sim.log))
    assert ManifestRejected(Reason.HEADER_MISMATCH) in sim.client_events(B2_ID)
    assert b2.store.writes == 0


# --------------------------------------------------------------------------- server unit


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
    assert reply == ImageBlockWait(1, int(T0), int(T0), 250)  # learn the period
    reply = ask(server, B2_ID, block_request(period=250), T0 + 0.25)
    assert isinstance(reply, ImageBlockResponse)
    assert reply.data == r.image[:40]
    reply = ask(server, B2_ID, block_request(offset=990, period=250), T0 + 0.5)
    assert reply == ImageBlockWait(1, int(T0), int(T0) + 2, 250)  # cut-through: not here yet
    source.append(r.image[1000:])
    reply = ask(server, B2_ID, block_request(offset=4090, period=250), T0 + 3)
    assert isinstance(reply, ImageBlockResponse)
    assert reply.data == r.image[4090:]
    assert ask(server, B2_ID, block_request(offset=4096), T0 + 4) == ImageBlockAbort(
        1, ZclStatus.MALFORMED_COMMAND
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
        1, int(T0) + 1, int(T0) + 11, 100
    )
    assert server.next_deadline() == T0 + 60
    server.handle_timer(T0 + 59)
    assert server.transferring == 1
    server.handle_timer(T0 + 60)
    assert server.transferring == 0
    assert isinstance(server.drain_events()[-1], SessionTimedOut)
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
            5, VENDOR, 0x0B02, NEW_VERSION, int(T0), UPGRADE_TIME_WAIT
        )
    assert [type(e) for e in server.drain_events()] == [ImageDelivered]
    bad = UpgradeEndRequest(6, ZclStatus.INVALID_IMAGE, VENDOR, 0x0B02, NEW_VERSION).encode()
    assert ask(server, B1_ID, bad, T0) == DefaultResponse(6, 0x06, ZclStatus.SUCCESS, True)
    assert server.drain_events() == [
        SessionFailed(B1_ID, r.manifest.sha256, ZclStatus.INVALID_IMAGE, T0)
    ]


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
