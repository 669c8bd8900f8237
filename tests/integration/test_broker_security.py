"""The shipped broker config (systemd/mosquitto/otad.conf and its ACL) run by a real Mosquitto,
only ports and file paths substituted (loadtest.broker.ShippedConfig), with certificates from
``otactl pki`` (otad/ctl/pki.py).

Denials are checked by what arrives, not by acknowledgements: MQTT 3.1.1 still PUBACKs a publish
the ACL drops, and may grant a subscription it then never serves. Each check sends the denied
message first and an allowed one after it from the same client on the same connection; when
the allowed one has arrived, the denied one would have arrived before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from otad_harness import Monitor, Otad, assert_clean_log, otad_config
from test_otad_activation import activation_setup

from loadtest.broker import MosquittoBroker, ShippedConfig
from loadtest.release import make_release
from loadtest.runner import HubFleet
from mqttio import MqttClient, MqttConnectError, MqttSettings, MqttSubscribeError, create_client
from otad.brokercheck import largest_packet_bytes
from otad.ctl import pki
from otad.ctl.pki import Role
from otad.events import HubOnline, TransferFailed, TransferHeld, supplier_topic_id
from protocol.release.manifest import DeviceType
from protocol.wire import topics
from protocol.wire.messages import ImageHeld, TransferRejected

pytestmark = pytest.mark.broker

WAIT = 10.0
CH_A = "00DB0000000000A1"
CH_B = "00DB0000000000B2"
CH_EXPIRED = "00DB0000000000C3"
CH_REVOKED = "00DB0000000000D4"
SUPPLIER_X = "Supplier X Energy"
SUPPLIER_Y = "Supplier Y Power"
LOCAL_USER, LOCAL_PASSWORD = "grafana", "local-s3cret"


@dataclass(frozen=True)
class Pki:
    """The CAs and every certificate the tests use."""

    root: Path
    certs: Path
    rogue: Path  # a second `pki init`: a CA the broker does not trust

    @property
    def broker_ca(self) -> Path:
        """What clients verify the broker's certificate against."""
        return self.root / "services-ca.crt"

    def files(self, identity: str, *, rogue: bool = False) -> tuple[str, str]:
        base = (self.rogue / "certs") if rogue else self.certs
        return str(base / f"{identity}.crt"), str(base / f"{identity}.key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    pki.init_pki(root)
    out = root / "certs"
    pki.issue(root, Role.BROKER, "localhost", root, sans=["127.0.0.1"])
    for role, name in [
        (Role.OTAD, "otad"),
        (Role.OPERATOR, "alice"),
        (Role.MONITOR, "grafana"),
        (Role.SUPPLIER, SUPPLIER_X),
        (Role.SUPPLIER, SUPPLIER_Y),
        (Role.CH, CH_A),
        (Role.CH, CH_B),
    ]:
        pki.issue(root, role, name, out)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    pki.issue(root, Role.CH, CH_EXPIRED, out, days=1, not_before=long_ago)
    pki.revoke(root, pki.issue(root, Role.CH, CH_REVOKED, out).cert)
    rogue = tmp_path_factory.mktemp("rogue")
    pki.init_pki(rogue)
    pki.issue(rogue, Role.CH, CH_A, rogue / "certs")
    pki.issue(rogue, Role.OTAD, "otad", rogue / "certs")
    return Pki(root, out, rogue)


def acl_extra() -> str:
    """The stanzas ``otactl pki issue`` prints for the operator and the monitor."""
    return pki.acl_stanza(Role.OPERATOR, "alice") + pki.acl_stanza(Role.MONITOR, "grafana")


@pytest.fixture
def secure(certs: Pki, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Mosquitto running the shipped config, the local listener with one password user."""
    passwords = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwords), LOCAL_USER, LOCAL_PASSWORD],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin"},
    )
    shipped = ShippedConfig(
        cafile=certs.root / "ca-bundle.pem",
        certfile=certs.root / "localhost.crt",
        keyfile=certs.root / "localhost.key",
        crlfile=certs.root / "crl.pem",
        password_file=passwords,
        acl_extra=acl_extra(),
    )
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", shipped=shipped).start()
    try:
        yield broker
    finally:
        broker.stop()


class Inbox:
    """Every (topic, payload) a client receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((topic, payload))
        self._changed.set()

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.messages]

    async def wait_for(self, topic: str, within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            while topic not in self.topics():
                self._changed.clear()
                await self._changed.wait()


def tls_settings(broker: MosquittoBroker, certs: Pki, identity: str, **how: Any) -> MqttSettings:
    cert_dir = how.pop("cert_dir", None)
    cert, key = certs.files(identity, rogue=how.pop("rogue", False))
    if cert_dir is not None:
        cert, key = str(cert_dir / f"{identity}.crt"), str(cert_dir / f"{identity}.key")
    options: dict[str, Any] = {
        "client_id": f"{identity}-{secrets.token_hex(3)}",
        "host": "127.0.0.1",
        "port": broker.tls_port,
        "tls_ca": str(certs.broker_ca),
        "tls_cert": cert,
        "tls_key": key,
        "connect_timeout": 5.0,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
    }
    return MqttSettings(**(options | how))


@asynccontextmanager
async def connected(
    settings: MqttSettings, *subscriptions: str, inbox: Inbox | None = None
) -> AsyncIterator[MqttClient]:
    """A client connected with ``settings``, subscribed to ``subscriptions`` (a refused one is
    skipped: refusing is one way of not serving it)."""
    client = create_client("gmqtt", settings)
    if inbox is not None:
        client.set_message_handler(inbox)
    await client.connect(fail_fast=True)
    for subscription in subscriptions:
        with suppress(MqttSubscribeError):
            await client.subscribe(subscription, 1)
    try:
        yield client
    finally:
        await client.disconnect()


def supplier(label: str) -> str:
    return supplier_topic_id(label)


# --------------------------------------------------------------------------- who reads what


async def test_a_ch_reads_only_its_own_downlink_and_writes_only_its_own_uplink(
    secure: MosquittoBroker, certs: Pki
) -> None:
    at_a, at_b, at_otad = Inbox(), Inbox(), Inbox()
    async with (
        connected(
            tls_settings(secure, certs, "otad"), topics.UP_WILDCARD, topics.STATE_WILDCARD,
            inbox=at_otad,
        ) as otad,
        connected(
            tls_settings(secure, certs, CH_A), topics.down(CH_A), topics.down(CH_B),
            topics.up(CH_B), "ota/v1/#", inbox=at_a,
        ) as ch_a,
        connected(tls_settings(secure, certs, CH_B), topics.down(CH_B), inbox=at_b),
    ):  # fmt: skip
        # otad writes every downlink; each CH reads only its own
        otad.publish(topics.down(CH_B), b"for B", 1, False)
        otad.publish(topics.down(CH_A), b"for A", 1, False)
        await at_a.wait_for(topics.down(CH_A))
        await at_b.wait_for(topics.down(CH_B))
        assert at_a.topics() == [topics.down(CH_A)]
        # A writes B's uplink, B's state and B's downlink: nothing arrives; then its own uplink
        ch_a.publish(topics.up(CH_B), b"forged by A", 1, False)
        ch_a.publish(topics.state(CH_B), b"forged by A", 1, True)
        ch_a.publish(topics.down(CH_B), b"forged by A", 1, False)
        ch_a.publish(topics.state(CH_A), b"A's state", 1, False)
        ch_a.publish(topics.up(CH_A), b"A's own", 1, False)
        await at_otad.wait_for(topics.up(CH_A))
        await asyncio.sleep(0.3)
        assert at_otad.messages == [
            (topics.state(CH_A), b"A's state"),
            (topics.up(CH_A), b"A's own"),
        ]
        assert at_b.topics() == [topics.down(CH_B)]
        # A reads neither its own uplink nor anybody's events, and CHs cannot read each other
        otad.publish(topics.event("hub.online"), b"{}", 1, False)
        otad.publish(topics.down(CH_A), b"second for A", 1, False)
        await asyncio.sleep(0.3)
        assert at_a.topics() == [topics.down(CH_A), topics.down(CH_A)]


async def test_a_supplier_sees_its_own_alerts_and_none_of_another_suppliers(
    secure: MosquittoBroker, certs: Pki
) -> None:
    x, y = supplier(SUPPLIER_X), supplier(SUPPLIER_Y)
    at_x, at_y = Inbox(), Inbox()
    alert_x = f"ota/v1/alerts/{x}/device.activated/{CH_A}"
    alert_y = f"ota/v1/alerts/{y}/device.activated/{CH_B}"
    async with (
        connected(tls_settings(secure, certs, "otad")) as otad,
        connected(
            tls_settings(secure, certs, x), "ota/v1/alerts/#", f"ota/v1/alerts/{y}/#",
            topics.EVENTS_WILDCARD, inbox=at_x,
        ),
        connected(tls_settings(secure, certs, y), f"ota/v1/alerts/{y}/#", inbox=at_y) as sy,
    ):  # fmt: skip
        otad.publish(alert_y, b"y's", 1, False)
        otad.publish(topics.event("hub.online"), b"{}", 1, False)
        otad.publish(alert_x, b"x's", 1, False)
        await at_x.wait_for(alert_x)
        await at_y.wait_for(alert_y)
        await asyncio.sleep(0.3)
        assert at_x.messages == [(alert_x, b"x's")]
        assert at_y.messages == [(alert_y, b"y's")]
        # a supplier cannot forge an alert, even under its own level
        sy.publish(f"ota/v1/alerts/{y}/device.failed/{CH_B}", b"forged", 1, False)
        sy.publish(alert_x, b"forged", 1, False)
        otad.publish(alert_y, b"y's again", 1, False)
        await asyncio.sleep(0.5)
        assert at_y.messages == [(alert_y, b"y's"), (alert_y, b"y's again")]
        assert at_x.messages == [(alert_x, b"x's")]


async def test_a_monitor_reads_events_and_status_and_cannot_publish(
    secure: MosquittoBroker, certs: Pki
) -> None:
    at_monitor, at_otad, at_b, at_alice = Inbox(), Inbox(), Inbox(), Inbox()
    status_offline = json.dumps({"v": 1, "state": "offline"}).encode()
    async with (
        connected(
            tls_settings(secure, certs, "otad"), topics.UP_WILDCARD, topics.CTL_REQUEST_WILDCARD,
            inbox=at_otad,
        ) as otad,
        connected(
            tls_settings(secure, certs, "grafana"), "ota/v1/#", topics.EVENTS_WILDCARD,
            topics.OTAD_STATUS, inbox=at_monitor,
        ) as monitor,
        connected(tls_settings(secure, certs, CH_B), topics.down(CH_B), inbox=at_b),
        connected(
            tls_settings(secure, certs, "alice"), topics.ctl_response("alice"),
            topics.OTAD_STATUS, inbox=at_alice,
        ),
    ):  # fmt: skip
        for topic in (
            topics.event("transfer.failed"),
            topics.OTAD_STATUS,
            topics.down(CH_B),
            topics.up(CH_B),
            topics.ctl_request("grafana"),
            topics.ctl_request("alice"),
            topics.ctl_response("alice"),
        ):
            monitor.publish(topic, status_offline, 1, topic == topics.OTAD_STATUS)
        otad.publish(topics.event("hub.online"), b"{}", 1, False)
        otad.publish(topics.OTAD_STATUS, b'{"state": "online"}', 1, True)
        otad.publish(topics.down(CH_B), b"real", 1, False)
        await at_monitor.wait_for(topics.OTAD_STATUS)
        await at_b.wait_for(topics.down(CH_B))
        await asyncio.sleep(0.3)
        assert at_monitor.messages == [
            (topics.event("hub.online"), b"{}"),
            (topics.OTAD_STATUS, b'{"state": "online"}'),
        ]
        assert at_otad.messages == []
        assert at_b.messages == [(topics.down(CH_B), b"real")]
        assert at_alice.messages == [(topics.OTAD_STATUS, b'{"state": "online"}')]


async def test_an_operator_writes_only_its_own_requests_and_reads_only_its_own_responses(
    secure: MosquittoBroker, certs: Pki
) -> None:
    at_otad, at_alice = Inbox(), Inbox()
    async with (
        connected(
            tls_settings(secure, certs, "otad"), topics.CTL_REQUEST_WILDCARD, inbox=at_otad
        ) as otad,
        connected(
            tls_settings(secure, certs, "alice"), "ota/v1/ctl/#", topics.EVENTS_WILDCARD,
            topics.down(CH_A), inbox=at_alice,
        ) as alice,
        connected(tls_settings(secure, certs, CH_A)) as ch_a,
        connected(tls_settings(secure, certs, supplier(SUPPLIER_X))) as sx,
    ):  # fmt: skip
        # nobody but the operator itself writes its request topic; no CH or supplier writes one
        alice.publish(topics.ctl_request("bob"), b"as bob", 1, False)
        alice.publish(topics.down(CH_A), b"as otad", 1, False)
        ch_a.publish(topics.ctl_request(CH_A), b"from a CH", 1, False)
        ch_a.publish(topics.ctl_request("alice"), b"from a CH", 1, False)
        sx.publish(topics.ctl_request(supplier(SUPPLIER_X)), b"from a supplier", 1, False)
        sx.publish(topics.ctl_request("alice"), b"from a supplier", 1, False)
        await asyncio.sleep(0.3)
        alice.publish(topics.ctl_request("alice"), b"alice's", 1, False)
        await at_otad.wait_for(topics.ctl_request("alice"))
        await asyncio.sleep(0.3)
        assert at_otad.messages == [(topics.ctl_request("alice"), b"alice's")]
        otad.publish(topics.ctl_response("bob"), b"bob's", 1, False)
        otad.publish(topics.event("hub.online"), b"{}", 1, False)
        otad.publish(topics.ctl_response("alice"), b"alice's answer", 1, False)
        await at_alice.wait_for(topics.ctl_response("alice"))
        await asyncio.sleep(0.3)
        # its own response and the monitoring feed (otactl campaign watch follows it), nothing
        # of another operator's and no downlink
        assert at_alice.messages == [
            (topics.event("hub.online"), b"{}"),
            (topics.ctl_response("alice"), b"alice's answer"),
        ]


async def test_the_local_listener_takes_password_users_under_the_same_acl(
    secure: MosquittoBroker, certs: Pki
) -> None:
    local = MqttSettings(
        client_id="local-tool",
        host="127.0.0.1",
        port=secure.port,
        username=LOCAL_USER,
        password=LOCAL_PASSWORD,
        connect_timeout=5.0,
    )
    at_local = Inbox()
    async with (
        connected(tls_settings(secure, certs, "otad")) as otad,
        connected(local, "ota/v1/#", inbox=at_local) as tool,
    ):
        tool.publish(topics.event("hub.online"), b"forged", 1, False)
        otad.publish(topics.down(CH_A), b"not for a monitor", 1, False)
        otad.publish(topics.event("hub.online"), b"{}", 1, False)
        await at_local.wait_for(topics.event("hub.online"))
        await asyncio.sleep(0.3)
        assert at_local.messages == [(topics.event("hub.online"), b"{}")]


# --------------------------------------------------------------------------- who connects


def _refused_settings(broker: MosquittoBroker, certs: Pki, case: str) -> MqttSettings:
    plain = {"client_id": f"refused-{case}", "host": "127.0.0.1", "connect_timeout": 5.0}
    if case == "anonymous on the local listener":
        return MqttSettings(port=broker.port, **plain)  # type: ignore[arg-type]
    if case == "wrong password on the local listener":
        return MqttSettings(
            port=broker.port,
            username=LOCAL_USER,
            password="guess",
            **plain,  # type: ignore[arg-type]
        )
    if case == "a CH's GUID and no password on the local listener":
        return MqttSettings(port=broker.port, username=CH_A, **plain)  # type: ignore[arg-type]
    if case == "TLS without a client certificate":
        return MqttSettings(
            port=broker.tls_port,
            tls_ca=str(certs.broker_ca),
            username="otad",
            **plain,  # type: ignore[arg-type]
        )
    if case == "an expired certificate":
        return tls_settings(broker, certs, CH_EXPIRED)
    if case == "a revoked certificate":
        return tls_settings(broker, certs, CH_REVOKED)
    if case == "a certificate from another CA (a CH)":
        return tls_settings(broker, certs, CH_A, rogue=True)
    if case == "a certificate from another CA (otad)":
        return tls_settings(broker, certs, "otad", rogue=True)
    if case == "plaintext on the TLS listener":
        return MqttSettings(port=broker.tls_port, username="otad", **plain)  # type: ignore[arg-type]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "anonymous on the local listener",
        "wrong password on the local listener",
        "a CH's GUID and no password on the local listener",
        "TLS without a client certificate",
        "an expired certificate",
        "a revoked certificate",
        "a certificate from another CA (a CH)",
        "a certificate from another CA (otad)",
        "plaintext on the TLS listener",
    ],
)
async def test_clients_without_valid_credentials_are_refused(
    secure: MosquittoBroker, certs: Pki, case: str
) -> None:
    settings = dataclasses.replace(_refused_settings(secure, certs, case), connect_timeout=2.0)
    client = create_client("gmqtt", settings)
    with pytest.raises(MqttConnectError):
        await asyncio.wait_for(client.connect(fail_fast=True), WAIT)
    # the broker itself is fine: a valid client connects right after
    async with connected(tls_settings(secure, certs, CH_A)):
        pass
    log = secure.log_text()
    # the refused client never got a session: it is "<unknown>" to the broker, however it ended
    assert re.search(r"Client (<unknown> (disconnected|closed)|connection from .* failed)", log), (
        log
    )
    assert log.count("New client connected") == 1, log  # only the valid one ever was


