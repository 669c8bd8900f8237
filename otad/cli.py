"""``otad``: the daemon's command line.

``otad run [--config FILE] [--broker HOST:PORT] [--state-dir DIR] [--trust DIR]
[--mqtt-library gmqtt|aiomqtt] [--log-level LEVEL]``: flags override the file, the file
overrides the defaults (see :mod:`otad.config`). Before anything starts, every file the
configuration names is checked (:mod:`otad.preflight`). Exit status: 0 after a clean stop
(SIGTERM or SIGINT), 1 when a task failed or the MQTT session kept being taken over, 2
(:data:`EXIT_CONFIG`) for a configuration or start-up error (one line on stderr per problem).

``otad check-config FILE`` (same override flags): validate the configuration and every file it
names and print what otad would do; exit 0, or 2 with one line per problem. The systemd unit
runs it as ``ExecStartPre=``.

Logging: one line per event (a traceback is folded into its record's line). Under systemd
(``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) each line starts with its syslog priority
(``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug), which journald takes as the
entry's priority, and carries no timestamp (the journal has its own).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from otad import preflight
from otad.config import Config, ConfigError, cli_overrides, load_config

EXIT_CONFIG = 2


def _add_overrides(command: argparse.ArgumentParser) -> None:
    command.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (overrides the file)")
    command.add_argument("--state-dir", metavar="DIR", help="state directory (overrides the file)")
    command.add_argument(
        "--trust", metavar="DIR", help="trust store directory (overrides the file)"
    )
    command.add_argument(
        "--mqtt-library", choices=("gmqtt", "aiomqtt"), help="MQTT client library (overrides)"
    )
    command.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (overrides the file)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree."""
    parser = argparse.ArgumentParser(prog="otad", description="OTA firmware-distribution daemon.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    _add_overrides(run)
    check = commands.add_parser(
        "check-config", help="validate a configuration and the files it names; print the plan"
    )
    check.add_argument("config", type=Path, metavar="FILE", help="TOML configuration file")
    _add_overrides(check)
    return parser


class _ConnectionLossIsAWarning(logging.Filter):
    """paho (under aiomqtt, logger ``mqtt``) logs a dropped broker connection at ERROR; the
    adapter reports the loss itself and reconnects, so it is a WARNING in otad's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("failed to receive"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: syslog priorities (sd-daemon(3) prefixes) of the logging levels.
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """Whether stderr goes to the journal (systemd sets these for a service)."""
    environ = os.environ if env is None else env
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


class OneLineFormatter(logging.Formatter):
    """Every record on one line (a traceback folded in with `` | ``); with ``journal`` the
    line starts with its syslog priority ``<N>`` and has no timestamp."""

    def __init__(self, *, journal: bool) -> None:
        self.journal = journal
        super().__init__(
            "%(name)s: %(message)s"
            if journal
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " | ")
        if not self.journal:
            return text
        priority = next((p for level, p in _PRIORITIES.items() if record.levelno >= level), 7)
        return f"<{priority}>{text}"


def configure_logging(level: str, *, journal: bool | None = None) -> None:
    """Log lines to stderr (the journal under systemd: see the module docstring)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(journal=under_systemd() if journal is None else journal))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    logging.getLogger("mqtt").addFilter(_ConnectionLossIsAWarning())


def _load(args: argparse.Namespace) -> Config:
    overrides = cli_overrides(broker=args.broker, state_dir=args.state_dir, trust=args.trust)
    if args.mqtt_library:
        overrides["broker.library"] = args.mqtt_library
    if args.log_level:
        overrides["log.level"] = args.log_level
    return load_config(args.config, overrides)


def check_config(config: Config) -> int:
    """``otad check-config``: print the problems (stderr) or the plan (stdout)."""
    found = preflight.check(config)
    for problem in found.problems:
        print(f"otad: configuration: {problem}", file=sys.stderr)
    if found.problems:
        return EXIT_CONFIG
    for line in preflight.describe(config, found):
        print(line)
    print("configuration OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otad`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"otad: configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        return check_config(config)
    problems = preflight.check(config).problems
    for problem in problems:
        print(f"otad: configuration: {problem}", file=sys.stderr)
    if problems:
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
