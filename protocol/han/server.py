"""HAN server: the Communications Hub side of the ZigBee OTA Upgrade cluster (sans-IO).

The CH holds images (each with its signed manifest) and serves them to HAN clients that pull
them: QueryNextImage, then the manifest by ManifestBlockRequest (manufacturer-specific
extension), then the image by ImageBlockRequest, then UpgradeEnd. The server keeps one session
per client (``peer``: the client's address, opaque here).

SPEC §8.3 is the normative description: what each frame is answered with and in which order
(admission of at most ``max_sessions`` K transferring sessions with a first-come first-served
queue, pacing by the MinimumBlockPeriod in each client's unit, bounds, cut-through from an
image still arriving over the WAN), the session states with every edge (:data:`TRANSITIONS`
is that table) and the defaults (:class:`ServerConfig`). Back-pressure is always a
WAIT_FOR_DATA response carrying (current time, request time, minimum block period).

A session's bytes come from an :class:`ImageSource`; the server never writes anything. Activation
is not the server's business: UpgradeEnd always answers upgrade time 0xFFFFFFFF (wait for the
server's activation command), and the signed activation command travels separately
(:mod:`protocol.device.activation`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from protocol.clock import UnixTime, later
from protocol.errors import ProtocolError, Reason
from protocol.han.frames import (
    EXTENSION_MANUFACTURER_CODE,
    MAX_BLOCK_DATA,
    MAX_QUERY_JITTER,
    MIN_BLOCK_DATA,
    UPGRADE_TIME_WAIT,
    BlockPeriodUnit,
    DefaultResponse,
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
    Tolerated,
    UpgradeEndRequest,
    UpgradeEndResponse,
    ZclStatus,
    decode_frame,
    decode_header,
    zigbee_time,
)
from protocol.release.manifest import Manifest
from protocol.transitions import checked
from protocol.wire.limits import MAX_U16

Output = list[tuple[str, bytes]]
"""Frames to send: (peer, frame bytes)."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Tunables of the HAN server."""

    max_data_size: int = 50  # cap on block payload, bytes (40-63)
    minimum_block_period_ms: int = 100  # clients wait this long between block requests
    max_sessions: int = 2  # K: simultaneous TRANSFERRING sessions
    busy_retry_s: int = 10  # WAIT_FOR_DATA delay when all K slots are taken
    data_retry_s: int = 1  # WAIT_FOR_DATA delay when the bytes are not here yet
    session_timeout: float = 60.0  # a TRANSFERRING session with no request this long is dropped
    query_jitter: int = MAX_QUERY_JITTER  # sent in ImageNotify
    #: the MinimumBlockPeriod unit of a client not set by HanServer.set_block_period_unit
    block_period_unit: BlockPeriodUnit = BlockPeriodUnit.MILLISECONDS
    #: the manufacturer code of the ManifestBlock extension's header (SPEC §8.2)
    extension_code: int = EXTENSION_MANUFACTURER_CODE

    def __post_init__(self) -> None:
        if not MIN_BLOCK_DATA <= self.max_data_size <= MAX_BLOCK_DATA:
            raise ValueError(f"max_data_size must be {MIN_BLOCK_DATA}..{MAX_BLOCK_DATA}")
        if not 0 <= self.minimum_block_period_ms <= MAX_U16:
            raise ValueError("minimum_block_period_ms must fit a u16")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if self.busy_retry_s < 1 or self.data_retry_s < 0:
            raise ValueError("retry delays must be non-negative (busy at least 1 s)")
        if self.session_timeout <= 0:
            raise ValueError("session_timeout must be positive")
        if not 1 <= self.query_jitter <= MAX_QUERY_JITTER:
            raise ValueError("query_jitter must be 1..100")
        if not 0 <= self.extension_code < MAX_U16:
            raise ValueError("extension_code must be a manufacturer code (not 0xffff)")


