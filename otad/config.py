"""otad configuration: one TOML file (stdlib :mod:`tomllib`) into frozen dataclasses.

Every setting has a default, so an empty file (or none) is a valid configuration. Everything is
validated once, at start, and the first problem is raised as a :class:`ConfigError` whose one-line
message names the key (``transfer.window: must be ...``). Unknown sections and keys are errors,
so a typo never passes silently. CLI flags arrive as *overrides* (dotted keys, see
:func:`cli_overrides`) and win over the file.

Relative paths in the file are relative to the file's directory; relative paths given as
overrides are relative to the current directory. ``store.state_dir`` defaults to the first entry
of ``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``) or else ``/var/lib/otad``.
The files named here are not opened by this module: whoever uses them reports a missing one.
``systemd/otad.example.toml`` documents every key with its default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mqttio.address import split_host_port
from protocol.wire.messages import Block

__all__ = [
    "ActivationConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "EventsConfig",
    "LogConfig",
    "MetricsConfig",
    "StoreConfig",
    "TransferConfig",
    "TrustConfig",
    "cli_overrides",
    "default_client_id",
    "load_config",
]

DEFAULT_STATE_DIR = Path("/var/lib/otad")
MAX_WINDOW = 64
"""Largest ``transfer.window``: otad's cap on one CH's blocks in flight (the block size is the
signed manifest's, never a setting)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # as protocol.wire.topics.check_level
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,124}")  # + ".ctl" for the control session


