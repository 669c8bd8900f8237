"""A private Mosquitto for tests, ``make demo`` and ``make bench``.

:class:`MosquittoBroker` writes a config into its own directory, starts ``mosquitto`` on a free
127.0.0.1 port, waits until the port accepts connections, and can stop (SIGTERM, then SIGKILL),
kill (SIGKILL) and restart it on the same port. On Linux the broker is also asked to die with the
thread that started it (``PR_SET_PDEATHSIG``), so a crashed test run leaves no broker behind.

    with MosquittoBroker(workdir=tmp / "broker") as broker:   # all arguments keyword-only
        print(broker.host, broker.port, broker.address)

With ``shipped=ShippedConfig(...)`` it runs the production config instead,
``systemd/mosquitto/otad.conf`` with its ACL, only the ports and file paths substituted (see
:class:`ShippedConfig`), so the file that is deployed is the file that is tested; ``port`` is
then its loopback listener's and ``tls_port`` its TLS listener's.
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "MAX_PACKET_BYTES",
    "SHIPPED_ACL",
    "SHIPPED_CONFIG",
    "BrokerError",
    "MosquittoBroker",
    "ShippedConfig",
    "find_mosquitto",
    "free_port",
    "raise_nofile_limit",
]

_FALLBACK_BINARY = "/usr/sbin/mosquitto"

#: ``max_packet_size`` of the project's brokers: SPEC §1.1 asks for at least otad's largest packet
#: (2,098,216 bytes, an ``Offer`` at its cap); 2 MiB + 4 KiB leaves room for MQTT 5 properties.
MAX_PACKET_BYTES = 2_101_248


#: The production broker config and its ACL (README, "The broker").
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "systemd" / "mosquitto" / "otad.conf"
SHIPPED_ACL = SHIPPED_CONFIG.with_name("acl")
_SHIPPED_TLS_LISTENER = "8883"
_SHIPPED_LOCAL_LISTENER = "1883 127.0.0.1"


class BrokerError(RuntimeError):
    """The broker binary is missing, or the broker would not start."""


@dataclass(frozen=True, slots=True)
class ShippedConfig:
    """The shipped broker config, made runnable in a directory of its own.

    What :meth:`render` substitutes, and nothing else: the two listeners' ports (the TLS one and
    the loopback one; their addresses stay), the paths of ``cafile``, ``certfile``, ``keyfile``,
    ``crlfile``, ``password_file``, ``acl_file``, ``persistence_location`` and ``pid_file``, and
    ``log_dest syslog`` becomes a log file in the directory. One line is appended: ``user``,
    the current user (as root Mosquitto would switch to "mosquitto", which cannot read the
    test's files). The ACL is the shipped one with ``acl_extra`` appended (the operator and
    monitor stanzas ``otactl pki issue`` prints); ``password_file`` None: an empty one (no local
    user can log in).
    """

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path
    password_file: Path | None = None
    acl_extra: str = ""
    source: Path = SHIPPED_CONFIG
    acl_source: Path = SHIPPED_ACL

    def render(self, workdir: Path, *, tls_port: int, local_port: int, log_path: Path) -> str:
        """The config text for ``workdir`` (writing the ACL, and an empty password file if
        none is given, into it)."""
        acl = workdir / "acl"
        acl.write_text(self.acl_source.read_text() + self.acl_extra)
        password_file = self.password_file
        if password_file is None:
            password_file = workdir / "passwd"
            password_file.write_text("")
        paths = {
            "cafile": self.cafile,
            "certfile": self.certfile,
            "keyfile": self.keyfile,
            "crlfile": self.crlfile,
            "password_file": password_file,
            "acl_file": acl,
            "pid_file": workdir / "mosquitto.pid",
        }
        substituted: list[str] = []
        lines = []
        for line in self.source.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in paths:
                line = f"{key} {paths[key]}"
            elif key == "persistence_location":
                line = f"{key} {workdir}/"
            elif key == "log_dest" and value == "syslog":
                line = f"log_dest file {log_path}"
            elif key == "listener" and value == _SHIPPED_TLS_LISTENER:
                line = f"listener {tls_port}"
            elif key == "listener" and value == _SHIPPED_LOCAL_LISTENER:
                line = f"listener {local_port} 127.0.0.1"
            elif key == "listener":
                raise BrokerError(f"{self.source}: unexpected listener line {line!r}")
            else:
                lines.append(line)
                continue
            substituted.append(f"{key} {value}" if key in ("listener", "log_dest") else key)
            lines.append(line)
        expected = [
            *paths,
            "persistence_location",
            "log_dest syslog",
            f"listener {_SHIPPED_TLS_LISTENER}",
            f"listener {_SHIPPED_LOCAL_LISTENER}",
        ]
        for item in expected:
            if substituted.count(item) != 1:
                raise BrokerError(
                    f"{self.source}: expected one {item!r} line to substitute, found"
                    f" {substituted.count(item)}"
                )
        lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
        return "\n".join(lines) + "\n"


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
    ceiling = _nr_open()
    if hard != resource.RLIM_INFINITY and ceiling > hard:
        # root (CAP_SYS_RESOURCE) may raise the hard limit too, up to the kernel's fs.nr_open:
        # a 10,000-CH load test's fault proxy holds two sockets per CH, over a 20,000 default
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nr_open() -> int:
    """The kernel's most open files per process (fs.nr_open); 0 if unknown."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 0


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
        shipped: run the production config (:class:`ShippedConfig`) instead of a generated one;
            every option above but ``port``, ``workdir`` and ``binary`` is then ignored, and
            ``host`` must stay 127.0.0.1 (the shipped loopback listener's).
        tls_port: the shipped config's TLS listener port (None: a free one, kept across
            :meth:`restart`).
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
        shipped: ShippedConfig | None = None,
        tls_port: int | None = None,
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
        self.shipped = shipped
        self.tls_port = tls_port if tls_port is not None else 0
        if shipped is not None and host != "127.0.0.1":
            raise BrokerError("the shipped config's plaintext listener is on 127.0.0.1 only")

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
        """The generated mosquitto.conf (or the shipped one, substituted)."""
        if self.shipped is not None:
            return self.shipped.render(
                self.workdir, tls_port=self.tls_port, local_port=self.port, log_path=self.log_path
            )
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
            if self.shipped is not None and not self.tls_port:
                self.tls_port = free_port("0.0.0.0")  # noqa: S104 - as the shipped listener
            try:
                self._spawn_and_wait(timeout)
                return self
            except BrokerError:
                if attempt == attempts - 1 or "in use" not in self.log_text().lower():
                    raise
                self.port = 0  # lost a race for the port: pick another
                if self.shipped is not None:
                    self.tls_port = 0
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