class ImageSource(Protocol):
    """Where the server reads image bytes from (a file, a WAN receiver's buffer...)."""

    def read(self, offset: int, length: int) -> bytes | None:
        """Exactly ``length`` bytes at ``offset``, or ``None`` if they are not available yet."""


class ProgressiveImage:
    """An in-memory :class:`ImageSource` whose bytes arrive in order (WAN cut-through)."""

    __slots__ = ("_data", "size")

    def __init__(self, size: int, data: bytes = b"") -> None:
        if size < 1 or len(data) > size:
            raise ValueError("size must be positive and hold the initial data")
        self.size = size
        self._data = bytearray(data)

    @property
    def available(self) -> int:
        """How many leading bytes are available."""
        return len(self._data)

    def append(self, data: bytes) -> None:
        """Make the next ``len(data)`` bytes available."""
        if len(self._data) + len(data) > self.size:
            raise ValueError("more bytes than the image size")
        self._data += data

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes, or ``None`` while any of them is still missing."""
        if offset < 0 or length < 0 or offset + length > len(self._data):
            return None
        return bytes(self._data[offset : offset + length])


@dataclass(frozen=True, slots=True)
class OfferedImage:
    """An image the server can serve, with its signed manifest and who may fetch it."""

    manifest: Manifest
    signed_manifest: bytes
    source: ImageSource
    targets: frozenset[str] | None  # None: any client whose ids and hardware match

    def serves(self, peer: str) -> bool:
        """Whether ``peer`` may fetch this image."""
        return self.targets is None or peer in self.targets


class SessionState(Enum):
    """State of one client's session on the server."""

    OFFERED = "offered"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    DELIVERED = "delivered"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


#: A session's edges (SPEC §8.3 draws and lists them). Sessions start OFFERED; a FAILED or
#: TIMED_OUT one is replaced by a new session when its peer asks again.
TRANSITIONS: Final[dict[SessionState, frozenset[SessionState]]] = {
    SessionState.OFFERED: frozenset(
        {
            SessionState.WAITING,
            SessionState.TRANSFERRING,
            SessionState.DELIVERED,
            SessionState.FAILED,
        }
    ),
    SessionState.WAITING: frozenset(
        {
            SessionState.TRANSFERRING,
            SessionState.OFFERED,
            SessionState.DELIVERED,
            SessionState.FAILED,
        }
    ),
    SessionState.TRANSFERRING: frozenset(
        {SessionState.DELIVERED, SessionState.FAILED, SessionState.TIMED_OUT}
    ),
    SessionState.DELIVERED: frozenset(
        {SessionState.WAITING, SessionState.TRANSFERRING, SessionState.FAILED}
    ),
    SessionState.FAILED: frozenset(),
    SessionState.TIMED_OUT: frozenset(),
}


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A snapshot of one session, for the CH's reports (CCS08-like transfer outcome)."""

    peer: str
    image_sha256: bytes
    state: SessionState
    started_at: UnixTime | None
    finished_at: UnixTime | None
    bytes_served: int
    manifest_bytes_served: int
    blocks_served: int
    busy_waits: int
    data_waits: int
    period_waits: int


