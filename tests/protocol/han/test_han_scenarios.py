"""The HAN server and clients run against each other over a simulated link in virtual time
(seeded latency and loss): full delivery to Alt HAN bridges with MinimumBlockPeriod and
WAIT_FOR_DATA back-pressure (busy server, cut-through), lossy links, device-side refusals,
and the hand-over to activation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Any

import pytest
from hansim import (
    B1_ID,
    B2_ID,
    B3_ID,
    B4_ID,
    EPS,
    IMAGE_TYPE,
    NEW_VERSION,
    OLD_VERSION,
    T0,
    HanSim,
    activation,
    held,
    node,
    release,
    serve,
)

from protocol.device.activation import (
    ActivationAlert,
    ActivationResponse,
    Outcome,
)
from protocol.device.activation import VersionReport as VersionReportMsg
from protocol.device.device import (
    AlertRaised,
    JoinMode,
    SlotState,
)
from protocol.errors import Reason
from protocol.han.client import (
    ClientState,
    DownloadAborted,
    ImageOffered,
    ImageReceived,
    ManifestAccepted,
    ManifestRejected,
    UpgradeEndAcknowledged,
)
from protocol.han.frames import (
    UPGRADE_TIME_WAIT,
    ImageBlockRequest,
    ImageBlockResponse,
    ManifestBlockRequest,
    QueryNextImageRefused,
    UpgradeEndRequest,
    UpgradeEndResponse,
    ZclStatus,
)
from protocol.han.server import (
    HanServer,
    ImageDelivered,
    ProgressiveImage,
    ServerConfig,
    SessionFailed,
    SessionStarted,
    SessionState,
)
from protocol.release.manifest import DeviceType
from protocol.release.trust import TrustStore

# --------------------------------------------------------------------------- full exchanges


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
    forged = dataclasses.replace(r.manifest, fw_version=0x0999)
    server = HanServer(ServerConfig())
    # the CH announces version 0x0999 but serves the manifest of 0x0200
    server.add_image(r.signed, forged, ProgressiveImage(len(r.image), r.image))
    b2 = node(B2_ID, DeviceType.B2)
    sim = HanSim(server, [b2])
    sim.start()
    sim.run(T0 + 600, lambda: b2.client.state is ClientState.IDLE and bool(sim.log))
    assert ManifestRejected(Reason.HEADER_MISMATCH) in sim.client_events(B2_ID)
    assert b2.store.writes == 0
