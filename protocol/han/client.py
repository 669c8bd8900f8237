"""HAN client: the device side of the ZigBee OTA Upgrade cluster (sans-IO).

The client drives the download (ZigBee OTA is pull: the client owns the offset) and hands every
byte to its :class:`~protocol.device.device.Device`, which verifies the signed manifest before the
first image byte, each manifest block before it reaches flash, and the whole image at the end.

SPEC §8.4 is the normative description: the frames the client sends and when, its timers (one
request outstanding; ``message_timeout``, a backoff doubling per consecutive error up to
``max_backoff``, ``max_errors`` to abort; block requests paced by the MinimumBlockPeriod learned
from WAIT_FOR_DATA; stale answers matched by sequence number and offset and ignored), its states
with every edge (:data:`TRANSITIONS` is that table) and its defaults (:class:`ClientConfig`).
All deadlines are exposed by :meth:`HanClient.next_deadline`.

The device never activates on an UpgradeEndResponse: whatever its upgrade time, the client
waits for the signed activation command (:meth:`protocol.device.device.Device.activation_received`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from protocol.clock import UnixTime, later
from protocol.device.device import Device
from protocol.errors import ProtocolError, Reason
from protocol.han.frames import (
    EXTENSION_MANUFACTURER_CODE,
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
    unix_time,
)
from protocol.release.manifest import Manifest
from protocol.transitions import checked
from protocol.wire.limits import MAX_U8, MAX_U16, MAX_U32


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Tunables of the HAN client (defaults after the SiLabs OTA client)."""

    max_data_size: int = 63  # asked for in each block request; the server may send less
    message_timeout: float = 3.0
    retry_backoff: float = 2.0
    max_backoff: float = 30.0
    max_errors: int = 10
    query_interval: float = 300.0
    upgrade_end_requery: float = 3600.0
    max_manifest_bytes: int = 64 * 1024
    max_wait: float = 3600.0  # cap on one WAIT_FOR_DATA delay
    #: the unit this client's stack reads MinimumBlockPeriod in (SE 1.2b: seconds)
    block_period_unit: BlockPeriodUnit = BlockPeriodUnit.MILLISECONDS
    #: the manufacturer code of the ManifestBlock extension's header (SPEC §8.2)
    extension_code: int = EXTENSION_MANUFACTURER_CODE
    #: unanswered first ManifestBlockRequests of an offer after which the server is taken not
    #: to speak the extension (an UNSUP_* answer is final at once)
    extension_probe_attempts: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.max_data_size <= MAX_U8:
            raise ValueError("max_data_size must be 1..255")
        if min(self.message_timeout, self.retry_backoff, self.query_interval) <= 0:
            raise ValueError("timers must be positive")
        if self.max_errors < 1:
            raise ValueError("max_errors must be at least 1")
        if self.extension_probe_attempts < 1:
            raise ValueError("extension_probe_attempts must be at least 1")
        if not 0 <= self.extension_code < MAX_U16:
            raise ValueError("extension_code must be a manufacturer code (not 0xffff)")


class ClientState(Enum):
    """State of the client's download."""

    IDLE = "idle"
    QUERYING = "querying"
    FETCHING_MANIFEST = "fetching_manifest"
    DOWNLOADING = "downloading"
    ENDING = "ending"
    WAITING_ACTIVATION = "waiting_activation"


#: The download's edges (SPEC §8.4 draws and lists them); :meth:`HanClient._enter` takes no other.
TRANSITIONS: Final[dict[ClientState, frozenset[ClientState]]] = {
    ClientState.IDLE: frozenset({ClientState.QUERYING}),
    ClientState.QUERYING: frozenset(
        {ClientState.IDLE, ClientState.FETCHING_MANIFEST, ClientState.ENDING}
    ),
    ClientState.FETCHING_MANIFEST: frozenset(
        {ClientState.IDLE, ClientState.DOWNLOADING, ClientState.ENDING}
    ),
    ClientState.DOWNLOADING: frozenset({ClientState.IDLE, ClientState.ENDING}),
    ClientState.ENDING: frozenset({ClientState.WAITING_ACTIVATION, ClientState.IDLE}),
    ClientState.WAITING_ACTIVATION: frozenset({ClientState.IDLE}),
}


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ImageOffered:
    """The server offered an image (QueryNextImageResponse)."""

    file_version: int
    image_size: int


