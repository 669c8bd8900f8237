"""``otactl pki``: two CAs, one certificate per role, and no identity that could reach a topic it
should not (otad/ctl/pki.py)."""

from __future__ import annotations

import datetime
import re
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otad import ctl
from otad.ctl import pki
from otad.ctl.pki import PkiError, Role
from otad.events import supplier_topic_id

GUID = "00DB1234567890AA"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_pki(directory)
    return directory


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_makes_two_cas_and_a_bundle_and_never_overwrites(tmp_path: Path) -> None:
    written = pki.init_pki(tmp_path)
    assert sorted(p.name for p in written) == [
        "ca-bundle.pem",
        "crl.pem",
        "devices-ca.crl.pem",
        "devices-ca.crt",
        "devices-ca.key",
        "services-ca.crl.pem",
        "services-ca.crt",
        "services-ca.key",
    ]
    for key in ("devices-ca.key", "services-ca.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca-bundle.pem").read_bytes())
    assert {c.subject for c in bundle} == {
        load(tmp_path / "devices-ca.crt").subject,
        load(tmp_path / "services-ca.crt").subject,
    }
    before = (tmp_path / "devices-ca.key").read_bytes()
    with pytest.raises(PkiError, match="exists; not overwriting a CA"):
        pki.init_pki(tmp_path)
    assert (tmp_path / "devices-ca.key").read_bytes() == before


@pytest.mark.parametrize(
    ("role", "name", "ca"),
    [
        (Role.CH, GUID, "devices"),
        (Role.OTAD, "otad", "services"),
        (Role.OPERATOR, "alice", "services"),
        (Role.MONITOR, "grafana", "services"),
        (Role.BROKER, "localhost", "services"),
    ],
)
def test_each_role_is_signed_by_its_ca_and_recorded(
    ca_dir: Path, tmp_path: Path, role: Role, name: str, ca: str
) -> None:
    issued = pki.issue(ca_dir, role, name, tmp_path, days=30)
    cert = load(issued.cert)
    issuer = load(ca_dir / f"{ca}-ca.crt")
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        role.value
    )
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    wanted = (
        ExtendedKeyUsageOID.SERVER_AUTH if role is Role.BROKER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    assert list(usage) == [wanted]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=30)
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    assert pki.certificate_identity(issued.cert) == (name, role.value)
    ssl.create_default_context().load_cert_chain(issued.cert, issued.key)  # a usable pair


def test_a_supplier_certificate_carries_its_supplier_topic_id(ca_dir: Path, tmp_path: Path) -> None:
    issued = pki.issue(ca_dir, Role.SUPPLIER, "Acme Energy Ltd", tmp_path)
    assert issued.identity == supplier_topic_id("Acme Energy Ltd")
    assert issued.cert.name == f"{issued.identity}.crt"


