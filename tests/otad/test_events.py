"""Typed monitoring events: their JSON, keys, topics and subjects, and the one decoder."""

from __future__ import annotations

import json
from typing import Any

import pytest

from otad.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    CredentialsFailed,
    CredentialsReplaced,
    DeviceConfirmed,
    DeviceFailed,
    DistributionResumed,
    DistributionStalled,
    EventDecodeError,
    HubFlapping,
    HubForgotten,
    HubOffline,
    HubOnline,
    HubRefused,
    HubSteady,
    ImageImported,
    MonitorEvent,
    TransferFailed,
    TransferHeld,
    TransferProgress,
    TransferStalled,
    TransferStarted,
    decode_event,
    event_topic,
    iso_time,
    payload_topic,
    supplier_topic_id,
)
from otad.jsonwire import dumps

GUID = "0123456789ABCDEF"
IMAGE = "9f" * 32
T = 1_767_225_600.1234  # 2026-01-01T00:00:00.123Z, and a bit
ACME = supplier_topic_id("Acme Ltd")


def one_of_each() -> list[MonitorEvent]:
    transfer = {"time": T, "guid": GUID, "image": IMAGE, "attempt": 2}
    device = {
        "time": T,
        "guid": GUID,
        "supplier": "Acme Ltd",
        "supplier_topic": ACME,
        "device_id": "00DB1234567890AE",
        "device_type": "B2",
        "image": IMAGE,
        "counter": 9,
    }
    return [
        ImageImported(
            time=T, image=IMAGE, device_type="CH", fw_version=0x01020304, sequence=7, size=3000,
            block_size=1024, blocks=3,
        ),
        HubOnline(
            time=T, guid=GUID, segment="cell-1", supplier="S", fw_version=0x01000002,
            hw_version=0x0100,
        ),
        HubOffline(time=T, guid=GUID),
        HubForgotten(time=T, guid=GUID, online=False, transfers=2, devices=3),
        HubFlapping(time=T, guid=GUID, changes=8, window_s=2.5),
        HubSteady(time=T, guid=GUID, online=True, changes=893, flapped_s=30.2, quiet_s=120.0),
        HubRefused(
            time=T,
            guid=GUID,
            source="state",
            of=32,
            reason="MALFORMED",
            detail="supplier must be 1 to 64 characters: ''",
            told=False,
        ),
        TransferStarted(**transfer, blocks_total=3),
        TransferProgress(**transfer, blocks_acked=1, blocks_total=3, bytes_sent=1024),
        TransferHeld(
            **transfer, sha256=IMAGE, matches=True, blocks_total=3, bytes_sent=3000,
            retransmissions=1,
        ),
        TransferFailed(**transfer, reason="TIMED_OUT", code=44, detail="9 timeouts"),
        TransferStalled(
            **transfer, idle_s=31.5, phase="streaming", scheduler="queued", blocks_acked=1,
            blocks_total=3,
        ),
        DistributionStalled(
            time=T, image=IMAGE, active=5, idle_s=30.0, blocks_acked=3, blocks_total=15,
            offline=5, pending=0, running=0, queued=0, throttled=0,
        ),
        DistributionResumed(time=T, image=IMAGE, active=5, stalled_s=12.5),
        DeviceConfirmed(**device, fw_version=0x01020305, proof="signed_alert"),
        DeviceFailed(
            **device, fw_version=0x01020304, state="failed", reason="SELF_TEST_FAILED",
            rolled_back=True,
        ),
        CredentialsReplaced(
            time=T, guid=GUID, device_id="00DB1234567890AE", device_type="B2", counter=11,
            attempts=2, old_kid="0123456789abcdef", new_kid="fedcba9876543210",
        ),
        CredentialsFailed(
            time=T, guid=GUID, device_id="00DB1234567890AE", device_type="B2", counter=12,
            attempts=3, old_kid="0123456789abcdef", reason="TIMED_OUT",
        ),
        *(
            cls(time=T, campaign="fw-2026-12", stage="pilot", actor="alice", reason="why",
                ordinal=1)
            for cls in EVENT_TYPES.values()
            if cls.KIND.startswith("campaign.")
        ),
    ]  # fmt: skip


