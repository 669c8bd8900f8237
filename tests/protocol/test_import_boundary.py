"""protocol/ must stay sans-IO: it may import only the standard library's pure parts, cbor2
and cryptography. This walks every module's AST, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
FORBIDDEN = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "threading",
    "multiprocessing",
    "subprocess",
    "time",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "sqlite3",
    "aiosqlite",
    "aiomqtt",
    "gmqtt",
    "paho",
    "uvloop",
    "urllib",
    "http",
    "random",
    "signal",
}
ALLOWED_THIRD_PARTY = {"cbor2", "cryptography"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(PROTOCOL.rglob("*.py"))


def test_there_are_protocol_modules() -> None:
    assert len(MODULES) >= 5


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_does_no_io(path: Path) -> None:
    roots = imported_roots(path)
    assert not roots & FORBIDDEN, f"{path.name} imports {sorted(roots & FORBIDDEN)}"
    import sys

    stdlib = set(sys.stdlib_module_names)
    third_party = {r for r in roots if r not in stdlib and r not in {"protocol", "__future__"}}
    assert third_party <= ALLOWED_THIRD_PARTY, f"{path.name} imports {sorted(third_party)}"


def test_the_checker_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import asyncio\n    from socket import socket\n")
    assert {"asyncio", "socket"} <= imported_roots(bad)
