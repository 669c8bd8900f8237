"""``python -m loadtest``: virtual Communications Hubs, the demo and the benchmark.

* ``hubs --count N --broker HOST:PORT --state-dir DIR [--procs P] [--seed S] [--window W]
  [--library gmqtt] [--trust DIR] [--tls-ca FILE --tls-cert-dir DIR]``: run N virtual CHs until
  SIGINT/SIGTERM, then disconnect them cleanly and print a one-line summary. Started again on the
  same state directory, the hubs resume their transfers. ``--trust`` defaults to ``DIR/trust``.
  With ``--tls-cert-dir`` every hub connects over TLS with its own certificate
  (``GUID.crt``/``GUID.key``, ``otactl pki issue --role ch``).
* ``conformance --broker HOST:PORT --guid GUID --trust DIR [--restart-command CMD] [--timeout S]``:
  check a CH connected to that broker against SPEC.md clause by clause, one line per clause and a
  verdict; exit status 0 only if no clause failed (see :mod:`loadtest.conformance`).
* ``run SCENARIO --out DIR``: a load-test scenario end to end (``make loadtest``): Mosquitto,
  the fault proxy, otad, the virtual premises, staged campaigns, the report; see
  :mod:`loadtest.run` and :mod:`loadtest.scenario`.
* ``demo``: the end-to-end demonstration (``make demo``), see :mod:`loadtest.demo`.
* ``bench``: baseline vs otad throughput (``make bench``), see :mod:`loadtest.bench`.
* ``scale``: otad at 1,000-10,000 CHs, default configuration (``make scale``), see
  :mod:`loadtest.scale`.
* ``broker [--secure --pki DIR] [--port P] [--local-port P] [--workdir DIR]``: run a private
  Mosquitto until SIGINT/SIGTERM and print its ports. ``--secure`` runs the shipped production
  config (``systemd/mosquitto/otad.conf`` and its ACL, only ports and file paths substituted:
  :class:`loadtest.broker.ShippedConfig`) with the CAs of ``otactl pki init --out DIR``; the
  broker's certificate (``DIR/localhost.crt``, for localhost and 127.0.0.1) is issued if absent.
* ``vectors [--out DIR]``: regenerate the protocol test vectors (default
  ``protocol/vectors/``), see :mod:`loadtest.vectors`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from loadtest.hub import DEFAULT_LIMITS
from mqttio import parse_broker

if TYPE_CHECKING:
    from loadtest.broker import ShippedConfig


def _broker(text: str) -> tuple[str, int]:
    try:
        return parse_broker(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port (1..65535): {text!r}")
    return int(text)


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``python -m loadtest``."""
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    hubs = sub.add_parser("hubs", help="run N virtual CHs until interrupted")
    hubs.add_argument("--count", type=_positive, required=True, help="number of hubs")
    hubs.add_argument("--broker", type=_broker, required=True, metavar="HOST:PORT")
    hubs.add_argument("--state-dir", required=True, metavar="DIR")
    hubs.add_argument("--procs", type=_positive, help="worker processes (default: 1 per 2,500)")
    hubs.add_argument("--seed", type=int, default=0, help="identity seed (default 0)")
    hubs.add_argument("--window", type=_positive, default=DEFAULT_LIMITS.window)
    hubs.add_argument("--max-block", type=_positive, default=DEFAULT_LIMITS.max_block)
    hubs.add_argument("--buffer", type=_positive, default=DEFAULT_LIMITS.buffer)
    hubs.add_argument("--segments", type=_positive, default=8, help="network segments cell-<k>")
    hubs.add_argument("--library", choices=("gmqtt", "aiomqtt"), default="gmqtt")
    hubs.add_argument("--trust", metavar="DIR", help="trusted public keys (default DIR/trust)")
    hubs.add_argument("--tls-ca", metavar="FILE", help="TLS: CA of the broker's certificate")
    hubs.add_argument(
        "--tls-cert-dir",
        metavar="DIR",
        help="TLS client certificates, GUID.crt and GUID.key per hub (otactl pki issue --role ch)",
    )

    broker = sub.add_parser("broker", help="run a private Mosquitto (the shipped config: --secure)")
    broker.add_argument(
        "--secure", action="store_true", help="the production config, TLS and ACL (needs --pki)"
    )
    broker.add_argument("--pki", metavar="DIR", help="a directory of `otactl pki init`")
    broker.add_argument("--port", type=_port, help="TLS listener port (default: a free one)")
    broker.add_argument("--local-port", type=_port, help="loopback listener port (default: free)")
    broker.add_argument(
        "--password-file", metavar="FILE", help="--secure: the loopback listener's users"
    )
    broker.add_argument("--workdir", metavar="DIR", help="config, log, persistence (default: temp)")

    conformance = sub.add_parser(
        "conformance", help="check a CH against SPEC.md clause by clause (a vendor's kit)"
    )
    conformance.add_argument("--broker", type=_broker, required=True, metavar="HOST:PORT")
    conformance.add_argument("--guid", required=True, help="the CH's GUID (16 hex digits)")
    conformance.add_argument(
        "--trust",
        required=True,
        metavar="DIR",
        help="holds the release key NAME.pem (NAME.pub.pem beside it) the CH trusts",
    )
    conformance.add_argument(
        "--restart-command",
        metavar="CMD",
        help="shell command that restarts the CH (resume and last-will clauses need it)",
    )
    conformance.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="wait per answer (default 5)"
    )
    conformance.add_argument("--library", choices=("gmqtt", "aiomqtt"), default="gmqtt")

    run = sub.add_parser("run", help="a load-test scenario end to end, with its report")
    from loadtest import run as run_module

    run_module.add_arguments(run)

    demo = sub.add_parser("demo", help="Mosquitto + otad + virtual premises: images confirmed")
    from loadtest import demo as demo_module

    demo_module.add_arguments(demo)

    bench = sub.add_parser("bench", help="raw baseline vs otad, recorded in BENCHMARKS.md")
    from loadtest import bench as bench_module

    bench_module.add_arguments(bench)

    scale = sub.add_parser("scale", help="otad at 1,000-10,000 CHs, recorded in BENCHMARKS.md")
    from loadtest import scale as scale_module

    scale_module.add_arguments(scale)

    vectors = sub.add_parser("vectors", help="regenerate the test vectors in protocol/vectors/")
    from loadtest import vectors as vectors_module

    vectors_module.add_arguments(vectors)

    proxy = sub.add_parser("_proxy", help=argparse.SUPPRESS)
    proxy.add_argument("config")

    worker = sub.add_parser("_worker", help=argparse.SUPPRESS)
    worker.add_argument("config")
    worker.add_argument("number", type=int)
    worker.add_argument("first", type=int)
    worker.add_argument("last", type=int)
    return parser


