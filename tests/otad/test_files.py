"""The one bounded read and the one atomic write."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from otad.files import FileError, read_bounded, write_atomic


def test_a_bounded_read_refuses_one_byte_more_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10) == b"x" * 10
    with pytest.raises(FileError, match=r"too large for a key \(more than 9 bytes\)"):
        read_bounded(path, 9, what="a key")
    with pytest.raises(FileError, match="cannot read"):
        read_bounded(tmp_path / "missing", 10)
    with pytest.raises(FileError, match="too large"):
        read_bounded("/dev/zero", 4096, what="a device")


def test_an_atomic_write_replaces_the_whole_file_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"old content, longer than the new one")
    write_atomic(path, b"new", mode=0o640)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary file left behind


def test_an_exclusive_write_never_replaces_anything(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    write_atomic(key, b"secret", mode=0o600, exclusive=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileError, match="already exists"):
        write_atomic(key, b"other", mode=0o600, exclusive=True)
    assert key.read_bytes() == b"secret"
    dangling = tmp_path / "link.pem"
    dangling.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileError, match="already exists"):
        write_atomic(dangling, b"other", mode=0o600, exclusive=True)
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem", "link.pem"]
    with pytest.raises(FileError, match="cannot write"):
        write_atomic(tmp_path / "no" / "such" / "dir", b"x")
