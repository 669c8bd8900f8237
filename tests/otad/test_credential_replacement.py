"""otad's side of credential replacement (SPEC §8.11), on the in-memory daemon shell.

The devices are real :class:`protocol.device.device.Device` machines behind the shell's
:class:`HanRelay`: they verify otad's really signed credentials commands, generate their new key
pairs and sign their confirmations (and, later, their activation alerts) with real keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from test_devices import GUID, NEW_FW, Premises, pem, premises
from test_event_schema import SCHEMA, validate

from otad.credentials import CredentialsState, DeviceKeys, load_device_keys
from otad.devices import DeviceState, Proof
from otad.events import CredentialsFailed, CredentialsReplaced
from otad.store import DeviceKeyRow
from protocol.device.activation import ActivationAlert, ActivationResponse
from protocol.device.credentials import CredentialsCommand, claimed_command_type, spki
from protocol.device.device import AlertRaised, CredentialsConfirmed
from protocol.errors import Reason
from protocol.release.cose import key_id
from protocol.release.trust import TrustStore
from protocol.wire.devices import JoinMode
from protocol.wire.messages import Activate, DeviceReported, Evidence, decode


def credentials_sent(p: Premises) -> list[CredentialsCommand]:
    """Every credentials command otad sent, verified with otad's activation key."""
    trust = TrustStore([p.activation_key.public_key()])
    return [
        CredentialsCommand.verify(m.command, trust)
        for m in p.downlink()
        if isinstance(m, Activate) and claimed_command_type(m.command) is CredentialsCommand
    ]


def replacement(p: Premises, device: str) -> Any:
    return p.sh.daemon.credentials.records.get(device)


def replaced(p: Premises, device: str) -> bool:
    rec = replacement(p, device)
    return rec is not None and rec.state is CredentialsState.REPLACED


async def replace(p: Premises, *devices: str) -> dict[str, Any]:
    return await p.sh.daemon.commands.credentials_replace({"devices": list(devices)})


async def credentials_events(p: Premises) -> list[Any]:
    await p.sh.events.flush()
    events = [
        e
        for e in p.sh.events_published()
        if isinstance(e, (CredentialsReplaced, CredentialsFailed))
    ]
    for event in events:  # what is published fits the documented schema, as its own kind
        assert not validate({**event.payload(), "seq": event.seq, "key": event.key()}, SCHEMA)
    return events


def trusted_key(p: Premises, device: str) -> ec.EllipticCurvePublicKey | None:
    keys: DeviceKeys = p.sh.daemon.credentials._keys
    return keys.key(device)


def trusted(p: Premises, device: str) -> bytes:
    """The SubjectPublicKeyInfo of the key otad trusts for ``device``'s alerts."""
    key = trusted_key(p, device)
    assert key is not None
    return spki(key)


def public(key: ec.EllipticCurvePrivateKey | None) -> bytes:
    assert key is not None
    return spki(key.public_key())


# --------------------------------------------------------------------------- replaced


