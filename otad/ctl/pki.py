"""``otactl pki``: the certificates of the broker's clients (systemd/mosquitto/otad.conf).

Two certificate authorities, made once by :func:`init_pki`:

* ``devices`` signs the Communications Hubs' certificates (role ``ch``);
* ``services`` signs everyone else's: ``otad``, ``operator``, ``supplier``, ``monitor``, and the
  broker's own server certificate (``broker``).

The broker trusts both (``ca-bundle.pem``) and, with ``use_identity_as_username``, takes a
client's certificate CN as its username, which the ACL (systemd/mosquitto/acl) expands ``%u``
to. So the CN *is* the client's identity on every topic, and :func:`check_identity` refuses any
name that could reach a topic it should not:

* no ``/``, ``+``, ``#`` or NUL, not empty, at most 64 characters, only ``A-Z a-z 0-9 _ . : -``
  (one safe topic level, :func:`protocol.wire.topics.check_level`): Mosquitto 2.0 does not
  refuse ``/``, and a CN ``A/B`` would expand ``ota/v1/ch/%u/up`` into another hub's subtree;
* a CH's name is its GUID (16 upper-case hex digits); no other role may have a GUID as its
  name (it would get that hub's topics);
* a supplier's CN is its supplier topic id (:func:`otad.events.supplier_topic_id` of the label
  its CHs announce), and no other role may have a name of that shape (it would read that
  supplier's alerts).

The role is recorded in the certificate (``OU``) and decides which CA signs it. Keys are P-256;
private keys are written 0600, never overwritten.

Revocation: :func:`revoke` adds a certificate to its CA's CRL (``<ca>-ca.crl.pem``) and rewrites
``crl.pem``, both CAs' CRLs, which the broker reads (``crlfile``; OpenSSL then wants a CRL of
every CA in the bundle, so :func:`init_pki` writes empty ones). A CRL is valid until its CA
expires: it is read by this broker only, which gets a new one at every revocation, and an
expired CRL would make OpenSSL refuse every client at once.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otad.events import supplier_topic_id
from protocol.errors import ProtocolError
from protocol.wire import topics

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_DAYS",
    "MAX_DAYS",
    "MAX_NAME_CHARS",
    "CaName",
    "Issued",
    "PkiError",
    "Role",
    "acl_stanza",
    "certificate_identity",
    "check_identity",
    "init_pki",
    "issue",
    "revoke",
]

DEFAULT_DAYS = 397  # a client or broker certificate (the CA/Browser Forum's ceiling for servers)
DEFAULT_CA_DAYS = 3650
MAX_DAYS = 3650  # a client certificate never outlives the CAs of a default `pki init`
MAX_NAME_CHARS = 64
ORGANIZATION = "otad"

_FORBIDDEN = {"/": "a slash", "+": "a '+'", "#": "a '#'", "\0": "a NUL"}
_GUID = re.compile(r"[0-9A-F]{16}")
_SUPPLIER_SHAPE = re.compile(r"[a-z0-9-]*-[0-9a-f]{8}")


class PkiError(Exception):
    """A PKI operation refused (bad identity, missing CA, a file that exists): one line why."""


class Role(Enum):
    """What a certificate is for; its value is the certificate's ``OU``."""

    CH = "ch"
    OTAD = "otad"
    OPERATOR = "operator"
    SUPPLIER = "supplier"
    MONITOR = "monitor"
    BROKER = "broker"

    @property
    def ca(self) -> CaName:
        """The CA that signs this role's certificates."""
        return CaName.DEVICES if self is Role.CH else CaName.SERVICES


