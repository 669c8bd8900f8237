"""A private Mosquitto for tests, ``make demo`` and ``make bench``.

:class:`MosquittoBroker` writes a config into its own directory, starts ``mosquitto`` on a free
127.0.0.1 port, waits until the port accepts connections, and can stop (SIGTERM, then SIGKILL),
kill (SIGKILL) and restart it on the same port. On Linux the broker is also asked to die with the
thread that started it (``PR_SET_PDEATHSIG``), so a crashed test run leaves no broker behind.

    with MosquittoBroker(workdir=tmp / "broker") as broker:   # all arguments keyword-only
        print(broker.host, broker.port, broker.address)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "MAX_PACKET_BYTES",
    "BrokerError",
    "MosquittoBroker",
    "find_mosquitto",
    "free_port",
    "raise_nofile_limit",
]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"

#: ``max_packet_size`` of the project's brokers: SPEC §1.1 asks for at least otad's largest packet
#: (2,098,216 bytes, an ``Offer`` at its cap); 2 MiB + 4 KiB leaves room for MQTT 5 properties.
MAX_PACKET_BYTES = 2_101_248


class BrokerError(RuntimeError):
    """The broker binary is missing, or the broker would not start."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary (PATH, then /usr/sbin), or raise :class:`BrokerError`."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise BrokerError(
        "mosquitto not found on PATH or at /usr/sbin/mosquitto; install it with "
        "`apt-get install mosquitto` (or `make broker`)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def raise_nofile_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the new soft limit.

    Every process holding many MQTT connections needs this (one fd per connection; the default
    soft limit of 1024 stops a fleet at about 1,011 hubs). Children inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _death_signal_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent thread dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


class MosquittoBroker:
    """One private Mosquitto process with a generated config.

    Args:
        port: fixed port, or None to pick a free one (kept across :meth:`restart`).
        host: listen address.
        allow_anonymous: accept clients without credentials (tests); with False and no
            ``password_file`` in ``extra_config`` every CONNECT is refused ("not authorised").
        persistence: enable ``persistence`` (saved in the broker's directory every
            ``autosave_interval`` seconds and at exit, and reloaded by :meth:`restart`).
        max_inflight_messages / max_queued_messages: per-client limits, sized for load tests
            (Mosquitto's defaults of 20 / 1000 would throttle a bulk sender; SPEC §1.1).
        tcp_nodelay: ``set_tcp_nodelay`` (SPEC §1.1 requires true; False only to test
            otad's broker check against a broker that breaks it).
        log_types: Mosquitto ``log_type`` values written to ``mosquitto.log``.
        extra_config: appended to the generated config verbatim.
        workdir: directory for config, log and persistence; a temporary one (removed by
            :meth:`cleanup` / the context manager) when None.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        allow_anonymous: bool = True,
        persistence: bool = False,
        autosave_interval: int = 1,
        max_inflight_messages: int = 10_000,
        max_queued_messages: int = 1_000_000,
        tcp_nodelay: bool = True,
        log_types: tuple[str, ...] = ("error", "warning", "notice"),
        extra_config: str = "",
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self._fixed_port = port
        self.port = port if port is not None else 0
        self.allow_anonymous = allow_anonymous
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.tcp_nodelay = tcp_nodelay
        self.log_types = log_types
        self.extra_config = extra_config
        self.binary = binary or find_mosquitto()
        self._own_dir = workdir is None
        self.workdir = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="mosq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def pid(self) -> int | None:
        """PID of the running broker, or None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def address(self) -> str:
        """``host:port``, the form ``--broker`` options take."""
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        """The broker's log so far (plus anything it printed on stderr)."""
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # ------------------------------------------------------------------ life cycle

    def config_text(self) -> str:
        """The generated mosquitto.conf."""
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"max_packet_size {MAX_PACKET_BYTES}",
            f"set_tcp_nodelay {'true' if self.tcp_nodelay else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"log_dest file {self.log_path}",
            *(f"log_type {kind}" for kind in self.log_types),
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # Stay the current user: as root Mosquitto would switch to "mosquitto", which cannot
            # write into our directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if self.persistence:
            lines += [
                f"persistence_location {self.workdir}/",
                f"autosave_interval {self.autosave_interval}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the broker and return once its port accepts TCP connections."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port is not None or self.port else 5
        for attempt in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait(timeout)
                return self
            except BrokerError:
                if attempt == attempts - 1 or "in use" not in self.log_text().lower():
                    raise
                self.port = 0  # lost a race for the port: pick another
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, timeout: float) -> None:
        self.config_path.write_text(self.config_text())
        raise_nofile_limit()
        with self.stderr_path.open("ab") as err:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                preexec_fn=_death_signal_preexec(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(
                    f"mosquitto exited with {code} on {self.address}:\n{self.log_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerError(f"mosquitto did not listen on {self.address}") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Mosquitto saves persistence and exits), then SIGKILL after ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: the broker dies at once, unsaved state is lost (a crash)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None

    def restart(self, *, hard: bool = False, timeout: float = 10.0) -> MosquittoBroker:
        """Stop (or with ``hard``, kill) the broker and start it again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        self._fixed_port = self.port
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop the broker and remove its temporary directory (if this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<MosquittoBroker {self.address} {state}>"
