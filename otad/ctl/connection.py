"""How ``otactl`` reaches the broker: the same options otad's ``[broker]`` has.

Each setting comes from, in order of precedence: a command-line flag (``--broker``,
``--username``, ``--password-file``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``,
``--client-name``), an ``OTACTL_*`` environment variable (``OTACTL_BROKER``,
``OTACTL_USERNAME``, ...), the config file, the default. The config file is ``--config FILE``
(or ``OTACTL_CONFIG``), else the first of ``$XDG_CONFIG_HOME/otactl.toml``
(``~/.config/otactl.toml``) and ``/etc/otad/otactl.toml`` that exists; it is TOML with the
flags' names as keys (``password_file``, ``tls_ca``, ...)::

    broker = "mqtt.example.net"       # HOST[:PORT]; the port defaults to 8883 with TLS, else 1883
    tls_ca = "/etc/otad/pki/services-ca.crt"
    tls_cert = "/home/alice/.config/otad/alice.crt"
    tls_key = "/home/alice/.config/otad/alice.key"

The client name (the ``<client>`` topic level of ``ota/v1/ctl/<client>/req``) defaults to the
username, else the CN of the client certificate: the identity the broker authenticated, which
its ACL lets write only its own request topic, so the name otad records as a command's actor is
the authenticated one. The MQTT client id is the name plus a per-process suffix, so two
``otactl`` of one operator never take each other's session over.

Every problem (unknown key, unreadable file, a password file without a username) is one
:class:`ConnectionConfigError` line.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mqttio import MqttSettings, split_host_port
from otad.ctl.pki import PkiError, certificate_identity
from protocol.errors import ProtocolError
from protocol.wire import topics

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PLAIN_PORT",
    "DEFAULT_TLS_PORT",
    "ENV_PREFIX",
    "KEYS",
    "Connection",
    "ConnectionConfigError",
    "default_config_files",
    "resolve",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PLAIN_PORT = 1883
DEFAULT_TLS_PORT = 8883
ENV_PREFIX = "OTACTL_"
KEYS = (
    "broker",
    "username",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "client_name",
)
"""The settings, as config-file keys; flags are ``--`` plus the key with ``-`` for ``_``, and
environment variables ``OTACTL_`` plus the key in upper case."""
MAX_PASSWORD_FILE_BYTES = 4096


class ConnectionConfigError(Exception):
    """A connection setting that cannot be used; the message is one line saying which and why."""


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and as whom ``otactl`` connects."""

    host: str
    port: int
    name: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` (bracketed for IPv6)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def settings(self, *, purpose: str, connect_timeout: float) -> MqttSettings:
        """MQTT settings of one connection; ``purpose`` (``ctl``, ``watch``) and a random
        suffix make its client id unique."""
        return MqttSettings(
            client_id=f"{self.name}.{purpose}-{os.getpid()}-{secrets.token_hex(3)}",
            host=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            connect_timeout=connect_timeout,
            reconnect_min=0.2,
            reconnect_max=1.0,
        )


def default_config_files(env: Mapping[str, str]) -> list[Path]:
    """The config files looked for when none is named, first found wins."""
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return [Path(config_home).expanduser() / "otactl.toml", Path("/etc/otad/otactl.toml")]


def _read_config(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConnectionConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConnectionConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConnectionConfigError(f"config file {path} is not TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConnectionConfigError(
            f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})"
        )
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConnectionConfigError(f"config file {path}: {key} must be a string")
    return dict(data)


def resolve(
    flags: Mapping[str, str | None],
    env: Mapping[str, str],
    *,
    config: str | None = None,
) -> Connection:
    """The connection from ``flags`` (key -> value or None when not given), the environment and
    the config file (``config``: the ``--config`` flag), by the precedence of the module
    docstring."""
    named = config or env.get(f"{ENV_PREFIX}CONFIG")
    file_values: dict[str, str] = {}
    if named:
        file_values = _read_config(Path(named).expanduser())
    else:
        for candidate in default_config_files(env):
            if candidate.is_file():
                file_values = _read_config(candidate)
                break
    merged: dict[str, str] = {}
    for key in KEYS:
        for source in (flags.get(key), env.get(f"{ENV_PREFIX}{key.upper()}"), file_values.get(key)):
            if source:
                merged[key] = source
                break
    return _build(merged)


def _build(values: Mapping[str, str]) -> Connection:
    tls_ca, tls_cert, tls_key = values.get("tls_ca"), values.get("tls_cert"), values.get("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise ConnectionConfigError("--tls-cert and --tls-key go together")
    for what, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConnectionConfigError(f"{what} {path}: not a readable file")
    uses_tls = tls_ca is not None or tls_cert is not None
    try:
        host, port = split_host_port(values.get("broker", DEFAULT_HOST))
    except ValueError as exc:
        raise ConnectionConfigError(f"--broker: {exc}") from None
    if port is None:
        port = DEFAULT_TLS_PORT if uses_tls else DEFAULT_PLAIN_PORT
    username = values.get("username")
    password = None
    password_file = values.get("password_file")
    if password_file is not None:
        if username is None:
            raise ConnectionConfigError("--password-file needs --username")
        password = _read_password(Path(password_file))
    name = values.get("client_name") or username
    if name is None and tls_cert is not None:
        try:
            name = certificate_identity(Path(tls_cert))[0]
        except PkiError as exc:
            raise ConnectionConfigError(str(exc)) from None
    if name is None:
        name = f"otactl-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        topics.check_level(name)
    except ProtocolError:
        raise ConnectionConfigError(
            f"client name {name!r} is not a safe topic level (A-Z a-z 0-9 _ . : -, 1-64)"
        ) from None
    return Connection(
        host=host,
        port=port,
        name=name,
        username=username,
        password=password,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


def _read_password(path: Path) -> str:
    try:
        with path.open("rb") as source:
            data = source.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise ConnectionConfigError(f"--password-file {path}: {exc.strerror}") from None
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        raise ConnectionConfigError(
            f"--password-file {path}: larger than {MAX_PASSWORD_FILE_BYTES} bytes"
        )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConnectionConfigError(f"--password-file {path}: not UTF-8 text") from None
