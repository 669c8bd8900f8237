"""protocol/ must stay sans-IO, and layered.

Sans-IO: it may import only the standard library's pure parts, cbor2 and cryptography. Layered:
each part of protocol/ imports only the parts below it in :data:`LAYERS` (SPEC's own order:
the wire under the release formats, the release formats under the transfers, the device under
the HAN client that feeds it). Every module's AST is walked, so a lazy import inside a function
counts too, and relative imports are refused so that no edge escapes the table.
"""

from __future__ import annotations

import ast
import sys
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
    stdlib = set(sys.stdlib_module_names)
    third_party = {r for r in roots if r not in stdlib and r not in {"protocol", "__future__"}}
    assert third_party <= ALLOWED_THIRD_PARTY, f"{path.name} imports {sorted(third_party)}"


def test_the_checker_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import asyncio\n    from socket import socket\n")
    assert {"asyncio", "socket"} <= imported_roots(bad)


# --------------------------------------------------------------------------- layering

#: part of protocol/ -> the other parts it may import (its own modules it always may). The
#: graph is what the code needs, no more: wan/ and han/ never see each other, release/ never
#: sees a transfer, and han/ uses device/ because the HAN client hands every byte to its Device.
LAYERS: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "clock": frozenset(),
    "transitions": frozenset({"errors"}),
    "wire": frozenset({"errors"}),
    "release": frozenset({"errors", "clock", "wire"}),
    "wan": frozenset({"errors", "clock", "transitions", "wire", "release"}),
    "device": frozenset({"errors", "clock", "transitions", "wire", "release"}),
    "han": frozenset({"errors", "clock", "transitions", "wire", "release", "device"}),
    "__init__": frozenset(),
}


def part(module: str) -> str:
    """The part of protocol/ a dotted module name belongs to ("protocol.wan.sack" -> "wan")."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def part_of_path(path: Path) -> str:
    relative = path.relative_to(PROTOCOL)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def layering_problems(path: Path, here: str) -> list[str]:
    """The imports of ``path`` (a module of part ``here``) that :data:`LAYERS` does not allow."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            if node.level:
                problems.append(f"{path.name}:{node.lineno}: relative import")
                continue
            modules = [node.module] if node.module else []
            if node.module == "protocol":  # from protocol import wan
                modules = [f"protocol.{alias.name}" for alias in node.names]
        for module in modules:
            if module.split(".")[0] != "protocol":
                continue
            there = part(module)
            if there != here and there not in LAYERS[here]:
                problems.append(f"{path.name}:{node.lineno}: {here} imports {module}")
    return problems


def test_every_part_of_protocol_has_a_row() -> None:
    assert {part_of_path(path) for path in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PROTOCOL)))
def test_protocol_module_imports_only_the_layers_below(path: Path) -> None:
    assert layering_problems(path, part_of_path(path)) == []


def test_the_checker_catches_a_forbidden_edge(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from protocol.wire.limits import MAX_U8\n"  # allowed
        "import protocol.wan.sack\n"
        "def f():\n"
        "    from protocol.device.device import Device\n"
        "    from protocol import han\n"
        "    from . import frames\n"
    )
    assert layering_problems(bad, "wan") == [
        "bad.py:4: wan imports protocol.device.device",
        "bad.py:5: wan imports protocol.han",
        "bad.py:6: relative import",
    ]
    assert layering_problems(bad, "han") == [
        "bad.py:2: han imports protocol.wan.sack",
        "bad.py:6: relative import",
    ]
    assert layering_problems(bad, "wire") == [
        "bad.py:2: wire imports protocol.wan.sack",
        "bad.py:4: wire imports protocol.device.device",
        "bad.py:5: wire imports protocol.han",
        "bad.py:6: relative import",
    ]