# --------------------------------------------------------------------------- with otad


def otactl_tls(
    broker: MosquittoBroker, certs: Pki, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``otactl`` as the operator alice: TLS options after the command (and from the
    environment, if given), the port from the flag."""
    cert, key = certs.files("alice")
    flags = ["--broker", f"127.0.0.1:{broker.tls_port}", "--tls-cert", cert, "--tls-key", key]
    environment = {**os.environ, "OTACTL_TLS_CA": str(certs.broker_ca), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "otad.ctl", *args, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )


def otactl_tls_json(broker: MosquittoBroker, certs: Pki, *args: str) -> Any:
    result = otactl_tls(broker, certs, *args, "--json")
    assert result.returncode == 0, f"otactl {args}: {result.stderr}"
    return json.loads(result.stdout)


async def tls_monitor(broker: MosquittoBroker, certs: Pki, raw: Inbox) -> Monitor:
    """otad's monitoring feed read as the monitor grafana (events and status: its ACL)."""
    monitor = Monitor()

    def feed(topic: str, payload: bytes, retain: bool) -> None:
        raw(topic, payload, retain)
        monitor.feed(topic, payload, retain)

    client = create_client("gmqtt", tls_settings(broker, certs, "grafana"))
    client.set_message_handler(feed)
    await client.subscribe(topics.EVENTS_WILDCARD, 1)
    await client.subscribe(topics.OTAD_STATUS, 1)
    await client.connect(fail_fast=True)
    monitor.client = client
    return monitor


async def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what}")
        await asyncio.sleep(0.25)


