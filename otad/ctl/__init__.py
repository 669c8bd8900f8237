"""``otactl``: the operator's command line (``otactl`` or ``python -m otad.ctl``).

The package: this module is the command line (the argparse tree and one handler per command);
:mod:`otad.ctl.client` talks to the running otad over MQTT request/response (the control plane,
:mod:`otad.control`); :mod:`otad.ctl.format` turns its answers into tables and summary lines;
:mod:`otad.ctl.watch` follows the retained status (``otactl watch``); :mod:`otad.ctl.imagetool`
makes keys and signs and verifies releases, offline; :mod:`otad.ctl.pki` makes the broker's
certificates (``otactl pki``), offline; :mod:`otad.ctl.connection` is how otactl reaches and
authenticates to the broker (flags, ``OTACTL_*`` variables, a TOML config file).

The connection options (``--broker``, ``--username``, ``--password-file``, ``--tls-ca``,
``--tls-cert``, ``--tls-key``, ``--client-name``, ``--config``) are accepted before or after the
command (``otactl --broker H status`` and ``otactl status --broker H``).

Commands are ``GROUP ACTION`` pairs. :func:`build_parser` builds the argparse tree (one
``_add_<group>`` function per group, listed in :data:`GROUPS`), each leaf parser sets
``command="group action"``, and :data:`HANDLERS` maps that name to the function that runs it.
To add a command: write (or extend) an ``_add_<group>`` function, append it to :data:`GROUPS`
and put its handler in :data:`HANDLERS`; one that talks to otad calls :func:`_daemon_call` and
adds :func:`_add_daemon_options`. A command without an action (``otactl distribute ...``) is a
group parser that sets ``command`` itself.

Exit status: 0 success (one summary line on stdout), 2 failure or refusal (one line on stderr,
never a traceback; also at once, without waiting for the timeout, when otad's retained status
says it is offline: the code ``otactl watch`` gives offline too), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mqttio
from otad.ctl import campaign, imagetool, pki, watch
from otad.ctl.client import (
    DEFAULT_TIMEOUT,
    CtlError,
    CtlOffline,
    CtlTimeout,
    CtlUnreachable,
    call_once,
)
from otad.ctl.connection import Connection, ConnectionConfigError, resolve
from otad.ctl.format import (
    format_activate,
    format_credentials,
    format_credentials_replace,
    format_devices,
    format_distribute,
    format_firmware_version,
    format_fleet,
    format_forget,
    format_import,
    format_status,
    format_transfers,
)
from otad.files import FileError, read_bounded
from protocol.release.manifest import DeviceType
from protocol.release.otaimg import MAX_OTAIMG_BYTES
from protocol.release.zigbee_ota import OtaLayout

DEFAULT_BROKER = "127.0.0.1:1883"
EXIT_OK = 0
EXIT_FAILED = 2
EXIT_OFFLINE = EXIT_FAILED  # as otactl watch; scripts tell it apart by the message
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]
_Subparsers = Any  # argparse's _SubParsersAction is private


class CtlFailure(Exception):  # noqa: N818 - what otactl reports, not an error of its own
    """What ``otactl`` reports on stderr (one line) before exiting with status 2."""


class OtadOffline(Exception):  # noqa: N818 - what otactl reports, not an error of its own
    """otad's retained status says offline: one line on stderr, :data:`EXIT_OFFLINE`."""


