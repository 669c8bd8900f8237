"""The Prometheus collector in memory: the figures are the owners' own, every family and label
is there from the start, the scrape thread gets them through the loop, a blocked loop shows."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from shellkit import Shell, guids, shell

from otad.campaign.engine import CampaignState
from otad.config import Config, ConfigError, MetricsConfig, load_config
from otad.devices import DeviceState
from otad.histogram import Histogram
from otad.metrics import (
    BuildInfo,
    LoopHandover,
    MetricsServer,
    OtadCollector,
    Sources,
    serve,
    take_figures,
)
from otad.store import TransferState
from protocol.errors import Reason
from protocol.wire.messages import TransferAcked

BUILD = BuildInfo(version="9.9.9", mqtt_library="gmqtt")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def exposition(sources: Sources) -> str:
    """What a scrape returns for ``sources``, taken on this (the owners') loop."""
    server = MetricsServer(MetricsConfig(), OtadCollector(lambda: take_figures(sources), BUILD))
    return generate_latest(server.registry).decode()


def sources_of(s: Shell, **extra: object) -> Sources:
    return s.daemon._metrics_sources() if not extra else Sources(
        **{**{f: getattr(s.daemon._metrics_sources(), f) for f in Sources.__slots__}, **extra}
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_histogram_counts_a_value_at_a_bound_in_that_bucket_and_above_all_in_inf() -> None:
    h = Histogram((1.0, 0.1, 1.0, 10.0))
    assert h.bounds == (0.1, 1.0, 10.0)
    for value in (0.0, 0.1, 0.5, 1.0, 10.0, 10.000001, 1e9):
        h.observe(value)
    snap = h.snapshot()
    assert snap.counts == (2, 2, 1, 2)
    assert snap.cumulative() == [("0.1", 2), ("1.0", 4), ("10.0", 5), ("+Inf", 7)]
    assert snap.count == 7
    assert snap.total == pytest.approx(0.1 + 0.5 + 1.0 + 10.0 + 10.000001 + 1e9)
    h.observe(0.05)
    assert snap.counts == (2, 2, 1, 2)  # a snapshot is a copy
    with pytest.raises(ValueError):
        Histogram(())


async def test_before_anything_happens_every_family_and_label_is_present_at_zero(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        got = samples(exposition(s.daemon._metrics_sources()))
    info = [k for k in got if k[0] == "otad_build_info"]
    assert len(info) == 1
    assert dict(info[0][1])["version"] == "9.9.9"
    assert dict(info[0][1])["mqtt_library"] == "gmqtt"
    assert got[("otad_loop_responsive", ())] == 1
    assert got[("otad_hubs", (("state", "online"),))] == 0
    assert got[("otad_hubs", (("state", "offline"),))] == 0
    for family, states in (
        ("otad_transfers", TransferState),
        ("otad_devices", DeviceState),
        ("otad_campaigns", CampaignState),
    ):
        for state in states:
            assert got[(family, (("state", state.value),))] == 0, (family, state)
    for name in (
        "otad_blocks_sent_total",
        "otad_block_bytes_sent_total",
        "otad_retransmissions_total",
        "otad_events_published_total",
    ):
        assert got[(name, ())] == 0, name
    for reason in Reason:
        assert got[("otad_refusals_total", (("reason", reason.name),))] == 0
    for outcome in ("reported", "told", "suppressed"):
        assert got[("otad_hub_refusals_total", (("outcome", outcome),))] == 0
    assert got[("otad_control_commands_total", (("command", "status"), ("outcome", "ok")))] == 0
    for state in TransferState:
        if state is not TransferState.ACTIVE:
            key = ("otad_transfer_duration_seconds_count", (("state", state.value),))
            assert got[key] == 0
    assert got[("otad_ack_round_trip_seconds_count", ())] == 0
    assert ("otad_event_loop_lag_seconds_bucket", (("le", "+Inf"),)) in got


async def test_after_a_lossy_distribution_the_counters_are_the_transfers_own_figures(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path, firmware_bytes=16 * 1024) as s:
        fleet = guids(3)
        for guid in fleet:
            ch = s.add_ch(guid)
            acks = itertools.count()
            ch.lose = lambda reply, acks=acks: type(reply) is TransferAcked and next(acks) % 3 == 0
            s.announce(guid)
        await s.distribute()
        transfers = list(s.distribution.transfers.values())
        assert len(transfers) == 3
        s.run_until(lambda: all(t.state is TransferState.HELD for t in transfers))
        await s.settle()
        figures = take_figures(s.daemon._metrics_sources())
        got = samples(exposition(s.daemon._metrics_sources()))
        devices = s.daemon.devices
        by_state = collections.Counter(r.state for r in devices.records.values())
    assert figures.blocks_sent == sum(t.blocks_sent for t in transfers) > 0
    assert figures.bytes_sent == sum(t.bytes_sent for t in transfers) > 16 * 1024 * 3 - 1
    assert figures.retransmissions == sum(t.retransmissions for t in transfers) > 0
    assert got[("otad_blocks_sent_total", ())] == figures.blocks_sent
    assert got[("otad_block_bytes_sent_total", ())] == figures.bytes_sent
    assert got[("otad_retransmissions_total", ())] == figures.retransmissions
    assert got[("otad_hubs", (("state", "online"),))] == 3
    assert got[("otad_transfers", (("state", "held"),))] == 3
    assert got[("otad_transfer_duration_seconds_count", (("state", "held"),))] == 3
    assert got[("otad_transfer_duration_seconds_sum", (("state", "held"),))] > 0
    assert got[("otad_ack_round_trip_seconds_count", ())] > 0
    # the shell's link takes 2 x 20 ms: every round trip is above 0.025 s and below 1 s
    assert got[("otad_ack_round_trip_seconds_bucket", (("le", "0.025"),))] == 0
    assert (
        got[("otad_ack_round_trip_seconds_bucket", (("le", "1.0"),))]
        == got[("otad_ack_round_trip_seconds_count", ())]
    )
    assert got[("otad_events_published_total", ())] == s.events.published > 0
    for state in DeviceState:
        assert devices.state_counts[state] == by_state.get(state, 0)


async def test_campaigns_come_from_the_callable_and_unknown_states_are_ignored(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        counts = {"running": 2, "on_hold": 1, "no-such-state": 7}
        got = samples(exposition(sources_of(s, campaigns=lambda: counts)))
    assert got[("otad_campaigns", (("state", "running"),))] == 2
    assert got[("otad_campaigns", (("state", "on_hold"),))] == 1
    assert got[("otad_campaigns", (("state", "completed"),))] == 0
    assert not [k for k in got if k[0] == "otad_campaigns" and ("state", "no-such-state") in k[1]]


async def test_commands_are_counted_by_outcome_and_an_unknown_name_adds_no_label(
    tmp_path: Path,
) -> None:
    from test_commands import request

    async with shell(tmp_path) as s:
        assert (await request(s, "status"))["ok"]
        for n in range(3):
            assert not (await request(s, f"no-such-command-{n}"))["ok"]
        got = samples(exposition(s.daemon._metrics_sources()))
    assert got[("otad_control_commands_total", (("command", "status"), ("outcome", "ok")))] == 1
    unknown = ("otad_control_commands_total", (("command", "unknown"), ("outcome", "UNKNOWN_TYPE")))
    assert got[unknown] == 3
    assert not [k for k in got if any(v.startswith("no-such") for _, v in k[1])]


async def test_a_scrape_from_the_server_thread_gets_the_figures_through_the_loop(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        for guid in guids(2):
            s.add_ch(guid)
            s.announce(guid)
        port = free_port()
        server = await serve(MetricsConfig(port=port), s.daemon._metrics_sources(), BUILD)
        assert server is not None
        assert server.port == port
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        finally:
            await server.stop()
        got = samples(body.decode())
        assert got[("otad_loop_responsive", ())] == 1
        assert got[("otad_hubs", (("state", "online"),))] == 2
        with pytest.raises(OSError):
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())


async def test_a_blocked_loop_gives_a_scrape_build_info_and_responsive_zero(
    tmp_path: Path,
) -> None:
    async with shell(tmp_path) as s:
        sources = s.daemon._metrics_sources()
        handover = LoopHandover(asyncio.get_running_loop(), timeout=0.2)
        collector = OtadCollector(lambda: handover.call(lambda: take_figures(sources)), BUILD)
        server = MetricsServer(MetricsConfig(), collector)
        result: list[str] = []
        scraper = threading.Thread(
            target=lambda: result.append(generate_latest(server.registry).decode())
        )
        scraper.start()
        time.sleep(0.5)  # noqa: ASYNC251 - the point: the loop is blocked past the timeout
        scraper.join(5)
        await asyncio.sleep(0)  # the cancelled hand-over runs (and does nothing)
    got = samples(result[0])
    assert got[("otad_loop_responsive", ())] == 0
    assert [k for k in got if k[0] == "otad_build_info"]
    assert not [k for k in got if k[0] == "otad_hubs"]


async def test_a_port_in_use_is_a_warning_and_otad_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with shell(tmp_path) as s:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = int(taken.getsockname()[1])
            with caplog.at_level(logging.WARNING, "otad.metrics"):
                server = await serve(MetricsConfig(port=port), s.daemon._metrics_sources(), BUILD)
        assert server is None
        assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
        assert (
            await serve(
                MetricsConfig(enabled=False, port=free_port()), s.daemon._metrics_sources(), BUILD
            )
            is None
        )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[metrics]\nport = 0", "metrics.port"),
        ("[metrics]\nport = 65536", "metrics.port"),
        ("[metrics]\nport = -1", "metrics.port"),
        ('[metrics]\nport = "9464"', "metrics.port"),
        ('[metrics]\nhost = ""', "metrics.host"),
        ('[metrics]\nhost = "a b"', "metrics.host"),
        ('[metrics]\nenabled = "yes"', "metrics.enabled"),
        ("[metrics]\npath = '/x'", "metrics.path"),
    ],
)
def test_bad_metrics_settings_are_named(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "otad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {}, env={})
    assert raised.value.key == key


def test_metrics_default_to_loopback_and_the_edges_of_the_port_range_are_accepted(
    tmp_path: Path,
) -> None:
    assert Config().metrics == MetricsConfig(enabled=True, host="127.0.0.1", port=9464)
    for port in (1, 65535):
        path = tmp_path / "otad.toml"
        path.write_text(f'[metrics]\nport = {port}\nhost = "::1"\n')
        assert load_config(path, {}, env={}).metrics.port == port
