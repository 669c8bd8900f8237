"""Which keys may sign releases, and the full check of a signed manifest.

:class:`TrustStore` maps key ids to P-256 public keys and keeps a revocation list of key ids.
:func:`verify_manifest` is the one place a signed manifest becomes a :class:`Manifest`; it runs the
checks in the order of SPEC §6.4 (which names each step's reasons) and stops at the first
failure: envelope and signature (:meth:`TrustStore.verify`, steps 1-6; the payload is not
decoded before its signature has verified), manifest decoding (:meth:`Manifest.decode`, step
7), expiry against the caller's fixed update-start time (step 8), and, given a
:class:`Target`, vendor, device type, hardware range and anti-rollback (steps 9-13).

Sans-IO: keys come in as objects, time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.clock import UnixTime
from protocol.errors import ProtocolError, Reason
from protocol.release.cose import key_id, parse_sign1, verify_sign1
from protocol.release.manifest import DeviceType, Manifest
from protocol.wire.limits import (  # re-exported: otad imports it from here
    MAX_SIGNED_MANIFEST_BYTES as MAX_SIGNED_MANIFEST_BYTES,
)


class TrustStore:
    """Public keys trusted to sign, by key id, and the key ids revoked.

    Not a frozen value: keys are added and revoked as configuration changes. A revoked key id
    stays revoked even if its key is added again (revocation wins), and a key id may be revoked
    before the key is known.
    """

    __slots__ = ("_keys", "_revoked")

    def __init__(
        self,
        keys: Iterable[ec.EllipticCurvePublicKey] = (),
        revoked: Iterable[bytes] = (),
    ) -> None:
        self._keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
        self._revoked: set[bytes] = set()
        for key in keys:
            self.add(key)
        for kid in revoked:
            self.revoke(kid)

    def add(self, public_key: ec.EllipticCurvePublicKey) -> bytes:
        """Trust ``public_key`` (P-256 only) and return its key id.

        Adding the same key twice is a no-op. Raises ``ValueError`` for another curve or for a
        different key whose id collides with one already held.
        """
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("trusted keys must be EC P-256 public keys")
        kid = key_id(public_key)
        held = self._keys.get(kid)
        if held is not None and held.public_numbers() != public_key.public_numbers():
            raise ValueError(f"key id {kid.hex()} collides with a different trusted key")
        self._keys[kid] = public_key
        return kid

    def revoke(self, kid: bytes) -> None:
        """Revoke key id ``kid``: anything it signed is refused with ``REVOKED_KEY``."""
        if not isinstance(kid, bytes) or not kid:
            raise ValueError("a key id is a non-empty byte string")
        self._revoked.add(bytes(kid))

    @property
    def kids(self) -> frozenset[bytes]:
        """Key ids that currently verify: held and not revoked."""
        return frozenset(self._keys) - self._revoked

    @property
    def revoked(self) -> frozenset[bytes]:
        """Key ids on the revocation list (held or not)."""
        return frozenset(self._revoked)

    def public_key(self, kid: bytes) -> ec.EllipticCurvePublicKey | None:
        """The held key with id ``kid``, revoked or not; ``None`` if not held."""
        return self._keys.get(kid)

    def verify(self, signed: bytes, *, max_size: int) -> bytes:
        """Verify a COSE_Sign1 and return its payload bytes, still undecoded.

        Order: envelope (:func:`~protocol.release.cose.parse_sign1`), ``REVOKED_KEY`` (checked
        first, so a revoked id is reported as revoked even when its key is no longer held),
        ``UNKNOWN_KEY_ID``, then ``BAD_ALGORITHM`` / ``BAD_SIGNATURE``. Raises ``ProtocolError``
        only.
        """
        message = parse_sign1(signed, max_size=max_size)
        if message.kid in self._revoked:
            raise ProtocolError(Reason.REVOKED_KEY, f"key {message.kid.hex()} is revoked")
        key = self._keys.get(message.kid)
        if key is None:
            raise ProtocolError(Reason.UNKNOWN_KEY_ID, f"key {message.kid.hex()} is not trusted")
        verify_sign1(message, key)
        return message.payload


@dataclass(frozen=True, slots=True)
class Target:
    """The device a manifest must fit, and the sequence it has already installed or accepted.

    ``vendor`` ``None`` skips the vendor check (for a verifier that does not know it).
    """

    device_type: DeviceType
    hw_version: int
    installed_sequence: int = 0
    vendor: int | None = None


def verify_manifest(
    signed: bytes, trust: TrustStore, *, now: UnixTime, target: Target | None = None
) -> Manifest:
    """Verify a signed manifest completely; return it or raise ``ProtocolError`` (see module doc).

    ``now`` is wall-clock time, fixed at the start of the update (TUF): a manifest is refused at
    or after its ``expires`` instant. Without ``target`` only signature, decoding and expiry are
    checked (what otad itself does before it offers an image).
    """
    payload = trust.verify(signed, max_size=MAX_SIGNED_MANIFEST_BYTES)
    manifest = Manifest.decode(payload)
    if now >= manifest.expires:
        raise ProtocolError(
            Reason.EXPIRED, f"manifest expired at {manifest.expires}, now {int(now)}"
        )
    if target is not None:
        check_target(manifest, target)
    return manifest


def check_target(manifest: Manifest, target: Target) -> None:
    """Raise ``ProtocolError`` unless ``manifest`` fits ``target`` (vendor, type, hw, sequence)."""
    if target.vendor is not None and manifest.vendor != target.vendor:
        raise ProtocolError(
            Reason.WRONG_VENDOR, f"vendor 0x{manifest.vendor:04x}, device 0x{target.vendor:04x}"
        )
    if manifest.device_type != target.device_type:
        raise ProtocolError(
            Reason.WRONG_DEVICE_TYPE,
            f"image for {manifest.device_type.value}, device is {target.device_type.value}",
        )
    if not manifest.hw_min <= target.hw_version <= manifest.hw_max:
        raise ProtocolError(
            Reason.HARDWARE_OUT_OF_RANGE,
            f"hardware 0x{target.hw_version:04x} outside "
            f"0x{manifest.hw_min:04x}..0x{manifest.hw_max:04x}",
        )
    if manifest.sequence < target.installed_sequence:
        raise ProtocolError(
            Reason.ROLLBACK,
            f"sequence {manifest.sequence} < installed {target.installed_sequence}",
        )
    if manifest.sequence == target.installed_sequence:
        raise ProtocolError(Reason.REPLAYED, f"sequence {manifest.sequence} already installed")
