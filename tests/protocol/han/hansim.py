"""A HAN in virtual time, shared by the HAN tests: signed releases, simulated devices (slots,
verifier/activator, OTA client) and a seeded link with latency and loss to one CH server.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.device.activation import (
    ActivationCommand,
)
from protocol.device.device import (
    Device,
    DeviceIdentity,
    FirmwareInfo,
    JoinMode,
    MemorySlotStore,
)
from protocol.errors import ProtocolError
from protocol.han.client import (
    ClientConfig,
    ClientState,
    HanClient,
)
from protocol.han.frames import (
    ImageBlockRequest,
    ImageBlockWait,
    ManifestBlockRequest,
    ManifestBlockWait,
    decode_frame,
)
from protocol.han.server import (
    HanServer,
    ProgressiveImage,
    ServerConfig,
)
from protocol.release import otaimg, zigbee_ota
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import TrustStore, verify_manifest

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
    manifest = verify_manifest(signed.signed_manifest, RELEASE_TRUST, now=T0)
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
        self.log.append(Sent(self.now, src, dst, self._decode(data), lost))
        if not lost:
            arrival = self.now + self.latency + len(data) * 8 / 250_000
            heapq.heappush(self._heap, (arrival, self._next(), src, dst, data))

    def _decode(self, data: bytes) -> Any:
        """Decode a frame for the log, under any extension code a peer here is configured with."""
        codes = {self.server.config.extension_code} | {
            n.client.config.extension_code for n in self.nodes
        }
        for code in sorted(codes):
            try:
                return decode_frame(data, extension_code=code)
            except ProtocolError:
                continue
        return decode_frame(data)

    def at(self, when: float, hook: Callable[[HanSim], None]) -> None:
        heapq.heappush(self._hooks, (when, self._next(), hook))

    def _next(self) -> int:
        self._n += 1
        return self._n

    def _collect(self) -> None:
        for server_event in self.server.events():
            self.events.append((self.now, server_event))
        for n in self.nodes:
            for client_event in n.client.events():
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
    """A signed activation command naming ``r``'s activation digest (SPEC §8.7)."""
    return ActivationCommand(n.peer, r.manifest.activation_digest, counter, **kwargs).sign(OPS_KEY)


B1_ID, B2_ID, B3_ID, B4_ID = (f"00124B00000000B{i}" for i in range(1, 5))
