"""Reading and writing the files otad and otactl own, one policy each.

* :func:`read_bounded` reads a whole file that has a size limit (a key, a firmware image, a
  release, a stored image) without ever reading more than one byte past the limit, so a wrong
  path (``/dev/zero``, a log file) is refused instead of filling memory.
* :func:`write_atomic` writes a whole file so that a crash at any instant leaves either the old
  content or the new one, never a mix: a temporary file in the same directory, fsynced, then
  renamed over the target (or, with ``exclusive``, linked to it: that fails if the target
  exists, so a key is never overwritten), then the directory fsynced, so the rename itself
  survives a power cut.

Both raise :class:`FileError` (an :class:`OSError`) whose message names the file and says why.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["FileError", "read_bounded", "write_atomic"]


class FileError(OSError):
    """A file could not be read or written; ``str(exc)`` names it and says why, in one line."""


def read_bounded(path: str | os.PathLike[str], limit: int, *, what: str = "this file") -> bytes:
    """The whole content of ``path``, refused (:class:`FileError`) if it is longer than
    ``limit`` bytes (``what`` names what the file should hold, for the message)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise FileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise FileError(f"{path}: too large for {what} (more than {limit} bytes)")
    return data


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` durably and atomically (see the module docstring), with
    permissions ``mode``. ``exclusive``: refuse (:class:`FileError`) if ``path`` exists, even as
    a dangling symbolic link. The directory must exist."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise FileError(f"{target}: cannot write: {exc.strerror or exc}") from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, target, follow_symlinks=False)  # EEXIST if anything is there
        else:
            os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, FileExistsError):
            raise FileError(f"{target}: already exists") from None
        raise FileError(f"{target}: cannot write: {exc.strerror or exc}") from None
    if exclusive:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise FileError(f"{directory}: cannot sync: {exc.strerror or exc}") from None
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
