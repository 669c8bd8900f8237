"""Targeting: which device on a premises an image is for, and whether the CH can carry it."""

from __future__ import annotations

import pytest

from otad.targeting import device_for, matches, refusal
from protocol.errors import Reason
from protocol.release.manifest import DeviceType, Manifest
from protocol.release.trust import Target
from protocol.release.zigbee_ota import OtaLayout, wrap
from protocol.wire.messages import HanDevice, HubAnnounced, Limits, declaring_minor

GUID = "0011223344556677"
ROOMY = Limits(4096, 8, 65536)


def manifest(
    device_type: DeviceType = DeviceType.CH,
    *,
    hw: tuple[int, int] = (1, 3),
    sequence: int = 5,
    size: int = 3000,
    block_size: int = 1024,
) -> Manifest:
    return Manifest.for_image(
        bytes(size),
        vendor=0x1234,
        image_type=7,
        device_type=device_type,
        hw_min=hw[0],
        hw_max=hw[1],
        fw_version=0x0102_0000,
        sequence=sequence,
        block_size=block_size,
        created=1_700_000_000,
        expires=1_900_000_000,
    )


def premises(*han: tuple[str, int], hw_version: int = 2, limits: Limits = ROOMY) -> HubAnnounced:
    return HubAnnounced(
        guid=GUID,
        fw_version=1,
        hw_version=hw_version,
        supplier="S",
        segment="cell-0",
        limits=limits,
        han=tuple(
            HanDevice(f"{i:016X}", kind, "NATIVE", 0x100, hw) for i, (kind, hw) in enumerate(han)
        ),
    )


def reason(announcement: HubAnnounced, m: Manifest, **kwargs: int) -> Reason | None:
    error = refusal(announcement, m, **kwargs)
    return None if error is None else error.reason


def test_a_ch_image_is_for_the_ch_within_its_hardware_range() -> None:
    assert device_for(premises(), manifest()) == Target(DeviceType.CH, 2)
    assert matches(premises(), manifest())
    assert reason(premises(), manifest()) is None
    assert not matches(premises(hw_version=4), manifest())
    assert reason(premises(hw_version=4), manifest()) is Reason.HARDWARE_OUT_OF_RANGE
    # a HAN device of the right hardware does not make a CH image fit: the CH never lists
    # itself in its HAN (SPEC §3), so such an announcement cannot even be built
    with pytest.raises(ValueError, match="does not list itself"):
        premises(("CH", 2), hw_version=9)


def test_a_han_image_is_for_any_device_of_its_type_whose_hardware_fits() -> None:
    esme = manifest(DeviceType.ESME, hw=(3, 4))
    assert reason(premises(("GSME", 3)), esme) is Reason.WRONG_DEVICE_TYPE
    error = refusal(premises(("GSME", 3)), esme)
    assert error is not None
    assert error.detail == f"no ESME on the HAN of {GUID}"
    assert reason(premises(("ESME", 1)), esme) is Reason.HARDWARE_OUT_OF_RANGE
    assert not matches(premises(("ESME", 1)), esme)
    two = premises(("ESME", 1), ("ESME", 4))  # the second one fits
    assert matches(two, esme)
    assert device_for(two, esme) == Target(DeviceType.ESME, 4)
    assert reason(two, esme) is None
    assert not matches(premises(hw_version=3), esme)  # the CH's own hardware is not an ESME's


def test_the_sequence_is_checked_only_by_who_knows_what_is_installed() -> None:
    replayed = manifest(sequence=0)
    assert reason(premises(), replayed) is None  # otad: the CH decides
    assert reason(premises(), replayed, installed_sequence=0) is Reason.REPLAYED
    assert reason(premises(), manifest(sequence=4), installed_sequence=5) is Reason.ROLLBACK
    assert reason(premises(), manifest(sequence=6), installed_sequence=5) is None


@pytest.mark.parametrize(
    ("limits", "size", "expected", "detail"),
    [
        (Limits(1024, 8, 65536), 3000, None, ""),
        (Limits(512, 8, 65536), 3000, Reason.LIMITS_EXCEEDED, "max_block 512"),
        (Limits(512, 8, 65536), 500, None, ""),  # one block, smaller than max_block
        (Limits(4096, 8, 1000), 3000, Reason.LIMITS_EXCEEDED, "buffer 1000"),
    ],
)
def test_the_largest_block_must_fit_the_declared_limits(
    limits: Limits, size: int, expected: Reason | None, detail: str
) -> None:
    error = refusal(premises(limits=limits), manifest(size=size))
    assert (None if error is None else error.reason) is expected
    if error is not None:
        assert error.detail == f"block size 1024 > {detail} of {GUID}"


def test_a_wrong_device_is_refused_before_the_limits() -> None:
    tiny = premises(("GSME", 1), limits=Limits(16, 8, 16))
    assert reason(tiny, manifest(DeviceType.ESME)) is Reason.WRONG_DEVICE_TYPE
    assert matches(tiny, manifest(DeviceType.GSME, hw=(1, 1)))  # matching ignores the limits


def test_a_v2_manifest_is_only_for_a_ch_of_protocol_1_1() -> None:
    image = wrap(bytes(3000), manufacturer_code=0xFFF1, image_type=7, file_version=0x0102_0000,
                 hw_min=1, hw_max=3, layout=OtaLayout.GBCS)  # fmt: skip
    v2 = Manifest.for_image(
        image, vendor=0xFFF1, image_type=7, device_type=DeviceType.CH, hw_min=1, hw_max=3,
        fw_version=0x0102_0000, sequence=5, block_size=1024, created=1_700_000_000,
        expires=1_900_000_000, layout=OtaLayout.GBCS,
    )  # fmt: skip
    assert reason(premises(), v2) is Reason.UNSUPPORTED_VERSION  # a 1.0 CH cannot read it
    assert reason(declaring_minor(premises(), 1), v2) is None
    assert reason(premises(), manifest()) is None  # v1 manifests are for everyone