def test_a_broker_certificate_names_its_hosts(ca_dir: Path, tmp_path: Path) -> None:
    issued = pki.issue(ca_dir, Role.BROKER, "mqtt.example.net", tmp_path, sans=["192.0.2.7"])
    names = load(issued.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["mqtt.example.net"]
    assert [str(a) for a in names.value.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]


@pytest.mark.parametrize(
    ("role", "name", "why"),
    [
        (Role.CH, "00DB1234/567890A", "contains a slash"),
        (Role.OPERATOR, "alice/../bob", "contains a slash"),
        (Role.OPERATOR, "al+ce", "contains a '\\+'"),
        (Role.MONITOR, "graf#na", "contains a '#'"),
        (Role.OPERATOR, "alice\0", "contains a NUL"),
        (Role.SUPPLIER, "Acme\0", "contains a NUL"),
        (Role.OPERATOR, "", "is empty"),
        (Role.OPERATOR, "a" * 65, "65 characters long; at most 64"),
        (Role.SUPPLIER, "S" * 65, "65 characters long; at most 64"),
        (Role.OPERATOR, "alice smith", "not a safe topic level"),
        (Role.CH, "00db1234567890aa", "GUID"),
        (Role.CH, "00DB1234567890A", "GUID"),
        (Role.OPERATOR, GUID, "only a CH's certificate may carry one"),
        (Role.MONITOR, "acme-0123abcd", "shape of a supplier topic id"),
        (Role.BROKER, "-bad-", "not a host name"),
    ],
)
def test_unsafe_identities_are_refused_and_nothing_is_written(
    ca_dir: Path, tmp_path: Path, role: Role, name: str, why: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(PkiError, match=why):
        pki.issue(ca_dir, role, name, out)
    assert not out.exists()


def test_64_characters_is_the_longest_name(ca_dir: Path, tmp_path: Path) -> None:
    assert pki.issue(ca_dir, Role.OPERATOR, "a" * 64, tmp_path).identity == "a" * 64


@pytest.mark.parametrize("days", [0, pki.MAX_DAYS + 1])
def test_validity_outside_its_range_is_refused(ca_dir: Path, tmp_path: Path, days: int) -> None:
    with pytest.raises(PkiError, match="--days must be"):
        pki.issue(ca_dir, Role.OPERATOR, "bob", tmp_path, days=days)


def test_a_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "ca", days=10)
    with pytest.raises(PkiError, match="outlive its CA"):
        pki.issue(tmp_path / "ca", Role.OPERATOR, "bob", tmp_path / "out", days=11)


def test_an_issued_certificate_is_never_overwritten(ca_dir: Path, tmp_path: Path) -> None:
    pki.issue(ca_dir, Role.OPERATOR, "carol", tmp_path)
    with pytest.raises(PkiError, match="exists"):
        pki.issue(ca_dir, Role.OPERATOR, "carol", tmp_path)


def test_acl_stanzas_grant_operators_and_monitors_their_topics_only() -> None:
    assert pki.acl_stanza(Role.OPERATOR, "alice").splitlines() == [
        "user alice",
        "topic write ota/v1/ctl/alice/req",
        "topic read ota/v1/ctl/alice/resp",
        "topic read ota/v1/otad/status",
        "topic read ota/v1/campaigns/+/status",
        "topic read ota/v1/events/#",
    ]
    assert pki.acl_stanza(Role.MONITOR, "grafana").splitlines() == [
        "user grafana",
        "topic read ota/v1/events/#",
        "topic read ota/v1/otad/status",
        "topic read ota/v1/campaigns/+/status",
    ]
    assert pki.acl_stanza(Role.CH, GUID) == pki.acl_stanza(Role.SUPPLIER, "x-0123abcd") == ""
    with pytest.raises(PkiError, match="name otad's certificate 'otad'"):
        pki.acl_stanza(Role.OTAD, "otad2")


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["pki", "init", "--out", str(tmp_path / "ca")]) == 0
    args = ["pki", "issue", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "c")]
    assert ctl.main([*args, "--role", "operator", "--name", "alice", "--days", "7"]) == 0
    out = capsys.readouterr().out
    assert "signed by the services CA" in out
    assert "topic write ota/v1/ctl/alice/req" in out
    assert ctl.main([*args, "--role", "ch", "--name", "A/B"]) == ctl.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "contains a slash" in err
    assert "Traceback" not in err
    assert ctl.main([*args, "--role", "ch", "--name", GUID, "--ca", str(tmp_path / "none")]) == 2
    assert "otactl pki init" in capsys.readouterr().err
    alice = str(tmp_path / "c" / "alice.crt")
    assert ctl.main(["pki", "revoke", "--ca", str(tmp_path / "ca"), alice]) == 0
    assert "revoked 'alice'" in capsys.readouterr().out
    assert ctl.main(["pki", "revoke", "--ca", str(tmp_path / "ca"), str(tmp_path / "no.crt")]) == 2
    assert "cannot read the certificate" in capsys.readouterr().err


def crls(directory: Path) -> dict[str, x509.CertificateRevocationList]:
    """The CRLs in crl.pem by issuer CN."""
    text = (directory / "crl.pem").read_text()
    blocks = re.findall(r"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----\n", text, re.S)
    found = [x509.load_pem_x509_crl(block.encode()) for block in blocks]
    return {str(c.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value): c for c in found}


def test_revoking_puts_the_serial_in_its_cas_crl_and_crl_pem_holds_both(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    empty = crls(tmp_path)
    assert sorted(empty) == ["otad devices CA", "otad services CA"]
    assert all(len(list(c)) == 0 for c in empty.values())
    for name, crl in empty.items():  # valid as long as the CA: it never expires under the broker
        ca = load(tmp_path / f"{name.split()[1]}-ca.crt")
        assert crl.next_update_utc == ca.not_valid_after_utc
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    hub = pki.issue(tmp_path, Role.CH, GUID, tmp_path / "out")
    other = pki.issue(tmp_path, Role.CH, "00DB1234567890AB", tmp_path / "out")
    identity, serial, path = pki.revoke(tmp_path, hub.cert)
    assert (identity, serial, path) == (GUID, load(hub.cert).serial_number, tmp_path / "crl.pem")
    pki.revoke(tmp_path, hub.cert)  # again: no second entry
    now = crls(tmp_path)
    assert [e.serial_number for e in now["otad devices CA"]] == [serial]
    assert list(now["otad services CA"]) == []
    assert (
        now["otad devices CA"].get_revoked_certificate_by_serial_number(
            load(other.cert).serial_number
        )
        is None
    )


def test_a_certificate_of_another_ca_cannot_be_revoked_here(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "ours")
    pki.init_pki(tmp_path / "theirs")
    foreign = pki.issue(tmp_path / "theirs", Role.CH, GUID, tmp_path / "out")
    with pytest.raises(PkiError, match="not issued by either CA"):
        pki.revoke(tmp_path / "ours", foreign.cert)
    with pytest.raises(PkiError, match="cannot read the certificate"):
        pki.revoke(tmp_path / "ours", tmp_path / "missing.crt")