PREMISES = 30
HAN_ACCELERATION = 200.0


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_whole_path_over_tls_and_forgeries_have_no_effect(
    secure: MosquittoBroker, certs: Pki, tmp_path: Path
) -> None:
    """otad, otactl, a monitor and every virtual CH authenticated by certificate; an image for
    the premises' B2 devices distributed, held, activated and confirmed. On the way, everything
    the ACL must stop is tried, and shown to change nothing otad or its readers see."""
    release = make_release(
        tmp_path / "release", firmware_bytes=3 * 1024, device_type=DeviceType.B2, version=0x0200
    )
    act = activation_setup(secure, tmp_path, PREMISES, bridge_share=1.0)
    guids = [act.fleet.identity(i).guid for i in range(PREMISES)]
    for guid in guids:
        pki.issue(certs.root, Role.CH, guid, tmp_path / "hub-certs")
    carriers = sorted(
        {
            act.fleet.identity(i).guid
            for i in range(PREMISES)
            for d in act.fleet.identity(i).han
            if d.device_type is DeviceType.B2
        }
    )
    assert 0 < len(carriers) < PREMISES
    victim = carriers[0]  # a CH that receives the image
    forger = next(g for g in guids if g != victim)
    otad_cert, otad_key = certs.files("otad")
    broker_section = otad_config(
        broker={"tls_ca": str(certs.broker_ca), "tls_cert": otad_cert, "tls_key": otad_key}
    )
    raw = Inbox()
    monitor = await tls_monitor(secure, certs, raw)
    otad = Otad(
        secure,
        tmp_path / "otad",
        release.trust_dir,
        config=act.config + broker_section,
        address=f"127.0.0.1:{secure.tls_port}",
    )
    otad.start()
    try:
        await monitor.wait_online(otad, 30)
        async with (
            HubFleet(
                broker=("127.0.0.1", secure.tls_port),
                state_dir=tmp_path / "hubs",
                count=PREMISES,
                procs=1,
                trust_dir=release.trust_dir,
                bridge_share=1.0,
                activation_trust_dir=act.trust,
                han_acceleration=HAN_ACCELERATION,
                tls_ca=certs.broker_ca,
                tls_cert_dir=tmp_path / "hub-certs",
            ) as fleet,
            connected(tls_settings(secure, certs, forger, cert_dir=tmp_path / "hub-certs")) as ch,
            connected(tls_settings(secure, certs, "grafana")) as grafana,
            connected(tls_settings(secure, certs, supplier(SUPPLIER_X))) as sx,
        ):
            await monitor.wait_for(lambda: len(monitor.of_kind(HubOnline)) == PREMISES, 60)
            # otad's own probe of the broker (SPEC §1.1) finds the shipped config sound
            await wait_until(lambda: "broker check: every requirement" in otad.log(), 20, "probe")
            assert monitor.status.get("broker_warnings") == []
            imported = otactl_tls(secure, certs, "image", "import", str(release.path))
            assert imported.returncode == 0, imported.stderr

            # control requests from clients without the operator role: no transfer starts
            request = json.dumps(
                {"v": 1, "id": "forged", "cmd": "distribute",
                 "args": {"image": release.sha256, "to": [victim]}}
            ).encode()  # fmt: skip
            for client, name in ((grafana, "grafana"), (ch, forger), (sx, supplier(SUPPLIER_X))):
                client.publish(topics.ctl_request(name), request, 1, False)
                client.publish(topics.ctl_request("alice"), request, 1, False)
            # events, and a retained "offline" status, published by anyone but otad
            forged_event = json.dumps({"v": 1, "kind": "transfer.failed", "seq": 10**9}).encode()
            forged_status = json.dumps({"v": 1, "state": "offline", "pid": otad.pid}).encode()
            for client in (grafana, ch, sx):
                client.publish(topics.event("transfer.failed"), forged_event, 1, False)
                client.publish(topics.OTAD_STATUS, forged_status, 1, True)
            await asyncio.sleep(1.0)
            assert otactl_tls_json(secure, certs, "transfers") == []
            status = otactl_tls(secure, certs, "status")  # not "otad is offline"
            assert status.returncode == 0, status.stderr
            assert all(payload != forged_status for _, payload in raw.messages)
            assert all(payload != forged_event for _, payload in raw.messages)

            # the real distribution, by the operator
            dist = otactl_tls_json(secure, certs, "distribute", release.sha256, "--all-matching")
            assert sorted(dist["started"]) == carriers
            # another hub forges the victim's reports: a rejection and a wrong digest
            image = bytes.fromhex(release.sha256)
            ch.publish(
                topics.up(victim),
                TransferRejected(image=image, reason=1, detail="forged").encode(),
                1,
                False,
            )
            ch.publish(
                topics.up(victim), ImageHeld(image=image, sha256=b"\0" * 32).encode(), 1, False
            )
            await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= len(carriers), 90)
            held = [e for e in monitor.of_kind(TransferHeld) if e.guid == victim]
            assert [e.matches for e in held] == [True]
            assert monitor.of_kind(TransferFailed) == []

            # activation, over the same authenticated path
            await wait_devices(secure, certs, "held_by_device", 90, release.sha256)
            activated = otactl_tls(secure, certs, "activate", release.sha256, "--all-held")
            assert activated.returncode == 0, activated.stderr
            rows = await wait_devices(secure, certs, None, 120, release.sha256)
            assert [r for r in rows if r["state"] != "confirmed"] == []
            stats = await fleet.stats()
        assert all(stats[g].held.get(release.sha256) == release.sha256 for g in carriers)
        assert otad.terminate() == 0
    finally:
        otad.stop_quietly()
        await monitor.close()
    assert_clean_log(otad)
    assert "WARNING" not in otad.log()
    assert monitor.undecodable == 0


