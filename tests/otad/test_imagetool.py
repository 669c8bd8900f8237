"""otactl keys/image commands through the real CLI entry point (in-process and as a process)."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from otad.catalogue import Catalogue
from otad.ctl import build_parser, main
from otad.keyfiles import (
    KeyFileError,
    load_private_key,
    load_public_key,
    load_revoked,
    load_trust_dir,
    public_key_path,
)
from otad.store import Store
from protocol.release.cose import key_id, parse_sign1
from protocol.release.manifest import DeviceType
from protocol.release.otaimg import SignedImage, verify
from protocol.release.trust import MAX_SIGNED_MANIFEST_BYTES, TrustStore
from protocol.release.zigbee_ota import OtaHeader, OtaLayout, wrap

FIRMWARE = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(157))[:5000]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def keypair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    key = tmp_path / "release.pem"
    assert run(capsys, "keys", "new", "--out", str(key))[0] == 0
    return key


@pytest.fixture
def trust_dir(tmp_path: Path, keypair: Path) -> Path:
    directory = tmp_path / "trust"
    directory.mkdir()
    (directory / "release.pem").write_bytes(public_key_path(keypair).read_bytes())
    return directory


def sign_raw(
    capsys: pytest.CaptureFixture[str], key: Path, out: Path, *extra: str
) -> tuple[int, str, str]:
    fw = out.with_suffix(".bin")
    fw.write_bytes(FIRMWARE)
    return run(
        capsys,
        "image", "sign", "--key", str(key), "--in", str(fw), "--device-type", "B2",
        "--version", "0x0105", "--hw-min", "2", "--hw-max", "4", "--out", str(out), *extra,
    )  # fmt: skip


def _kid(path: Path) -> bytes:
    image = SignedImage.decode(path.read_bytes())
    return parse_sign1(image.signed_manifest, max_size=MAX_SIGNED_MANIFEST_BYTES).kid


# --------------------------------------------------------------------------- keys new


def test_keys_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.pem"
    code, out, err = run(capsys, "keys", "new", "--out", str(key))
    assert (code, err) == (0, "")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = load_private_key(key)
    public = load_public_key(tmp_path / "k.pub.pem")
    assert isinstance(private.curve, ec.SECP256R1)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert out.count("\n") == 1
    assert key_id(public).hex() in out


def test_keys_new_refuses_to_overwrite(keypair: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = keypair.read_bytes()
    code, out, err = run(capsys, "keys", "new", "--out", str(keypair))
    assert (code, out) == (2, "")
    assert "already exists" in err
    assert keypair.read_bytes() == before


# --------------------------------------------------------------------------- sign


def test_sign_raw_then_verify(
    tmp_path: Path, keypair: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "fw.otaimg"
    before = int(time.time())
    code, out, err = sign_raw(capsys, keypair, out_file, "--block-size", "512")
    after = int(time.time())
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    image = SignedImage.decode(out_file.read_bytes())
    manifest, ota = verify(
        image, TrustStore([load_public_key(public_key_path(keypair))]), now=after
    )
    assert ota.upgrade_image == FIRMWARE
    assert (manifest.vendor, manifest.image_type) == (0xFFF1, 0x0001)  # raw-firmware defaults
    assert manifest.fw_version == 0x0105
    assert (manifest.hw_min, manifest.hw_max) == (2, 4)
    assert manifest.device_type is DeviceType.B2
    assert manifest.block_size == 512
    assert before <= manifest.sequence <= after  # default sequence: the unix time
    assert manifest.expires - manifest.created == 365 * 86_400

    code, out, err = run(capsys, "image", "verify", "--trust", str(trust_dir), str(out_file))
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    for fact in (
        "B2",
        "version 0x00000105",
        f"sequence {manifest.sequence}",
        f"size {manifest.size}",
        f"blocks {manifest.block_count}x512",
        manifest.sha256.hex()[:16],
        _kid(out_file).hex(),
        "expires ",
    ):
        assert fact in out


def test_sign_existing_ota_file(
    tmp_path: Path, keypair: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ota_path = tmp_path / "meter.ota"
    ota_path.write_bytes(
        wrap(
            FIRMWARE,
            manufacturer_code=0x121D,
            image_type=7,
            file_version=0xACDC,
            hw_min=1,
            hw_max=9,
        )
    )
    out_file = tmp_path / "meter.otaimg"
    code, _, err = run(
        capsys,
        "image", "sign", "--key", str(keypair), "--in", str(ota_path), "--device-type", "ESME",
        "--sequence", "42", "--expires-days", "10", "--out", str(out_file),
        "--manufacturer", "0x121d",  # agrees with the header: fine
    )  # fmt: skip
    assert (code, err) == (0, "")
    image = SignedImage.decode(out_file.read_bytes())
    assert image.image == ota_path.read_bytes()  # the OTA file is carried unchanged
    manifest, _ = verify(image, load_trust_dir(trust_dir), now=int(time.time()))
    assert (manifest.vendor, manifest.image_type, manifest.fw_version) == (0x121D, 7, 0xACDC)
    assert (manifest.hw_min, manifest.hw_max, manifest.sequence) == (1, 9, 42)
    assert manifest.expires - manifest.created == 10 * 86_400
    code, out, _ = run(capsys, "image", "verify", "--trust", str(trust_dir), str(out_file))
    assert code == 0
    assert "ESME" in out
    assert "sequence 42" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--version", "1"], "--version"),
        (["--hw-min", "1", "--hw-max", "8"], "--hw-max"),
        (["--image-type", "8"], "--image-type"),
        (["--manufacturer", "0x1234"], "--manufacturer"),
    ],
)
def test_sign_existing_ota_file_flags_must_agree(
    tmp_path: Path,
    keypair: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    ota_path = tmp_path / "meter.ota"
    ota_path.write_bytes(
        wrap(
            FIRMWARE,
            manufacturer_code=0x121D,
            image_type=7,
            file_version=0xACDC,
            hw_min=1,
            hw_max=9,
        )
    )
    out_file = tmp_path / "meter.otaimg"
    code, out, err = run(
        capsys,
        "image", "sign", "--key", str(keypair), "--in", str(ota_path), "--device-type", "ESME",
        "--out", str(out_file), *flags,
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert message in err
    assert "disagrees" in err
    assert err.count("\n") == 1
    assert not out_file.exists()


def test_sign_broken_ota_file_is_refused(
    tmp_path: Path, keypair: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ota = bytearray(wrap(FIRMWARE, manufacturer_code=1, image_type=1, file_version=1))
    ota[52] ^= 1  # total image size
    (tmp_path / "bad.ota").write_bytes(bytes(ota))
    code, _, err = run(
        capsys,
        "image", "sign", "--key", str(keypair), "--in", str(tmp_path / "bad.ota"),
        "--device-type", "ESME", "--hw-min", "1", "--hw-max", "1", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2
    assert "not a valid ZigBee OTA file" in err


def test_sign_raw_needs_version_and_hardware(
    tmp_path: Path, keypair: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    code, _, err = run(
        capsys,
        "image", "sign", "--key", str(keypair), "--in", str(tmp_path / "fw.bin"),
        "--device-type", "B2", "--version", "1", "--out", str(tmp_path / "fw.otaimg"),
    )  # fmt: skip
    assert code == 2
    assert "--hw-min" in err
    assert not (tmp_path / "fw.otaimg").exists()


def test_sign_with_missing_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = sign_raw(capsys, tmp_path / "nope.pem", tmp_path / "fw.otaimg")
    assert code == 2
    assert "nope.pem" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- verify refusals


@pytest.fixture
def signed_file(tmp_path: Path, keypair: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out_file = tmp_path / "fw.otaimg"
    assert sign_raw(capsys, keypair, out_file)[0] == 0
    return out_file


def test_verify_with_wrong_trust_dir(
    tmp_path: Path, signed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-trust"
    other.mkdir()
    assert run(capsys, "keys", "new", "--out", str(tmp_path / "other.pem"))[0] == 0
    (tmp_path / "other.pub.pem").rename(other / "other.pem")
    code, out, err = run(capsys, "image", "verify", "--trust", str(other), str(signed_file))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "refused: UNKNOWN_KEY_ID" in err
    assert _kid(signed_file).hex() in err


def test_verify_revoked(
    tmp_path: Path, signed_file: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"# compromised 2025-01-01\n\n{_kid(signed_file).hex()}  # release key\n")
    code, _, err = run(
        capsys, "image", "verify", "--trust", str(trust_dir), "--revoked", str(revoked),
        str(signed_file),
    )  # fmt: skip
    assert code == 2
    assert "REVOKED_KEY" in err


def test_verify_tampered_image(
    signed_file: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(signed_file.read_bytes())
    data[-100] ^= 0xFF
    signed_file.write_bytes(bytes(data))
    code, _, err = run(capsys, "image", "verify", "--trust", str(trust_dir), str(signed_file))
    assert code == 2
    assert "IMAGE_HASH" in err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing file", "cannot read"),
        ("not an otaimg", "MALFORMED"),
        ("private key in trust dir", "private key"),
        ("empty trust dir", "no public keys"),
        ("bad revoked line", "not a key id"),
    ],
)
def test_verify_errors_are_one_line(
    tmp_path: Path,
    signed_file: Path,
    trust_dir: Path,
    keypair: Path,
    capsys: pytest.CaptureFixture[str],
    setup: str,
    message: str,
) -> None:
    target, extra = signed_file, []
    if setup == "missing file":
        target = tmp_path / "missing.otaimg"
    elif setup == "not an otaimg":
        target.write_bytes(b"hello")
    elif setup == "private key in trust dir":
        (trust_dir / "oops.pem").write_bytes(keypair.read_bytes())
    elif setup == "empty trust dir":
        for f in trust_dir.iterdir():
            f.unlink()
    elif setup == "bad revoked line":
        (tmp_path / "rev").write_text("0011\n")
        extra = ["--revoked", str(tmp_path / "rev")]
    code, out, err = run(capsys, "image", "verify", "--trust", str(trust_dir), *extra, str(target))
    assert (code, out) == (2, "")
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


# --------------------------------------------------------------------------- key files, parser


def test_load_revoked_and_public_key_path(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    path.write_text("00112233aabbccdd\n# comment\n  FFEEDDCCBBAA9988  # trailing\n")
    assert load_revoked(path) == [
        bytes.fromhex("00112233aabbccdd"),
        bytes.fromhex("ffeeddccbbaa9988"),
    ]
    assert public_key_path(tmp_path / "a.pem") == tmp_path / "a.pub.pem"
    assert public_key_path(tmp_path / "key") == tmp_path / "key.pub.pem"


def test_load_trust_dir_refuses_p384(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "k.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="P-256"):
        load_trust_dir(tmp_path)


def test_broker_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["--broker", "mqtt.example:8883", "keys", "new", "--out", "k"])
    assert args.broker == ("mqtt.example", 8883)
    # Not given: resolved at run time from OTACTL_BROKER, the config file, else 127.0.0.1
    # (tests/otad/test_ctl_connection.py); a HOST without a port is accepted (issue 11).
    assert parser.parse_args(["keys", "new", "--out", "k"]).broker is None
    assert parser.parse_args(["--broker", "nohost", "keys", "new", "--out", "k"]).broker == (
        "nohost",
        None,
    )
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--broker", "::1:1883", "keys", "new", "--out", "k"])
    assert info.value.code == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- real process


def test_console_script_end_to_end(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("otactl")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "otad.ctl"]

    def otactl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *argv], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
        )

    assert otactl("keys", "new", "--out", "k.pem").returncode == 0
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    signed = otactl(
        "image", "sign", "--key", "k.pem", "--in", "fw.bin", "--device-type", "B1",
        "--version", "3", "--hw-min", "1", "--hw-max", "1", "--out", "fw.otaimg",
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    trust = tmp_path / "trust"
    trust.mkdir()
    (tmp_path / "k.pub.pem").rename(trust / "k.pem")
    ok = otactl("image", "verify", "--trust", "trust", "fw.otaimg")
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith("OK fw.otaimg: B1 ")
    assert ok.stdout.count("\n") == 1
    (trust / "k.pem").write_text("not a key\n")
    bad = otactl("image", "verify", "--trust", "trust", "fw.otaimg")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.count("\n") == 1
    assert "not a PEM public key" in bad.stderr
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- GB images


def _gb_image() -> bytes:
    """Shaped like the DCC's DUIS 11.1 sample: a 60-byte header, then a Manufacturer Image that
    is not split into sub-elements (its first bytes read as an absurd sub-element length)."""
    body = b"\x2a\x00\x01\x01\x6d\xb3" + FIRMWARE[:295]
    header = OtaHeader(
        0x121D, 0x0000, 0xACDC_ACDC, 2, bytes(32), 60 + len(body), hw_min=0x1111, hw_max=0x1211
    )
    return header.encode() + body


async def test_a_gb_image_signs_verifies_and_imports(
    tmp_path: Path, keypair: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gb = tmp_path / "dcc-sample.ota"
    gb.write_bytes(_gb_image())
    out_file = tmp_path / "gb.otaimg"
    argv = ["image", "sign", "--key", str(keypair), "--in", str(gb), "--device-type", "ESME"]
    code, _, err = run(capsys, *argv, "--out", str(out_file))
    assert code == 2
    assert "--layout gbcs" in err  # the layout is declared, never guessed: a hint, no signature
    assert not out_file.exists()
    code, out, err = run(capsys, *argv, "--layout", "gbcs", "--out", str(out_file))
    assert (code, err) == (0, "")
    assert "layout gbcs" in out
    image = SignedImage.decode(out_file.read_bytes())
    assert image.image == gb.read_bytes()  # carried unchanged
    manifest, ota = verify(image, load_trust_dir(trust_dir), now=int(time.time()))
    assert manifest.body_layout is OtaLayout.GBCS
    assert manifest.activation_digest == hashlib.sha256(_gb_image()[60:]).digest()
    assert ota.raw_body == _gb_image()[60:]
    code, out, _ = run(capsys, "image", "verify", "--trust", str(trust_dir), str(out_file))
    assert code == 0
    assert "layout gbcs" in out
    async with await Store.open(tmp_path / "state") as store:
        catalogue = Catalogue(store, load_trust_dir(trust_dir), tmp_path / "images")
        imported, new = await catalogue.import_image(out_file.read_bytes())
        assert new
        assert imported.manifest == manifest
        reloaded = Catalogue(store, load_trust_dir(trust_dir), tmp_path / "images")
        await reloaded.load()  # the stored v2 manifest decodes again
        assert reloaded.images[manifest.sha256].manifest == manifest


def test_raw_firmware_can_be_wrapped_as_a_gb_image(
    tmp_path: Path, keypair: Path, trust_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "raw-gb.otaimg"
    code, _, err = sign_raw(
        capsys, keypair, out_file, "--layout", "gbcs", "--manufacturer", "0x121d"
    )
    assert (code, err) == (0, "")
    image = SignedImage.decode(out_file.read_bytes())
    manifest, ota = verify(image, load_trust_dir(trust_dir), now=int(time.time()))
    assert ota.raw_body == FIRMWARE  # the Manufacturer Image right after the header
    assert manifest.vendor == 0x121D
    assert manifest.activation_digest == hashlib.sha256(FIRMWARE).digest()
