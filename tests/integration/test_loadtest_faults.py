"""The load test's fault timeline played against a real run: cuts and half-open links through
the fault proxy process, flapping hubs, a broker restart and an otad SIGKILL; afterwards otad
lists every hub online again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from loadtest.broker import MosquittoBroker
from loadtest.demo import _guids_in, start_otad
from loadtest.faultproxy import FaultPolicy, ProxyProcess
from loadtest.release import make_release
from loadtest.run import FaultPlayer, OtadProcess
from loadtest.runner import HubFleet
from loadtest.scenario import parse_scenario
from otad.ctl.client import CtlClient

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_every_fault_of_a_timeline_is_applied_and_the_fleet_comes_back(
    tmp_path: Path,
) -> None:
    scenario = parse_scenario(
        {
            "seed": 9,
            "fleet": {"hubs": 12},
            "campaign": {"timeout_s": 7},
            "faults": {
                "wan_latency_ms": 2,
                "wan_loss": 0.01,
                "wan_cuts": [{"at_s": 0.5, "share": 0.25}],
                "half_open": [{"at_s": 1.0, "share": 0.25, "for_s": 1.5}],
                "flap_share": 0.25,
                "flap_every_s": 3,
                "flap_down_s": 1,
                "broker_restart_at_s": [2.0],
                "otad_kill_at_s": [4.0],
            },
        }
    )
    release = make_release(tmp_path, firmware_bytes=4096, name="fw")
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    broker.start()
    proxy = ProxyProcess((broker.host, broker.port), FaultPolicy(loss=0.01), seed=9)
    otad = OtadProcess(
        lambda: start_otad(
            broker.address, tmp_path / "otad", release.trust_dir, tmp_path / "otad.log"
        )
    )
    fleet: HubFleet | None = None
    ctl = CtlClient(broker.host, broker.port, name="fault-test", timeout=5.0)
    try:
        await proxy.start()
        fleet = HubFleet(
            broker=(proxy.host, proxy.port),
            state_dir=tmp_path / "hubs",
            count=12,
            procs=0,
            seed=9,
            trust_dir=release.trust_dir,
        )
        await otad.start()
        first_pid = otad.pid
        await ctl.connect()
        await fleet.start()
        player = FaultPlayer(scenario, fleet, broker, proxy, otad)
        await asyncio.wait_for(player.run(time.monotonic()), 30)
        kinds = [a["kind"] for a in player.applied]
        assert [a for a in player.applied if "error" in a] == []
        assert {"cut", "half_open", "resume", "hub_down", "hub_up", "broker_restart",
                "otad_kill"} <= set(kinds)  # fmt: skip
        assert len(kinds) == len(scenario.timeline())
        assert otad.kills == 1
        assert otad.pid is not None
        assert otad.pid != first_pid
        assert otad.dead_cpu_s > 0
        assert player.faulty_hubs() == {"cut": 3, "flapping": 3, "half_open": 3}
        wanted = set(fleet.guids)
        deadline = time.monotonic() + 60
        known: set[str] = set()
        while not wanted <= known:
            assert time.monotonic() < deadline, f"{len(known & wanted)} of 12 back"
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):  # otad may still be starting
                known = _guids_in(await ctl.call("fleet.list", {}))
        assert await fleet.running() == 12
        totals = await proxy.totals()
        assert totals.packets > 0
    finally:
        await ctl.close()
        if fleet is not None:
            await fleet.close()
        await proxy.close()
        await otad.stop()
        broker.stop()
