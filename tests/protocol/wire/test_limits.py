"""The shared identifier check: an EUI-64 is exactly 16 upper-case hex digits (SPEC §2, §8.7)."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import check_eui64, check_label


def test_check_eui64() -> None:
    assert check_eui64("ABCDEF0123456789", "device id") == "ABCDEF0123456789"
    for bad in ("abcdef0123456789", "ABCDEF012345678", "ABCDEF01234567890", 5, None, "+" * 16):
        with pytest.raises(ProtocolError) as info:
            check_eui64(bad, "device id")
        assert info.value.reason is Reason.BAD_IDENTIFIER
        assert "device id" in info.value.detail


@pytest.mark.parametrize(
    "label", ["Acme Ltd", "a b", "süd", "Süd-Netz/3", "a/b", "a@b", "a,b", "a=b", "$sys", "~x",
              "a+b", "a#b", "x" * 64, "0", "-", "電力"],
)  # fmt: skip
def test_a_label_is_any_printable_text_of_1_to_64_characters(label: str) -> None:
    assert check_label(label, "supplier") == label


@pytest.mark.parametrize(
    ("label", "why"),
    [("", "1 to 64"), ("x" * 65, "1 to 64"), (" Acme", "space"), ("Acme ", "space"),
     ("a\tb", "U+0009"), ("a\nb", "U+000A"), ("a\x00b", "U+0000"), ("a\u200bb", "U+200B"),
     ("a\u2028b", "U+2028"), (7, "1 to 64")],
)  # fmt: skip
def test_anything_else_is_refused_malformed_naming_the_field(label: object, why: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        check_label(label, "segment")
    assert refused.value.reason is Reason.MALFORMED
    assert "segment" in refused.value.detail
    assert why in refused.value.detail
