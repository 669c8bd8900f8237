"""The virtual CH's MQTT session is the one SPEC §1.2 specifies, on a broker with §1.1's ACL."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

from loadtest.broker import MosquittoBroker
from loadtest.runner import HubFleet
from mqttio import MqttSettings, create_client
from protocol.wire import topics
from protocol.wire.messages import HubAnnounced, HubWentOffline, Message, decode

WAIT = 30.0


class StateWatcher:
    """What arrives on the CHs' state topics, as (message, retain flag)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Message, bool]] = []
        self._arrived = asyncio.Event()

    def received(self, topic: str, payload: bytes, retain: bool) -> None:
        if payload:
            self.seen.append((decode(payload), retain))
            self._arrived.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()


async def test_a_ch_confined_by_the_acl_pattern_announces_and_says_offline_on_a_clean_stop(
    tmp_path: Path,
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user watcher\ntopic read ota/v1/#\n\npattern readwrite ota/v1/ch/%u/#\n")
    with MosquittoBroker(workdir=tmp_path / "mosquitto", extra_config=f"acl_file {acl}") as broker:
        state = StateWatcher()
        watcher = create_client(
            "gmqtt",
            MqttSettings(
                client_id="watcher", username="watcher", host=broker.host, port=broker.port
            ),
        )
        watcher.set_message_handler(state.received)
        await watcher.subscribe(topics.STATE_WILDCARD, 1)
        await watcher.connect(fail_fast=True)
        fleet = HubFleet(
            broker=(broker.host, broker.port), state_dir=tmp_path / "hubs", count=1, procs=1
        )
        await fleet.start()
        try:
            (guid,) = fleet.guids
            # the ACL let the CH publish on its subtree: its username is its GUID
            await state.until(lambda: any(isinstance(m, HubAnnounced) for m, _ in state.seen))
            await fleet.stop_hubs([guid])  # clean stop
            await state.until(lambda: (HubWentOffline(guid=guid), False) in state.seen)
            # it is retained: a reader subscribing now is sent the hub offline
            state.seen.clear()
            await watcher.subscribe(topics.state(guid), 1)
            await state.until(lambda: (HubWentOffline(guid=guid), True) in state.seen)
        finally:
            await fleet.close()
            await watcher.disconnect()
        log = broker.log_text()
    # client id and username are the GUID, clean session (c1), keepalive 30 s (k30)
    assert re.search(rf"connected from \S+ as {guid} \(p\d, c1, k30, u'{guid}'\)", log), log
    assert f"Client {guid} disconnected." in log  # a DISCONNECT: the will was not what said it