def parse_broker(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` (``[v6addr][:PORT]`` for IPv6) -> ``(host, port or None)``; argparse
    type (:func:`mqttio.split_host_port`). A missing port is 8883 with TLS, else 1883."""
    try:
        return mqttio.split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The connection flags; on a command's parser (``top`` False) they default to nothing, so
    the same flag given before the command is not overwritten."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection (also OTACTL_* variables and --config)")
    group.add_argument(
        "--broker",
        type=parse_broker,
        default=default,
        metavar="HOST[:PORT]",
        help=f"MQTT broker of the daemon commands (default {DEFAULT_BROKER}; port 8883 with TLS)",
    )
    group.add_argument("--username", default=default, metavar="USER")
    group.add_argument(
        "--password-file", default=default, metavar="FILE", help="file holding the password"
    )
    group.add_argument(
        "--tls-ca", default=default, metavar="FILE", help="CA of the broker's certificate"
    )
    group.add_argument("--tls-cert", default=default, metavar="FILE", help="client certificate")
    group.add_argument("--tls-key", default=default, metavar="FILE", help="its private key")
    group.add_argument(
        "--client-name",
        default=default,
        metavar="NAME",
        help="the ctl topic level (default: the username, else the certificate's CN)",
    )
    group.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help="TOML file of these settings (default ~/.config/otactl.toml, /etc/otad/otactl.toml)",
    )


def connection_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Connection:
    """The connection the parsed ``args``, the environment and the config file give (flags >
    ``OTACTL_*`` > file > defaults); :class:`CtlFailure` when it cannot be used."""
    broker = getattr(args, "broker", None)
    flags = {
        "broker": None if broker is None else _join_host_port(*broker),
        "username": getattr(args, "username", None),
        "password_file": getattr(args, "password_file", None),
        "tls_ca": getattr(args, "tls_ca", None),
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "client_name": getattr(args, "client_name", None),
    }
    try:
        return resolve(
            flags, os.environ if env is None else env, config=getattr(args, "config", None)
        )
    except ConnectionConfigError as exc:
        raise CtlFailure(str(exc)) from None


def _join_host_port(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def _version() -> str:
    try:
        return metadata.version("otad")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _int(text: str) -> int:
    """A non-negative integer, decimal or 0x-hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _say(line: str) -> int:
    print(line)
    return EXIT_OK


# --------------------------------------------------------------------------- keys


def _add_keys(groups: _Subparsers) -> None:
    keys = groups.add_parser("keys", help="signing keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="generate a P-256 signing key (and KEY.pub.pem)")
    new.add_argument("--out", required=True, metavar="KEY.pem", help="private key file to create")
    new.set_defaults(command="keys new")


def _keys_new(args: argparse.Namespace) -> int:
    return _say(imagetool.keys_new(args.out))


# --------------------------------------------------------------------------- pki


def _add_pki(groups: _Subparsers) -> None:
    group = groups.add_parser("pki", help="certificates of the broker's clients (offline)")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="make the devices CA and the services CA")
    init.add_argument("--out", required=True, metavar="DIR", help="directory for the CAs")
    init.add_argument("--days", type=_int, default=pki.DEFAULT_CA_DAYS, help="CA validity")
    init.set_defaults(command="pki init")
    issue = actions.add_parser(
        "issue",
        help="issue a certificate (ch: devices CA; otad, operator, supplier, monitor, broker:"
        " services CA)",
    )
    issue.add_argument("--ca", required=True, metavar="DIR", help="a directory of `pki init`")
    issue.add_argument("--role", required=True, choices=[role.value for role in pki.Role])
    issue.add_argument(
        "--name",
        required=True,
        help="the identity: a CH's GUID, a supplier's label (as its CHs announce it), the"
        " broker's host name, or the user name of otad, an operator or a monitor",
    )
    issue.add_argument("--out", required=True, metavar="DIR", help="writes NAME.crt, NAME.key")
    issue.add_argument(
        "--days", type=_int, default=pki.DEFAULT_DAYS, help=f"validity (default {pki.DEFAULT_DAYS})"
    )
    issue.add_argument(
        "--san", action="append", default=[], metavar="HOST", help="broker: another name or IP"
    )
    issue.set_defaults(command="pki issue")
    revoke = actions.add_parser(
        "revoke", help="revoke a certificate: rewrites the CRL the broker reads (crl.pem)"
    )
    revoke.add_argument("--ca", required=True, metavar="DIR", help="a directory of `pki init`")
    revoke.add_argument("cert", metavar="CERT.crt", help="the certificate to revoke")
    revoke.set_defaults(command="pki revoke")


def _pki_init(args: argparse.Namespace) -> int:
    written = pki.init_pki(Path(args.out), days=args.days)
    return _say(f"wrote {', '.join(str(path) for path in written)}")


def _pki_revoke(args: argparse.Namespace) -> int:
    identity, serial, crl = pki.revoke(Path(args.ca), Path(args.cert))
    return _say(
        f"revoked {identity!r} (serial {serial:x}); install {crl} as the broker's crlfile"
        " (/etc/mosquitto/otad/crl.pem) and reload mosquitto"
    )


def _pki_issue(args: argparse.Namespace) -> int:
    role = pki.Role(args.role)
    issued = pki.issue(
        Path(args.ca), role, args.name, Path(args.out), days=args.days, sans=args.san
    )
    print(
        f"issued {role.value} certificate {issued.cert} (key {issued.key}) for"
        f" {issued.identity!r}, signed by the {role.ca.value} CA, valid until"
        f" {issued.not_after:%Y-%m-%dT%H:%M:%SZ}"
    )
    stanza = pki.acl_stanza(role, issued.identity)
    if stanza:
        print("append to the broker's ACL file, then reload mosquitto:")
        print(stanza, end="")
    return EXIT_OK


# --------------------------------------------------------------------------- image


def _add_image(groups: _Subparsers) -> None:
    image = groups.add_parser("image", help="sign and verify .otaimg releases")
    actions = image.add_subparsers(dest="action", required=True, metavar="ACTION")

    sign = actions.add_parser(
        "sign",
        help="sign firmware (raw or a ZigBee OTA file) into an .otaimg",
        description="--in is a ZigBee OTA file (its header gives manufacturer, image type, "
        "version and hardware range; flags, if given, must agree) or raw firmware, wrapped into "
        "an OTA file from the flags.",
    )
    sign.add_argument("--key", required=True, metavar="KEY.pem", help="private signing key")
    sign.add_argument("--in", dest="source", required=True, metavar="FILE", help="firmware")
    sign.add_argument("--out", required=True, metavar="FILE.otaimg")
    sign.add_argument(
        "--device-type", required=True, choices=[d.value for d in DeviceType], metavar="TYPE"
    )
    sign.add_argument("--version", type=_int, help="OTA file version (u32)")
    sign.add_argument("--hw-min", type=_int, help="lowest hardware version (u16)")
    sign.add_argument("--hw-max", type=_int, help="highest hardware version (u16)")
    sign.add_argument(
        "--sequence",
        type=_int,
        help="anti-rollback release counter (default: the current unix time)",
    )
    sign.add_argument("--block-size", type=_int, default=imagetool.DEFAULT_BLOCK_SIZE)
    sign.add_argument("--expires-days", type=_int, default=imagetool.DEFAULT_EXPIRES_DAYS)
    sign.add_argument(
        "--manufacturer",
        type=_int,
        help="ZigBee manufacturer code, the device maker's (raw default "
        f"{imagetool.DEFAULT_MANUFACTURER:#06x}, the CSA test vendor code: test images only)",
    )
    sign.add_argument(
        "--image-type",
        type=_int,
        help=f"ZigBee OTA image type (raw default {imagetool.DEFAULT_IMAGE_TYPE:#06x})",
    )
    sign.add_argument(
        "--layout",
        choices=[layout.value for layout in OtaLayout],
        default=OtaLayout.SUB_ELEMENTS.value,
        help="what follows the OTA header: ZigBee sub-elements (default) or gbcs, the "
        "Manufacturer Image unframed (GBCS Upgrade Images); recorded in the manifest",
    )
    sign.set_defaults(command="image sign")

    verify = actions.add_parser("verify", help="verify an .otaimg against a trust directory")
    verify.add_argument("--trust", required=True, metavar="DIR", help="one public key PEM a file")
    verify.add_argument("--revoked", metavar="FILE", help="revoked key ids, 16 hex digits a line")
    verify.add_argument("image", metavar="FILE.otaimg")
    verify.set_defaults(command="image verify")
    # Daemon-side image actions (e.g. "image import") go here too, with their HANDLERS entry.
    imp = actions.add_parser("import", help="verify and import an .otaimg into the running otad")
    imp.add_argument("image", metavar="FILE.otaimg")
    _add_daemon_options(imp, json_flag=True)
    imp.set_defaults(command="image import")


def _image_sign(args: argparse.Namespace) -> int:
    return _say(
        imagetool.sign_image(
            key=args.key,
            source=args.source,
            out=args.out,
            device_type=DeviceType(args.device_type),
            now=int(time.time()),
            version=args.version,
            hw_min=args.hw_min,
            hw_max=args.hw_max,
            sequence=args.sequence,
            block_size=args.block_size,
            expires_days=args.expires_days,
            manufacturer=args.manufacturer,
            image_type=args.image_type,
            layout=OtaLayout(args.layout),
        )
    )


def _image_verify(args: argparse.Namespace) -> int:
    return _say(
        imagetool.verify_image(
            args.image, trust_dir=args.trust, revoked_file=args.revoked, now=int(time.time())
        )
    )


# --------------------------------------------------------------------------- daemon commands
# These talk to the running otad over MQTT request/response (otad.control, otad.ctl.client).


def _add_daemon_options(parser: argparse.ArgumentParser, *, json_flag: bool) -> None:
    _add_connection_options(parser, top=False)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for otad (default {DEFAULT_TIMEOUT:g})",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def _add_distribute(groups: _Subparsers) -> None:
    dist = groups.add_parser("distribute", help="send an imported image to CHs")
    dist.add_argument("image", metavar="IMAGE", help="image SHA-256 or a unique hex prefix")
    targets = dist.add_mutually_exclusive_group(required=True)
    targets.add_argument("--to", nargs="+", metavar="GUID", help="these CHs")
    targets.add_argument(
        "--all-matching",
        action="store_true",
        help="every known CH whose hardware or HAN matches the image's device type and range",
    )
    _add_daemon_options(dist, json_flag=True)
    dist.set_defaults(command="distribute")


def _add_activate(groups: _Subparsers) -> None:
    activate = groups.add_parser(
        "activate",
        help="sign and send activation commands for an image devices hold (or cancel them)",
        usage="otactl activate [cancel] IMAGE (--device ID... | --all-held) [--at TIME]",
    )
    activate.add_argument(
        "words", nargs="+", metavar="[cancel] IMAGE",
        help="the image (SHA-256 or a unique hex prefix); 'cancel IMAGE' cancels a future-dated"
        " activation",
    )  # fmt: skip
    targets = activate.add_mutually_exclusive_group(required=True)
    targets.add_argument("--device", nargs="+", metavar="ID", help="these devices (EUI-64)")
    targets.add_argument(
        "--all-held", action="store_true", help="every device that holds the image"
    )
    activate.add_argument(
        "--at", type=_time, metavar="TIME",
        help="execute then: unix seconds or ISO 8601 UTC (2026-06-01T02:00:00Z); default now",
    )  # fmt: skip
    _add_daemon_options(activate, json_flag=True)
    activate.set_defaults(command="activate")


def _time(text: str) -> int:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not unix seconds or ISO 8601: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _activate(args: argparse.Namespace) -> int:
    words = list(args.words)
    cancel = words[0] == "cancel" and len(words) == 2
    if len(words) != 1 and not cancel:
        raise CtlFailure("usage: otactl activate [cancel] IMAGE (--device ID... | --all-held)")
    image = words[-1]
    if cancel:
        if args.all_held or args.at is not None:
            raise CtlFailure("activate cancel takes --device ID... (and no --at)")
        result = _daemon_call(args, "activate.cancel", {"image": image, "devices": args.device})
    else:
        call_args: dict[str, Any] = {"image": image}
        if args.all_held:
            call_args["all_held"] = True
        else:
            call_args["devices"] = list(args.device)
        if args.at is not None:
            call_args["at"] = args.at
        result = _daemon_call(args, "activate", call_args)
    _print_result(args, result, format_activate)
    return EXIT_FAILED if result.get("refused") else EXIT_OK


def _add_devices(groups: _Subparsers) -> None:
    devices = groups.add_parser(
        "devices", help="each HAN device's state per image: transfer, activation, proof"
    )
    devices.add_argument("--image", metavar="IMAGE", help="only this image (hex prefix)")
    devices.add_argument("--guid", metavar="GUID", help="only this premises (CH)")
    _add_daemon_options(devices, json_flag=True)
    devices.set_defaults(command="devices")


def _devices(args: argparse.Namespace) -> int:
    call_args = {k: v for k, v in (("image", args.image), ("guid", args.guid)) if v is not None}
    result = _daemon_call(args, "devices", call_args)
    return _print_result(args, result, format_devices)


def _add_credentials(groups: _Subparsers) -> None:
    credentials = groups.add_parser(
        "credentials", help="replace the signing keys of devices that sign (SPEC §8.11)"
    )
    actions = credentials.add_subparsers(dest="action", required=True, metavar="ACTION")
    replace = actions.add_parser(
        "replace",
        help="have devices generate a new key pair and confirm it; otad then trusts only it",
    )
    replace.add_argument(
        "--device", nargs="+", required=True, metavar="ID", help="these devices (EUI-64)"
    )
    _add_daemon_options(replace, json_flag=True)
    replace.set_defaults(command="credentials replace")
    listing = actions.add_parser("list", help="every replacement: state, attempts, key ids")
    _add_daemon_options(listing, json_flag=True)
    listing.set_defaults(command="credentials list")


def _credentials_replace(args: argparse.Namespace) -> int:
    result = _daemon_call(args, "credentials.replace", {"devices": list(args.device)})
    _print_result(args, result, format_credentials_replace)
    return EXIT_FAILED if result.get("refused") else EXIT_OK


def _credentials_list(args: argparse.Namespace) -> int:
    return _print_result(args, _daemon_call(args, "credentials.list", {}), format_credentials)


def _add_firmware_version(groups: _Subparsers) -> None:
    version = groups.add_parser(
        "firmware-version", help="read the firmware version a device runs, through its CH"
    )
    version.add_argument("device", metavar="DEVICE", help="the device id (EUI-64)")
    _add_daemon_options(version, json_flag=True)
    version.set_defaults(command="firmware-version")


def _firmware_version(args: argparse.Namespace) -> int:
    wait_s = max(0.5, args.timeout * 0.8)  # the daemon answers before otactl gives up
    result = _daemon_call(args, "firmware.version", {"device": args.device, "wait_s": wait_s})
    return _print_result(args, result, format_firmware_version)


def _add_fleet(groups: _Subparsers) -> None:
    fleet = groups.add_parser("fleet", help="the CHs otad knows")
    actions = fleet.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every CH, its declared limits and HAN devices")
    _add_daemon_options(listing, json_flag=True)
    listing.set_defaults(command="fleet list")
    forget = actions.add_parser(
        "forget",
        help="remove CHs that were never real (refused while anything of theirs is in progress);"
        " one that announces itself again comes back",
    )
    forget.add_argument("guids", nargs="+", metavar="GUID", help="the CHs to forget")
    _add_daemon_options(forget, json_flag=True)
    forget.set_defaults(command="fleet forget")


def _add_transfers(groups: _Subparsers) -> None:
    transfers = groups.add_parser("transfers", help="per-CH transfer progress")
    transfers.add_argument("--image", metavar="IMAGE", help="only this image (hex prefix)")
    _add_daemon_options(transfers, json_flag=True)
    transfers.set_defaults(command="transfers")


def _add_status(groups: _Subparsers) -> None:
    status = groups.add_parser(
        "status", help="the daemon: hubs, transfers, scheduler, event-loop lag, stalls"
    )
    _add_daemon_options(status, json_flag=True)
    status.set_defaults(command="status")


def _status(args: argparse.Namespace) -> int:
    result = _daemon_call(args, "status", {})
    return _print_result(args, result, format_status)


def _add_watch(groups: _Subparsers) -> None:
    watch = groups.add_parser(
        "watch", help="live progress of the distributions in progress (says STALLED when stuck)"
    )
    watch.add_argument("image", nargs="?", metavar="IMAGE", help="only this image (hex prefix)")
    watch.add_argument("--once", action="store_true", help="print the current state and exit")
    _add_daemon_options(watch, json_flag=False)
    watch.set_defaults(command="watch")


def _watch(args: argparse.Namespace) -> int:
    connection = connection_of(args)
    try:
        return asyncio.run(
            watch.watch(
                connection.host,
                connection.port,
                image=args.image,
                once=args.once,
                wait_s=args.timeout,
                settings=connection.settings(purpose="watch", connect_timeout=args.timeout),
            )
        )
    except watch.WatchError as exc:
        raise CtlFailure(str(exc)) from None


def _daemon_call(args: argparse.Namespace, cmd: str, call_args: dict[str, Any]) -> Any:
    """Make one call to otad; raise :class:`CtlFailure` with a one-line message for every way
    it can fail."""
    connection = connection_of(args)
    try:
        return asyncio.run(
            call_once(
                connection.host,
                connection.port,
                cmd,
                call_args,
                wait_s=args.timeout,
                connection=connection,
            )
        )
    except CtlOffline as exc:
        raise OtadOffline(str(exc)) from None
    except CtlError as exc:
        raise CtlFailure(f"otad refused {cmd}: {exc.reason}: {exc.detail}") from None
    except (CtlTimeout, CtlUnreachable) as exc:
        raise CtlFailure(str(exc)) from None


def _print_result(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> int:
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else human(result))
    return EXIT_OK


def _image_import(args: argparse.Namespace) -> int:
    try:
        data = read_bounded(args.image, MAX_OTAIMG_BYTES, what="an .otaimg")
    except FileError as exc:
        raise imagetool.ToolError(str(exc)) from None
    payload = {"data": base64.b64encode(data).decode("ascii")}
    result = _daemon_call(args, "image.import", payload)
    return _print_result(args, result, format_import)


def _distribute(args: argparse.Namespace) -> int:
    call_args: dict[str, Any] = {"image": args.image}
    if args.all_matching:
        call_args["all_matching"] = True
    else:
        call_args["to"] = list(args.to)
    result = _daemon_call(args, "distribute", call_args)
    _print_result(args, result, format_distribute)
    return EXIT_FAILED if result.get("refused") else EXIT_OK


def _fleet_list(args: argparse.Namespace) -> int:
    result = _daemon_call(args, "fleet.list", {})
    return _print_result(args, result, format_fleet)


def _fleet_forget(args: argparse.Namespace) -> int:
    result = _daemon_call(args, "fleet.forget", {"guids": list(args.guids)})
    _print_result(args, result, format_forget)
    return EXIT_FAILED if result.get("refused") else EXIT_OK


def _transfers(args: argparse.Namespace) -> int:
    call_args = {} if args.image is None else {"image": args.image}
    result = _daemon_call(args, "transfers", call_args)
    return _print_result(args, result, format_transfers)


# --------------------------------------------------------------------------- wiring

GROUPS: list[Callable[[_Subparsers], None]] = [
    _add_keys,
    _add_pki,
    _add_image,
    _add_distribute,
    _add_activate,
    _add_devices,
    _add_credentials,
    _add_firmware_version,
    _add_fleet,
    _add_transfers,
    _add_status,
    _add_watch,
    campaign.add_parser,
]

HANDLERS: dict[str, Handler] = {
    "keys new": _keys_new,
    "pki init": _pki_init,
    "pki issue": _pki_issue,
    "pki revoke": _pki_revoke,
    "image sign": _image_sign,
    "image verify": _image_verify,
    "image import": _image_import,
    "distribute": _distribute,
    "activate": _activate,
    "devices": _devices,
    "credentials replace": _credentials_replace,
    "credentials list": _credentials_list,
    "firmware-version": _firmware_version,
    "fleet list": _fleet_list,
    "fleet forget": _fleet_forget,
    "transfers": _transfers,
    "status": _status,
    "watch": _watch,
    "campaign": campaign.run,
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every command in :data:`GROUPS`."""
    parser = argparse.ArgumentParser(prog="otactl", description="Operate otad and its releases.")
    parser.add_argument("--version", action="version", version=f"otactl (otad) {_version()}")
    _add_connection_options(parser, top=True)
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for add in GROUPS:
        add(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints and exits 2
    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except OtadOffline as exc:
        print(f"otactl: {exc}", file=sys.stderr)
        return EXIT_OFFLINE
    except (imagetool.ToolError, CtlFailure, pki.PkiError) as exc:
        print(f"otactl: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("otactl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # never a traceback for the operator
        print(f"otactl: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_FAILED
