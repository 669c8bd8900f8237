"""The shared identifier check: an EUI-64 is exactly 16 upper-case hex digits (SPEC §2, §8.7)."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.wire.limits import check_eui64


def test_check_eui64() -> None:
    assert check_eui64("ABCDEF0123456789", "device id") == "ABCDEF0123456789"
    for bad in ("abcdef0123456789", "ABCDEF012345678", "ABCDEF01234567890", 5, None, "+" * 16):
        with pytest.raises(ProtocolError) as info:
            check_eui64(bad, "device id")
        assert info.value.reason is Reason.BAD_IDENTIFIER
        assert "device id" in info.value.detail