async def wait_devices(
    broker: MosquittoBroker, certs: Pki, state: str | None, wait_s: float, image: str
) -> list[dict[str, Any]]:
    """Poll ``otactl devices`` until every device is in ``state`` (None: in a final state)."""
    final = ("confirmed", "failed", "timed_out")
    rows: list[dict[str, Any]] = []

    def done() -> bool:
        return bool(rows) and all(
            r["state"] == state if state is not None else r["state"] in final for r in rows
        )

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        rows = otactl_tls_json(broker, certs, "devices", "--image", image)
        if done():
            return rows
        await asyncio.sleep(0.5)
    raise AssertionError(f"devices not {state or 'final'}: {sorted(r['state'] for r in rows)}")


# --------------------------------------------------------------------------- limits and the CLI


async def test_the_packet_limit_passes_the_largest_offer_and_stops_one_byte_more(
    secure: MosquittoBroker, certs: Pki
) -> None:
    """otad's largest packet reaches the CH; a control request one byte over the broker's
    max_packet_size never reaches otad (Mosquitto drops its sender instead). Mosquitto 2.0
    counts a packet as its remaining length plus one (the length bytes are not counted)."""
    limit = int(
        next(
            line.split()[1]
            for line in secure.config_path.read_text().splitlines()
            if line.startswith("max_packet_size ")
        )
    )
    down = topics.down(CH_A)
    largest = largest_packet_bytes()
    # packet = 1 + length bytes (4 here) + 2 + topic + 2 (packet id) + payload
    fitting_payload = largest - (1 + 4 + 2 + len(down) + 2)
    request = topics.ctl_request("alice")
    over_payload = limit - (2 + len(request) + 2)  # remaining length + 1 = limit + 1
    at_ch, at_otad = Inbox(), Inbox()
    async with (
        connected(
            tls_settings(secure, certs, "otad"), topics.CTL_REQUEST_WILDCARD, inbox=at_otad
        ) as otad,
        connected(tls_settings(secure, certs, CH_A), down, inbox=at_ch),
        connected(tls_settings(secure, certs, "alice", reconnect_min=5, reconnect_max=5)) as alice,
    ):
        otad.publish(down, b"o" * fitting_payload, 1, False)
        await at_ch.wait_for(down)
        assert len(at_ch.messages[0][1]) == fitting_payload
        dropped = asyncio.Event()
        alice.set_connection_handler(lambda up: None if up else dropped.set())
        alice.publish(request, b"x" * over_payload, 1, False)
        await asyncio.wait_for(dropped.wait(), WAIT)
        await asyncio.sleep(0.3)
        assert at_otad.messages == []
    assert "disconnected" in secure.log_text()


