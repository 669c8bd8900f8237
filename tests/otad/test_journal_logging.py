"""otad's log lines as journald reads them: one line per record, ``<N>`` syslog priority
prefixes and no timestamp under systemd; the plain format elsewhere."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otad.cli import OneLineFormatter, under_systemd
from otad.keyfiles import write_keypair


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("otad.test", level, __file__, 1, message, None, info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
    ],
)
def test_priority_prefixes_under_the_journal(level: int, prefix: str) -> None:
    line = OneLineFormatter(journal=True).format(record(level, "broker lost"))
    assert line == f"{prefix}otad.test: broker lost"


def test_a_traceback_stays_on_its_record_line() -> None:
    for journal in (True, False):
        line = OneLineFormatter(journal=journal).format(record(logging.ERROR, "a\nb", exc=True))
        assert "\n" not in line
        assert "Traceback" in line
        assert "boom | second line" in line


def test_plain_format_has_a_timestamp_and_the_level() -> None:
    line = OneLineFormatter(journal=False).format(record(logging.WARNING, "x"))
    assert " WARNING otad.test: x" in line
    assert line[:4].isdigit()


def test_under_systemd_from_the_environment() -> None:
    assert under_systemd({"JOURNAL_STREAM": "8:12345"})
    assert under_systemd({"INVOCATION_ID": "0123abcd"})
    assert not under_systemd({})


def test_otad_under_systemd_writes_prefixed_lines(tmp_path: Path) -> None:
    """A real otad that cannot reach any broker, under INVOCATION_ID, stopped by SIGTERM."""
    trust = tmp_path / "trust"
    trust.mkdir()
    pair = write_keypair(tmp_path / "k.pem")
    (trust / "k.pem").write_bytes(pair.public_path.read_bytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "otad", "run", "--broker", "127.0.0.1:1", "--trust", str(trust),
         "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE,
        text=True,
        env={"INVOCATION_ID": "test", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        time.sleep(3)
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    lines = err.splitlines()
    assert lines
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    warnings = [line for line in lines if "cannot connect" in line]
    assert warnings
    assert all(line.startswith("<4>") for line in warnings), warnings  # unreachable: WARNING