@dataclass(frozen=True, slots=True)
class ManifestAccepted:
    """The device verified the manifest; image blocks follow."""

    manifest: Manifest


@dataclass(frozen=True, slots=True)
class ManifestRejected:
    """The device refused the manifest; nothing was stored."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class ImageReceived:
    """The whole image is stored and its digest matched: the device holds it."""

    sha256: bytes


@dataclass(frozen=True, slots=True)
class DownloadAborted:
    """The download stopped before the image was held."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class UpgradeEndAcknowledged:
    """The server answered UpgradeEnd; ``upgrade_time`` 0xFFFFFFFF means wait for activation."""

    upgrade_time: int


ClientEvent = (
    ImageOffered
    | ManifestAccepted
    | ManifestRejected
    | ImageReceived
    | DownloadAborted
    | UpgradeEndAcknowledged
)


class ClientStats:
    """Counters a simulator or a test reads (mutable, owned by the client)."""

    __slots__ = ("block_hash_errors", "requests", "stale", "timeouts", "tolerated", "waits")

    def __init__(self) -> None:
        self.requests = 0
        self.timeouts = 0
        self.waits = 0
        self.stale = 0
        self.block_hash_errors = 0
        #: frames accepted with trailing bytes or reserved bits (ZCL forward compatibility)
        self.tolerated = Tolerated()


class JitterSource(Protocol):
    """Where the ImageNotify query-jitter draw comes from (``random.Random`` fits)."""

    def randint(self, a: int, b: int) -> int:
        """A uniform integer in ``a..b`` inclusive."""
        ...