def published(event: MonitorEvent, seq: int) -> bytes:
    """The body the outbox publishes."""
    return dumps({**event.payload(), "seq": seq, "key": event.key()})


def held_example() -> TransferHeld:
    """The example ``transfer.held`` event."""
    (held,) = [e for e in one_of_each() if isinstance(e, TransferHeld)]
    return held


def test_every_kind_has_one_class_and_one_example() -> None:
    assert [type(e) for e in one_of_each()] == list(EVENT_TYPES.values())
    assert all(cls.__name__ == "".join(p.title() for p in kind.split(".")) for kind, cls in
               EVENT_TYPES.items())  # fmt: skip


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: e.KIND)
def test_a_published_event_decodes_to_the_same_event(event: MonitorEvent) -> None:
    decoded = decode_event(published(event, 42))
    assert decoded == event
    assert type(decoded) is type(event)
    assert decoded.seq == 42
    assert decoded.key() == event.key()
    assert decode_event(json.loads(published(event, 42))) == event  # parsed JSON too


def test_the_json_carries_the_envelope_iso_times_and_hex_versions() -> None:
    hub = one_of_each()[1]
    body = json.loads(published(hub, 7))
    assert body == {
        "v": SCHEMA_VERSION,
        "kind": "hub.online",
        "seq": 7,
        "key": f"hub.online:{GUID}:1767225600123",
        "time": 1767225600.123,
        "time_iso": "2026-01-01T00:00:00.123Z",
        "guid": GUID,
        "segment": "cell-1",
        "supplier": "S",
        "fw_version": 0x01000002,
        "fw_version_hex": "0x01000002",
        "hw_version": 0x0100,
        "hw_version_hex": "0x0100",
    }
    assert json.loads(published(one_of_each()[0], 1))["fw_version_hex"] == "0x01020304"
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"


def test_keys_are_the_same_facts_as_before_so_a_restart_stores_each_once() -> None:
    keys = {e.KIND: e.key() for e in one_of_each() if not e.KIND.startswith("campaign.")}
    assert keys == {
        "image.imported": f"image.imported:{IMAGE}",
        "hub.online": f"hub.online:{GUID}:1767225600123",
        "hub.offline": f"hub.offline:{GUID}:1767225600123",
        "hub.forgotten": f"hub.forgotten:{GUID}:1767225600123",
        "hub.flapping": f"hub.flapping:{GUID}:1767225600123",
        "hub.steady": f"hub.steady:{GUID}:1767225600123",
        "hub.refused": f"hub.refused:{GUID}:MALFORMED:1767225600123",
        "transfer.started": f"transfer.started:{GUID}:{IMAGE}:2",
        "transfer.progress": f"transfer.progress:{GUID}:{IMAGE}:2:1",
        "transfer.held": f"transfer.held:{GUID}:{IMAGE}:2",
        "transfer.failed": f"transfer.failed:{GUID}:{IMAGE}:2",
        "transfer.stalled": f"transfer.stalled:{GUID}:{IMAGE}:2:1767225600123",
        "distribution.stalled": f"distribution.stalled:{IMAGE}:1767225600123",
        "distribution.resumed": f"distribution.resumed:{IMAGE}:1767225600123",
        "device.confirmed": f"device.confirmed:00DB1234567890AE:{IMAGE}:9",
        "device.failed": f"device.failed:00DB1234567890AE:{IMAGE}:9:SELF_TEST_FAILED",
        "credentials.replaced": "credentials.replaced:00DB1234567890AE:11",
        "credentials.failed": "credentials.failed:00DB1234567890AE:12:TIMED_OUT",
    }
    campaign_keys = {e.key() for e in one_of_each() if e.KIND.startswith("campaign.")}
    assert "campaign.held:fw-2026-12:pilot:1" in campaign_keys
    assert len(campaign_keys) == sum(k.startswith("campaign.") for k in EVENT_TYPES)


def test_a_field_added_later_decodes_to_its_default_from_an_older_payload() -> None:
    event = next(e for e in one_of_each() if e.KIND == "transfer.held")
    older = json.loads(published(event, 7))
    del older["campaign"]
    assert decode_event(older) == event  # campaign "" in the example
    missing = json.loads(published(event, 7))
    del missing["guid"]
    with pytest.raises(EventDecodeError, match="no 'guid'"):
        decode_event(missing)