class CaName(Enum):
    """The two CAs of :func:`init_pki`; the value is their files' stem."""

    DEVICES = "devices"
    SERVICES = "services"


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate written by :func:`issue`."""

    role: Role
    identity: str  # the CN: the broker username
    cert: Path
    key: Path
    not_after: datetime.datetime


def check_identity(role: Role, name: str) -> str:
    """The CN a certificate of ``role`` named ``name`` gets, or :class:`PkiError` saying why
    not (see the module docstring). A supplier's ``name`` is its label; the CN its topic id."""
    if not isinstance(name, str) or not name:
        raise PkiError(f"the {role.value} name is empty")
    for char, what in _FORBIDDEN.items():
        if char in name:
            raise PkiError(
                f"the {role.value} name {name!r} contains {what}: a certificate identity is one"
                " MQTT topic level and may not contain / + # or NUL"
            )
    if len(name) > MAX_NAME_CHARS:
        raise PkiError(
            f"the {role.value} name is {len(name)} characters long; at most {MAX_NAME_CHARS}"
        )
    if role is Role.SUPPLIER:
        return supplier_topic_id(name)
    if role is Role.BROKER:
        return _check_host(name)
    try:
        topics.check_level(name)
    except ProtocolError:
        raise PkiError(
            f"the {role.value} name {name!r} is not a safe topic level"
            " (only A-Z a-z 0-9 _ . : - are allowed)"
        ) from None
    if role is Role.CH:
        try:
            return topics.check_guid(name)
        except ProtocolError:
            raise PkiError(
                f"a CH's name is its GUID (16 upper-case hex digits), not {name!r}"
            ) from None
    if _GUID.fullmatch(name):
        raise PkiError(f"{name!r} is a GUID: only a CH's certificate may carry one")
    if _SUPPLIER_SHAPE.fullmatch(name):
        raise PkiError(
            f"{name!r} has the shape of a supplier topic id (…-8 hex digits): it would read"
            " that supplier's alerts; choose another name"
        )
    return name


def _check_host(name: str) -> str:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            raise PkiError(f"the broker name {name!r} is not a host name or IP address") from None
    return name


def acl_stanza(role: Role, identity: str) -> str:
    """ACL lines to append for a client of ``role`` (empty when the shipped ACL's pattern or
    ``user otad`` lines already cover it)."""
    if role is Role.OPERATOR:
        return (
            f"user {identity}\n"
            f"topic write ota/v1/ctl/{identity}/req\n"
            f"topic read ota/v1/ctl/{identity}/resp\n"
            "topic read ota/v1/otad/status\n"
            "topic read ota/v1/campaigns/+/status\n"
            "topic read ota/v1/events/#\n"
        )
    if role is Role.MONITOR:
        return (
            f"user {identity}\ntopic read ota/v1/events/#\ntopic read ota/v1/otad/status\n"
            "topic read ota/v1/campaigns/+/status\n"
        )
    if role is Role.OTAD and identity != "otad":
        raise PkiError(
            f"the shipped ACL grants otad's topics to the user 'otad', not {identity!r}:"
            " name otad's certificate 'otad'"
        )
    return ""


# --------------------------------------------------------------------------- files


def _ca_paths(directory: Path, ca: CaName) -> tuple[Path, Path]:
    return directory / f"{ca.value}-ca.crt", directory / f"{ca.value}-ca.key"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} exists; not overwriting it") from None
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def init_pki(out: Path, *, days: int = DEFAULT_CA_DAYS) -> list[Path]:
    """Make the two CAs in ``out`` (created if need be; existing files are never overwritten)
    and ``ca-bundle.pem`` (both, for the broker's ``cafile``). Returns the files written."""
    if not 1 <= days <= 100 * 365:
        raise PkiError(f"--days must be 1..{100 * 365}, not {days}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {out}: {exc.strerror}") from None
    for ca in CaName:
        for path in _ca_paths(out, ca):
            if path.exists():
                raise PkiError(f"{path} exists; not overwriting a CA")
    written: list[Path] = []
    bundle = b""
    now = _now()
    for ca in CaName:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"otad {ca.value} CA"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        cert_path, key_path = _ca_paths(out, ca)
        _write_new(key_path, _key_pem(key), 0o600)
        _write_new(cert_path, _cert_pem(cert), 0o644)
        written += [cert_path, key_path]
        bundle += _cert_pem(cert)
    bundle_path = out / "ca-bundle.pem"
    _write_new(bundle_path, bundle, 0o644)
    written.append(bundle_path)
    for ca in CaName:
        cert, key = _load_ca(out, ca)
        crl_path = _crl_path(out, ca)
        _write_new(crl_path, _sign_crl(cert, key, []), 0o644)
        written.append(crl_path)
    written.append(_write_combined_crl(out))
    return written


