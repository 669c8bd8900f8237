"""The conformance kit (loadtest/conformance.py) against the project's own virtual CH.

A conforming virtual CH passes every clause (the restart clauses included: the restart is a
power cut and a start from the hub's state directory); a deliberately broken one
(``HubOptions.faults``) fails, with the clause that catches the fault named; and the
``python -m loadtest conformance`` command runs end to end. Each test starts its own Mosquitto.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.broker import MosquittoBroker
from loadtest.conformance import CLAUSES, Outcome, Report, Restart, run_conformance
from loadtest.hub import HubGroup, HubOptions
from otad.ctl.imagetool import keys_new
from otad.keyfiles import load_trust_dir, public_key_path
from protocol.errors import Reason
from protocol.wire.messages import MINOR_VERSION

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

TIMEOUT = 2.0  # the kit's wait per answer: everything is local


@dataclass
class KitSetup:
    """The kit's key directory and the CH trust directory holding its public half."""

    kit_dir: Path
    hub_trust: Path


@pytest.fixture
def keys(tmp_path: Path) -> KitSetup:
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    keys_new(kit_dir / "release.pem")
    hub_trust = tmp_path / "hub-trust"
    hub_trust.mkdir()
    shutil.copy(public_key_path(kit_dir / "release.pem"), hub_trust / "release.pem")
    return KitSetup(kit_dir, hub_trust)


@asynccontextmanager
async def virtual_ch(
    broker: MosquittoBroker,
    keys: KitSetup,
    state_dir: Path,
    faults: frozenset[str] = frozenset(),
    protocol_minor: int = MINOR_VERSION,
) -> AsyncIterator[tuple[HubGroup, str, Restart]]:
    """One virtual CH (index 0) and a restart callable that cuts its power and starts it again
    from its state directory."""
    group = HubGroup(
        options=HubOptions(
            host=broker.host, port=broker.port, faults=faults, protocol_minor=protocol_minor
        ),
        trust=load_trust_dir(keys.hub_trust),
        state_dir=state_dir,
        indices=[0],
    )
    guid = group.guids[0]
    assert await group.start() == 1

    async def restart() -> None:
        await group.stop([guid], crash=True)
        assert await group.start([guid]) == 1

    try:
        yield group, guid, restart
    finally:
        await group.close()


async def test_virtual_ch_passes_every_clause(
    broker: MosquittoBroker, keys: KitSetup, tmp_path: Path
) -> None:
    lines: list[str] = []
    async with virtual_ch(broker, keys, tmp_path / "state") as (group, guid, restart):
        report = await run_conformance(
            broker.address,
            guid,
            keys.kit_dir,
            restart=restart,
            timeout=TIMEOUT,
            on_result=lambda r: lines.append(r.line()),
        )
        hub = group.hubs[guid]
        overruns = hub.receiver.rejected[Reason.LIMITS_EXCEEDED]
        stats = group.stats()[guid]
    assert [r.outcome for r in report.results] == [Outcome.PASS] * len(CLAUSES), "\n".join(lines)
    assert report.passed
    assert "CONFORMS" in report.verdict()
    # the kit is a conforming sender: it never overran the CH's window or buffer...
    assert overruns == 0
    # ...and it did what the clauses say: refused manifests and bad blocks reached the CH
    assert stats.rejected.get("BAD_SIGNATURE") == 1
    assert stats.rejected.get("UNKNOWN_KEY_ID") == 1
    assert stats.rejected.get("EXPIRED") == 1
    assert stats.rejected.get("WRONG_DEVICE_TYPE") == 1
    assert stats.rejected.get("REPLAYED") == 1
    assert stats.restored
    assert len(stats.held) >= 4  # duplicates-reordered, full-transfer, held-re-reported, resume
    assert stats.refused == {"MALFORMED": 1}  # refused-understood: the CH took the Refused


async def test_a_ch_of_protocol_1_0_passes_every_clause_but_the_1_1_ones(
    broker: MosquittoBroker, keys: KitSetup, tmp_path: Path
) -> None:
    async with virtual_ch(broker, keys, tmp_path / "state", protocol_minor=0) as (_, guid, rs):
        report = await run_conformance(broker.address, guid, keys.kit_dir, restart=rs,
                                       timeout=TIMEOUT)  # fmt: skip
    only_1_1 = {"held-block-reported", "refused-understood"}
    outcomes = {r.name: r.outcome for r in report.results}
    assert {name for name, o in outcomes.items() if o is Outcome.SKIP} == only_1_1, _text(report)
    assert all(o is Outcome.PASS for name, o in outcomes.items() if name not in only_1_1)
    assert report.passed


@pytest.mark.parametrize(
    ("fault", "clause"),
    [
        ("accept_bad_signature", "manifest-bad-signature"),
        ("no_rereport", "held-re-reported"),
        ("forget_on_restart", "resume-after-restart"),
    ],
)
async def test_broken_ch_fails_the_clause_that_catches_it(
    broker: MosquittoBroker, keys: KitSetup, tmp_path: Path, fault: str, clause: str
) -> None:
    async with virtual_ch(broker, keys, tmp_path / "state", frozenset({fault})) as (
        _group,
        guid,
        restart,
    ):
        report = await run_conformance(
            broker.address, guid, keys.kit_dir, restart=restart, timeout=TIMEOUT
        )
    failed = {r.name: r for r in report.failed}
    assert clause in failed, _text(report)
    assert not report.passed
    assert clause in report.verdict()
    line = failed[clause].line()
    assert line.startswith("FAIL")
    assert "expected" in line
    assert "saw" in line
    # the fault breaks what it breaks, not the announcement the rest stands on
    assert report.outcome("announcement") is Outcome.PASS


async def test_cli_runs_end_to_end(broker: MosquittoBroker, keys: KitSetup, tmp_path: Path) -> None:
    async with virtual_ch(broker, keys, tmp_path / "state") as (_group, guid, _restart):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest",
            "conformance",
            "--broker",
            broker.address,
            "--guid",
            guid,
            "--trust",
            str(keys.kit_dir),
            "--timeout",
            str(TIMEOUT),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 45)
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    lines = text.splitlines()
    assert len(lines) == len(CLAUSES) + 1
    for line, item in zip(lines, CLAUSES, strict=False):
        assert line.split()[0] in ("PASS", "SKIP"), line
        assert item.name in line, line
    # without --restart-command the restart clauses are skipped, and say why
    skipped = [line for line in lines if line.startswith("SKIP")]
    assert any("resume-after-restart" in line for line in skipped)
    assert any("last-will" in line for line in skipped)
    assert lines[-1].startswith(f"verdict: {guid} CONFORMS")


def _text(report: Report) -> str:
    return "\n".join([*(r.line() for r in report.results), report.verdict()])
