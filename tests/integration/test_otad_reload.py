"""SIGHUP (the unit's ExecReload=): the trust store and the revocation list are read again,
logged, and a distribution in progress carries on; SIGTERM stops within the unit's
TimeoutStopSec even mid-distribution with the broker gone.

Checked from outside: ``otactl image import`` (refused for an unknown key before the reload,
accepted after; accepted for a key before it is revoked, refused after), the CHs' events and
what every CH holds at the end.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from otad_harness import assert_clean_log, otactl, otad_config, otad_with_fleet

from loadtest.broker import MosquittoBroker
from loadtest.release import make_release
from otad.events import TransferFailed, TransferHeld
from otad.keyfiles import load_private_key, public_key_path
from protocol.release.cose import key_id

pytestmark = [pytest.mark.broker, pytest.mark.slow]

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "otad.service"
HUBS = 20


async def wait_logged(log: Callable[[], str], text: str, wait_s: float = 20.0) -> None:
    deadline = time.monotonic() + wait_s
    while text not in log():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_sighup_reloads_keys_and_revocations_without_dropping_transfers(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # a 1 MiB image in 512-byte blocks at a window of 2: long enough to be mid-way at the HUP
    release = make_release(tmp_path / "a", firmware_bytes=1024 * 1024, block_size=512)
    other_key = make_release(tmp_path / "b", firmware_bytes=4096, name="other")
    same_key = make_release(tmp_path / "a", firmware_bytes=4096, name="second", key=release.key)
    revoked = tmp_path / "revoked"
    revoked.write_text("# nothing revoked yet\n")
    config = otad_config(trust={"revoked_file": str(revoked)}, transfer={"window": 2})
    async with otad_with_fleet(broker, tmp_path, release, hubs=HUBS, config=config) as setup:
        monitor, otad = setup.monitor, setup.otad
        refused = otactl(broker, "image", "import", str(other_key.path))
        assert refused.returncode != 0
        assert "key" in (refused.stdout + refused.stderr).lower()
        setup.import_and_distribute()
        await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) > 0.05, 60)

        # a key added to the trust dir is trusted after SIGHUP
        shutil.copy(public_key_path(other_key.key), release.trust_dir / "other.pem")
        held_before = len(monitor.of_kind(TransferHeld))
        assert otad.proc is not None
        otad.proc.send_signal(signal.SIGHUP)
        other_kid = key_id(load_private_key(other_key.key).public_key()).hex()
        await wait_logged(otad.log, f"added: {other_kid}")
        assert otad.alive
        assert held_before < HUBS, "the distribution was still running at the reload"
        accepted = otactl(broker, "image", "import", str(other_key.path))
        assert accepted.returncode == 0, accepted.stderr

        # the distribution carried on to the end
        await monitor.wait_for(lambda: len(monitor.of_kind(TransferHeld)) >= HUBS, 120)
        assert monitor.of_kind(TransferFailed) == []
        held = {e.guid for e in monitor.of_kind(TransferHeld) if e.sha256 == release.sha256}
        assert held == set(setup.fleet.guids)

        # a key revoked in the revocation list is refused after SIGHUP
        signing_kid = key_id(load_private_key(release.key).public_key()).hex()
        revoked.write_text(f"{signing_kid}  # compromised\n")
        otad.proc.send_signal(signal.SIGHUP)
        await wait_logged(otad.log, "1 key id(s) revoked")
        await wait_logged(otad.log, f"no longer verifies: image {release.sha256}")
        refused = otactl(broker, "image", "import", str(same_key.path))
        assert refused.returncode != 0
        assert "revoked" in (refused.stdout + refused.stderr).lower()

        # a broken trust dir on reload keeps the current store, logged, otad carries on
        (release.trust_dir / "broken.pem").write_text("not a key")
        otad.proc.send_signal(signal.SIGHUP)
        await wait_logged(otad.log, "reload: trust store kept as it was")
        assert otad.alive
        assert "Traceback" not in otad.log()
        assert otad.terminate() == 0


def timeout_stop_s() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert match, "the unit sets TimeoutStopSec in seconds"
    return float(match.group(1))


@pytest.mark.timeout(180)
async def test_sigterm_mid_distribution_with_the_broker_gone_exits_within_timeout_stop_sec(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    release = make_release(tmp_path / "a", firmware_bytes=1024 * 1024, block_size=512)
    config = otad_config(transfer={"window": 2})
    async with otad_with_fleet(broker, tmp_path, release, hubs=HUBS, config=config) as setup:
        monitor, otad = setup.monitor, setup.otad
        setup.import_and_distribute()
        await monitor.wait_for(lambda: monitor.acked_fraction(HUBS * release.blocks) > 0.05, 60)
        await setup.fleet.close()
        broker.kill()  # nothing can be published any more: events stay in the outbox
        await asyncio.sleep(1.0)
        began = time.monotonic()
        assert otad.terminate(timeout=timeout_stop_s() + 10) == 0
        took = time.monotonic() - began
        print(f"\nSIGTERM to exit, broker gone, {HUBS} transfers active: {took:.2f} s")
        assert took < timeout_stop_s()
        with otad.db() as db:
            kept = db.execute("SELECT count(*), max(seq) FROM events").fetchone()
            states = dict(db.execute("SELECT state, count(*) FROM transfers GROUP BY state"))
            acked = db.execute("SELECT sum(blocks_acked) FROM transfers").fetchone()[0]
        assert sum(states.values()) == HUBS, states
        assert states.get("active"), states  # unfinished transfers kept, to resume
        held_seen = {e.guid for e in monitor.of_kind(TransferHeld)}
        assert states.get("held", 0) >= len(held_seen)  # every reported end is durable
        assert acked  # the progress bookkeeping was flushed
        seen = monitor.by_seq()
        assert kept[0] >= len(seen)  # the outbox lost nothing
        assert kept[1] >= max(seen)
        assert_clean_log(otad)
