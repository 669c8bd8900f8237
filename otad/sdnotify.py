"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX datagram socket, a file
path or (leading ``@``) an abstract name. Each datagram is newline-separated ``KEY=value``
assignments: ``READY=1`` (start-up done), ``STATUS=...`` (one line shown by ``systemctl
status``), ``RELOADING=1`` (with ``MONOTONIC_USEC=`` on systemd >= 253), ``STOPPING=1``,
``WATCHDOG=1`` (a keep-alive ping). ``$WATCHDOG_USEC`` is the watchdog interval; pings are
expected at least that often (sd_watchdog_enabled(3) recommends every half of it), and only
from the process ``$WATCHDOG_PID`` names, if it is set.

:class:`Notifier` sends; with no ``$NOTIFY_SOCKET`` every call is a no-op, so the daemon calls
it unconditionally. A send never raises: the socket may be gone (systemd restarted, a test's
listener closed) and that must never take the daemon down; the first failure is logged.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("otad.sdnotify")


def _address(value: str) -> str | bytes | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or (``@name``) an abstract name."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock addresses (systemd >= 254) are not used by a local service


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds if systemd expects pings from this process, else None
    (``$WATCHDOG_USEC`` unset, not a positive integer, or ``$WATCHDOG_PID`` another process)."""
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        """Read ``$NOTIFY_SOCKET`` from ``env`` (default: the process environment)."""
        environ = os.environ if env is None else env
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET %r is not a unix socket address: not notifying", raw)
        self._socket: socket.socket | None = None
        self._failed = False
        self.sent: list[str] = []
        """Every message sent (newest last, at most 100): for the status and for tests."""

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="...")``); True if sent.

        A value must be one line (newlines become spaces)."""
        if self._address is None:
            return False
        text = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        )
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(text.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
            return False
        self._failed = False
        self.sent.append(text)
        del self.sent[:-100]
        return True

    def ready(self, status: str) -> None:
        """``READY=1`` with a status line."""
        self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """A ``STATUS=`` line."""
        self.notify(STATUS=status)

    def reloading(self, monotonic_usec: int) -> None:
        """``RELOADING=1`` (a reload began); :meth:`ready` ends it."""
        self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self, status: str) -> None:
        """``STOPPING=1`` with a status line."""
        self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        """A ``WATCHDOG=1`` keep-alive ping."""
        self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket (later calls reopen it)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