class ConfigError(Exception):
    """The configuration is invalid; ``key`` names the setting (``section.key``)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """``[broker]``: the MQTT broker otad connects to."""

    host: str = "localhost"
    port: int = 1883
    # "" (the default): otad-<hostname>-<8 hex digits of the state directory's path>
    # (:func:`default_client_id`), so two otads on one broker never share a session by default
    client_id: str = ""
    username: str | None = None
    password_file: Path | None = None  # file holding the password (e.g. a systemd credential)
    tls_ca: Path | None = None  # CA bundle; setting it turns TLS on
    tls_cert: Path | None = None  # client certificate (needs tls_key)
    tls_key: Path | None = None
    keepalive: int = 30  # seconds
    library: Literal["gmqtt", "aiomqtt"] = "gmqtt"

    @property
    def tls(self) -> bool:
        """Whether to connect with TLS."""
        return self.tls_ca is not None or self.tls_cert is not None


def default_client_id(state_dir: Path, hostname: str | None = None) -> str:
    """``otad-<hostname>-<hash>``: unique per host and state directory (the hash is the first
    8 hex digits of SHA-256 of the state directory's absolute path), within the client-id
    alphabet (other characters of the host name become ``_``)."""
    host = socket.gethostname() if hostname is None else hostname
    host = re.sub(r"[^A-Za-z0-9_.:-]", "_", host)[:64] or "host"
    digest = hashlib.sha256(str(Path(state_dir).absolute()).encode()).hexdigest()[:8]
    return f"otad-{host}-{digest}"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: the SQLite state (see :mod:`otad.store`)."""

    state_dir: Path = DEFAULT_STATE_DIR
    flush_interval_ms: int = 100  # batched ack bookkeeping is committed at least this often
    flush_batch: int = 1000  # ... or as soon as this many updates are pending

    @property
    def flush_interval(self) -> float:
        """``flush_interval_ms`` in seconds."""
        return self.flush_interval_ms / 1000.0


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """``[trust]``: keys that sign manifests."""

    dir: Path = Path("/etc/otad/trust")  # trust store directory
    revoked_file: Path | None = None  # list of revoked key ids


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """``[transfer]``: block streaming and flow control."""

    window: int = 8  # blocks in flight per CH, 1..MAX_WINDOW (each CH's declared window caps it)
    # Blocks in flight across all CHs; CHs take turns for it when it binds. It bounds the queue
    # in front of the broker: about what the broker forwards in a quarter of a second (4096 at
    # the ~16k blocks/s of the reference 2-core machine). Larger queues made first round trips
    # outlast the RTO (spurious retransmissions, Offers repeated). CH links with a round trip of
    # R seconds need at least throughput x R in flight to keep the broker busy.
    global_inflight: int = 4096
    max_handshakes: int = 1024  # Offers/Polls unanswered at once (start-up and reconnect pacing)
    handshake_kib: int = 16384  # ... and KiB of them (a 64 MiB image's Offer is about 2 MiB)
    segment_rate: float = 0.0  # blocks/s per network segment (shared cell); 0 = unlimited
    qos_blocks: int = Block.QOS  # MQTT QoS of block messages (others: each type's QOS, SPEC §3)
    # Seconds; the retransmission timeout's floor. 1 s as RFC 6298 (2.4) says: a loss is repaired
    # from the CH's acknowledgements (RACK, SPEC 7.6), not by the timer, and at fleet scale a
    # round trip's jitter beyond a lower floor showed up as spurious retransmissions.
    rto_min: float = 1.0
    rto_max: float = 60.0  # seconds; retransmission timeout ceiling
    # SPEC 7.7's "momentum" (the Sender's max_timeouts): retransmission timeouts in a row with no
    # new acknowledgement after which the transfer ends TIMED_OUT. otad's default is 8, below the
    # Sender's own 10: at 8 backed-off timeouts a silent CH has had minutes to answer.
    max_rto_without_progress: int = 8
    stall_after_s: float = 30.0  # no progress this long: transfer.stalled event and a WARNING


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """``[events]``: JSON events for monitoring tools."""

    # At most one progress event per transfer this often. Each is a durable outbox row: at 5 s,
    # 10,000 CHs made 2,000 a second and the other events waited behind them. The status
    # snapshot carries each distribution's progress every 2 s.
    progress_interval_s: float = 30.0
    topic_prefix: str = "ota/v1/events"
    # Days a published event stays in the outbox (so a late monitor can be replayed, and a key
    # re-derived within it is still recognised); 0 keeps every event for ever.
    retention_days: int = 30
    # The retained status is published at least this often (its time moves): another otad
    # starting on the same broker waits 1.5 of these for a sign of life before serving.
    status_heartbeat_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ActivationConfig:
    """``[activation]``: signed activation of the images devices hold, and its confirmation
    (SPEC §8.7, §8.10; :mod:`otad.devices`)."""

    key: Path | None = None  # otad's P-256 activation signing key (PEM); unset: no activation
    # One public key per device that signs its activation alerts: <DEVICE_ID>.pem (SPEC §8.10)
    device_keys: Path | None = None
    # Seconds after a command's execution time (or its sending) without its outcome before
    # otad reads the device's firmware version back
    response_timeout_s: float = 60.0
    read_back_attempts: int = 5  # read-backs, doubling from read_back_backoff_s, then TIMED_OUT
    read_back_backoff_s: float = 30.0
    # Seconds a HAN transfer (held by the CH, or relaying) may go without a report before the
    # device ends TIMED_OUT; allow for sleepy devices (a GSME queries every 30 min or so)
    han_timeout_s: float = 7200.0
    # Credential replacement (SPEC §8.11; otad.credentials): seconds to wait for a device's
    # confirmation before a new command (a new counter, naming the same key) is sent, and how
    # many commands in all before the replacement ends FAILED (TIMED_OUT)
    credentials_timeout_s: float = 300.0
    credentials_attempts: int = 3


@dataclass(frozen=True, slots=True)
class CampaignsConfig:
    """``[campaigns]``: the campaign engines' evaluation (:mod:`otad.campaigns`) and the
    defaults of the pacing model behind ``otactl campaign plan`` (measured figures replace
    them once otad has followed enough targets on this deployment)."""

    tick_s: float = 2.0  # evaluation period: a threshold crossing holds within one tick
    snapshot_s: float = 30.0  # a campaign that only recorded reports is committed this often
    status_every_s: float = 10.0  # the retained campaign status, at least this often
    transfer_blocks_per_s: float = 250.0  # one CH's WAN transfer (window-limited)
    fleet_blocks_per_s: float = 4000.0  # every transfer together (broker and budget)
    han_bytes_per_s: float = 2000.0  # a CH relaying to one HAN device
    activation_s: float = 30.0  # an activation issued -> the device confirmed


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint ``http://host:port/metrics``
    (:mod:`otad.metrics`)."""

    enabled: bool = True
    # Loopback: the figures are for the host's own Prometheus (or an agent scraping for it); to
    # publish them further, set an address here and firewall it (the endpoint has no auth).
    host: str = "127.0.0.1"
    # In the exporters' range (9100-9999) and clear of node_exporter (9100) and Prometheus (9090)
    port: int = 9464


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: logging to stdout / the journal."""

    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    campaigns: CampaignsConfig = field(default_factory=CampaignsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def client_id(self) -> str:
        """The data session's MQTT client id: ``broker.client_id``, or when that is unset
        :func:`default_client_id` of the state directory."""
        return self.broker.client_id or default_client_id(self.store.state_dir)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (None: defaults only), apply ``overrides``, validate, return the config.

    ``overrides`` maps dotted keys (``"broker.port"``) to values of the same types TOML would
    give; they win over the file. ``env`` defaults to ``os.environ`` (for ``$STATE_DIRECTORY``).
    It reads the file synchronously: call it before the event loop starts.
    Raises :class:`ConfigError` naming the first bad key.
    """
    environ = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"invalid TOML: {exc}") from exc
        base = Path(path).absolute().parent

    values: dict[str, dict[str, tuple[Any, Path]]] = {name: {} for name in _SECTIONS}
    for section, table in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(section, "unknown section")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table ([section])")
        for key, value in table.items():
            values[section][key] = (value, base)
    cwd = Path.cwd()
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(dotted, "unknown setting")
        values[section][key] = (value, cwd)

    if "state_dir" not in values["store"]:
        state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state_directory:
            values["store"]["state_dir"] = (state_directory, cwd)

    sections = {name: _build(name, cls, values[name]) for name, cls in _SECTIONS.items()}
    return _validate(Config(**sections))


def cli_overrides(
    *, broker: str | None = None, state_dir: str | None = None, trust: str | None = None
) -> dict[str, Any]:
    """Overrides from the CLI flags ``--broker HOST[:PORT]``, ``--state-dir``, ``--trust``.

    ``HOST`` may be a bracketed IPv6 address (``[::1]:1883``). Raises :class:`ConfigError`.
    """
    out: dict[str, Any] = {}
    if broker is not None:
        try:
            host, port = split_host_port(broker)
        except ValueError as exc:
            raise ConfigError("--broker", str(exc)) from None
        out["broker.host"] = host
        if port is not None:
            out["broker.port"] = port
    if state_dir is not None:
        if not state_dir:
            raise ConfigError("--state-dir", "must not be empty")
        out["store.state_dir"] = state_dir
    if trust is not None:
        if not trust:
            raise ConfigError("--trust", "must not be empty")
        out["trust.dir"] = trust
    return out


# --------------------------------------------------------------------------- internals


def _build(section: str, cls: type[Any], given: dict[str, tuple[Any, Path]]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (value, base) in given.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}", "unknown key")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value, base)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any, base: Path) -> Any:
    """Check the TOML type of ``value`` against the field's annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if type(None) in args:  # X | None: TOML has no null, so a value is always an X
        (hint,) = (a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if type(value) is not int:
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise ConfigError(key, f"must be a non-empty path string, got {value!r}")
        if "\0" in str(value):
            raise ConfigError(key, "must not contain NUL")
        return base / Path(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug, not input


def _in_range(key: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(key, f"must be {span}, got {value}")


def _validate(config: Config) -> Config:
    """Raise on the first bad setting; return ``config`` normalised (log level upper-case)."""
    b = config.broker
    if not b.host or any(c in b.host for c in " /\0"):
        raise ConfigError("broker.host", f"must be a host name or address, got {b.host!r}")
    _in_range("broker.port", b.port, 1, 65535)
    if b.client_id and not _CLIENT_ID.fullmatch(b.client_id):
        raise ConfigError(
            "broker.client_id",
            f"must be 1-124 of A-Z a-z 0-9 _ . : - (no / + # or NUL), got {b.client_id!r}",
        )
    if b.username is not None and (not b.username or any(c in b.username for c in "+#/\0")):
        raise ConfigError("broker.username", "must be non-empty without / + # or NUL")
    if b.password_file is not None and b.username is None:
        raise ConfigError("broker.password_file", "needs broker.username")
    if (b.tls_cert is None) != (b.tls_key is None):
        missing = "broker.tls_key" if b.tls_key is None else "broker.tls_cert"
        raise ConfigError(missing, "tls_cert and tls_key must be set together")
    _in_range("broker.keepalive", b.keepalive, 1, 65535)

    s = config.store
    _in_range("store.flush_interval_ms", s.flush_interval_ms, 1, 60_000)
    _in_range("store.flush_batch", s.flush_batch, 1, 1_000_000)

    t = config.transfer
    _in_range("transfer.window", t.window, 1, MAX_WINDOW)
    if t.global_inflight < t.window:
        raise ConfigError(
            "transfer.global_inflight",
            f"must be >= transfer.window ({t.window}), got {t.global_inflight}",
        )
    _in_range("transfer.max_handshakes", t.max_handshakes, 1, 1_000_000)
    _in_range("transfer.handshake_kib", t.handshake_kib, 1, 16 * 1024 * 1024)
    _in_range("transfer.stall_after_s", t.stall_after_s, 1.0, 86_400.0)
    _in_range("transfer.segment_rate", t.segment_rate, 0.0)
    if t.qos_blocks not in (0, 1):
        raise ConfigError("transfer.qos_blocks", f"must be 0 or 1, got {t.qos_blocks}")
    if not t.rto_min > 0:
        raise ConfigError("transfer.rto_min", f"must be > 0, got {t.rto_min}")
    if t.rto_max < t.rto_min:
        raise ConfigError(
            "transfer.rto_max", f"must be >= transfer.rto_min ({t.rto_min}), got {t.rto_max}"
        )
    _in_range("transfer.max_rto_without_progress", t.max_rto_without_progress, 1)

    e = config.events
    if not e.progress_interval_s > 0:
        raise ConfigError("events.progress_interval_s", f"must be > 0, got {e.progress_interval_s}")
    if not e.status_heartbeat_s > 0:
        raise ConfigError("events.status_heartbeat_s", f"must be > 0, got {e.status_heartbeat_s}")
    _in_range("events.retention_days", e.retention_days, 0, 36_500)
    if not all(_TOPIC_LEVEL.fullmatch(level) for level in e.topic_prefix.split("/")):
        raise ConfigError(
            "events.topic_prefix",
            f"must be topic levels of A-Z a-z 0-9 _ . : - joined by '/', got {e.topic_prefix!r}",
        )

    a = config.activation
    for name in (
        "response_timeout_s",
        "read_back_backoff_s",
        "han_timeout_s",
        "credentials_timeout_s",
    ):
        _in_range(f"activation.{name}", getattr(a, name), 0.001, 30 * 86_400.0)
    _in_range("activation.read_back_attempts", a.read_back_attempts, 1, 100)
    _in_range("activation.credentials_attempts", a.credentials_attempts, 1, 100)

    m = config.metrics
    if not m.host or any(c in m.host for c in " /\0[]"):
        raise ConfigError("metrics.host", f"must be a host name or address, got {m.host!r}")
    _in_range("metrics.port", m.port, 1, 65535)

    level = config.log.level.upper()
    if level not in LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return dataclasses.replace(config, log=LogConfig(level=level))
