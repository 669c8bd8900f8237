"""A hub worker's loop exception handler: gmqtt's collected read loops are not reported, the
rest is (loadtest.runner._quiet_about_gmqtt_read_loops)."""

from __future__ import annotations

import asyncio
from typing import Any

from gmqtt.mqtt.protocol import MQTTProtocol

from loadtest.runner import _quiet_about_gmqtt_read_loops


class _Loop:
    def __init__(self) -> None:
        self.reported: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.reported.append(context)


async def test_only_gmqtt_read_loops_destroyed_pending_are_left_out() -> None:
    protocol = MQTTProtocol.__new__(MQTTProtocol)
    read_loop = asyncio.get_running_loop().create_task(protocol._read_loop())
    other = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
    loop = _Loop()
    try:
        destroyed = "Task was destroyed but it is pending!"
        _quiet_about_gmqtt_read_loops(loop, {"message": destroyed, "task": read_loop})  # type: ignore[arg-type]
        assert loop.reported == []
        elsewhere = {"message": "Exception in callback", "exception": ValueError()}
        for context in ({"message": destroyed, "task": other}, elsewhere):
            _quiet_about_gmqtt_read_loops(loop, context)  # type: ignore[arg-type]
        assert len(loop.reported) == 2
    finally:
        for task in (read_loop, other):
            task.cancel()
        await asyncio.gather(read_loop, other, return_exceptions=True)
