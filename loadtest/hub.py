"""A virtual Communications Hub, WAN side: the protocol Receiver behind one MQTT connection.

A :class:`VirtualHub` is what a real CH's firmware would run for the otad hop, built from the same
sans-IO :class:`protocol.wan.receiver.Receiver` the specification describes. It

* holds the MQTT session of SPEC §1.2: its GUID as client id and username, a clean session, a
  retained :class:`HubWentOffline` last will on ``topics.state(guid)`` (and the same message
  published by itself on a clean stop), subscribes ``topics.down(guid)`` and publishes a retained
  :class:`HubAnnounced` (firmware and hardware version, supplier, network segment, declared
  :class:`Limits`, HAN inventory) every time its connection comes up (and, with
  ``HubOptions.announce_on_poll``, on every ``Poll`` too: SPEC does not ask for it, but a CH may
  do it, and otad must not loop on it);
* verifies each ``Offer``'s signed manifest against its trust store, for itself (a CH image) or
  for the matching device of its HAN inventory (an ESME, bridge... image);
* stores verified blocks through :class:`loadtest.hubstate.HubStore` (a sparse file per image),
  re-reads the *stored* image when the receiver asks (inline for small images, in a worker
  thread for large ones), re-hashes it and runs the whole-image checks of SPEC §6.4 (15-17,
  :func:`protocol.release.otaimg.check_image`: a CH never reports held an image its HAN devices
  would refuse), and reports the digest it computed or the check that failed;
* verifies every manifest of a transfer at the transfer's update-start instant (its wall clock
  when the first Offer arrived, SPEC §7.9), which the receiver keeps and persists;
* persists the receiver snapshot at once, *before* publishing the reply that reports it, whenever
  the set of transfers or a phase changes (offer accepted, held, cancelled, discarded), every
  ``flush_interval`` (10 s) once :data:`SNAPSHOT_AFTER_BLOCKS` blocks arrived since the last
  save, and on a clean stop. Blocks stored after the
  last snapshot are not lost: a restarted hub replays them from its image file through the
  receiver, which re-checks each against its signed hash (:meth:`VirtualHub._replay`), and
  re-hashes a complete one. So every block the hub acknowledged survives a crash, without a
  snapshot write per ack (measured: a save per hub per second cost ~10% of the hub process at
  1,000 hubs), and an image completing needs none either (the ``ImageHeld`` after its check does);
* writes blocks in batches (:meth:`loadtest.hubstate.HubStore.flush_blocks`), always before the
  acknowledgement that names them is published;

Many hubs share one event loop (:class:`HubGroup`). Nothing creates a task per message: the MQTT
callbacks are plain functions, receiver timers are ``loop.call_at`` handles re-armed from
``Receiver.next_deadline()``, and snapshots are written by one periodic flush per group.

Per-hub statistics (:class:`HubStats`) record what the tests check: blocks and bytes received
(duplicates included), the most blocks ever outstanding at the hub (received but not yet covered
by an acknowledgement the hub itself sent: the sender's window as the hub sees it), and the
rejections the hub sent, by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.chhan import HanSide
from loadtest.hubstate import HubStore
from loadtest.premises import PremisesConfig
from mqttio.interface import (
    MqttClient,
    MqttSettings,
    NotConnected,
    Will,
    create_client,
    wait_acknowledged,
)
from otad.targeting import refusal
from protocol.clock import Monotonic, UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import parse_sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.otaimg import check_image
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, TrustStore, verify_manifest
from protocol.wan.receiver import (
    DiscardImage,
    Receiver,
    ReceiverAction,
    Reply,
    StoreBlock,
    TransferPhase,
    VerifyImage,
)
from protocol.wan.sack import covers
from protocol.wire import topics
from protocol.wire.devices import JoinMode
from protocol.wire.messages import (
    MINOR_VERSION,
    Activate,
    Block,
    Cancel,
    HanDevice,
    HubAnnounced,
    HubWentOffline,
    ImageHeld,
    Limits,
    Message,
    Offer,
    Poll,
    ReadVersion,
    Refused,
    TransferAcked,
    TransferRejected,
    declaring_minor,
    decode,
)

log = logging.getLogger("loadtest.hub")

#: Images up to this size are re-hashed on the event loop (about 0.12 ms for 256 KiB); larger
#: ones in a worker thread, so thousands of hubs completing together never stall the loop.
INLINE_HASH_BYTES = 256 * 1024
#: A periodic flush saves a hub's snapshot only once this many blocks were stored since its last
#: save: the blocks are on disk, and a restart replays the rest from the image file (about 10 us
#: a block, against about 150 us per snapshot save measured at 1,000 hubs), so the snapshot only
#: bounds that work. Structural changes are saved at once whatever this says.
SNAPSHOT_AFTER_BLOCKS = 1024
OFFLINE_ACK_WAIT_S = 2.0
"""On a clean stop, how long a hub waits for the PUBACK of its own ``HubWentOffline``."""

#: Deliberate departures from SPEC a hub can be told to make (``HubOptions.faults``), so the
#: conformance kit's own test can show it catches them. The normal path never looks at them.
HUB_FAULTS = frozenset(
    {
        "accept_bad_signature",  # take a manifest whose signature does not verify (§6.4)
        "no_rereport",  # answer a Poll or a repeated Offer for a held image with nothing (§7.2)
        "forget_on_restart",  # start without the persisted snapshot (§7.8)
    }
)

SUPPLIERS = ("SUPPLIER-A", "SUPPLIER-B", "SUPPLIER-C", "SUPPLIER-D")
CH_HW_VERSIONS = (0x0100, 0x0101, 0x0200)
BRIDGE_SHARE = 0.05
HCALCS_SLOT = 7  # device-id slot of the HCALCS (0-2: ESME, GSME, PPMID; 3-5: bridges)


# ----------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class HubIdentity:
    """Who a virtual CH is: everything its announcement says, derived from (seed, index)."""

    index: int
    guid: str
    fw_version: int
    hw_version: int
    supplier: str
    segment: str
    limits: Limits
    han: tuple[HanDevice, ...]

    def announcement(self) -> HubAnnounced:
        """The retained :class:`HubAnnounced` this hub publishes on its state topic."""
        return HubAnnounced(
            guid=self.guid,
            fw_version=self.fw_version,
            hw_version=self.hw_version,
            supplier=self.supplier,
            segment=self.segment,
            limits=self.limits,
            han=self.han,
        )


def hub_guid(seed: int, index: int) -> str:
    """The GUID (EUI-64, 16 upper-case hex digits) of hub ``index`` of a run seeded ``seed``."""
    return hashlib.sha256(f"otad-loadtest/ch/{seed}/{index}".encode()).digest()[:8].hex().upper()


def _device_id(seed: int, index: int, slot: int) -> str:
    digest = hashlib.sha256(f"otad-loadtest/han/{seed}/{index}/{slot}".encode()).digest()
    return digest[:8].hex().upper()


DEFAULT_LIMITS = Limits(max_block=4096, window=8, buffer=64 * 1024)


def premises_seed(seed: int, index: int) -> int:
    """The seed of hub ``index``'s premises in a run seeded ``seed``: its devices' keys are
    :func:`loadtest.premises.device_key` of it (what otad's ``activation.device_keys`` holds)."""
    return (seed << 32) + index


def make_identity(
    seed: int,
    index: int,
    *,
    limits: Limits = DEFAULT_LIMITS,
    segments: int = 8,
    bridge_share: float = BRIDGE_SHARE,
) -> HubIdentity:
    """Deterministically generate hub ``index``'s identity and HAN inventory.

    Every hub has an ESME, a GSME, a PPMID and an HCALCS; a ``bridge_share`` of them (default
    :data:`BRIDGE_SHARE`, about 5%) also have 2-3 Alt HAN bridges (B1-B4), each joined as a CAD
    or as a PPMID (listed before the HCALCS). The network segment is ``cell-<k>``,
    k < ``segments``.
    """
    rng = random.Random(f"{seed}/{index}")
    han = [
        HanDevice(_device_id(seed, index, 0), DeviceType.ESME, JoinMode.NATIVE, 0x0200, 0x0001),
        HanDevice(_device_id(seed, index, 1), DeviceType.GSME, JoinMode.NATIVE, 0x0105, 0x0001),
        HanDevice(_device_id(seed, index, 2), DeviceType.PPMID, JoinMode.NATIVE, 0x0300, 0x0002),
    ]
    if rng.random() < bridge_share:
        kinds = rng.sample([DeviceType.B1, DeviceType.B2, DeviceType.B3, DeviceType.B4], 4)
        for slot, kind in enumerate(kinds[: rng.choice((2, 3))], start=3):
            han.append(
                HanDevice(
                    _device_id(seed, index, slot),
                    kind,
                    rng.choice((JoinMode.CAD, JoinMode.PPMID)),
                    0x0100 + rng.randrange(4),
                    0x0001,
                )
            )
    # the heating/cooling (HCALCS) device, listed last so the inventory up to here is unchanged
    han.append(
        HanDevice(_device_id(seed, index, HCALCS_SLOT), DeviceType.HCALCS, JoinMode.NATIVE,
                  0x0100, 0x0001)
    )  # fmt: skip
    return HubIdentity(
        index=index,
        guid=hub_guid(seed, index),
        fw_version=0x0100_0000 + rng.randrange(4),
        hw_version=rng.choice(CH_HW_VERSIONS),
        supplier=SUPPLIERS[index % len(SUPPLIERS)],
        segment=f"cell-{index % max(1, segments)}",
        limits=limits,
        han=tuple(han),
    )


# ----------------------------------------------------------------------------- statistics


@dataclass(slots=True)
class HubStats:
    """What one hub saw and did (all counters since the hub object was created)."""

    connects: int = 0  # times its connection came up
    announces: int = 0  # HubAnnounced published
    restored: bool = False  # started from a persisted snapshot
    offers: int = 0
    offer_bytes: int = 0  # encoded size of the Offers received
    polls: int = 0
    blocks: int = 0  # Block messages received, duplicates included
    block_bytes: int = 0  # payload bytes of those blocks
    stored_blocks: int = 0  # verified blocks written to storage
    acks: int = 0  # TransferAcked sent
    max_outstanding: int = 0  # most blocks received and not yet covered by its own ack
    replayed_blocks: int = 0  # blocks recovered from the image file at a restart
    held: dict[str, str] = field(default_factory=dict)  # image hex -> SHA-256 it computed
    rejected: dict[str, int] = field(default_factory=dict)  # TransferRejected sent, by reason
    undecodable: dict[str, int] = field(default_factory=dict)  # messages refused by the decoder
    refused: dict[str, int] = field(default_factory=dict)  # Refused received (1.1), by reason
    reboots: int = 0  # its own firmware activated (or rolled back): it announced the new version

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HubStats:
        """Inverse of :meth:`to_json`."""
        return cls(**dict(data))


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


# ----------------------------------------------------------------------------- the hub


@dataclass(frozen=True, slots=True)
class HubOptions:
    """Settings shared by the hubs of a group."""

    host: str
    port: int
    library: str = "gmqtt"
    keepalive: int = 30
    reconnect_min: float = 0.2
    reconnect_max: float = 5.0
    ack_every: int | None = None  # None: the receiver's default
    ack_delay: float | None = None
    inline_hash_bytes: int = INLINE_HASH_BYTES
    announce_on_poll: bool = False
    faults: frozenset[str] = frozenset()  # of HUB_FAULTS: a deliberately broken CH (tests only)
    protocol_minor: int = MINOR_VERSION  # 0: a CH of protocol 1.0 exactly as SPEC 1.0 said
    # TLS with a client certificate per hub (the shipped broker, systemd/mosquitto/otad.conf):
    # the CA of the broker's certificate, and a directory of <GUID>.crt / <GUID>.key (what
    # `otactl pki issue --role ch --name GUID --out DIR` writes). None: plain MQTT.
    tls_ca: str | None = None
    tls_cert_dir: str | None = None

    def tls_files(self, guid: str) -> tuple[str | None, str | None]:
        """(certificate, key) of the hub ``guid``, or (None, None) without ``tls_cert_dir``."""
        if self.tls_cert_dir is None:
            return None, None
        return f"{self.tls_cert_dir}/{guid}.crt", f"{self.tls_cert_dir}/{guid}.key"

    def __post_init__(self) -> None:
        unknown = set(self.faults) - HUB_FAULTS
        if unknown:
            raise ValueError(f"unknown hub faults {sorted(unknown)}; known: {sorted(HUB_FAULTS)}")


class VirtualHub:
    """One virtual CH on a shared event loop. Create it, then ``await start()``."""

    def __init__(
        self,
        identity: HubIdentity,
        *,
        trust: TrustStore,
        store: HubStore,
        options: HubOptions,
        group: HubGroup,
    ) -> None:
        self.identity = identity
        self.guid = identity.guid
        self.stats = HubStats()
        self._trust = trust
        self._store = store
        self._options = options
        self._group = group
        self._loop = group.loop
        self._client: MqttClient | None = None
        self._after_restore: list[ReceiverAction] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._unacked: dict[bytes, set[int]] = {}
        self._last_ack: dict[bytes, tuple[int, bytes]] = {}
        self._hashing: set[bytes] = set()
        self.unsaved_blocks = 0
        """Blocks stored since the snapshot was last saved (replayed from disk at a restart)."""
        self._up_topic = topics.up(self.guid)
        self._down_topic = topics.down(self.guid)
        self._state_topic = topics.state(self.guid)
        self._announcement = declaring_minor(identity.announcement(), options.protocol_minor)
        self._announce_payload = self._announcement.encode()
        self._offline_payload = HubWentOffline(guid=self.guid).encode()
        self._reconnects = 0
        self.running = False
        self.muted = False  # connected but ignoring everything: a hung CH
        self.receiver = self._load_receiver()
        self.han: HanSide | None = None
        self._relayed: set[bytes] = set()  # images handed to the HAN side (it relays them)
        self._reading = 0  # held images being read for the HAN side
        self._held_back: list[Activate | ReadVersion] = []  # commands waiting for those reads
        self._life = 0  # one more each start: what the last power cut interrupted knows its own
        """Its premises' HAN (SPEC §8.10): only for a 1.1 CH of a group given otad's activation
        key; otherwise the CH only holds images, as before."""
        if group.activation_trust is not None and options.protocol_minor >= 1:
            self.han = HanSide(
                identity,
                trust=trust,
                activation_trust=group.activation_trust,
                send=self._send_up,
                loop=self._loop,
                config=group.premises_config(identity.index),
                on_ch_reboot=self._rebooted,
            )

    # ---------------------------------------------------------------- receiver and trust

    def _receiver_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._options.ack_every is not None:
            kwargs["ack_every"] = self._options.ack_every
        if self._options.ack_delay is not None:
            kwargs["ack_delay"] = self._options.ack_delay
        return kwargs

    def _load_receiver(self) -> Receiver:
        snapshot = self._store.load_snapshot()
        if "forget_on_restart" in self._options.faults:
            snapshot = None
        if snapshot is not None:
            try:
                receiver = Receiver.restore(
                    snapshot, self.identity.limits, self._verify_manifest, **self._receiver_kwargs()
                )
            except ProtocolError as exc:
                log.warning("%s: snapshot unusable (%s); starting afresh", self.guid, exc)
            else:
                self.stats.restored = True
                self._replay(receiver)
                return receiver
        return Receiver(self.identity.limits, self._verify_manifest, **self._receiver_kwargs())

    def _replay(self, receiver: Receiver) -> None:
        """Recover blocks stored after the last snapshot was written.

        The snapshot is saved periodically, so after a crash it may lag the image file. Every
        block the file holds that the snapshot does not is fed back to the receiver, which checks
        it against its signed hash like any block (holes read as zeros and are skipped; a torn
        write fails the hash): an acknowledged block is never lost, and is never fetched again.
        Replies and store actions of the replay are dropped (the data is already where it
        belongs, and the receiver reports its state when otad offers or polls); a completed
        image is re-hashed as usual.
        """
        now = Monotonic(self._loop.time())
        later: list[ReceiverAction] = []
        for image in receiver.images():
            manifest = receiver.manifest(image)
            if manifest is None or receiver.phase(image) is not TransferPhase.RECEIVING:
                continue
            missing = [i for i in range(manifest.block_count) if not receiver.has_block(image, i)]
            if not missing:
                continue
            for index, data in self._store.read_blocks(
                image, manifest.block_size, manifest.size, missing
            ):
                actions = receiver.message_received(Block(image, index, data), now)
                later.extend(a for a in actions if isinstance(a, (VerifyImage, DiscardImage)))
            self.stats.replayed_blocks += receiver.blocks_held(image) - (
                manifest.block_count - len(missing)
            )
        self._after_restore = later

    def _verify_manifest(self, signed: bytes, at: UnixTime) -> Manifest:
        """The Receiver's check of an Offer's manifest: signature, expiry at the transfer's
        update-start instant ``at``, then whether it is for this premises and fits its limits
        (:func:`otad.targeting.refusal`; nothing is installed here, so any sequence above 0 is
        new)."""
        try:
            manifest = verify_manifest(signed, self._trust, now=at)
        except ProtocolError as exc:
            if exc.reason is not Reason.BAD_SIGNATURE or (
                "accept_bad_signature" not in self._options.faults
            ):
                raise
            payload = parse_sign1(signed, max_size=MAX_SIGNED_MANIFEST_BYTES).payload
            manifest = Manifest.decode(payload)
        error = refusal(self._announcement, manifest, installed_sequence=0)
        if error is not None:
            raise error
        return manifest

    # ---------------------------------------------------------------- connection

    async def start(self) -> None:
        """Connect, subscribe and announce (returns once the first connection is up)."""
        if self.running:
            return
        tls_cert, tls_key = self._options.tls_files(self.guid)
        settings = MqttSettings(
            host=self._options.host,
            port=self._options.port,
            client_id=self.guid,
            username=self.guid,  # what the broker's ACL pattern expands %u to (SPEC §1.2)
            tls_ca=self._options.tls_ca,
            tls_cert=tls_cert,  # with a certificate, its CN (the GUID) is the username
            tls_key=tls_key,
            will=Will(
                topic=self._state_topic,
                payload=self._offline_payload,
                qos=HubWentOffline.QOS,
                retain=True,
            ),
            keepalive=self._options.keepalive,
            reconnect_min=self._options.reconnect_min,
            reconnect_max=self._options.reconnect_max,
        )
        client = create_client(self._options.library, settings)
        client.set_message_handler(self._on_message)
        client.set_connection_handler(self._on_connection)
        self._client = client
        self.running = True
        try:
            await client.subscribe(self._down_topic, 1)  # remembered: sent with every connect
            await client.connect()
        except BaseException:
            self.running = False
            self._client = None
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise
        self.stats.connects += 1
        self._announce()
        self._life += 1
        self._reading, self._held_back = 0, []  # what a power cut interrupted is gone
        if self.han is not None:
            self.han.resumed()
            for image in self.receiver.images():  # held, but the power cut beat the relay
                if self.receiver.phase(image) is TransferPhase.HELD and image not in self._relayed:
                    self._relay(image)
        later, self._after_restore = self._after_restore, []
        self._apply(later, structural=bool(later))

    def _on_connection(self, up: bool) -> None:
        # The adapter reports True after the first connect too (start() already announced);
        # after a reconnection it has restored the subscription, and the broker may have lost our
        # retained state (restart without persistence) or published our will: announce again.
        if not up or not self.running:
            return
        client = self._client
        if client is not None and client.reconnects > 0 and client.reconnects != self._reconnects:
            self._reconnects = client.reconnects
            self.stats.connects += 1
            self._announce()

    def _announce(self) -> None:
        if self._publish(self._state_topic, self._announce_payload, True, HubAnnounced.QOS):
            self.stats.announces += 1

    def _publish(self, topic: str, payload: bytes, retain: bool, qos: int) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            client.publish(topic, payload, qos, retain)
        except NotConnected:
            return False  # the receiver's timers (or otad's Poll) bring it back later
        return True

    async def stop(self, *, crash: bool = False) -> None:
        """Stop this hub.

        Clean (default): save the snapshot, publish :class:`HubWentOffline` (retained, QoS 1)
        and wait up to :data:`OFFLINE_ACK_WAIT_S` for its PUBACK, then send MQTT DISCONNECT
        (which discards the will: SPEC §1.2). ``crash=True``: simulate a power cut: no snapshot
        save, the connection is dropped without DISCONNECT so the broker publishes the last will.
        """
        if not self.running:
            return
        self.running = False
        self._cancel_timer()
        if self.han is not None:
            self.han.close()
        client, self._client = self._client, None
        if not crash:
            self.save()
        self._store.close()
        if client is not None:
            if crash:
                _cut(client)
            else:
                with contextlib.suppress(NotConnected):
                    client.publish(
                        self._state_topic, self._offline_payload, HubWentOffline.QOS, True
                    )
                    await wait_acknowledged(client, OFFLINE_ACK_WAIT_S)
            with contextlib.suppress(Exception):
                await client.disconnect()

    # ---------------------------------------------------------------- inbound

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if not self.running or self.muted:
            return
        try:
            message = decode(payload)
        except ProtocolError as exc:
            _bump(self.stats.undecodable, exc.reason.name)
            return
        if type(message) is Offer:
            self.stats.offer_bytes += len(payload)
        self.handle(message)

    def handle(self, message: Message) -> None:
        """Feed one decoded downlink message to the receiver and carry out its actions."""
        stats = self.stats
        structural = False
        if type(message) is Block:
            stats.blocks += 1
            stats.block_bytes += len(message.data)
            image = message.image
            last = self._last_ack.get(image)
            if last is None or not covers(message.index, last[0], last[1]):
                pending = self._unacked.get(image)
                if pending is None:
                    pending = self._unacked[image] = set()
                pending.add(message.index)
                if len(pending) > stats.max_outstanding:
                    stats.max_outstanding = len(pending)
        elif type(message) is Offer:
            stats.offers += 1
            structural = True
        elif type(message) is Poll:
            stats.polls += 1
            if self._options.announce_on_poll:
                self._announce()
        elif type(message) is Cancel:
            structural = True
        elif type(message) is Refused:
            self._refused(message)
            return
        elif type(message) in (Activate, ReadVersion):
            if self.han is None:  # a CH without a HAN side does not know these types
                _bump(stats.undecodable, Reason.UNKNOWN_TYPE.name)
            else:
                assert isinstance(message, (Activate, ReadVersion))
                if self._reading:  # the CH holds the image it reported: its HAN side must too
                    self._held_back.append(message)
                else:
                    self.han.down_received(message)
            return
        now = Monotonic(self._loop.time())
        if type(message) is Offer:
            actions = self.receiver.offer_received(message, UnixTime(time.time()), now)
        else:
            actions = self.receiver.message_received(message, now)
        if "no_rereport" in self._options.faults and type(message) in (Poll, Offer):
            actions = [a for a in actions if not _reports_held(a)]
        self._apply(actions, structural)

    def _refused(self, refused: Refused) -> None:
        """otad refused something this CH sent (SPEC §5.1): count it; a 1.0 CH does not know
        the message type at all, and drops it as any unknown type (SPEC §5)."""
        if self._options.protocol_minor < 1:
            _bump(self.stats.undecodable, Reason.UNKNOWN_TYPE.name)
            return
        try:
            reason = Reason(refused.reason).name
        except ValueError:
            reason = str(refused.reason)
        _bump(self.stats.refused, reason)
        log.warning("%s: otad refused our message of type %d: %s: %s",
                    self.guid, refused.of, reason, refused.detail)  # fmt: skip

    # ---------------------------------------------------------------- actions

    def _apply(self, actions: Iterable[ReceiverAction], structural: bool = False) -> None:
        """Carry out receiver actions: storage first, then (after saving the snapshot when the
        set of transfers or a phase changed) the replies, so nothing is reported upstream that
        a restart could take back. Blocks are queued by the store and written before any reply
        goes out (an acknowledgement never names a block that is not on disk); an image
        completing (``VerifyImage``) needs no snapshot of its own: its blocks are on disk, which
        a restart replays, and the ``ImageHeld`` that follows is saved before it is sent."""
        replies: list[Message] = []
        stored = False
        for action in actions:
            if type(action) is StoreBlock:
                self._store_block(action)
                stored = True
            elif type(action) is Reply:
                replies.append(action.message)
                if type(action.message) is not TransferAcked:
                    structural = True
            elif type(action) is VerifyImage:
                self._verify_image(action.image, action.size)
                stored = True
            elif type(action) is DiscardImage:
                self._forget(action.image)
                self._store.discard_image(action.image)
                structural = True
        if structural:
            self._group.mark_dirty(self, urgent=True)
        elif stored:
            self._group.mark_dirty(self)
        if replies:
            self._store.flush_blocks()
            for message in replies:
                self._reply(message)
        self._arm_timer()

    def _store_block(self, action: StoreBlock) -> None:
        manifest = self.receiver.manifest(action.image)
        size = manifest.size if manifest is not None else action.offset + len(action.data)
        self._store.write_block(action.image, size, action.offset, action.data)
        self.stats.stored_blocks += 1
        self.unsaved_blocks += 1

    def _reply(self, message: Message) -> None:
        if isinstance(message, TransferAcked):
            self.stats.acks += 1
            self._last_ack[message.image] = (message.base, message.bitmap)
            pending = self._unacked.get(message.image)
            if pending:
                base, bitmap = message.base, message.bitmap
                if max(pending) < base:  # the usual case: everything outstanding is below it
                    pending.clear()
                else:
                    pending.difference_update([i for i in pending if covers(i, base, bitmap)])
        elif isinstance(message, TransferRejected):
            try:
                name = Reason(message.reason).name
            except ValueError:
                name = str(message.reason)
            _bump(self.stats.rejected, name)
        elif isinstance(message, ImageHeld):
            self.stats.held[message.image.hex()] = message.sha256.hex()
            self._forget(message.image)
            if message.image not in self._relayed and self.han is not None:
                self._relay(message.image)
        # A SACK is cumulative and idempotent: a lost one is covered by the next, or by the
        # sender's probe on timeout, so acks go at QoS 0; reports that end a transfer at QoS 1.
        self._publish(self._up_topic, message.encode(), False, message.QOS)

    def _send_up(self, message: Message) -> None:
        self._publish(self._up_topic, message.encode(), False, message.QOS)

    def _relay(self, image: bytes) -> None:
        """Hand a newly held image to the HAN side (it relays it to the devices it is for)."""
        manifest = self.receiver.manifest(image)
        signed = self.receiver.signed_manifest(image)
        if self.han is None or manifest is None or signed is None:
            return
        path, han = self._store.image_path(image), self.han
        if manifest.size <= self._options.inline_hash_bytes:
            self._relayed.add(image)
            han.image_held(manifest, signed, _read_image(path, manifest.size))
            return
        # a large image is read in the hashing pool, as it was checked: the loop serves the
        # other hubs meanwhile
        future = self._loop.run_in_executor(self._group.executor, _read_image, path, manifest.size)
        self._reading += 1
        life = self._life
        # A command for the CH or a device (an activation) can arrive before the read is done,
        # behind other hubs' hashing: it waits for it (the CH reported the image held, so to
        # the command it holds it) instead of finding nothing held -- NO_IMAGE_HELD under load.

        def read(done: asyncio.Future[bytes]) -> None:
            if done.cancelled() or not self.running or life != self._life:
                return  # stopped meanwhile: relayed when it runs again (start)
            self._reading -= 1
            if (error := done.exception()) is not None:
                log.error("%s: cannot read %s to relay it: %s", self.guid, image.hex()[:16], error)
            elif image not in self._relayed:
                self._relayed.add(image)
                han.image_held(manifest, signed, done.result())
            if not self._reading:
                waiting, self._held_back = self._held_back, []
                for message in waiting:
                    han.down_received(message)

        future.add_done_callback(read)

    def _rebooted(self, fw_version: int) -> None:
        """The CH's own firmware was activated (or rolled back): it reboots, reconnects and
        announces ``fw_version``, with the versions its HAN devices run now."""
        self.stats.reboots += 1
        han = self.han.inventory() if self.han is not None else self._announcement.han
        self._announcement = replace(self._announcement, fw_version=fw_version, han=han)
        self._announce_payload = self._announcement.encode()
        client = self._client
        if client is None:
            return
        # A reboot: the connection drops without DISCONNECT (the broker publishes the will), the
        # client reconnects and the CH announces its new version (_on_connection). What the CH
        # answered before rebooting is already written to the socket.
        self._loop.call_soon(_cut, client)

    def _forget(self, image: bytes) -> None:
        self._unacked.pop(image, None)
        self._last_ack.pop(image, None)

    def _verify_image(self, image: bytes, size: int) -> None:
        self._store.close_image(image)
        path = self._store.image_path(image)
        manifest = self.receiver.manifest(image)
        if manifest is None:
            return
        if size <= self._options.inline_hash_bytes:
            self._loop.call_soon(self._image_checked, image, _check_stored(path, manifest))
            return
        if image in self._hashing:
            return
        self._hashing.add(image)
        future = self._loop.run_in_executor(self._group.executor, _check_stored, path, manifest)
        future.add_done_callback(lambda f: self._check_done(image, f))

    def _check_done(self, image: bytes, future: asyncio.Future[bytes | ProtocolError]) -> None:
        self._hashing.discard(image)
        if future.cancelled() or not self.running:
            return
        self._image_checked(image, future.result())

    def _image_checked(self, image: bytes, result: bytes | ProtocolError) -> None:
        if not self.running:
            return
        now = Monotonic(self._loop.time())
        if isinstance(result, ProtocolError):
            self._apply(self.receiver.image_refused(image, result, now))
        else:
            self._apply(self.receiver.image_hashed(image, result, now))

    # ---------------------------------------------------------------- timers and persistence

    def _arm_timer(self) -> None:
        """Make sure the timer fires by the receiver's next deadline. A timer already set for
        no later stays (when the deadline moved later or went away it fires early, finds
        nothing due and is set again): no cancel and re-arm per acknowledgement."""
        if not self.running:
            return
        deadline = self.receiver.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if not self.running or self.muted:
            return
        self._apply(self.receiver.handle_timer(Monotonic(self._loop.time())))

    def save(self) -> None:
        """Write the receiver snapshot now (atomically)."""
        self._store.save_snapshot(self.receiver.snapshot())
        self.unsaved_blocks = 0


def _reports_held(action: ReceiverAction) -> bool:
    return isinstance(action, Reply) and type(action.message) is ImageHeld


def _cut(client: MqttClient) -> None:
    """Drop the TCP connection without an MQTT DISCONNECT, as a power cut would: the broker then
    publishes the last will. (The DISCONNECT the caller sends afterwards cannot get through.)"""
    fileno = client.socket_fileno()
    if fileno is None:
        return
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fileno)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _read_image(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a stored image (safe in a worker thread)."""
    with open(path, "rb") as f:
        return f.read(size)


def _check_stored(path: Path, manifest: Manifest) -> bytes | ProtocolError:
    """Re-read the stored image and run the whole-image checks of SPEC §6.4 (14-17) on it: the
    digest it has when they pass (the manifest's: check 14 compared them), the digest it has
    when that differs from the manifest's (the digest of nothing when the file is gone), else
    the check's refusal. One read of the file; the image is hashed by the checks themselves, and
    again only to name the digest of an image that failed them. Safe in a worker thread."""
    try:
        data = _read_image(path, manifest.size)
    except FileNotFoundError:
        return hashlib.sha256(b"").digest()
    try:
        check_image(manifest, data)
    except ProtocolError as exc:
        if exc.reason is Reason.IMAGE_HASH:
            digest = hashlib.sha256(data).digest()
            if digest != manifest.sha256:
                return digest
        return exc
    return manifest.sha256


# ----------------------------------------------------------------------------- the group


class HubGroup:
    """Many virtual hubs on one event loop, with one periodic snapshot flush and one hashing pool.

    ``limits_for`` overrides the declared limits of particular hub indices (e.g. a window of 2).
    ``activation_trust`` (otad's activation key) gives every 1.1 hub its premises' HAN
    (:mod:`loadtest.chhan`), run as ``premises`` says (seeded per hub); without it the hubs only
    hold images. ``bridge_share``: of the hubs, those with Alt HAN bridges (:func:`make_identity`).
    """

    def __init__(
        self,
        *,
        options: HubOptions,
        trust: TrustStore,
        state_dir: Path | str,
        seed: int = 0,
        indices: Iterable[int] = (),
        limits: Limits = DEFAULT_LIMITS,
        limits_for: Mapping[int, Limits] | None = None,
        segments: int = 8,
        flush_interval: float = 10.0,
        connect_concurrency: int = 200,
        activation_trust: TrustStore | None = None,
        premises: PremisesConfig | None = None,
        bridge_share: float = BRIDGE_SHARE,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.loop = asyncio.get_running_loop()
        self.options = options
        self.trust = trust
        self.state_dir = Path(state_dir)
        self.seed = seed
        self.activation_trust = activation_trust
        self._premises = premises or PremisesConfig()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hub-hash")
        self._flush_interval = flush_interval
        self._connect_sem = asyncio.Semaphore(connect_concurrency)
        self._dirty: set[VirtualHub] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self.identities: dict[str, HubIdentity] = {}
        self.hubs: dict[str, VirtualHub] = {}
        self._retired: dict[str, HubStats] = {}
        overrides = dict(limits_for or {})
        for index in indices:
            identity = make_identity(
                seed,
                index,
                limits=overrides.get(index, limits),
                segments=segments,
                bridge_share=bridge_share,
            )
            self.identities[identity.guid] = identity

    def premises_config(self, index: int) -> PremisesConfig:
        """The premises scenario of hub ``index``: the group's, seeded for that hub."""
        return replace(self._premises, seed=premises_seed(self.seed, index))

    @property
    def guids(self) -> list[str]:
        """GUIDs of every hub of the group, in index order."""
        return list(self.identities)

    def _new_hub(self, guid: str) -> VirtualHub:
        return VirtualHub(
            self.identities[guid],
            trust=self.trust,
            store=HubStore(self.state_dir, guid),
            options=self.options,
            group=self,
        )

    async def start(self, guids: Iterable[str] | None = None) -> int:
        """Start (or restart from their persisted state) the given hubs, default all.

        Returns how many are running afterwards. A hub that cannot connect is logged and left
        stopped.
        """
        wanted = list(self.identities) if guids is None else list(guids)
        failures: list[BaseException] = []

        async def one(guid: str) -> None:
            hub = self.hubs.get(guid)
            if hub is not None and hub.running:
                return
            if hub is not None:
                self._retire(hub)
            hub = self.hubs[guid] = self._new_hub(guid)
            async with self._connect_sem:
                try:
                    await hub.start()
                except Exception as exc:
                    failures.append(exc)
                    log.warning("%s: could not start: %s", guid, exc)

        await asyncio.gather(*(one(guid) for guid in wanted))
        if failures:
            log.warning("%d of %d hubs failed to start", len(failures), len(wanted))
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_later(self._flush_interval, self._flush)
        return sum(1 for hub in self.hubs.values() if hub.running)

    def _retire(self, hub: VirtualHub) -> None:
        """Keep a replaced hub's counters (a restart must not lose what it already saw)."""
        old = self._retired.get(hub.guid)
        self._retired[hub.guid] = merge_stats(old, hub.stats) if old else hub.stats

    async def stop(self, guids: Iterable[str] | None = None, *, crash: bool = False) -> None:
        """Stop the given hubs (default all); ``crash`` simulates a power cut (see VirtualHub)."""
        wanted = list(self.hubs) if guids is None else list(guids)
        hubs = [self.hubs[g] for g in wanted if g in self.hubs]
        for hub in hubs:
            self._dirty.discard(hub)
        await asyncio.gather(*(hub.stop(crash=crash) for hub in hubs))

    async def close(self) -> None:
        """Stop every hub cleanly and release the group's resources."""
        await self.stop()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.executor.shutdown(wait=True, cancel_futures=True)

    def mute(self, guids: Iterable[str], muted: bool = True) -> None:
        """Make hubs hang (``muted``: the connection stays up, every message is ignored) or
        come back to life."""
        for guid in guids:
            hub = self.hubs.get(guid)
            if hub is not None:
                hub.muted = muted

    def mark_dirty(self, hub: VirtualHub, *, urgent: bool = False) -> None:
        """Note that ``hub``'s snapshot is stale; ``urgent`` saves it right away."""
        if urgent:
            self._dirty.discard(hub)
            hub.save()
        else:
            self._dirty.add(hub)

    def _flush(self) -> None:
        """Save the snapshot of every running hub that lags by :data:`SNAPSHOT_AFTER_BLOCKS`
        blocks or more; the others stay dirty (their blocks are on disk: module docstring)."""
        dirty, self._dirty = self._dirty, set()
        for hub in dirty:
            if not hub.running:
                continue
            if hub.unsaved_blocks < SNAPSHOT_AFTER_BLOCKS:
                self._dirty.add(hub)
                continue
            try:
                hub.save()
            except OSError as exc:
                log.error("%s: cannot save state: %s", hub.guid, exc)
        self._flush_handle = self.loop.call_later(self._flush_interval, self._flush)

    def stats(self) -> dict[str, HubStats]:
        """Per-hub statistics, a restarted hub's counters summed over its lives."""
        result: dict[str, HubStats] = {}
        for guid in self.identities:
            old = self._retired.get(guid)
            hub = self.hubs.get(guid)
            if hub is None:
                if old is not None:
                    result[guid] = old
                continue
            result[guid] = merge_stats(old, hub.stats) if old else hub.stats
        return result

    @property
    def running(self) -> int:
        """How many hubs are running."""
        return sum(1 for hub in self.hubs.values() if hub.running)


def merge_stats(a: HubStats | None, b: HubStats) -> HubStats:
    """Counters of two lives of one hub, summed (maxima and flags combined)."""
    if a is None:
        return b
    return replace(
        b,
        connects=a.connects + b.connects,
        announces=a.announces + b.announces,
        restored=a.restored or b.restored,
        offers=a.offers + b.offers,
        offer_bytes=a.offer_bytes + b.offer_bytes,
        polls=a.polls + b.polls,
        blocks=a.blocks + b.blocks,
        block_bytes=a.block_bytes + b.block_bytes,
        stored_blocks=a.stored_blocks + b.stored_blocks,
        replayed_blocks=a.replayed_blocks + b.replayed_blocks,
        acks=a.acks + b.acks,
        max_outstanding=max(a.max_outstanding, b.max_outstanding),
        held={**a.held, **b.held},
        rejected=_sum_counts(a.rejected, b.rejected),
        undecodable=_sum_counts(a.undecodable, b.undecodable),
        refused=_sum_counts(a.refused, b.refused),
        reboots=a.reboots + b.reboots,
    )


def _sum_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


ClientFactory = Callable[[str, MqttSettings], MqttClient]