async def run_hubs(args: argparse.Namespace) -> int:
    """The ``hubs`` command."""
    from loadtest.runner import (
        FleetSummary,
        HostLimitError,
        HubFleet,
        check_host_limits,
        default_procs,
    )

    procs = args.procs or default_procs(args.count)
    try:
        check_host_limits(args.count, procs, local_broker=False)
    except HostLimitError as exc:
        print(f"hubs: {exc}", file=sys.stderr)
        return 2
    fleet = HubFleet(
        broker=args.broker,
        state_dir=args.state_dir,
        count=args.count,
        procs=procs,
        seed=args.seed,
        library=args.library,
        trust_dir=args.trust,
        max_block=args.max_block,
        window=args.window,
        buffer=args.buffer,
        segments=args.segments,
        tls_ca=args.tls_ca,
        tls_cert_dir=args.tls_cert_dir,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await fleet.start()
        print(
            f"hubs: {await fleet.running()} of {args.count} virtual CHs running in {procs} "
            f"process(es) on {args.broker[0]}:{args.broker[1]} "
            f"(started in {fleet.started_in or 0:.1f} s); state in {args.state_dir}; "
            "Ctrl-C to stop",
            flush=True,
        )
        await stop.wait()
        stats = await fleet.stats()
    finally:
        await fleet.close()
    print(f"hubs: stopped. {FleetSummary.of(stats).line()}", flush=True)
    return 0


def run_broker(args: argparse.Namespace) -> int:
    """The ``broker`` command: start Mosquitto, print its ports, run until SIGINT/SIGTERM."""
    from loadtest.broker import BrokerError, MosquittoBroker

    if args.secure != (args.pki is not None):
        print("broker: --secure and --pki DIR go together", file=sys.stderr)
        return 2
    if not args.secure and (args.local_port or args.password_file):
        print("broker: --local-port and --password-file are for --secure", file=sys.stderr)
        return 2
    shipped = None
    if args.secure:
        try:
            shipped = secure_broker_files(Path(args.pki), args.password_file)
        except ValueError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
    try:
        broker = MosquittoBroker(
            workdir=args.workdir,
            shipped=shipped,
            port=args.local_port if shipped is not None else args.port,
            tls_port=args.port if shipped is not None else None,
        ).start()
    except BrokerError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    if shipped is not None:
        print(
            f"broker: mosquitto (shipped config {shipped.source}) pid {broker.pid}:"
            f" TLS with client certificates on port {broker.tls_port} (all interfaces),"
            f" username and password on 127.0.0.1:{broker.port}; files in {broker.workdir};"
            " Ctrl-C to stop",
            flush=True,
        )
    else:
        print(
            f"broker: mosquitto (test config, anonymous) pid {broker.pid} on {broker.address};"
            f" files in {broker.workdir}; Ctrl-C to stop",
            flush=True,
        )
    try:
        while not stopped and broker.running:
            time.sleep(0.2)
    finally:
        crashed = not broker.running
        broker.cleanup()
    if crashed and not stopped:
        print("broker: mosquitto exited on its own", file=sys.stderr)
        return 1
    return 0


def secure_broker_files(pki_dir: Path, password_file: str | None) -> ShippedConfig:
    """The shipped config's files from a ``pki init`` directory, issuing the broker's own
    certificate (``localhost``, also valid for 127.0.0.1) there if it has none yet;
    ``ValueError`` with one line when the directory cannot serve."""
    from loadtest.broker import ShippedConfig
    from otad.ctl import pki

    bundle, crl = pki_dir / "ca-bundle.pem", pki_dir / "crl.pem"
    for needed in (bundle, crl):
        if not needed.is_file():
            raise ValueError(
                f"{needed} not found: make the CAs with `otactl pki init --out {pki_dir}`"
            )
    cert, key = pki_dir / "localhost.crt", pki_dir / "localhost.key"
    if not cert.exists():
        try:
            pki.issue(pki_dir, pki.Role.BROKER, "localhost", pki_dir, sans=["127.0.0.1", "::1"])
        except pki.PkiError as exc:
            raise ValueError(str(exc)) from None
    return ShippedConfig(
        cafile=bundle,
        certfile=cert,
        keyfile=key,
        crlfile=crl,
        password_file=None if password_file is None else Path(password_file),
    )


async def run_conformance_command(args: argparse.Namespace) -> int:
    """The ``conformance`` command: one line per clause as it ends, then the verdict."""
    from loadtest.conformance import restart_command, run_conformance
    from mqttio import MqttConnectError
    from otad.keyfiles import KeyFileError
    from protocol.errors import ProtocolError

    restart = restart_command(args.restart_command) if args.restart_command else None
    try:
        report = await run_conformance(
            args.broker,
            args.guid,
            args.trust,
            restart=restart,
            timeout=args.timeout,
            library=args.library,
            on_result=lambda result: print(result.line(), flush=True),
        )
    except (KeyFileError, MqttConnectError, ProtocolError) as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    print(report.verdict(), flush=True)
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "hubs":
        return uvloop.run(run_hubs(args))
    if args.command == "broker":
        return run_broker(args)
    if args.command == "_worker":
        import json

        from loadtest.runner import FleetConfig, worker_main

        config = FleetConfig.from_json(json.loads(args.config))
        return uvloop.run(worker_main(config, args.number, args.first, args.last))
    if args.command == "_proxy":
        import json

        from loadtest.faultproxy import serve_process

        return uvloop.run(serve_process(json.loads(args.config)))
    if args.command == "conformance":
        if not args.timeout > 0:
            print("conformance: --timeout must be positive", file=sys.stderr)
            return 2
        return uvloop.run(run_conformance_command(args))
    if args.command == "run":
        from loadtest import run as run_module

        return run_module.main(args)
    if args.command == "demo":
        from loadtest import demo as demo_module

        return demo_module.main(args)
    if args.command == "bench":
        from loadtest import bench as bench_module

        return bench_module.main(args)
    if args.command == "scale":
        from loadtest import scale as scale_module

        return scale_module.main(args)
    if args.command == "vectors":
        from loadtest import vectors as vectors_module

        return vectors_module.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