class _Session:
    __slots__ = (
        "blocks_served",
        "busy_waits",
        "bytes_served",
        "data_waits",
        "finished_at",
        "image",
        "last_request_at",
        "last_served_at",
        "manifest_bytes_served",
        "peer",
        "period_announced",
        "period_waits",
        "started_at",
        "state",
    )

    def __init__(self, peer: str, image: OfferedImage, now: UnixTime) -> None:
        self.peer = peer
        self.image = image
        self.state = SessionState.OFFERED  # the initial state, not an edge
        self.last_request_at = now
        self.last_served_at: UnixTime | None = None
        self.period_announced = False
        self.started_at: UnixTime | None = None
        self.finished_at: UnixTime | None = None
        self.bytes_served = 0
        self.manifest_bytes_served = 0
        self.blocks_served = 0
        self.busy_waits = 0
        self.data_waits = 0
        self.period_waits = 0

    def enter(self, state: SessionState) -> None:
        """Change state along an edge of :data:`TRANSITIONS` (``IllegalTransitionError`` if not)."""
        self.state = checked(TRANSITIONS, "HanServer", self.state, state)

    def info(self) -> SessionInfo:
        return SessionInfo(
            peer=self.peer,
            image_sha256=self.image.manifest.sha256,
            state=self.state,
            started_at=self.started_at,
            finished_at=self.finished_at,
            bytes_served=self.bytes_served,
            manifest_bytes_served=self.manifest_bytes_served,
            blocks_served=self.blocks_served,
            busy_waits=self.busy_waits,
            data_waits=self.data_waits,
            period_waits=self.period_waits,
        )


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A client got one of the K transfer slots."""

    peer: str
    image_sha256: bytes
    at: UnixTime


@dataclass(frozen=True, slots=True)
class ImageDelivered:
    """A client reported UpgradeEnd(SUCCESS): it verified and holds the image."""

    peer: str
    image_sha256: bytes
    at: UnixTime


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """A client reported UpgradeEnd with an error status (e.g. INVALID_IMAGE, ABORT)."""

    peer: str
    image_sha256: bytes
    status: ZclStatus
    at: UnixTime


@dataclass(frozen=True, slots=True)
class MoreImagesRequired:
    """A client reported UpgradeEnd(REQUIRE_MORE_IMAGE): it holds this image but needs further
    images before it can upgrade (ZCL multi-image); not a failure."""

    peer: str
    image_sha256: bytes
    at: UnixTime


@dataclass(frozen=True, slots=True)
class SessionTimedOut:
    """A transferring client went silent for ``session_timeout``; its slot was freed."""

    peer: str
    image_sha256: bytes
    at: UnixTime


ServerEvent = SessionStarted | ImageDelivered | MoreImagesRequired | SessionFailed | SessionTimedOut


class HanServer:
    """The CH's OTA Upgrade server. Feed it frames and timer calls; send what it returns."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._images: dict[bytes, OfferedImage] = {}
        self._sessions: dict[str, _Session] = {}
        self._queue: list[str] = []  # WAITING peers, first come first served
        self._events: list[ServerEvent] = []
        self._seq = 0
        self._units: dict[str, BlockPeriodUnit] = {}
        #: frames accepted with trailing bytes or reserved bits (ZCL forward compatibility)
        self.tolerated = Tolerated()

    # ------------------------------------------------------------------ images

    def add_image(
        self,
        signed_manifest: bytes,
        manifest: Manifest,
        source: ImageSource,
        *,
        targets: Iterable[str] | None = None,
    ) -> None:
        """Offer an image (already verified by the CH) to ``targets`` (default: any match)."""
        self._images[manifest.sha256] = OfferedImage(
            manifest=manifest,
            signed_manifest=bytes(signed_manifest),
            source=source,
            targets=None if targets is None else frozenset(targets),
        )

    def remove_image(self, sha256: bytes) -> None:
        """Stop offering an image; clients fetching it get ABORT / NO_IMAGE_AVAILABLE."""
        self._images.pop(sha256, None)

    def image_notify(self, sha256: bytes, peers: Iterable[str]) -> Output:
        """ImageNotify frames (payload type 3) telling ``peers`` about an offered image."""
        image = self._images.get(sha256)
        if image is None:
            return []
        m = image.manifest
        out: Output = []
        for peer in peers:
            if image.serves(peer):
                frame = ImageNotify(
                    self._next_seq(), self.config.query_jitter, m.vendor, m.image_type, m.fw_version
                )
                out.append((peer, frame.encode()))
        return out

    def set_block_period_unit(self, peer: str, unit: BlockPeriodUnit) -> None:
        """Declare the unit ``peer`` reads MinimumBlockPeriod in (from the CH's device records:
        a client built to SE 1.2b reads seconds); others use ``config.block_period_unit``."""
        self._units[peer] = unit

    def block_period_unit(self, peer: str) -> BlockPeriodUnit:
        """The unit the server tells ``peer`` MinimumBlockPeriod in."""
        return self._units.get(peer, self.config.block_period_unit)

    # ------------------------------------------------------------------ queries

    def session(self, peer: str) -> SessionInfo | None:
        """Snapshot of ``peer``'s session, if any."""
        session = self._sessions.get(peer)
        return None if session is None else session.info()

    @property
    def transferring(self) -> int:
        """How many sessions hold a transfer slot now."""
        return sum(s.state is SessionState.TRANSFERRING for s in self._sessions.values())

    def forget(self, peer: str) -> None:
        """Drop ``peer``'s session (e.g. after its activation was confirmed)."""
        self._sessions.pop(peer, None)
        if peer in self._queue:
            self._queue.remove(peer)

    def events(self) -> list[ServerEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ input

    def frame_received(self, peer: str, data: bytes, now: UnixTime) -> Output:
        """Handle one frame from ``peer``; return the frames to send."""
        try:
            frame = decode_frame(
                data, extension_code=self.config.extension_code, tolerated=self.tolerated
            )
        except ProtocolError as exc:
            return self._refuse(peer, data, exc)
        if isinstance(frame, QueryNextImageRequest):
            return [(peer, self._query(peer, frame, now))]
        if isinstance(frame, (ImageBlockRequest, ManifestBlockRequest)):
            return [(peer, self._block(peer, frame, now))]
        if isinstance(frame, UpgradeEndRequest):
            return [(peer, self._upgrade_end(peer, frame, now))]
        return []  # server->client frames and Default Responses need no answer

    def next_deadline(self) -> UnixTime | None:
        """When :meth:`handle_timer` must next be called, or ``None``."""
        deadlines = [
            later(s.last_request_at, self.config.session_timeout)
            for s in self._sessions.values()
            if s.state is SessionState.TRANSFERRING
        ]
        return min(deadlines, default=None)

    def handle_timer(self, now: UnixTime) -> Output:
        """Free the slots of sessions that went silent."""
        for s in self._sessions.values():
            if (
                s.state is SessionState.TRANSFERRING
                and now >= s.last_request_at + self.config.session_timeout
            ):
                s.enter(SessionState.TIMED_OUT)
                s.finished_at = now
                self._events.append(SessionTimedOut(s.peer, s.image.manifest.sha256, now))
        return []

    # ------------------------------------------------------------------ handlers

    def _refuse(self, peer: str, data: bytes, exc: ProtocolError) -> Output:
        try:
            header, _ = decode_header(data)
        except ProtocolError:
            return []  # not even a ZCL header: drop silently
        if header.to_client or not header.cluster_specific:
            return []  # never answer a response (no Default Response loops)
        if exc.reason is Reason.UNKNOWN_TYPE:
            status = (
                ZclStatus.UNSUP_MANUF_CLUSTER_COMMAND
                if header.manufacturer_code is not None
                else ZclStatus.UNSUP_CLUSTER_COMMAND
            )
        else:
            status = ZclStatus.MALFORMED_COMMAND
        reply = DefaultResponse(
            header.seq, header.command_id, status, True, header.manufacturer_code
        )
        return [(peer, reply.encode())]

    def _select(self, peer: str, req: QueryNextImageRequest) -> OfferedImage | None:
        best: OfferedImage | None = None
        for image in self._images.values():
            m = image.manifest
            if not image.serves(peer):
                continue
            if (m.vendor, m.image_type) != (req.manufacturer_code, req.image_type):
                continue
            if m.fw_version == req.file_version:
                continue
            hw = req.hardware_version
            if hw is not None and not m.hw_min <= hw <= m.hw_max:
                continue
            if best is None or m.sequence > best.manifest.sequence:
                best = image
        return best

    def _find(self, peer: str, vendor: int, image_type: int, version: int) -> OfferedImage | None:
        for image in self._images.values():
            m = image.manifest
            if (m.vendor, m.image_type, m.fw_version) == (
                vendor,
                image_type,
                version,
            ) and image.serves(peer):
                return image
        return None

    def _session_for(self, peer: str, image: OfferedImage, now: UnixTime) -> _Session:
        session = self._sessions.get(peer)
        if (
            session is None
            or session.image is not image
            or session.state
            in (
                SessionState.FAILED,
                SessionState.TIMED_OUT,
            )
        ):
            session = _Session(peer, image, now)
            self._sessions[peer] = session
        return session

    def _query(self, peer: str, req: QueryNextImageRequest, now: UnixTime) -> bytes:
        image = self._select(peer, req)
        if image is None:
            return QueryNextImageRefused(req.seq, ZclStatus.NO_IMAGE_AVAILABLE).encode()
        session = self._session_for(peer, image, now)
        session.last_request_at = now
        m = image.manifest
        return QueryNextImageResponse(
            req.seq, m.vendor, m.image_type, m.fw_version, m.size
        ).encode()

    def _block(
        self, peer: str, req: ImageBlockRequest | ManifestBlockRequest, now: UnixTime
    ) -> bytes:
        image = self._find(peer, req.manufacturer_code, req.image_type, req.file_version)
        if image is None:
            return self._abort(req, ZclStatus.NO_IMAGE_AVAILABLE)
        session = self._session_for(peer, image, now)
        session.last_request_at = now
        if session.state is not SessionState.TRANSFERRING and not self._admit(session, now):
            session.busy_waits += 1
            return self._wait(peer, req, now, self.config.busy_retry_s)
        if self._too_early(session, req.minimum_block_period, now):
            session.period_waits += 1
            return self._wait(peer, req, now, 0)
        if isinstance(req, ManifestBlockRequest):
            return self._serve_manifest(session, req, now)
        return self._serve_image(session, req, now)

    def _too_early(self, session: _Session, declared: int | None, now: UnixTime) -> bool:
        """Whether to answer with the pacing WAIT_FOR_DATA instead of data.

        A client that declares (at least) our MinimumBlockPeriod is trusted to pace itself. One
        that does not is told the period once; after that (a legacy client that cannot declare
        it) it is held to the period by the request times we see.
        """
        period_ms = self.config.minimum_block_period_ms
        unit = self.block_period_unit(session.peer)
        if declared is not None and unit.from_wire(declared) >= period_ms:
            return False
        if not session.period_announced:
            session.period_announced = True
            return True
        last = session.last_served_at
        return last is not None and (now - last) * 1000.0 < period_ms

    def _serve_manifest(self, session: _Session, req: ManifestBlockRequest, now: UnixTime) -> bytes:
        image = session.image
        total = len(image.signed_manifest)
        if req.offset >= total:
            return self._abort(req, ZclStatus.ABORT)
        n = min(req.max_data_size, self.config.max_data_size, total - req.offset)
        session.manifest_bytes_served += n
        session.last_served_at = now
        m = image.manifest
        return ManifestBlockResponse(
            req.seq,
            m.vendor,
            m.image_type,
            m.fw_version,
            total,
            req.offset,
            image.signed_manifest[req.offset : req.offset + n],
            req.extension_code,
        ).encode()

    def _serve_image(self, session: _Session, req: ImageBlockRequest, now: UnixTime) -> bytes:
        image = session.image
        size = image.manifest.size
        if req.file_offset >= size:
            return self._abort(req, ZclStatus.ABORT)
        n = min(req.max_data_size, self.config.max_data_size, size - req.file_offset)
        data = image.source.read(req.file_offset, n)
        if data is None or len(data) != n:
            session.data_waits += 1
            return self._wait(session.peer, req, now, self.config.data_retry_s)
        session.bytes_served += n
        session.blocks_served += 1
        session.last_served_at = now
        return ImageBlockResponse(
            req.seq, req.manufacturer_code, req.image_type, req.file_version, req.file_offset, data
        ).encode()

    def _admit(self, session: _Session, now: UnixTime) -> bool:
        """Give ``session`` a transfer slot if one is free and no earlier waiter claims it."""
        stale_after = 3 * self.config.busy_retry_s
        for peer in list(self._queue):
            waiter = self._sessions.get(peer)
            if (
                waiter is None
                or waiter.state is not SessionState.WAITING
                or now - waiter.last_request_at > stale_after
            ):
                self._queue.remove(peer)
                if waiter is not None and waiter.state is SessionState.WAITING:
                    waiter.enter(SessionState.OFFERED)  # went silent: leaves the queue
        ahead = self._queue.index(session.peer) if session.peer in self._queue else len(self._queue)
        if self.transferring + ahead < self.config.max_sessions:
            if session.peer in self._queue:
                self._queue.remove(session.peer)
            session.enter(SessionState.TRANSFERRING)
            if session.started_at is None:
                session.started_at = now
            self._events.append(SessionStarted(session.peer, session.image.manifest.sha256, now))
            return True
        if session.state is not SessionState.WAITING:
            session.enter(SessionState.WAITING)
        if session.peer not in self._queue:
            self._queue.append(session.peer)
        return False

    def _wait(
        self, peer: str, req: ImageBlockRequest | ManifestBlockRequest, now: UnixTime, delay: int
    ) -> bytes:
        """WAIT_FOR_DATA: ask again ``delay`` seconds from ``now``, at the configured period in
        ``peer``'s unit (rounded up: a seconds client is told 1 for 100 ms)."""
        current, request = zigbee_time(now), zigbee_time(later(now, delay))
        period = self.block_period_unit(peer).to_wire(self.config.minimum_block_period_ms)
        if isinstance(req, ManifestBlockRequest):
            return ManifestBlockWait(req.seq, req.extension_code, current, request, period).encode()
        return ImageBlockWait(req.seq, current, request, period).encode()

    @staticmethod
    def _abort(req: ImageBlockRequest | ManifestBlockRequest, status: ZclStatus) -> bytes:
        if isinstance(req, ManifestBlockRequest):
            return ManifestBlockAbort(req.seq, req.extension_code, status).encode()
        return ImageBlockAbort(req.seq, status).encode()

    def _upgrade_end(self, peer: str, req: UpgradeEndRequest, now: UnixTime) -> bytes:
        image = self._find(peer, req.manufacturer_code, req.image_type, req.file_version)
        if image is None:
            return DefaultResponse(
                req.seq, req.COMMAND, ZclStatus.NO_IMAGE_AVAILABLE, True
            ).encode()
        session = self._session_for(peer, image, now)
        session.last_request_at = now
        sha = image.manifest.sha256
        if req.status is ZclStatus.SUCCESS:
            if session.state is not SessionState.DELIVERED:
                self._leave_queue(session)
                session.enter(SessionState.DELIVERED)
                session.finished_at = now
                self._events.append(ImageDelivered(peer, sha, now))
            return UpgradeEndResponse(
                req.seq,
                req.manufacturer_code,
                req.image_type,
                req.file_version,
                zigbee_time(now),
                UPGRADE_TIME_WAIT,
            ).encode()
        if req.status is ZclStatus.REQUIRE_MORE_IMAGE:
            # it holds this image and needs further ones (ZCL multi-image): not a failure
            if session.state is not SessionState.DELIVERED:
                self._leave_queue(session)
                session.enter(SessionState.DELIVERED)
                session.finished_at = now
                self._events.append(MoreImagesRequired(peer, sha, now))
            return DefaultResponse(req.seq, req.COMMAND, ZclStatus.SUCCESS, True).encode()
        if session.state is not SessionState.FAILED:
            self._leave_queue(session)
            session.enter(SessionState.FAILED)
            session.finished_at = now
            self._events.append(SessionFailed(peer, sha, req.status, now))
        return DefaultResponse(req.seq, req.COMMAND, ZclStatus.SUCCESS, True).encode()

    def _leave_queue(self, session: _Session) -> None:
        if session.peer in self._queue:
            self._queue.remove(session.peer)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq
