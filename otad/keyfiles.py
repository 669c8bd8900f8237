"""Signing keys and trust stores on disk (the I/O side of :mod:`protocol.release.trust`).

* A private key is a PEM PKCS#8 EC P-256 key, unencrypted, mode 0600 (otad reads it from
  systemd credentials; ``otactl keys new`` writes it).
* Its public key sits beside it as ``NAME.pub.pem`` (SubjectPublicKeyInfo PEM).
* A trust directory holds one public-key PEM per ``*.pem`` file; hidden files and other names
  are ignored. A private key or anything unreadable there is an error, not a skip.
* A revocation file lists key ids, one per line as 16 hex digits; ``#`` starts a comment.

Every failure is a :class:`KeyFileError` whose message names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from otad.files import FileError, read_bounded, write_atomic
from protocol.release.cose import KID_LEN, key_id
from protocol.release.trust import TrustStore

MAX_KEY_FILE_BYTES = 64 * 1024


class KeyFileError(Exception):
    """A key, trust directory or revocation file could not be used; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyPairFiles:
    """What :func:`write_keypair` wrote."""

    private_path: Path
    public_path: Path
    kid: bytes


def public_key_path(private_path: str | os.PathLike[str]) -> Path:
    """``KEY.pem`` -> ``KEY.pub.pem`` (any other name gets ``.pub.pem`` appended)."""
    path = Path(private_path)
    stem = path.name[: -len(".pem")] if path.name.endswith(".pem") else path.name
    return path.with_name(stem + ".pub.pem")


def _read(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_KEY_FILE_BYTES, what="a key file")
    except FileError as exc:
        raise KeyFileError(str(exc)) from None


def _check_p256(path: Path, key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path}: EC key on {key.curve.name}, need P-256 (secp256r1)")


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC P-256 private key; raises :class:`KeyFileError`."""
    path = Path(path)
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an EC private key ({type(key).__name__})")
    _check_p256(path, key)
    return key


def load_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Load a PEM EC P-256 public key (SubjectPublicKeyInfo); raises :class:`KeyFileError`."""
    path = Path(path)
    data = _read(path)
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(f"{path}: holds a private key; a trust store takes public keys only")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(f"{path}: not an EC public key ({type(key).__name__})")
    _check_p256(path, key)
    return key


def write_keypair(path: str | os.PathLike[str]) -> KeyPairFiles:
    """Generate a P-256 key; write it to ``path`` (PKCS#8 PEM, mode 0600) and its public key
    beside it as ``NAME.pub.pem``. Refuses to overwrite either file (:class:`KeyFileError`).
    """
    private_path = Path(path)
    public_path = public_key_path(private_path)
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise KeyFileError(f"{existing}: already exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except KeyFileError:
        private_path.unlink(missing_ok=True)
        raise
    return KeyPairFiles(private_path, public_path, key_id(key.public_key()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode=mode, exclusive=True)
    except FileError as exc:
        raise KeyFileError(str(exc)) from None


def load_revoked(path: str | os.PathLike[str]) -> list[bytes]:
    """Key ids listed in a revocation file (16 hex digits a line, ``#`` comments)."""
    path = Path(path)
    try:
        text = _read(path).decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not ASCII text") from None
    kids: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            kid = bytes.fromhex(line)
        except ValueError:
            kid = b""
        if len(kid) != KID_LEN:
            raise KeyFileError(f"{path}:{number}: not a key id (16 hex digits): {line[:40]!r}")
        kids.append(kid)
    return kids


def load_trust_dir(
    directory: str | os.PathLike[str], revoked_file: str | os.PathLike[str] | None = None
) -> TrustStore:
    """Build a :class:`TrustStore` from every ``*.pem`` public key in ``directory``.

    Raises :class:`KeyFileError` for a missing directory, a directory without keys, or any file
    that is not a P-256 public key, and for a bad revocation file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: not a directory")
    try:
        paths = sorted(
            p for p in directory.iterdir() if p.name.endswith(".pem") and not p.name.startswith(".")
        )
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot list: {exc.strerror or exc}") from None
    revoked = load_revoked(revoked_file) if revoked_file is not None else []
    store = TrustStore(revoked=revoked)
    loaded = 0
    for path in paths:
        if not path.is_file():
            continue
        try:
            store.add(load_public_key(path))
        except ValueError as exc:  # a key id collision between two files
            raise KeyFileError(f"{path}: {exc}") from None
        loaded += 1
    if not loaded:
        raise KeyFileError(f"{directory}: no public keys (*.pem) found")
    return store
