"""The gmqtt adapter frames QoS 0 PUBLISH packets itself (the hot path of every block): the
bytes must be exactly what gmqtt's own MQTT 3.1.1 packet builder makes."""

from __future__ import annotations

import pytest
from gmqtt import Message
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.mqtt.package import PublishPacket

from mqttio.gmqtt_adapter import _publish_qos0


class _Protocol:
    proto_ver = MQTTv311


# 94/95 and 16350/16351 put the remaining length (2 + 31 bytes of topic + payload) on either side
# of 127 and 16383, where its encoding grows a byte
@pytest.mark.parametrize(
    "size", [0, 1, 94, 95, 100, 126, 127, 128, 1100, 16350, 16351, 16383, 16384, 2_097_152]
)
@pytest.mark.parametrize("retain", [False, True])
def test_qos0_publish_matches_gmqtt(size: int, retain: bool) -> None:
    topic = "ota/v1/ch/00112233AABBCCDD/down"
    payload = bytes(i % 251 for i in range(size))
    _mid, theirs = PublishPacket.build_package(
        Message(topic, payload, qos=0, retain=retain), _Protocol()
    )
    assert _publish_qos0(topic, payload, retain) == bytes(theirs)


def test_non_ascii_topic_lengths_count_utf8_bytes() -> None:
    # MQTT 3.1.1 section 1.5.3: string lengths are in bytes. (gmqtt 0.8 counts characters in the
    # remaining length, so it cannot serve as the reference here.)
    packet = _publish_qos0("ota/v1/ü", b"xy", False)
    name = "ota/v1/ü".encode()
    assert packet == bytes((0x30, 2 + len(name) + 2)) + len(name).to_bytes(2, "big") + name + b"xy"
