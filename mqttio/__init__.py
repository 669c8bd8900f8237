"""MQTT behind one narrow interface (:class:`MqttClient`), with gmqtt and aiomqtt adapters.

>>> client = create_client("gmqtt", MqttSettings(client_id="otad-1"))  # doctest: +SKIP
"""

from __future__ import annotations

from mqttio.address import parse_broker, split_host_port
from mqttio.interface import (
    HARD_INFLIGHT_LIMIT,
    LIBRARIES,
    ConnectionHandler,
    InflightLimitError,
    MessageHandler,
    MqttClient,
    MqttConnectError,
    MqttError,
    MqttSettings,
    MqttSubscribeError,
    NotConnected,
    Will,
    create_client,
    wait_acknowledged,
)

__all__ = [
    "HARD_INFLIGHT_LIMIT",
    "LIBRARIES",
    "ConnectionHandler",
    "InflightLimitError",
    "MessageHandler",
    "MqttClient",
    "MqttConnectError",
    "MqttError",
    "MqttSettings",
    "MqttSubscribeError",
    "NotConnected",
    "Will",
    "create_client",
    "parse_broker",
    "split_host_port",
    "wait_acknowledged",
]
