"""``otad``: the daemon's command line.

``otad run [--config FILE] [--broker HOST:PORT] [--state-dir DIR] [--trust DIR]
[--mqtt-library gmqtt|aiomqtt] [--log-level LEVEL]``: flags override the file, the file
overrides the defaults (see :mod:`otad.config`). Exit status: 0 after a clean stop (SIGTERM or
SIGINT), 1 when a task failed, 2 for a configuration or start-up error (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from otad.config import ConfigError, cli_overrides, load_config

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree."""
    parser = argparse.ArgumentParser(prog="otad", description="OTA firmware-distribution daemon.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    run.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (overrides the file)")
    run.add_argument("--state-dir", metavar="DIR", help="state directory (overrides the file)")
    run.add_argument("--trust", metavar="DIR", help="trust store directory (overrides the file)")
    run.add_argument(
        "--mqtt-library", choices=("gmqtt", "aiomqtt"), help="MQTT client library (overrides)"
    )
    run.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (overrides the file)",
    )
    return parser


class _ConnectionLossIsAWarning(logging.Filter):
    """paho (under aiomqtt, logger ``mqtt``) logs a dropped broker connection at ERROR; the
    adapter reports the loss itself and reconnects, so it is a WARNING in otad's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("failed to receive"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: str) -> None:
    """Log lines to stderr (the journal under systemd)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mqtt").addFilter(_ConnectionLossIsAWarning())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otad`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        overrides = cli_overrides(broker=args.broker, state_dir=args.state_dir, trust=args.trust)
        if args.mqtt_library:
            overrides["broker.library"] = args.mqtt_library
        if args.log_level:
            overrides["log.level"] = args.log_level
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"otad: configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log.level)

    import uvloop

    from otad.daemon import run

    try:
        return uvloop.run(run(config))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
