"""otactl's device commands: what each sends to otad, and how it shows the answer."""

from __future__ import annotations

from typing import Any

import pytest

import otad.ctl as ctl
from otad.ctl.format import (
    format_activate,
    format_credentials,
    format_devices,
    format_firmware_version,
)

IMAGE = "ab" * 32
DEVICE = "00DB1234567890B0"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every control request otactl makes, answered as otad would shape it."""
    made: list[tuple[str, dict[str, Any]]] = []

    async def call_once(
        host: str, port: int, cmd: str, args: dict[str, Any], *, wait_s: float, **how: Any
    ) -> Any:
        made.append((cmd, args))
        if cmd in ("activate", "activate.cancel"):
            return {"image": args["image"], "issued": [], "refused": []}
        if cmd == "credentials.replace":
            ids = args["devices"]
            return {
                "issued": [{"device_id": ids[0], "counter": 7, "guid": "00DB1234567890AA"}],
                "refused": [
                    {"device_id": d, "reason": "NO_CREDENTIALS", "detail": "joined as CAD"}
                    for d in ids[1:]
                ],
            }
        if cmd == "firmware.version":
            return {
                "guid": "00DB1234567890AA",
                "device_id": args["device"],
                "fw_version": 1,
                "fw_version_hex": "0x00000001",
                "boot_count": 2,
                "counter": 3,
                "evidence": "device",
            }
        return []

    monkeypatch.setattr(ctl, "call_once", call_once)
    return made


def test_activate_sends_the_devices_the_time_or_all_held(calls: list[Any]) -> None:
    assert ctl.main(["activate", IMAGE, "--device", DEVICE, "--at", "2026-06-01T02:00:00Z"]) == 0
    assert ctl.main(["activate", IMAGE[:8], "--all-held", "--at", "1780279200"]) == 0
    assert ctl.main(["activate", "cancel", IMAGE, "--device", DEVICE]) == 0
    assert calls == [
        ("activate", {"image": IMAGE, "devices": [DEVICE], "at": 1780279200}),
        ("activate", {"image": IMAGE[:8], "all_held": True, "at": 1780279200}),
        ("activate.cancel", {"image": IMAGE, "devices": [DEVICE]}),
    ]


def test_activate_usage_errors(calls: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["activate", "cancel", IMAGE, "--all-held"]) == 2
    assert ctl.main(["activate", "a", "b", "c", "--all-held"]) == 2
    with pytest.raises(SystemExit):
        ctl.main(["activate", IMAGE, "--device", DEVICE, "--at", "tomorrow"])
    assert calls == []
    assert "activate cancel takes --device" in capsys.readouterr().err


def test_devices_and_firmware_version(calls: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["devices", "--guid", "00DB1234567890AA"]) == 0
    assert ctl.main(["firmware-version", DEVICE, "--timeout", "5"]) == 0
    assert calls[0] == ("devices", {"guid": "00DB1234567890AA"})
    assert calls[1][0] == "firmware.version"
    assert calls[1][1]["device"] == DEVICE
    assert calls[1][1]["wait_s"] < 5
    assert "runs 0x00000001" in capsys.readouterr().out


def test_the_formats_show_every_column() -> None:
    row = {
        "guid": "00DB1234567890AA",
        "device_id": DEVICE,
        "device_type": "B2",
        "join_mode": "CAD",
        "image": IMAGE,
        "state": "confirmed",
        "percent": 100,
        "proof": "ch_evidence",
        "reason": None,
    }
    text = format_devices(
        [row, {**row, "state": "failed", "proof": None, "reason": "SELF_TEST_FAILED"}]
    )
    assert "ch_evidence" in text
    assert "SELF_TEST_FAILED" in text
    assert text.endswith("2 device(s): 1 confirmed, 1 failed")
    summary = format_activate(
        {
            "image": IMAGE,
            "issued": [{"device_id": DEVICE, "counter": 7, "execute_at": None, "cancel": False}],
            "refused": [
                {
                    "device_id": "00DB1234567890B1",
                    "reason": "NO_IMAGE_HELD",
                    "detail": "it is offered",
                }
            ],
        }
    )
    assert "counter 7, now" in summary
    assert "refused NO_IMAGE_HELD" in summary
    assert format_firmware_version(
        {
            "guid": "G",
            "device_id": DEVICE,
            "fw_version_hex": "0x1",
            "boot_count": 1,
            "counter": 2,
            "evidence": "ch",
        }
    )


def test_credentials_replace_sends_the_devices_and_fails_on_a_refusal(
    calls: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cad = "00DB1234567890B1"
    assert ctl.main(["credentials", "replace", "--device", DEVICE]) == 0
    assert "counter 7" in capsys.readouterr().out
    assert ctl.main(["credentials", "replace", "--device", DEVICE, cad]) == ctl.EXIT_FAILED
    assert f"{cad}: refused NO_CREDENTIALS" in capsys.readouterr().out
    assert ctl.main(["credentials", "list"]) == 0
    with pytest.raises(SystemExit):
        ctl.main(["credentials", "replace"])  # --device is required
    assert calls == [
        ("credentials.replace", {"devices": [DEVICE]}),
        ("credentials.replace", {"devices": [DEVICE, cad]}),
        ("credentials.list", {}),
    ]
    row = {
        "guid": "00DB1234567890AA",
        "device_id": DEVICE,
        "device_type": "B2",
        "state": "replaced",
        "attempts": 2,
        "counter": 9,
        "old_kid": "0123456789abcdef",
        "new_kid": "fedcba9876543210",
        "reason": None,
    }
    text = format_credentials([row])
    assert "fedcba9876543210" in text
    assert text.endswith("1 device(s)")
    devices_row = {
        "guid": "00DB1234567890AA", "device_id": DEVICE, "device_type": "B2", "join_mode": "PPMID",
        "image": IMAGE, "state": "confirmed", "percent": 100, "proof": "signed_alert",
        "reason": None, "credentials": "replaced",
    }  # fmt: skip
    assert "CREDENTIALS" in format_devices([devices_row])
    assert "replaced" in format_devices([devices_row])