def test_loadtest_broker_secure_runs_the_shipped_config_and_prints_its_ports(
    certs: Pki, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    shutil.copytree(certs.root, pki_dir)
    for issued in ("localhost.crt", "localhost.key"):
        (pki_dir / issued).unlink()  # the command issues the broker's certificate itself
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "broker", "--secure", "--pki", str(pki_dir),
         "--workdir", str(tmp_path / "broker")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"TLS with client certificates on port (\d+).* 127\.0\.0\.1:(\d+)", line)
        assert found, line + (process.stderr.read() if process.poll() is not None else "")
        tls_port, local_port = int(found.group(1)), int(found.group(2))
        assert (tmp_path / "broker" / "mosquitto.conf").read_text().count(
            f"listener {tls_port}\n"
        ) == 1
        cert, key = certs.files(CH_A)
        settings = MqttSettings(
            client_id="cli-check", host="127.0.0.1", port=tls_port,
            tls_ca=str(pki_dir / "services-ca.crt"), tls_cert=cert, tls_key=key,
            connect_timeout=5.0,
        )  # fmt: skip

        async def connect_and_leave() -> None:
            client = create_client("gmqtt", settings)
            await client.connect(fail_fast=True)
            await client.disconnect()
            anonymous = create_client(
                "gmqtt", MqttSettings(client_id="anon", port=local_port, connect_timeout=2.0)
            )
            with pytest.raises(MqttConnectError):
                await anonymous.connect(fail_fast=True)

        asyncio.run(connect_and_leave())
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
