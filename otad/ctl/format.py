"""How ``otactl`` shows the daemon's answers to people: tables and summary lines.

Every function takes the JSON a command returned (:mod:`otad.commands`) and returns text; ``--json``
prints the JSON itself instead.
"""

from __future__ import annotations

from typing import Any


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, headers first (no trailing spaces)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def format_fleet(hubs: list[dict[str, Any]]) -> str:
    """``otactl fleet list`` as a table."""
    rows = [
        [
            h["guid"],
            "online" if h["online"] else "offline",
            f"0x{h['fw_version']:08x}",
            f"0x{h['hw_version']:04x}",
            h["supplier"],
            h["segment"],
            f"{h['limits']['window']}/{h['limits']['max_block']}",
            ",".join(d["device_type"] for d in h["han"]) or "-",
        ]
        for h in hubs
    ]
    headers = ["GUID", "STATE", "FIRMWARE", "HW", "SUPPLIER", "SEGMENT", "WIN/BLOCK", "HAN"]
    online = sum(1 for h in hubs if h["online"])
    return f"{format_table(headers, rows)}\n{len(hubs)} hub(s), {online} online"


def format_transfers(rows: list[dict[str, Any]]) -> str:
    """``otactl transfers`` as a table."""
    table = []
    for r in rows:
        held = r.get("held_sha256")
        if held is None:
            held_text = "-"
        else:
            held_text = f"{held[:12]} ({'ok' if r.get('matches') else 'MISMATCH'})"
        table.append(
            [
                r["guid"],
                r["image"][:12],
                r["state"] if not r.get("reason") else f"{r['state']}:{r['reason']}",
                f"{r['blocks_acked']}/{r['blocks_total']}",
                str(r["bytes_sent"]),
                held_text,
            ]
        )
    headers = ["GUID", "IMAGE", "STATE", "ACKED/TOTAL", "BYTES SENT", "HELD SHA-256"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return f"{format_table(headers, table)}\n{len(rows)} transfer(s): {summary}"


def format_import(result: dict[str, Any]) -> str:
    """``otactl image import`` summary line."""
    verb = "imported" if result.get("new") else "already imported"
    return (
        f"{verb} {result['sha256']}: {result['device_type']} fw 0x{result['fw_version']:08x}"
        f" hw 0x{result['hw_min']:04x}-0x{result['hw_max']:04x}, {result['size']} bytes,"
        f" {result['blocks']}x{result['block_size']}"
    )


def format_forget(result: dict[str, Any]) -> str:
    """``otactl fleet forget`` summary (one line per CH, then the count)."""
    lines = [
        f"{f['guid']}: forgotten ({f['transfers']} transfer(s), {f['devices']} device record(s))"
        for f in result["forgotten"]
    ]
    lines += [f"{r['guid']}: refused {r['error']}: {r['detail']}" for r in result["refused"]]
    lines.append(f"{len(result['forgotten'])} forgotten, {len(result['refused'])} refused")
    return "\n".join(lines)


def format_distribute(result: dict[str, Any]) -> str:
    """``otactl distribute`` summary (one line, then one line per refused target)."""
    lines = [
        f"image {result['image'][:16]}: {len(result['started'])} started,"
        f" {len(result['already'])} already running or done, {len(result['refused'])} refused"
    ]
    lines += [f"  {r['guid']}: {r['error']}: {r['detail']}" for r in result["refused"]]
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    """``otactl status``: a few lines a person reads at a glance."""
    hubs = status.get("hubs", {})
    transfers = status.get("transfers", {})
    scheduler = status.get("scheduler", {})
    lag = status.get("loop_lag", {})
    busy = ", ".join(f"{k} {v}" for k, v in sorted(transfers.items()) if v) or "none"
    lines = [
        f"otad {status.get('version', '?')} (pid {status.get('pid', '?')}) "
        f"{status.get('state', '?')}, {status.get('library', '?')}",
        f"hubs: {hubs.get('online', 0)} online of {hubs.get('known', 0)} known; "
        f"images: {status.get('images', 0)}",
        f"transfers: {busy}; stalled: {status.get('stalled', 0)}",
        f"scheduler: {scheduler.get('blocks_in_flight', 0)}/{scheduler.get('budget', '?')} "
        f"blocks in flight, {scheduler.get('handshakes', 0)} asks unanswered, "
        f"{scheduler.get('pending', 0)} waiting for admission, "
        f"{scheduler.get('queued', 0)} queued for budget, "
        f"{scheduler.get('throttled', 0)} for segment tokens; longest wait now "
        f"{scheduler.get('longest_wait_s', 0)} s",
        f"event-loop lag: p50 {lag.get('p50_ms', 0)} ms, p99 {lag.get('p99_ms', 0)} ms, "
        f"max {lag.get('max_ms', 0)} ms over {lag.get('window_s', 0)} s",
    ]
    for image, entry in sorted(status.get("distributions", {}).items()):
        states = ", ".join(f"{k} {v}" for k, v in sorted(entry.get("transfers", {}).items()))
        flag = "  STALLED" if entry.get("stalled") else ""
        lines.append(f"  {image[:16]}: {states}{flag}")
    return "\n".join(lines)


def format_activate(result: dict[str, Any]) -> str:
    """``otactl activate`` (and ``activate cancel``) summary lines."""
    lines = []
    for issued in result.get("issued", []):
        what = "cancel" if issued.get("cancel") else "activate"
        when = issued.get("execute_at")
        at = "now" if when is None else f"at {when}"
        lines.append(f"{issued['device_id']}: {what} sent, counter {issued['counter']}, {at}")
    lines += [
        f"{r['device_id']}: refused {r['reason']}: {r['detail']}" for r in result.get("refused", [])
    ]
    issued_n, refused_n = len(result.get("issued", [])), len(result.get("refused", []))
    lines.append(f"image {result['image'][:12]}: {issued_n} sent, {refused_n} refused")
    return "\n".join(lines)


def format_devices(rows: list[dict[str, Any]]) -> str:
    """``otactl devices`` as a table."""
    table = [
        [
            r["guid"],
            r["device_id"],
            r["device_type"],
            r["join_mode"],
            r["image"][:12],
            r["state"],
            f"{r['percent']}%",
            r["proof"] or "-",
            r["reason"] or "-",
            r.get("credentials") or "-",
        ]
        for r in rows
    ]
    headers = [
        "PREMISES", "DEVICE", "TYPE", "JOIN", "IMAGE", "STATE", "%", "PROOF", "REASON",
        "CREDENTIALS",
    ]  # fmt: skip
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return f"{format_table(headers, table)}\n{len(rows)} device(s): {summary}"


def format_credentials_replace(result: dict[str, Any]) -> str:
    """``otactl credentials replace`` summary lines."""
    lines = [
        f"{i['device_id']}: replace credentials sent, counter {i['counter']}"
        for i in result.get("issued", [])
    ]
    lines += [
        f"{r['device_id']}: refused {r['reason']}: {r['detail']}" for r in result.get("refused", [])
    ]
    issued_n, refused_n = len(result.get("issued", [])), len(result.get("refused", []))
    lines.append(f"credentials: {issued_n} sent, {refused_n} refused")
    return "\n".join(lines)


def format_credentials(rows: list[dict[str, Any]]) -> str:
    """``otactl credentials list`` as a table."""
    table = [
        [
            r["guid"],
            r["device_id"],
            r["device_type"],
            r["state"],
            str(r["attempts"]),
            str(r["counter"]),
            r["old_kid"],
            r["new_kid"] or "-",
            r["reason"] or "-",
        ]
        for r in rows
    ]
    headers = [
        "PREMISES", "DEVICE", "TYPE", "STATE", "ATTEMPTS", "COUNTER", "OLD KEY", "NEW KEY",
        "REASON",
    ]  # fmt: skip
    return f"{format_table(headers, table)}\n{len(rows)} device(s)"


def format_firmware_version(result: dict[str, Any]) -> str:
    """``otactl firmware-version`` summary line."""
    return (
        f"{result['device_id']} (premises {result['guid']}) runs {result['fw_version_hex']},"
        f" boot {result['boot_count']}, last command {result['counter']}"
        f" (reported by the {result['evidence']})"
    )
