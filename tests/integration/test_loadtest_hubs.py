"""Virtual Communications Hubs (loadtest/) against a real Mosquitto.

The hubs are driven by a tiny in-test publisher built on :class:`protocol.wan.sender.Sender` (not
otad), so these tests pin the hub's WAN behaviour on its own: announcement and last will,
verified reception with the hash the hub computed, resume after a crash, rejection of an
untrusted signer, and the window measure the otad tests rely on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from loadtest.broker import MosquittoBroker
from loadtest.hub import SNAPSHOT_AFTER_BLOCKS, HubStats, make_identity
from loadtest.hubstate import HubStore
from loadtest.runner import HubFleet, load_trust
from mqttio import MqttClient, MqttSettings, create_client
from otad.keyfiles import load_private_key, write_keypair
from protocol.errors import Reason
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import SignedImage, build
from protocol.release.trust import TrustStore, verify_manifest
from protocol.release.zigbee_ota import wrap
from protocol.wan.receiver import Receiver
from protocol.wan.sender import (
    SendBlock,
    SendCancel,
    Sender,
    SenderState,
    SendOffer,
    TransferCompleted,
    TransferFailed,
)
from protocol.wire import topics
from protocol.wire.messages import (
    Block,
    Cancel,
    HubAnnounced,
    HubWentOffline,
    Limits,
    Offer,
    decode,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

WAIT = 20.0


# ----------------------------------------------------------------------------- fixtures


def make_image(
    key: ec.EllipticCurvePrivateKey, size: int, *, block_size: int = 256, sequence: int = 7
) -> tuple[SignedImage, Manifest]:
    """A signed CH image of about ``size`` bytes of random firmware."""
    now = int(time.time())
    ota = wrap(
        os.urandom(size),
        manufacturer_code=0x1234,
        image_type=1,
        file_version=0x01020304,
        hw_min=0,
        hw_max=0xFFFF,
    )
    signed = build(
        ota,
        key,
        device_type=DeviceType.CH,
        sequence=sequence,
        block_size=block_size,
        created=now - 60,
        expires=now + 3600,
    )
    manifest = verify_manifest(signed.signed_manifest, TrustStore([key.public_key()]), now=now)
    return signed, manifest


@pytest.fixture
def trust_dir(tmp_path: Path) -> Path:
    """A trust directory with one public key; its private key is ``trust_dir/../signing.pem``."""
    files = write_keypair(tmp_path / "signing.pem")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "signing.pem").write_bytes(files.public_path.read_bytes())
    return trust


@pytest.fixture
def signing_key(trust_dir: Path) -> ec.EllipticCurvePrivateKey:
    return load_private_key(trust_dir.parent / "signing.pem")


async def connect(broker: MosquittoBroker, client_id: str) -> MqttClient:
    client = create_client(
        "gmqtt", MqttSettings(client_id=client_id, host=broker.host, port=broker.port)
    )
    await client.connect(fail_fast=True)
    return client


@asynccontextmanager
async def fleet_of(
    broker: MosquittoBroker, state_dir: Path, trust: Path | None, **kwargs: object
) -> AsyncIterator[HubFleet]:
    fleet = HubFleet(
        broker=(broker.host, broker.port),
        state_dir=state_dir,
        trust_dir=trust,
        **kwargs,  # type: ignore[arg-type]
    )
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.close()


class Publisher:
    """otad's transfer loop in miniature: one :class:`Sender`, one MQTT client, one hub."""

    def __init__(
        self,
        client: MqttClient,
        guid: str,
        signed: SignedImage,
        manifest: Manifest,
        limits: Limits,
    ) -> None:
        self.client = client
        self.guid = guid
        self.signed = signed
        self.manifest = manifest
        self.loop = asyncio.get_running_loop()
        self.sender = Sender(manifest, limits, now=self.loop.time())
        self.blocks_published = 0
        self.events: list[object] = []
        self._wake = asyncio.Event()
        client.set_message_handler(self._on_message)

    async def start(self) -> None:
        await self.client.subscribe(topics.up(self.guid), 1)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic != topics.up(self.guid):
            return
        self.sender.message_received(decode(payload), self.loop.time())
        self.events.extend(self.sender.events())
        self._wake.set()

    def _send(self) -> None:
        down = topics.down(self.guid)
        for action in self.sender.next_actions(self.loop.time(), 10_000):
            if isinstance(action, SendOffer):
                offer = Offer(image=action.image, manifest=self.signed.signed_manifest)
                self.client.publish(down, offer.encode(), 1)
            elif isinstance(action, SendBlock):
                start = action.index * self.manifest.block_size
                data = self.signed.image[start : start + self.manifest.block_size]
                block = Block(self.manifest.sha256, action.index, data, action.ack_now)
                self.client.publish(down, block.encode(), 0)
                self.blocks_published += 1
            elif isinstance(action, SendCancel):
                self.client.publish(down, Cancel(action.image, action.reason).encode(), 1)

    async def run(self, *, until_acked: int | None = None, limit_s: float = WAIT) -> None:
        """Drive the transfer until it ends (or ``until_acked`` blocks are acknowledged)."""
        async with asyncio.timeout(limit_s):
            while self.sender.state not in (SenderState.COMPLETE, SenderState.FAILED):
                if until_acked is not None and self.sender.blocks_acked >= until_acked:
                    return
                self._send()
                deadline = self.sender.next_deadline()
                self._wake.clear()
                delay = None if deadline is None else max(0.0, deadline - self.loop.time())
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    self.sender.handle_timer(self.loop.time())
                    self.events.extend(self.sender.events())


