"""Targeting: which device on a premises an image is for, and whether its CH can carry the image.

One answer for everyone who asks it: otad (``distribute``: which CHs ``--all-matching`` picks, why
a named CH is refused), the virtual CHs (their check of every ``Offer``) and the campaign engine
to come. The premises is what its CH declared in its :class:`~protocol.wire.messages.
HubAnnounced`: the CH's own hardware version, its HAN inventory and its transfer limits. The
checks themselves are the protocol's (:class:`~protocol.release.trust.Target`,
:func:`~protocol.release.trust.check_target`, SPEC 6.4 and 7.4):

0. **protocol version**: a v2 manifest (SPEC §6.2) is for CHs that declared protocol 1.1
   (``UNSUPPORTED_VERSION`` for a 1.0 CH, which cannot read it);
1. **device**: a CH image is for the CH itself; any other image is for a device of the image's
   type on the HAN. Refused ``WRONG_DEVICE_TYPE`` when the premises has no device of that type,
   ``HARDWARE_OUT_OF_RANGE`` when none of them has a hardware version in the manifest's range
   (the first that has one is the target);
2. **sequence** (anti-rollback), only for a caller that knows what the target has installed
   (a CH does; otad does not, so it leaves ``ROLLBACK``/``REPLAYED`` to the CH);
3. **limits**: the image's largest block must fit the CH's declared ``max_block`` and ``buffer``
   (``LIMITS_EXCEEDED``).
"""

from __future__ import annotations

from protocol.errors import ProtocolError, Reason
from protocol.release.manifest import DeviceType, Manifest, ManifestV2
from protocol.release.trust import Target, check_target
from protocol.wire.messages import HubAnnounced, minor_version

__all__ = ["device_for", "matches", "refusal"]

_SEQUENCE_REASONS = (Reason.ROLLBACK, Reason.REPLAYED)


def matches(announcement: HubAnnounced, manifest: Manifest) -> bool:
    """Whether the premises has a device ``manifest`` is for (type and hardware range; limits
    not considered): the CHs ``--all-matching`` picks."""
    return _hw_version(announcement, manifest) is not None


def device_for(announcement: HubAnnounced, manifest: Manifest) -> Target:
    """The :class:`Target` on the premises that ``manifest`` is for (installed sequence 0,
    vendor unchecked); raise :class:`ProtocolError` (step 1 of the module docstring) if none."""
    hw_version = _hw_version(announcement, manifest)
    if hw_version is not None:
        return Target(manifest.device_type, hw_version)
    wanted = manifest.device_type
    if wanted is DeviceType.CH:
        raise ProtocolError(
            Reason.HARDWARE_OUT_OF_RANGE,
            f"hardware 0x{announcement.hw_version:04x} of {announcement.guid} outside"
            f" 0x{manifest.hw_min:04x}..0x{manifest.hw_max:04x}",
        )
    if not any(d.device_type == wanted.value for d in announcement.han):
        raise ProtocolError(
            Reason.WRONG_DEVICE_TYPE, f"no {wanted.value} on the HAN of {announcement.guid}"
        )
    raise ProtocolError(
        Reason.HARDWARE_OUT_OF_RANGE,
        f"no {wanted.value} of hardware 0x{manifest.hw_min:04x}..0x{manifest.hw_max:04x}"
        f" on the HAN of {announcement.guid}",
    )


def refusal(
    announcement: HubAnnounced, manifest: Manifest, *, installed_sequence: int | None = None
) -> ProtocolError | None:
    """Why the premises that made ``announcement`` cannot take ``manifest``'s image (device,
    sequence if ``installed_sequence`` is known, limits: see the module docstring), or None."""
    if isinstance(manifest, ManifestV2) and minor_version(announcement) < 1:
        return ProtocolError(
            Reason.UNSUPPORTED_VERSION,
            f"a v2 manifest ({manifest.body_layout.value} image) needs a CH of protocol 1.1;"
            f" {announcement.guid} declared 1.0 (SPEC §5, §6.2)",
        )
    try:
        target = device_for(announcement, manifest)
        if installed_sequence is not None:
            check_target(
                manifest, Target(target.device_type, target.hw_version, installed_sequence)
            )
    except ProtocolError as exc:
        return exc
    limits = announcement.limits
    largest = min(manifest.block_size, manifest.size)
    if largest > limits.max_block:
        return ProtocolError(
            Reason.LIMITS_EXCEEDED,
            f"block size {manifest.block_size} > max_block {limits.max_block}"
            f" of {announcement.guid}",
        )
    if largest > limits.buffer:
        return ProtocolError(
            Reason.LIMITS_EXCEEDED,
            f"block size {manifest.block_size} > buffer {limits.buffer} of {announcement.guid}",
        )
    return None


def _hw_version(announcement: HubAnnounced, manifest: Manifest) -> int | None:
    """The hardware version of the device ``manifest`` is for, or None if none fits."""
    low, high = manifest.hw_min, manifest.hw_max
    if manifest.device_type is DeviceType.CH:
        hw = announcement.hw_version
        return hw if low <= hw <= high else None
    wanted = manifest.device_type.value
    for device in announcement.han:
        if device.device_type == wanted and low <= device.hw_version <= high:
            return device.hw_version
    return None