def test_only_progress_reports_are_superseded_and_only_within_one_attempt() -> None:
    by_kind = {e.KIND: e for e in one_of_each()}
    subject = f"{GUID}:{IMAGE}:2"
    assert {k for k, e in by_kind.items() if e.subject() == subject} == {
        "transfer.progress",
        "transfer.held",
        "transfer.failed",
    }
    assert [k for k, cls in EVENT_TYPES.items() if cls.SUPERSEDABLE] == ["transfer.progress"]
    assert by_kind["transfer.started"].subject() is None
    assert by_kind["transfer.stalled"].subject() is None


def test_events_about_one_ch_carry_its_guid_in_the_topic() -> None:
    topics = {e.KIND: e.topic("ota/v1/events") for e in one_of_each()}
    for kind, topic in topics.items():
        if kind.startswith(("hub.", "transfer.", "credentials.")):
            assert topic == f"ota/v1/events/{kind}/{GUID}"
        elif kind.startswith("device."):
            assert topic == f"ota/v1/alerts/{ACME}/{kind}/{GUID}"
        else:
            assert topic == f"ota/v1/events/{kind}"
    # a stored payload's topic is found the same way (a restart re-publishes from the outbox)
    assert event_topic("p", "transfer.held", GUID) == f"p/transfer.held/{GUID}"
    assert event_topic("p", "transfer.held", "not/a+guid") == "p/transfer.held"
    assert event_topic("p", "image.imported", GUID) == "p/image.imported"


def test_alerts_go_under_their_suppliers_own_topic_level() -> None:
    assert ACME.startswith("acme-ltd-")
    assert len(ACME) == len("acme-ltd-") + 8
    # labels that slug alike get different levels; odd characters never reach the topic
    ids = {supplier_topic_id(label) for label in ("Acme Ltd", "ACME-LTD", "acme ltd", "Åcme Ltd")}
    assert len(ids) == 4
    for label in ("Süd-Netz/3", "+#", "   ", "\u00e9\u00e9", "a" * 64):
        level = supplier_topic_id(label)
        assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in level), level
        assert 9 < len(level) <= 32 + 9
    assert supplier_topic_id("+#").startswith("supplier-")
    # a stored payload's topic is found the same way (a restart re-publishes from the outbox)
    (confirmed,) = [e for e in one_of_each() if isinstance(e, DeviceConfirmed)]
    assert payload_topic("p", confirmed.KIND, confirmed.payload()) == confirmed.topic("p")
    forged = {**confirmed.payload(), "supplier_topic": "../other/#"}
    assert payload_topic("p", confirmed.KIND, forged) == f"p/device.confirmed/{GUID}"


def test_fields_the_decoder_does_not_know_are_compatible_additions() -> None:
    body: dict[str, Any] = json.loads(published(one_of_each()[2], 3))
    body["new_field"] = {"anything": [1, 2]}
    assert decode_event(body) == HubOffline(time=T, guid=GUID)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "schema version 2"),
        ({"v": True}, "schema version True"),
        ({"kind": "hub.exploded"}, "unknown kind"),
        ({"kind": None}, "unknown kind"),
        ({"guid": 5}, "'guid' must be str"),
        ({"attempt": 1.5}, "'attempt' must be int"),
        ({"attempt": True}, "'attempt' must be int"),
        ({"matches": 1}, "'matches' must be bool"),
        ({"seq": -1}, "seq must be"),
        ({"time": "noon"}, "'time' must be float"),
    ],
)
def test_what_is_not_an_event_is_refused_by_name(change: dict[str, Any], message: str) -> None:
    body = {**json.loads(published(held_example(), 9)), **change}
    with pytest.raises(EventDecodeError, match=message):
        decode_event(body)


def test_a_missing_field_or_a_payload_that_is_not_an_object_is_refused() -> None:
    body = json.loads(published(held_example(), 9))
    del body["sha256"]
    with pytest.raises(EventDecodeError, match="no 'sha256'"):
        decode_event(body)
    for bad in (b"not json", b"[1, 2]", b"\xff", "null"):
        with pytest.raises(EventDecodeError):
            decode_event(bad)
    assert isinstance(EventDecodeError("x"), ValueError)
