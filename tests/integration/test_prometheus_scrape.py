"""A real Prometheus server scrapes a running otad and is asked for the figures back.

Prometheus (the Debian package, ``make setup``) runs on a generated config with its own storage
directory and a free port, scraping otad's ``/metrics`` every second while a real ``otad run``
distributes an image over a real Mosquitto to a few virtual CHs. The values are then read
back through Prometheus's HTTP API (``/api/v1/query``), as a dashboard or an alert rule would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from otad_harness import assert_clean_log, free_port, otactl, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from otad.events import TransferHeld

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Prometheus:
    """One Prometheus server scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: otad\n"
            "    static_configs:\n"
            f"      - targets: [{json.dumps(target)}]\n"
        )
        self.log_path = workdir / "prometheus.log"
        self.storage = workdir / "tsdb"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector"
        return list(data["result"])

    async def until(self, expr: str, wait_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty vector."""
        deadline = time.monotonic() + wait_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = await asyncio.to_thread(self.query, expr)
            except OSError as exc:  # not listening yet
                last = exc
            else:
                if result:
                    return result
            await asyncio.sleep(0.5)
        raise AssertionError(f"{expr!r} empty after {wait_s} s ({last}): {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.mark.timeout(150)
async def test_prometheus_scrapes_a_running_otad_and_reads_the_distribution_back(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    assert shutil.which(PROMETHEUS), "prometheus is not installed: run make setup"
    metrics_port = free_port()
    release = make_release(tmp_path / "release", firmware_bytes=64 * 1024)
    config = otad_config(metrics={"host": "127.0.0.1", "port": metrics_port})
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
    async with otad_with_fleet(broker, tmp_path, release, hubs=4, config=config) as setup:
        monitor, otad = setup.monitor, setup.otad
        prometheus.start()
        try:
            up = await prometheus.until('up{job="otad"} == 1')
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
            assert otactl(broker, "image", "import", str(release.path)).returncode == 0
            assert (
                otactl(broker, "distribute", release.sha256[:12], "--all-matching").returncode == 0
            )
            await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= 4, 60)

            held = await prometheus.until('otad_transfers{state="held"} == 4')
            assert held[0]["metric"]["job"] == "otad"
            blocks = await prometheus.until(f"otad_blocks_sent_total >= {4 * release.blocks}")
            assert float(blocks[0]["value"][1]) >= 4 * release.blocks
            sent = await prometheus.until(f"otad_block_bytes_sent_total >= {4 * release.size}")
            assert float(sent[0]["value"][1]) >= 4 * release.size
            online = await prometheus.until('otad_hubs{state="online"} == 4')
            assert online
            info = await prometheus.until("otad_build_info")
            labels = info[0]["metric"]
            assert labels["mqtt_library"] == "gmqtt"
            assert labels["version"]
            assert labels["python"].startswith("3.")
            durations = await prometheus.until(
                'otad_transfer_duration_seconds_count{state="held"} == 4'
            )
            assert durations
            rtt = await prometheus.until("otad_ack_round_trip_seconds_count > 0")
            assert rtt
            campaigns = await prometheus.until('otad_campaigns{state="running"} == 0')
            assert campaigns
            lag = await prometheus.until(
                "histogram_quantile(0.99, otad_event_loop_lag_seconds_bucket) < 1"
            )
            assert lag
        finally:
            prometheus.stop()
        assert_clean_log(otad)
        assert otad.terminate() == 0
        assert "metrics on http://127.0.0.1:" in otad.log()
