"""otactl's campaign views on a real Mosquitto: the feed gets retained and live JSON on the
topics subscribed (events at both levels), and ``campaign watch`` follows a retained status
published on the broker to the campaign's end.

otad's control answers (the one ``campaign.status``/``campaign.history`` request ``watch`` makes
first) are the recorded contract JSON here; the daemon side of campaigns is tested end to end in
the daemon's own integration tests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loadtest.broker import MosquittoBroker
from mqttio import MqttSettings, create_client
from otad.ctl import campaign
from otad.ctl.campaign import MQTT_LINKS, Links, event_filters
from otad.ctl.campaignview import status_topic
from otad.ctl.live import WatchError, feed

pytestmark = [pytest.mark.broker]
CID = "fw-2026-12-ch"
T0 = 1796176800.0


def status(state: str = "running", updated_at: float = T0, **counts: int) -> dict[str, Any]:
    """A campaign status as the contract shapes it (one stage)."""
    by_state = {"pending": 0, "confirmed": 0, "failed": 0, **counts}
    return {
        "v": 1, "id": CID, "parent": None, "state": state, "stage": "pilot",
        "payload": {"kind": "image", "image": "9f86" * 16, "fw_version": 1},
        "created_at": T0, "updated_at": updated_at, "targets": 10, "excluded": 0,
        "blocked": 0, "hold_reason": None, "notice_at": None, "rollout_not_before": None,
        "stages": [{"name": "pilot", "kind": "pilot", "targets": 10, "started_at": T0,
                    "settled_at": None, "gate": "", "counts": by_state}],
        "counts": by_state, "failures": {}, "rate_per_minute": 60.0,
        "confirmed_per_minute": 0.0, "eta_s": None, "last_change_at": updated_at,
        "stalled_s": None,
    }  # fmt: skip


def event(seq: int, kind: str = "campaign.held") -> dict[str, Any]:
    """An event as otad publishes it, of this campaign."""
    return {
        "v": 1, "kind": kind, "seq": seq, "key": f"{kind}:{seq}", "time": T0 + seq,
        "time_iso": "2026-12-02T02:00:09.000Z", "campaign": CID, "stage": "pilot",
        "actor": "otad", "reason": "failed_rate 0.06 > 0.05",
    }  # fmt: skip


async def _publish(broker: MosquittoBroker, items: list[tuple[str, Any, bool]]) -> None:
    client = create_client(
        "gmqtt", MqttSettings(client_id="test-publisher", host=broker.host, port=broker.port)
    )
    await client.connect(fail_fast=True)
    try:
        for topic, body, retain in items:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            client.publish(topic, payload, 1, retain)
        await asyncio.sleep(0.3)
    finally:
        await client.disconnect()


async def test_the_feed_gets_retained_and_live_json_and_drops_the_rest(
    broker: MosquittoBroker,
) -> None:
    await _publish(broker, [(status_topic(CID), status(), True)])
    filters = [status_topic(CID), *event_filters([])]
    async with feed(broker.host, broker.port, filters, wait_s=5) as messages:
        first = await asyncio.wait_for(messages.get(), 5)
        assert (first.topic, first.retained, first.body["id"]) == (status_topic(CID), True, CID)
        await _publish(
            broker,
            [
                ("ota/v1/events/campaign.held", b"not json", False),
                ("ota/v1/events/campaign.held", event(3), False),
                (
                    "ota/v1/events/transfer.failed/00DB123456780001",
                    event(4, "transfer.failed"),
                    False,
                ),
            ],
        )
        got = [await asyncio.wait_for(messages.get(), 5) for _ in range(2)]
        assert [m.body["seq"] for m in got] == [3, 4]
        assert messages.empty()


async def test_the_feed_says_when_the_broker_is_not_there() -> None:
    from loadtest.broker import free_port

    with pytest.raises(WatchError, match="cannot reach the MQTT broker"):
        async with feed("127.0.0.1", free_port(), ["x"], wait_s=2):
            pass


def test_watch_follows_the_retained_status_on_the_broker_to_the_end(
    broker: MosquittoBroker,
) -> None:
    asyncio.run(_publish(broker, [(status_topic(CID), status(updated_at=T0), True)]))

    @contextlib.asynccontextmanager
    async def answers(args: argparse.Namespace) -> AsyncIterator[Any]:
        async def call(cmd: str, call_args: dict[str, Any]) -> Any:
            return {"campaign.status": status(), "campaign.history": []}[cmd]

        yield call

    def later() -> None:
        asyncio.run(asyncio.sleep(1.0))
        asyncio.run(
            _publish(
                broker,
                [
                    ("ota/v1/events/campaign.held", event(9), False),
                    (status_topic(CID), status("completed", T0 + 9, confirmed=10), True),
                ],
            )
        )

    publisher = threading.Thread(target=later)
    publisher.start()
    out = io.StringIO()
    try:
        code = campaign.main(
            ["--broker", broker.address, "campaign", "watch", CID, "--timeout", "5"],
            out=out,
            links=Links(session=answers, subscribe=MQTT_LINKS.subscribe),
        )
    finally:
        publisher.join()
    text = out.getvalue()
    assert code == 0, text
    assert "RUNNING" in text
    assert text.splitlines().count("COMPLETED") == 1
    assert "held  pilot  by otad: failed_rate 0.06 > 0.05" in text  # the live event, logged