async def poll_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - the condition is fed by MQTT callbacks
            await asyncio.sleep(0.02)


async def hub_stats(fleet: HubFleet, guid: str) -> HubStats:
    return (await fleet.stats())[guid]


async def wait_until_held(fleet: HubFleet, guid: str, image_hex: str) -> HubStats:
    async with asyncio.timeout(WAIT):
        while True:
            stats = await hub_stats(fleet, guid)
            if image_hex in stats.held:
                return stats
            await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- tests


def _seed_with_bridges() -> int:
    """A seed whose hub 0 has Alt HAN bridges (about 1 seed in 20)."""
    for seed in range(1000):
        if any(d.device_type.startswith("B") for d in make_identity(seed, 0).han):
            return seed
    raise AssertionError("no seed gives hub 0 bridges")


async def test_hub_announces_itself_retained_with_its_han_inventory(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    seed = _seed_with_bridges()
    async with fleet_of(broker, tmp_path / "hubs", None, count=3, procs=0, seed=seed) as fleet:
        identity = fleet.identities[0]
        assert identity.guid == fleet.guids[0]
        assert len(set(fleet.guids)) == 3
        assert all(len(g) == 16 and g == g.upper() for g in fleet.guids)

        late = await connect(broker, "late-subscriber")
        got: asyncio.Future[tuple[bytes, bool]] = asyncio.get_running_loop().create_future()

        def on_message(topic: str, payload: bytes, retain: bool) -> None:
            if topic == topics.state(identity.guid) and not got.done():
                got.set_result((payload, retain))

        late.set_message_handler(on_message)
        try:
            await late.subscribe(topics.state(identity.guid), 1)
            payload, retain = await asyncio.wait_for(got, WAIT)
        finally:
            await late.disconnect()

    assert retain, "the announcement must be retained"
    message = decode(payload)
    assert isinstance(message, HubAnnounced)
    assert message.guid == identity.guid
    assert message.han == identity.han
    kinds = [d.device_type for d in message.han]
    assert kinds[:3] == ["ESME", "GSME", "PPMID"]
    bridges = [d for d in message.han if d.device_type in {"B1", "B2", "B3", "B4"}]
    assert 2 <= len(bridges) <= 3
    assert {d.join_mode for d in bridges} <= {"CAD", "PPMID"}
    assert message.segment.startswith("cell-")
    assert message.limits == identity.limits


async def test_last_will_fires_when_the_hub_process_is_killed(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    async with fleet_of(broker, tmp_path / "hubs", None, count=2, procs=1) as fleet:
        watcher = await connect(broker, "will-watcher")
        seen: dict[str, list[type]] = {guid: [] for guid in fleet.guids}
        offline = asyncio.Event()

        def on_message(topic: str, payload: bytes, retain: bool) -> None:
            guid, _ = topics.parse_ch_topic(topic)
            seen[guid].append(type(decode(payload)))
            if all(HubWentOffline in kinds for kinds in seen.values()):
                offline.set()

        watcher.set_message_handler(on_message)
        try:
            await watcher.subscribe(topics.STATE_WILDCARD, 1)
            await poll_until(
                lambda: all(
                    any(issubclass(k, HubAnnounced) for k in kinds) for kinds in seen.values()
                )
            )
            await fleet.kill_worker(0)  # SIGKILL: no DISCONNECT ever sent
            await asyncio.wait_for(offline.wait(), WAIT)
        finally:
            await watcher.disconnect()

        # and it is retained: a subscriber arriving now sees the hub offline
        late = await connect(broker, "late-will-reader")
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def first(topic: str, payload: bytes, retain: bool) -> None:
            if not got.done():
                got.set_result(payload)

        late.set_message_handler(first)
        try:
            await late.subscribe(topics.state(fleet.guids[1]), 1)
            message = decode(await asyncio.wait_for(got, WAIT))
        finally:
            await late.disconnect()
        assert message == HubWentOffline(guid=fleet.guids[1])


async def test_hub_receives_verifies_and_reports_the_hash_it_computed(
    broker: MosquittoBroker,
    tmp_path: Path,
    trust_dir: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    signed, manifest = make_image(signing_key, 40_000, block_size=512)
    async with fleet_of(broker, tmp_path / "hubs", trust_dir, count=1, procs=1) as fleet:
        guid = fleet.guids[0]
        client = await connect(broker, "tiny-otad")
        try:
            publisher = Publisher(client, guid, signed, manifest, fleet.identities[0].limits)
            await publisher.start()
            await publisher.run()
        finally:
            await client.disconnect()
        stats = await wait_until_held(fleet, guid, manifest.sha256.hex())
        state_dir = tmp_path / "hubs" / "hubs" / guid

    assert publisher.sender.state is SenderState.COMPLETE, publisher.events
    completed = [e for e in publisher.events if isinstance(e, TransferCompleted)]
    assert completed == [TransferCompleted(manifest.sha256, hashlib.sha256(signed.image).digest())]
    assert stats.held == {manifest.sha256.hex(): hashlib.sha256(signed.image).hexdigest()}
    assert stats.stored_blocks == manifest.block_count
    assert stats.blocks >= manifest.block_count
    assert stats.block_bytes >= manifest.size
    assert stats.rejected == {}
    assert stats.max_outstanding <= fleet.identities[0].limits.window
    # the hub really stored the image: the file on disk is the image
    stored = (state_dir / f"{manifest.sha256.hex()}.img").read_bytes()
    assert stored == signed.image


async def test_hub_restarted_mid_transfer_resumes_from_its_saved_state(
    broker: MosquittoBroker,
    tmp_path: Path,
    trust_dir: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    signed, manifest = make_image(signing_key, 200_000, block_size=1024)
    total = manifest.block_count
    # A long flush interval: at the crash the saved snapshot is the one written when the offer
    # was accepted (no block held). Everything acknowledged since must be recovered from the
    # image file, not fetched again.
    async with fleet_of(
        broker, tmp_path / "hubs", trust_dir, count=1, procs=0, flush_interval=3600.0
    ) as fleet:
        guid = fleet.guids[0]
        client = await connect(broker, "tiny-otad")
        try:
            publisher = Publisher(client, guid, signed, manifest, fleet.identities[0].limits)
            await publisher.start()
            await publisher.run(until_acked=total // 2)
            acked_before = publisher.sender.blocks_acked
            await fleet.stop_hubs([guid], crash=True)
            await fleet.start_hubs([guid])
            await publisher.run()
        finally:
            await client.disconnect()
        stats = await wait_until_held(fleet, guid, manifest.sha256.hex())

    assert publisher.sender.state is SenderState.COMPLETE, publisher.events
    assert acked_before >= total // 2
    assert stats.restored
    assert stats.connects == 2
    assert stats.replayed_blocks >= acked_before
    assert stats.held[manifest.sha256.hex()] == hashlib.sha256(signed.image).hexdigest()
    # blocks received over both lives: the image once, plus at most what was in flight at the
    # crash and a few repairs -- never the acknowledged half again
    window = fleet.identities[0].limits.window
    assert stats.blocks <= total + 2 * window, (stats.blocks, total)


def saved_blocks(state_dir: Path, guid: str, manifest: Manifest, trust: TrustStore) -> int:
    """Blocks of ``manifest``'s image the hub's snapshot on disk says it holds (0: none saved)."""
    snapshot = HubStore(state_dir, guid).load_snapshot()
    if snapshot is None:
        return 0
    receiver = Receiver.restore(
        snapshot,
        make_identity(0, 0).limits,
        lambda signed, at: verify_manifest(signed, trust, now=at),
    )
    return receiver.blocks_held(manifest.sha256)


async def test_periodic_snapshots_wait_for_enough_blocks_and_a_crash_replays_the_rest(
    broker: MosquittoBroker,
    tmp_path: Path,
    trust_dir: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A periodic flush saves a hub only once SNAPSHOT_AFTER_BLOCKS blocks arrived since its
    last save; what a crash finds unsaved is replayed from the image file, never fetched again."""
    signed, manifest = make_image(signing_key, (SNAPSHOT_AFTER_BLOCKS + 300) * 256, block_size=256)
    total = manifest.block_count
    trust = load_trust(trust_dir)
    state = tmp_path / "hubs"
    flush = 0.2
    async with fleet_of(broker, state, trust_dir, count=1, procs=0, flush_interval=flush) as fleet:
        guid = fleet.guids[0]
        client = await connect(broker, "tiny-otad")
        try:
            publisher = Publisher(client, guid, signed, manifest, fleet.identities[0].limits)
            await publisher.start()
            below = SNAPSHOT_AFTER_BLOCKS // 2
            await publisher.run(until_acked=below)
            await asyncio.sleep(3 * flush)  # flushes came and went
            assert saved_blocks(state, guid, manifest, trust) == 0  # the Offer's save only
            await publisher.run(until_acked=SNAPSHOT_AFTER_BLOCKS + 100)  # past the threshold
            await poll_until(
                lambda: saved_blocks(state, guid, manifest, trust) >= SNAPSHOT_AFTER_BLOCKS
            )
            await publisher.run(until_acked=SNAPSHOT_AFTER_BLOCKS + 200)
            acked_before = publisher.sender.blocks_acked
            saved = saved_blocks(state, guid, manifest, trust)
            assert saved < acked_before  # the snapshot lags what was acknowledged
            await fleet.stop_hubs([guid], crash=True)
            await fleet.start_hubs([guid])
            await publisher.run()
        finally:
            await client.disconnect()
        stats = await wait_until_held(fleet, guid, manifest.sha256.hex())
    assert publisher.sender.state is SenderState.COMPLETE, publisher.events
    assert stats.replayed_blocks >= acked_before - saved
    assert stats.held[manifest.sha256.hex()] == hashlib.sha256(signed.image).hexdigest()
    window = fleet.identities[0].limits.window
    assert stats.blocks <= total + 2 * window, (stats.blocks, total)


async def test_hub_restarted_from_disk_alone_keeps_its_blocks(
    broker: MosquittoBroker,
    tmp_path: Path,
    trust_dir: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A clean stop saves the snapshot; a new fleet on the same state dir resumes from it."""
    signed, manifest = make_image(signing_key, 100_000, block_size=1024)
    total = manifest.block_count
    state = tmp_path / "hubs"
    client = await connect(broker, "tiny-otad")
    try:
        async with fleet_of(broker, state, trust_dir, count=1, procs=1) as fleet:
            guid = fleet.guids[0]
            publisher = Publisher(client, guid, signed, manifest, fleet.identities[0].limits)
            await publisher.start()
            await publisher.run(until_acked=total // 2)
            first_life = await hub_stats(fleet, guid)
        async with fleet_of(broker, state, trust_dir, count=1, procs=1) as fleet:
            publisher.sender.handle_timer(publisher.loop.time())  # nudge: the hub came back
            await publisher.run()
            second_life = await wait_until_held(fleet, guid, manifest.sha256.hex())
    finally:
        await client.disconnect()
    assert second_life.restored
    assert first_life.stored_blocks >= total // 2
    assert second_life.stored_blocks <= total - first_life.stored_blocks + 16
    assert second_life.held[manifest.sha256.hex()] == hashlib.sha256(signed.image).hexdigest()


async def test_hub_rejects_an_offer_signed_by_an_untrusted_key(
    broker: MosquittoBroker, tmp_path: Path, trust_dir: Path
) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    signed, manifest = make_image(stranger, 5_000)
    async with fleet_of(broker, tmp_path / "hubs", trust_dir, count=1, procs=1) as fleet:
        guid = fleet.guids[0]
        client = await connect(broker, "tiny-otad")
        try:
            publisher = Publisher(client, guid, signed, manifest, fleet.identities[0].limits)
            await publisher.start()
            await publisher.run()
        finally:
            await client.disconnect()
        stats = await hub_stats(fleet, guid)

    assert publisher.sender.state is SenderState.FAILED
    failures = [e for e in publisher.events if isinstance(e, TransferFailed)]
    assert [f.reason for f in failures] == [Reason.UNKNOWN_KEY_ID]
    assert stats.rejected == {"UNKNOWN_KEY_ID": 1}
    assert stats.held == {}
    assert stats.stored_blocks == 0
    assert not any((tmp_path / "hubs" / "hubs" / guid).glob("*.img"))


async def test_window_measure_sees_a_sender_that_overruns_a_two_block_window(
    broker: MosquittoBroker,
    tmp_path: Path,
    trust_dir: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Hub 0 declares window 2 and is served by the real Sender: never more than 2 blocks
    outstanding. Hub 1, same limits, gets 6 blocks in a burst: the measure must see them.
    (The hubs acknowledge late -- ack_every above the window -- so the measure counts what the
    sender put in flight, not how fast the hub acknowledges.)"""
    signed, manifest = make_image(signing_key, 30_000, block_size=512)
    two = Limits(max_block=4096, window=2, buffer=64 * 1024)
    async with fleet_of(
        broker, tmp_path / "hubs", trust_dir, count=2, procs=0,
        limits_for={0: two, 1: two}, ack_every=64, ack_delay=0.3,
    ) as fleet:  # fmt: skip
        good, greedy = fleet.guids
        client = await connect(broker, "tiny-otad")
        try:
            publisher = Publisher(client, good, signed, manifest, two)
            await publisher.start()
            await publisher.run()
            down = topics.down(greedy)
            client.publish(down, Offer(manifest.sha256, signed.signed_manifest).encode(), 1)
            await asyncio.sleep(0.2)
            for index in range(6):
                data = signed.image[index * 512 : (index + 1) * 512]
                client.publish(down, Block(manifest.sha256, index, data).encode(), 0)
            async with asyncio.timeout(WAIT):
                while (await hub_stats(fleet, greedy)).blocks < 6:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        finally:
            await client.disconnect()
        stats = await fleet.stats()

    assert publisher.sender.state is SenderState.COMPLETE
    assert stats[good].held, "the well-behaved transfer completes"
    assert 1 <= stats[good].max_outstanding <= 2
    assert stats[greedy].max_outstanding == 6
