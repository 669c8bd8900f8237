"""Shared fixtures. Keep this file small: every test run imports it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.broker import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on a free 127.0.0.1 port, stopped after the test (log and config are
    kept in the test's tmp_path)."""
    instance = MosquittoBroker(workdir=tmp_path / "mosquitto")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(params=["gmqtt", "aiomqtt"])
def mqtt_library(request: pytest.FixtureRequest) -> str:
    """Name of an MQTT adapter: tests using this run once per adapter."""
    return str(request.param)