class _XorShift:
    """Default :class:`JitterSource`: xorshift64 seeded by the device's EUI-64 (no I/O)."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = (seed or 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF

    def randint(self, a: int, b: int) -> int:
        x = self._state
        x ^= (x << 13) & 0xFFFF_FFFF_FFFF_FFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFF_FFFF_FFFF_FFFF
        self._state = x
        return a + x % (b - a + 1)


_UNSUPPORTED = frozenset(
    {
        ZclStatus.UNSUP_CLUSTER_COMMAND,  # ZCL8's UNSUP_COMMAND
        ZclStatus.UNSUP_GENERAL_COMMAND,
        ZclStatus.UNSUP_MANUF_CLUSTER_COMMAND,
    }
)


class _Timer(Enum):
    SEND = "send"  # send the state's next request
    TIMEOUT = "timeout"  # the outstanding request went unanswered


class HanClient:
    """The OTA Upgrade client of one device. Feed it frames and timer calls; send its output."""

    def __init__(
        self,
        device: Device,
        config: ClientConfig | None = None,
        *,
        rng: JitterSource | None = None,
    ) -> None:
        """``rng`` draws the ImageNotify query jitter (default: seeded by the device id)."""
        self.device = device
        self.config = config or ClientConfig()
        self.rng: JitterSource = rng or _XorShift(int(device.identity.device_id, 16))
        self._state = ClientState.IDLE  # the initial state, not an edge
        self.stats = ClientStats()
        self.last_failure: Reason | None = None
        self._events: list[ClientEvent] = []
        self._seq = 0
        self._timer: _Timer | None = None
        self._timer_at = UnixTime(0.0)
        self._outstanding: int | None = None  # ZCL sequence number awaited
        self._requested_offset = 0
        self._requested_size = 0
        self._errors = 0
        self._period_ms = 0
        self._manifest_probes = 0  # unanswered first manifest requests of this offer
        self._last_block_request_at: UnixTime | None = None
        self._offer: QueryNextImageResponse | None = None
        self._manifest = bytearray()
        self._manifest_size: int | None = None
        self._node_address = int(device.identity.device_id, 16)

    # ------------------------------------------------------------------ API

    @property
    def state(self) -> ClientState:
        """The current :class:`ClientState`."""
        return self._state

    @property
    def minimum_block_period_ms(self) -> int:
        """The MinimumBlockPeriod the client currently honours."""
        return self._period_ms

    def events(self) -> list[ClientEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def start(self, now: UnixTime) -> list[bytes]:
        """Query the server now (network up); afterwards every ``query_interval``."""
        self._sync(now)
        if self.state is not ClientState.IDLE:
            return []
        self._arm(_Timer.SEND, now)
        return self._fire_due(now)

    def next_deadline(self) -> UnixTime | None:
        """When :meth:`handle_timer` must next be called, or ``None``."""
        return self._timer_at if self._timer is not None else None

    def handle_timer(self, now: UnixTime) -> list[bytes]:
        """Send what is due: a retry after a timeout, a paced request, a periodic query."""
        self._sync(now)
        if self._timer is _Timer.TIMEOUT and now >= self._timer_at:
            self._timer = None
            self._outstanding = None
            self.stats.timeouts += 1
            out = self._error(now, Reason.TIMED_OUT)
            return out + self._fire_due(now)
        return self._fire_due(now)

    def frame_received(self, data: bytes, now: UnixTime) -> list[bytes]:
        """Handle one frame from the server; return the frames to send.

        An ImageNotify given here is filtered as a broadcast one is (SPEC §8.4); one the shell
        knows was addressed to this device alone goes to :meth:`unicast_received`."""
        return self._received(data, now, unicast=False)

    def unicast_received(self, data: bytes, now: UnixTime) -> list[bytes]:
        """Handle one frame APS-addressed to this device alone: as :meth:`frame_received`, but a
        unicast ImageNotify is always answered with a query, whatever its fields (ZCL)."""
        return self._received(data, now, unicast=True)

    def _received(self, data: bytes, now: UnixTime, *, unicast: bool) -> list[bytes]:
        self._sync(now)
        try:
            frame = decode_frame(
                data, extension_code=self.config.extension_code, tolerated=self.stats.tolerated
            )
        except ProtocolError:
            return []  # noise or a frame we do not speak: the timeout covers a lost answer
        if isinstance(frame, ImageNotify):
            return self._notified(frame, now, unicast=unicast)
        if isinstance(frame, UpgradeEndResponse):
            return self._upgrade_end_answered(frame, now)
        if frame.seq != self._outstanding or self._timer is not _Timer.TIMEOUT:
            self.stats.stale += 1
            return []
        out: list[bytes] = []
        if isinstance(frame, (QueryNextImageResponse, QueryNextImageRefused)):
            out = self._query_answered(frame, now)
        elif isinstance(frame, (ManifestBlockResponse, ManifestBlockWait, ManifestBlockAbort)):
            out = self._manifest_answered(frame, now)
        elif isinstance(frame, (ImageBlockResponse, ImageBlockWait, ImageBlockAbort)):
            out = self._block_answered(frame, now)
        elif isinstance(frame, DefaultResponse) and frame.status is not ZclStatus.SUCCESS:
            self._clear_outstanding()
            out = self._refused(frame, now)
        else:
            self.stats.stale += 1
            return []
        return out + self._fire_due(now)

    # ------------------------------------------------------------------ helpers

    def _refused(self, frame: DefaultResponse, now: UnixTime) -> list[bytes]:
        """A Default Response with an error status answered the outstanding request.

        Final where the status says the server cannot do it: an UNSUP_* answer to the query or
        to a block request (the manifest extension or the image), NO_IMAGE_AVAILABLE to a block
        request (how SiLabs' server refuses one). Anything else is an error, retried."""
        unsupported = frame.status in _UNSUPPORTED
        if self.state is ClientState.QUERYING and unsupported:
            self._answered()
            self._go_idle(now)
            return []
        if self.state is ClientState.FETCHING_MANIFEST and unsupported:
            return self._abort(now, Reason.UNKNOWN_TYPE, ZclStatus.ABORT)
        if self.state is ClientState.DOWNLOADING and (
            unsupported or frame.status is ZclStatus.NO_IMAGE_AVAILABLE
        ):
            return self._abort(now, Reason.CANCELLED, None)
        return self._error(now, Reason.MALFORMED)

    def _sync(self, now: UnixTime) -> None:
        """Leave WAITING_ACTIVATION once the device has activated or dropped the image."""
        if (
            self.state in (ClientState.ENDING, ClientState.WAITING_ACTIVATION)
            and not self.device.holds_image
        ):
            self._go_idle(now)

    def _enter(self, state: ClientState) -> None:
        """Change state along an edge of :data:`TRANSITIONS` (``IllegalTransitionError`` if not)."""
        self._state = checked(TRANSITIONS, "HanClient", self._state, state)

    def _go_idle(self, now: UnixTime) -> None:
        self._enter(ClientState.IDLE)
        self._offer = None
        self._outstanding = None
        self._errors = 0
        self._arm(_Timer.SEND, later(now, self.config.query_interval))

    def _arm(self, kind: _Timer, at: UnixTime) -> None:
        self._timer = kind
        self._timer_at = at

    def _arm_send(self, at: UnixTime) -> None:
        """Schedule the next request at ``at``, but block requests not before the period."""
        if (
            self.state in (ClientState.FETCHING_MANIFEST, ClientState.DOWNLOADING)
            and self._last_block_request_at is not None
        ):
            at = max(at, later(self._last_block_request_at, self._period_ms / 1000.0))
        self._arm(_Timer.SEND, at)

    def _clear_outstanding(self) -> None:
        self._outstanding = None
        self._timer = None

    def _fire_due(self, now: UnixTime) -> list[bytes]:
        if self._timer is _Timer.SEND and now >= self._timer_at:
            self._timer = None
            return [self._send(now)]
        return []

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_U8
        return self._seq

    def _send(self, now: UnixTime) -> bytes:
        """Build and account for the current state's request; arm its timeout."""
        ident = self.device.identity
        seq = self._next_seq()
        frame: QueryNextImageRequest | ManifestBlockRequest | ImageBlockRequest | UpgradeEndRequest
        if self.state in (ClientState.IDLE, ClientState.QUERYING):
            if self.state is ClientState.IDLE:
                self._enter(ClientState.QUERYING)
            frame = QueryNextImageRequest(
                seq,
                ident.vendor,
                ident.image_type,
                self.device.running.fw_version,
                ident.hw_version,
            )
        else:
            offer = self._offer
            assert offer is not None  # every later state has an offer
            if self.state is ClientState.FETCHING_MANIFEST:
                self._requested_offset = len(self._manifest)
                self._requested_size = self.config.max_data_size
                self._last_block_request_at = now
                frame = ManifestBlockRequest(
                    seq,
                    offer.manufacturer_code,
                    offer.image_type,
                    offer.file_version,
                    self._requested_offset,
                    self._requested_size,
                    self.config.block_period_unit.to_wire(self._period_ms),
                    self.config.extension_code,
                )
            elif self.state is ClientState.DOWNLOADING:
                self._requested_offset = self.device.next_offset
                self._requested_size = self.config.max_data_size
                self._last_block_request_at = now
                frame = ImageBlockRequest(
                    seq,
                    offer.manufacturer_code,
                    offer.image_type,
                    offer.file_version,
                    self._requested_offset,
                    self._requested_size,
                    self._node_address,
                    self.config.block_period_unit.to_wire(self._period_ms),
                )
            else:  # ENDING, WAITING_ACTIVATION
                frame = UpgradeEndRequest(
                    seq,
                    ZclStatus.SUCCESS,
                    offer.manufacturer_code,
                    offer.image_type,
                    offer.file_version,
                )
        self._outstanding = seq
        self._arm(_Timer.TIMEOUT, later(now, self.config.message_timeout))
        self.stats.requests += 1
        return frame.encode()

    def _error(self, now: UnixTime, reason: Reason) -> list[bytes]:
        """One more consecutive error: retry after backoff, or give up after ``max_errors``
        (``extension_probe_attempts`` while no manifest byte of the offer has come)."""
        self._errors += 1
        if (
            self.state is ClientState.FETCHING_MANIFEST
            and self._manifest_size is None
            and reason is Reason.TIMED_OUT
        ):
            self._manifest_probes += 1
            if self._manifest_probes >= self.config.extension_probe_attempts:
                return self._abort(now, Reason.UNKNOWN_TYPE, ZclStatus.ABORT)
        if self._errors >= self.config.max_errors:
            if self.state is ClientState.QUERYING:
                self._go_idle(now)
                return []
            if self.state in (ClientState.ENDING, ClientState.WAITING_ACTIVATION):
                # the image is held: keep it and wait for the activation command regardless
                if self.state is ClientState.ENDING:
                    self._enter(ClientState.WAITING_ACTIVATION)
                self._errors = 0
                self._arm(_Timer.SEND, later(now, self.config.upgrade_end_requery))
                return []
            return self._abort(now, reason, ZclStatus.ABORT)
        if self.state is ClientState.WAITING_ACTIVATION:
            self._arm(_Timer.SEND, later(now, self.config.upgrade_end_requery))
            return []
        backoff = min(
            self.config.retry_backoff * 2.0 ** (self._errors - 1), self.config.max_backoff
        )
        self._arm_send(later(now, backoff))
        return []

    def _abort(self, now: UnixTime, reason: Reason, status: ZclStatus | None) -> list[bytes]:
        """Stop the download; tell the server (UpgradeEnd with ``status``) unless ``None``."""
        out: list[bytes] = []
        offer = self._offer
        if status is not None and offer is not None:
            end = UpgradeEndRequest(
                self._next_seq(),
                status,
                offer.manufacturer_code,
                offer.image_type,
                offer.file_version,
            )
            out.append(end.encode())
            self.stats.requests += 1
        self.last_failure = reason
        self._events.append(DownloadAborted(reason))
        self._go_idle(now)
        return out

    def _answered(self) -> None:
        """A valid answer arrived: the consecutive-error count restarts."""
        self._clear_outstanding()
        self._errors = 0

    def _waited(self, frame: ImageBlockWait | ManifestBlockWait, now: UnixTime) -> None:
        self._answered()
        self.stats.waits += 1
        self._period_ms = self.config.block_period_unit.from_wire(frame.minimum_block_period)
        delay = unix_time(frame.request_time) - unix_time(frame.current_time)
        self._arm_send(later(now, min(max(delay, 0.0), self.config.max_wait)))

    # ------------------------------------------------------------------ handlers

    def _notified(self, frame: ImageNotify, now: UnixTime, *, unicast: bool) -> list[bytes]:
        if self.state is not ClientState.IDLE:
            return []
        if unicast:  # ZCL: a unicast notify is answered whatever its fields (a reinstall...)
            self._arm(_Timer.SEND, now)
            return self._fire_due(now)
        ident = self.device.identity
        if frame.manufacturer_code is not None and frame.manufacturer_code != ident.vendor:
            return []
        if frame.image_type is not None and frame.image_type != ident.image_type:
            return []
        if frame.file_version == self.device.running.fw_version:
            return []
        if self.rng.randint(1, 100) > frame.query_jitter:
            return []
        self._arm(_Timer.SEND, now)
        return self._fire_due(now)

    def _query_answered(
        self, frame: QueryNextImageResponse | QueryNextImageRefused, now: UnixTime
    ) -> list[bytes]:
        if self.state is not ClientState.QUERYING:
            return []
        self._answered()
        ident = self.device.identity
        if (
            isinstance(frame, QueryNextImageRefused)
            or (frame.manufacturer_code, frame.image_type) != (ident.vendor, ident.image_type)
            or frame.file_version == self.device.running.fw_version
            or frame.image_size == 0
        ):
            self._go_idle(now)
            return []
        self._offer = frame
        self._events.append(ImageOffered(frame.file_version, frame.image_size))
        held = self.device.pending_manifest
        if self.device.holds_image and held is not None and self._matches(held):
            self._enter(ClientState.ENDING)  # already held: just report it
            self._arm(_Timer.SEND, now)
            return []
        self._enter(ClientState.FETCHING_MANIFEST)
        self._manifest = bytearray()
        self._manifest_size = None
        self._manifest_probes = 0
        self._arm_send(now)
        return []

    def _matches(self, manifest: Manifest) -> bool:
        offer = self._offer
        return offer is not None and (
            manifest.vendor,
            manifest.image_type,
            manifest.fw_version,
            manifest.size,
        ) == (offer.manufacturer_code, offer.image_type, offer.file_version, offer.image_size)

    def _manifest_answered(
        self, frame: ManifestBlockResponse | ManifestBlockWait | ManifestBlockAbort, now: UnixTime
    ) -> list[bytes]:
        if self.state is not ClientState.FETCHING_MANIFEST:
            return []
        offer = self._offer
        assert offer is not None
        if isinstance(frame, ManifestBlockWait):
            self._waited(frame, now)
            return []
        if isinstance(frame, ManifestBlockAbort):
            self._clear_outstanding()
            return self._abort(now, Reason.CANCELLED, None)
        if (
            (frame.manufacturer_code, frame.image_type, frame.file_version)
            != (offer.manufacturer_code, offer.image_type, offer.file_version)
            or frame.offset != self._requested_offset
            or not 1 <= len(frame.data) <= self._requested_size
            or frame.offset + len(frame.data) > frame.manifest_size
            or (self._manifest_size is not None and frame.manifest_size != self._manifest_size)
        ):
            self._clear_outstanding()
            return self._error(now, Reason.MALFORMED)
        if frame.manifest_size > self.config.max_manifest_bytes:
            self._clear_outstanding()
            self._events.append(ManifestRejected(Reason.TOO_LARGE))
            return self._abort(now, Reason.TOO_LARGE, ZclStatus.INVALID_IMAGE)
        self._answered()
        self._manifest_size = frame.manifest_size
        self._manifest += frame.data
        if len(self._manifest) < frame.manifest_size:
            self._arm_send(now)
            return []
        return self._manifest_complete(now)

    def _manifest_complete(self, now: UnixTime) -> list[bytes]:
        signed = bytes(self._manifest)
        try:
            manifest = self.device.check_manifest(signed, now)
            if not self._matches(manifest):
                raise ProtocolError(
                    Reason.HEADER_MISMATCH, "manifest disagrees with QueryNextImageResponse"
                )
            self.device.manifest_received(signed, now)
        except ProtocolError as exc:
            self._events.append(ManifestRejected(exc.reason))
            return self._abort(now, exc.reason, ZclStatus.INVALID_IMAGE)
        self._events.append(ManifestAccepted(manifest))
        if self.device.holds_image:
            return self._image_held(now)
        self._enter(ClientState.DOWNLOADING)
        self._arm_send(now)
        return []

    def _block_answered(
        self, frame: ImageBlockResponse | ImageBlockWait | ImageBlockAbort, now: UnixTime
    ) -> list[bytes]:
        if self.state is not ClientState.DOWNLOADING:
            return []
        offer = self._offer
        assert offer is not None
        if isinstance(frame, ImageBlockWait):
            self._waited(frame, now)
            return []
        if isinstance(frame, ImageBlockAbort):
            self._clear_outstanding()
            return self._abort(now, Reason.CANCELLED, None)
        if (
            (frame.manufacturer_code, frame.image_type, frame.file_version)
            != (offer.manufacturer_code, offer.image_type, offer.file_version)
            or frame.file_offset != self._requested_offset
            or not 1 <= len(frame.data) <= self._requested_size
            or frame.file_offset + len(frame.data) > offer.image_size
        ):
            self._clear_outstanding()
            return self._error(now, Reason.MALFORMED)
        try:
            self.device.image_data_received(frame.file_offset, frame.data)
        except ProtocolError as exc:
            self._clear_outstanding()
            if exc.reason is Reason.BLOCK_HASH:
                self.stats.block_hash_errors += 1
                return self._error(now, exc.reason)  # re-fetch from the block's start
            return self._abort(now, exc.reason, ZclStatus.INVALID_IMAGE)
        self._answered()
        if self.device.holds_image:
            return self._image_held(now)
        self._arm_send(now)
        return []

    def _image_held(self, now: UnixTime) -> list[bytes]:
        manifest = self.device.pending_manifest
        assert manifest is not None
        self._events.append(ImageReceived(manifest.sha256))
        self._enter(ClientState.ENDING)
        self._arm(_Timer.SEND, now)
        return []

    def _upgrade_end_answered(self, frame: UpgradeEndResponse, now: UnixTime) -> list[bytes]:
        offer = self._offer
        if self.state not in (ClientState.ENDING, ClientState.WAITING_ACTIVATION) or (
            offer is None
            or (frame.manufacturer_code, frame.image_type, frame.file_version)
            != (offer.manufacturer_code, offer.image_type, offer.file_version)
        ):
            self.stats.stale += 1
            return []
        if self.state is ClientState.ENDING and frame.seq != self._outstanding:
            self.stats.stale += 1
            return []
        self._answered()
        self._events.append(UpgradeEndAcknowledged(frame.upgrade_time & MAX_U32))
        # Never activate on this unsigned frame, whatever its upgrade time: wait for the signed
        # activation command, re-announcing the held image every upgrade_end_requery seconds.
        if self.state is ClientState.ENDING:
            self._enter(ClientState.WAITING_ACTIVATION)
        self._arm(_Timer.SEND, later(now, self.config.upgrade_end_requery))
        return []