# --------------------------------------------------------------------------- revocation


def _crl_path(directory: Path, ca: CaName) -> Path:
    return directory / f"{ca.value}-ca.crl.pem"


def _sign_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: list[x509.RevokedCertificate],
) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_combined_crl(directory: Path) -> Path:
    combined = b"".join(_crl_path(directory, ca).read_bytes() for ca in CaName)
    path = directory / "crl.pem"
    temporary = directory / ".crl.pem.tmp"
    temporary.write_bytes(combined)
    temporary.chmod(0o644)
    os.replace(temporary, path)
    return path


def revoke(ca_dir: Path, cert_path: Path) -> tuple[str, int, Path]:
    """Revoke the certificate in ``cert_path`` (issued from ``ca_dir``): add it to its CA's CRL
    and rewrite ``crl.pem``. Returns (its CN, its serial, the ``crl.pem`` to install). Revoking
    it again changes nothing."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the certificate {cert_path}: {exc}") from None
    for ca in CaName:
        ca_cert, ca_key = _load_ca(ca_dir, ca)
        if cert.issuer != ca_cert.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            continue
        try:
            crl = x509.load_pem_x509_crl(_crl_path(ca_dir, ca).read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read the {ca.value} CA's CRL in {ca_dir}: {exc}") from None
        revoked = list(crl)
        if all(entry.serial_number != cert.serial_number for entry in revoked):
            revoked.append(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(_now())
                .build()
            )
        crl_path = _crl_path(ca_dir, ca)
        temporary = crl_path.with_suffix(".tmp")
        temporary.write_bytes(_sign_crl(ca_cert, ca_key, revoked))
        os.replace(temporary, crl_path)
        identity = certificate_identity(cert_path)[0]
        return identity, cert.serial_number, _write_combined_crl(ca_dir)
    raise PkiError(f"{cert_path} was not issued by either CA in {ca_dir}")


def _load_ca(directory: Path, ca: CaName) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = _ca_paths(directory, ca)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(
            f"{exc.filename} not found: is {directory} a directory made by `otactl pki init`?"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the {ca.value} CA from {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    return cert, key


def issue(
    ca_dir: Path,
    role: Role,
    name: str,
    out: Path,
    *,
    days: int = DEFAULT_DAYS,
    sans: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Issue a certificate of ``role`` for ``name`` (checked by :func:`check_identity`) signed by
    that role's CA in ``ca_dir``; write ``out/<identity>.crt`` and ``out/<identity>.key`` (0600).

    ``sans``: extra DNS names or IP addresses of a broker certificate. ``not_before``: start of
    validity (default now; tests back-date it to make an expired certificate)."""
    identity = check_identity(role, name)
    if not 1 <= days <= MAX_DAYS:
        raise PkiError(f"--days must be 1..{MAX_DAYS}, not {days}")
    ca_cert, ca_key = _load_ca(ca_dir, role.ca)
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    end = start + datetime.timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(
            "the certificate would outlive its CA"
            f" (valid until {ca_cert.not_valid_after_utc:%Y-%m-%d})"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, identity),
        ]
    )
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role is Role.BROKER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if role is Role.BROKER:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in (identity, *sans)]),
            critical=False,
        )
    elif sans:
        raise PkiError("--san is for a broker certificate only")
    cert = builder.sign(ca_key, hashes.SHA256())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {out}: {exc.strerror}") from None
    cert_path, key_path = out / f"{identity}.crt", out / f"{identity}.key"
    if cert_path.exists():
        raise PkiError(f"{cert_path} exists; not overwriting it")
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, _cert_pem(cert), 0o644)
    return Issued(role=role, identity=identity, cert=cert_path, key=key_path, not_after=end)


def _general_name(name: str) -> x509.GeneralName:
    _check_host(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificate_identity(path: Path) -> tuple[str, str | None]:
    """(CN, role or None) of the certificate in ``path``: the username the broker gives its
    holder. :class:`PkiError` when it cannot be read or has no CN."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the certificate {path}: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise PkiError(f"the certificate {path} has no CN")
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(units[0].value) if units else None
    return str(names[0].value), role
