"""Where the broker is: the one ``HOST[:PORT]`` grammar of every command line.

``otad run --broker``, ``otactl --broker``, ``python -m loadtest hubs --broker`` and the benchmark
all take the broker as ``HOST:PORT``, ``HOST`` (otad only: the port comes from the
configuration), ``[IPV6]:PORT`` or ``[IPV6]``. A host name holds no ``:`` (an IPv6 address must be
bracketed, so ``::1:1883`` is refused rather than guessed); a port is 1..65535.
"""

from __future__ import annotations

import re

__all__ = ["parse_broker", "split_host_port"]

_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?")


def split_host_port(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` -> ``(host, port or None)``; else ``ValueError``."""
    match = _HOST_PORT.fullmatch(text)
    port_text = None if match is None else match.group(2) or match.group(4)
    if match is None or (port_text is not None and not 0 < int(port_text) < 65536):
        raise ValueError(f"expected HOST[:PORT] or [IPV6][:PORT], got {text!r}")
    host = match.group(1) or match.group(3)
    return host, None if port_text is None else int(port_text)


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> ``(host, port)``; ``ValueError`` otherwise (the port is
    required)."""
    host, port = split_host_port(text)
    if port is None:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
    return host, port
