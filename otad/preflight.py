"""Pre-flight: every file the configuration names is checked before otad starts.

:func:`check` opens (and parses) each file a :class:`~otad.config.Config` names -- the broker
password, the TLS CA bundle, client certificate and key, the trust directory and its revocation
list, the activation key, the device keys directory -- and the state directory, and returns one
:class:`~otad.config.ConfigError` per problem, naming the setting (``broker.tls_ca:
/etc/otad/ca.pem: cannot read: No such file or directory``). ``otad run`` refuses to start on
the first of them with the configuration exit status (so systemd does not restart it into the
same error, ``RestartPreventExitStatus=``), and ``otad check-config`` (the unit's
``ExecStartPre=``) prints all of them, or, when there are none, :func:`describe`'s account of
what otad would do.

Nothing here connects to the broker: whether it accepts the credentials is known only by trying
(:mod:`mqttio` reports a refusal by name).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from otad.config import Config, ConfigError
from otad.credentials import load_device_keys
from otad.keyfiles import KeyFileError, load_private_key, load_trust_dir
from protocol.release.cose import key_id
from protocol.release.trust import TrustStore

__all__ = ["Preflight", "check", "describe"]


@dataclass(slots=True)
class Preflight:
    """What :func:`check` found: the problems, and the trust store it loaded (if it could)."""

    problems: list[ConfigError]
    trust: TrustStore | None
    activation_kid: bytes | None
    device_keys: int


def _readable(key: str, path: Path, problems: list[ConfigError]) -> bytes | None:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        problems.append(ConfigError(key, f"{path}: is a directory, not a file"))
    except OSError as exc:
        problems.append(ConfigError(key, f"{path}: cannot read: {exc.strerror or exc}"))
    return None


def _directory(key: str, path: Path, problems: list[ConfigError]) -> bool:
    try:
        os.listdir(path)
    except NotADirectoryError:
        problems.append(ConfigError(key, f"{path}: not a directory"))
    except OSError as exc:
        problems.append(ConfigError(key, f"{path}: cannot list: {exc.strerror or exc}"))
    else:
        return True
    return False


def _check_broker(config: Config, problems: list[ConfigError]) -> None:
    b = config.broker
    if b.password_file is not None:
        data = _readable("broker.password_file", b.password_file, problems)
        if data is not None and not data.strip():
            problems.append(ConfigError("broker.password_file", f"{b.password_file}: is empty"))
    ca_ok = b.tls_ca is None or _readable("broker.tls_ca", b.tls_ca, problems) is not None
    cert_ok = b.tls_cert is None or _readable("broker.tls_cert", b.tls_cert, problems) is not None
    key_ok = b.tls_key is None or _readable("broker.tls_key", b.tls_key, problems) is not None
    if not b.tls:
        return
    if ca_ok:
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=None if b.tls_ca is None else str(b.tls_ca)
            )
        except ssl.SSLError as exc:
            problems.append(ConfigError("broker.tls_ca", f"{b.tls_ca}: not a CA bundle: {exc}"))
            return
        if b.tls_cert is not None and cert_ok and key_ok:
            try:
                context.load_cert_chain(str(b.tls_cert), None if b.tls_key is None else b.tls_key)
            except ssl.SSLError as exc:
                problems.append(
                    ConfigError(
                        "broker.tls_cert",
                        f"{b.tls_cert} with key {b.tls_key}: cannot load: {exc.reason or exc}",
                    )
                )


def _check_state_dir(config: Config, problems: list[ConfigError]) -> None:
    path = config.store.state_dir
    if path.exists():
        if not path.is_dir():
            problems.append(ConfigError("store.state_dir", f"{path}: not a directory"))
        elif not os.access(path, os.W_OK | os.X_OK):
            problems.append(ConfigError("store.state_dir", f"{path}: not writable"))
        return
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        problems.append(ConfigError("store.state_dir", f"{path}: does not exist, cannot create"))


def check(config: Config) -> Preflight:
    """Check every file and directory ``config`` names (synchronous file I/O: call it before
    the event loop starts, or in a thread)."""
    problems: list[ConfigError] = []
    _check_broker(config, problems)
    _check_state_dir(config, problems)
    trust = None
    t = config.trust
    if _directory("trust.dir", t.dir, problems) and (
        t.revoked_file is None or _readable("trust.revoked_file", t.revoked_file, problems)
    ):
        try:
            trust = load_trust_dir(t.dir, t.revoked_file)
        except KeyFileError as exc:
            problems.append(ConfigError("trust.dir", str(exc)))
    a = config.activation
    activation_kid = None
    if a.key is not None and _readable("activation.key", a.key, problems) is not None:
        try:
            activation_kid = key_id(load_private_key(a.key).public_key())
        except KeyFileError as exc:
            problems.append(ConfigError("activation.key", str(exc)))
    device_keys = 0
    if a.device_keys is not None and _directory("activation.device_keys", a.device_keys, problems):
        try:
            device_keys = len(load_device_keys(a.device_keys))
        except KeyFileError as exc:
            problems.append(ConfigError("activation.device_keys", str(exc)))
    return Preflight(problems, trust, activation_kid, device_keys)


def describe(config: Config, found: Preflight) -> list[str]:
    """What otad would do with ``config``: one line per aspect (``otad check-config``)."""
    b, s, t, x, a = config.broker, config.store, config.trust, config.transfer, config.activation
    if b.tls:
        tls = f"TLS (CA {b.tls_ca or 'system CAs'}"
        tls += f", client certificate {b.tls_cert}, key {b.tls_key})" if b.tls_cert else ")"
    else:
        tls = "plaintext (no TLS)"
    auth = "anonymous" if b.username is None else f"username {b.username!r}"
    if b.password_file is not None:
        auth += f", password from {b.password_file}"
    lines = [
        f"broker: {b.host}:{b.port} with {b.library}, {tls}, {auth}, keepalive {b.keepalive} s",
        f"client id: {config.client_id} (control session {config.client_id}.ctl)",
        f"state: {s.state_dir} ({'exists' if s.state_dir.is_dir() else 'will be created'});"
        f" batched bookkeeping committed every {s.flush_interval_ms} ms or {s.flush_batch}"
        " updates",
    ]
    if found.trust is not None:
        kids = ", ".join(sorted(k.hex() for k in found.trust.kids)) or "none"
        lines.append(f"trust: {t.dir}: key ids {kids}")
        if t.revoked_file is not None:
            revoked = ", ".join(sorted(k.hex() for k in found.trust.revoked)) or "none"
            lines.append(f"revoked ({t.revoked_file}): {revoked}")
    if a.key is None:
        lines.append("activation: no key (otactl activate is refused)")
    elif found.activation_kid is not None:
        lines.append(f"activation: key {a.key} (key id {found.activation_kid.hex()})")
    if a.device_keys is not None:
        lines.append(f"device keys: {a.device_keys}: {found.device_keys} device(s)")
    lines += [
        f"limits: window {x.window} blocks per CH, {x.global_inflight} blocks in flight in all,"
        f" {x.max_handshakes} handshakes / {x.handshake_kib} KiB unanswered,"
        f" segment rate {x.segment_rate or 'unlimited'}, RTO {x.rto_min}..{x.rto_max} s,"
        f" stall after {x.stall_after_s} s",
        f"events: {config.events.topic_prefix}/..., progress every"
        f" {config.events.progress_interval_s} s, kept {config.events.retention_days} day(s)",
        f"log level: {config.log.level}",
    ]
    return lines
