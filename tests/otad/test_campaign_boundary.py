"""otad/campaign/ is sans-IO: no event loop, clock, store, file or MQTT, and no other otad module.

The engine is driven by its inputs alone, so the daemon's shell can journal and replay them
(see :mod:`otad.campaign`). It may use the standard library's pure parts (``random`` only as a
seeded ``random.Random``, ``zoneinfo`` for the window's time zone) and :mod:`protocol`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).resolve().parents[2] / "otad" / "campaign"
FORBIDDEN = {
    "asyncio", "socket", "ssl", "selectors", "select", "threading", "multiprocessing",
    "subprocess", "time", "os", "io", "pathlib", "shutil", "tempfile", "sqlite3", "aiosqlite",
    "gmqtt", "paho", "uvloop", "urllib", "http", "signal", "mqttio", "logging",
}  # fmt: skip
MODULES = sorted(CAMPAIGN.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_campaign_modules_import_nothing_with_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("otad"):
                assert name.startswith("otad.campaign"), f"{path.name} imports {name}"
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            pytest.fail(f"{path.name}: use a seeded random.Random, not module-level random")


def test_there_are_modules_to_check() -> None:
    assert {p.name for p in MODULES} >= {"engine.py", "spec.py", "targets.py", "window.py"}