async def test_replaced_then_an_alert_verifies_only_with_the_new_key(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        bridge = p.devices[device]
        old_key = bridge.signing_key
        assert old_key is not None
        await p.relay()
        result = await replace(p, device)
        assert [i["device_id"] for i in result["issued"]] == [device]
        assert not result["refused"]
        await p.until(lambda: replaced(p, device))
        (command,) = credentials_sent(p)
        assert command.current_kid == key_id(old_key.public_key())
        # the device made a new key; otad trusts exactly it, durably
        new_key = bridge.signing_key
        assert public(new_key) != public(old_key)
        assert trusted(p, device) == spki(new_key.public_key())
        (row,) = await p.sh.store.device_keys()
        assert (row.device_id, row.spki, row.replaced_spki, row.counter) == (
            device,
            spki(new_key.public_key()),
            spki(old_key.public_key()),
            command.counter,
        )
        (event,) = await credentials_events(p)
        assert isinstance(event, CredentialsReplaced)
        assert (event.device_id, event.guid, event.counter, event.attempts) == (
            device,
            GUID,
            command.counter,
            1,
        )
        assert (event.old_kid, event.new_kid) == (
            key_id(old_key.public_key()).hex(),
            key_id(new_key.public_key()).hex(),
        )
        # otactl devices shows it
        (listed,) = await p.sh.daemon.commands.devices({})
        assert listed["credentials"] == "replaced"
        # activation: the counter comes after the credentials command's (one sequence), and
        # the alert is held back to check which key verifies
        p.ch.han.lose = lambda output: isinstance(output, (AlertRaised, ActivationResponse))
        await p.activate(device)
        await p.until(lambda: bool(p.ch.han.lost))
        counter = p.record(device).counter
        assert counter > command.counter
        m = p.image.manifest
        under_old_key = ActivationAlert(device, NEW_FW, m.sha256, counter).sign(old_key)
        refused = dict(p.sh.daemon.rejects.counts)
        p.sh.send_up(GUID, DeviceReported(device, under_old_key, Evidence.DEVICE))
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        assert p.state(device) is DeviceState.ACTIVATION_PENDING
        assert p.sh.daemon.rejects.counts["UNKNOWN_KEY_ID"] == refused.get("UNKNOWN_KEY_ID", 0) + 1
        (alert,) = [o for o in p.ch.han.lost if isinstance(o, AlertRaised)]
        p.sh.send_up(GUID, DeviceReported(device, alert.signed, Evidence.DEVICE))
        await p.until(lambda: p.state(device) is DeviceState.CONFIRMED)
        assert p.record(device).proof is Proof.SIGNED_ALERT


async def test_a_replayed_or_forged_replacement_command_is_refused(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        bridge = p.devices[device]
        seen: list[Any] = []
        p.ch.han.lose = lambda output: seen.append(output) or False  # a wiretap, nothing lost
        await replace(p, device)
        await p.until(lambda: replaced(p, device))
        key_after = bridge.signing_key
        (sent,) = [m for m in p.sh.downlink if isinstance(decode(m.payload), Activate)]
        forger = ec.generate_private_key(ec.SECP256R1())
        now_trusted = trusted_key(p, device)
        assert now_trusted is not None
        forged = CredentialsCommand(device, 2**62, key_id(now_trusted)).sign(forger)
        for payload in (sent.payload, Activate(device, forged).encode()):
            p.sh._send(p.sh.clock.now, "down", GUID, payload)
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        reasons = [reason for _, reason in p.ch.han.refused]
        assert reasons[0] is Reason.REPLAYED
        assert reasons[1] in (Reason.UNKNOWN_KEY_ID, Reason.BAD_SIGNATURE)
        assert bridge.signing_key is key_after  # no second key made
        assert trusted(p, device) == public(key_after)
        # a confirmation replayed to otad changes nothing either (no replacement in progress)
        (confirmation,) = [o for o in seen if isinstance(o, CredentialsConfirmed)]
        before = dict(p.sh.daemon.rejects.counts)
        p.sh.send_up(GUID, DeviceReported(device, confirmation.signed, Evidence.DEVICE))
        p.sh.run_for(1.0)
        await p.sh.daemon.devices.flushed()
        assert p.sh.daemon.rejects.counts["NO_TRANSFER"] == before.get("NO_TRANSFER", 0) + 1


async def test_a_lost_confirmation_is_recovered_by_the_retry_naming_the_same_key(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        bridge = p.devices[device]
        old_key = bridge.signing_key
        assert old_key is not None
        p.ch.han.lose = lambda output: (
            isinstance(output, CredentialsConfirmed) and not p.ch.han.lost
        )
        await replace(p, device)
        took = await p.until(lambda: replaced(p, device), max_s=2000.0)
        assert took >= p.sh.daemon.config.activation.credentials_timeout_s
        assert len(p.ch.han.lost) == 1  # the first confirmation never reached otad
        first, second = credentials_sent(p)
        assert second.counter > first.counter
        assert first.current_kid == second.current_kid == key_id(old_key.public_key())
        # the device signed the retry with the old key, dropped the key otad never adopted, and
        # otad trusts the key the retry made
        assert bridge.previous_signing_key is old_key
        assert trusted(p, device) == public(bridge.signing_key)
        (event,) = await credentials_events(p)
        assert isinstance(event, CredentialsReplaced)
        assert (event.attempts, event.counter) == (2, second.counter)


async def test_no_confirmation_after_every_attempt_fails_and_keeps_the_old_key(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        old_key = p.devices[device].signing_key
        assert old_key is not None
        p.ch.han.lose = lambda output: isinstance(output, CredentialsConfirmed)
        await replace(p, device)
        attempts = p.sh.daemon.config.activation.credentials_attempts

        def failed() -> bool:
            rec = replacement(p, device)
            return rec is not None and rec.state is CredentialsState.FAILED

        await p.until(failed, max_s=attempts * 400.0)
        assert len(credentials_sent(p)) == attempts
        assert replacement(p, device).reason == "TIMED_OUT"
        assert trusted(p, device) == spki(old_key.public_key())
        (event,) = await credentials_events(p)
        assert isinstance(event, CredentialsFailed)
        assert (event.reason, event.attempts) == ("TIMED_OUT", attempts)
        (row,) = await p.sh.store.credentials()
        assert (row.state, row.attempts) == ("failed", attempts)


# --------------------------------------------------------------------------- refused by otad


async def test_a_cad_joined_device_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    async with premises(tmp_path, (JoinMode.PPMID, JoinMode.CAD)) as p:
        ppmid, cad = p.devices
        result = await replace(p, ppmid, cad, "00DB123456789999")
        assert [i["device_id"] for i in result["issued"]] == [ppmid]
        assert {(r["device_id"], r["reason"]) for r in result["refused"]} == {
            (cad, "NO_CREDENTIALS"),
            ("00DB123456789999", "WRONG_DEVICE"),
        }
        await p.until(lambda: replaced(p, ppmid))
        assert [c.device_id for c in credentials_sent(p)] == [ppmid]
        assert replacement(p, cad) is None
        assert not p.ch.han.refused  # nothing reached the CAD bridge to refuse


# --------------------------------------------------------------------------- keys


def test_an_adopted_key_wins_over_its_file_unless_the_file_was_re_enrolled(
    tmp_path: Path,
) -> None:
    old, new, enrolled = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    (tmp_path / "00DB1234567890B0.pem").write_bytes(pem(old))
    (tmp_path / "00DB1234567890B1.pem").write_bytes(pem(enrolled))
    keys = DeviceKeys(load_device_keys(tmp_path))
    adopted = [
        DeviceKeyRow(d, spki(new.public_key()), spki(old.public_key()), 5, 0.0)
        for d in ("00DB1234567890B0", "00DB1234567890B1")
    ]
    keys.overlay(adopted)
    assert spki(keys.key("00DB1234567890B0")) == spki(new.public_key())
    assert spki(keys.key("00DB1234567890B1")) == spki(enrolled.public_key())
    assert set(keys) == {"00DB1234567890B0", "00DB1234567890B1"}
    assert keys["00DB1234567890B0"] is keys["00DB1234567890B0"]  # one trust store per key


# --------------------------------------------------------------------------- restarts


async def test_a_restart_resumes_a_pending_replacement_and_keeps_the_adopted_key(
    tmp_path: Path,
) -> None:
    async with premises(tmp_path, (JoinMode.PPMID,)) as p:
        (device,) = p.devices
        bridge = p.devices[device]
        p.ch.han.lose = lambda output: isinstance(output, CredentialsConfirmed)
        await replace(p, device)
        await p.until(lambda: bool(p.ch.han.lost))  # the confirmation in flight when otad dies
        (before,) = credentials_sent(p)
        p.sh.kill()
    async with premises(tmp_path, restart_of=p) as q:
        q.ch.han.lose = lambda output: False
        assert replacement(q, device).state is CredentialsState.PENDING
        await q.until(lambda: replaced(q, device), max_s=1000.0)
        (after,) = credentials_sent(q)  # the retry, at the deadline the store kept
        assert after.counter > before.counter
        assert after.current_kid == before.current_kid
        new_key = bridge.signing_key
        assert new_key is not None
        q.sh.kill()
    async with premises(tmp_path, restart_of=q) as r:
        # the key file still holds the old key: the adopted one, from the store, is trusted
        assert trusted(r, device) == spki(new_key.public_key())
        assert replaced(r, device)
        await r.relay()
        await r.activate(device)
        await r.until(lambda: r.state(device) is DeviceState.CONFIRMED)
        assert r.record(device).proof is Proof.SIGNED_ALERT
        assert r.record(device).counter > after.counter
