"""Topic grammar and identifier validation (B02: no '/', '+', '#' or NUL in a topic level)."""

from __future__ import annotations

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.wire import topics

GUID = "00112233AABBCCDD"


def test_per_hub_topics() -> None:
    assert topics.down(GUID) == f"ota/v1/ch/{GUID}/down"
    assert topics.parse_ch_topic(topics.up(GUID)) == (GUID, "up")
    assert topics.parse_ch_topic(topics.state(GUID)) == (GUID, "state")


@pytest.mark.parametrize(
    "guid",
    ["", "0011", "00112233aabbccdd", "0011223/AABBCCDD", "00112233AABBCC+#", "0" * 15 + "\0"],
)
def test_bad_guids_are_refused(guid: str) -> None:
    with pytest.raises(ProtocolError) as info:
        topics.down(guid)
    assert info.value.reason is Reason.BAD_IDENTIFIER


@pytest.mark.parametrize(
    "topic",
    [
        "ota/v1/ch/00112233AABBCCDD/other",
        "ota/v2/ch/00112233AABBCCDD/up",
        "ota/v1/ch/00112233AABBCCDD/up/extra",
        "ota/v1/ch/+/up",
        "x",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError):
        topics.parse_ch_topic(topic)


@pytest.mark.parametrize("level", ["a/b", "a+b", "#", "x\0", "", "y" * 65])
def test_unsafe_levels_are_refused(level: str) -> None:
    with pytest.raises(ProtocolError):
        topics.ctl_request(level)
