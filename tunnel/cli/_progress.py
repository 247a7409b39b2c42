"""Human-readable figures and the terminal progress bar of ``tunnel migrate``."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressBar", "ProgressLines", "format_bytes", "format_duration", "format_jobinfo"]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def format_duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _rate(n: float | None) -> str:
    return f"{format_bytes(n)}/s" if n else "-"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def format_jobinfo(info: dict[str, Any]) -> str:
    """The job statistics as aligned lines, in the spirit of ``virsh domjobinfo``; "-" where a figure is unknown."""
    status = info.get("status", "none")
    if status == "none":
        return f"{'Job status:':<24}none"
    incoming = info.get("operation") == "incoming"
    rows = [
        ("Job status", status),
        ("Operation", "incoming migration" if incoming else "outgoing migration"),
        ("Source" if incoming else "Destination", info.get("source" if incoming else "destination") or "-"),
        ("Mode", ("tunnelled" if info.get("tunnelled") else "native") + (", live" if info.get("live") else "")),
        ("Time elapsed", format_duration(info.get("time_elapsed_ms"))),
        ("Time remaining", format_duration(info.get("time_remaining_ms"))),
        ("Setup time", format_duration(info.get("setup_time_ms"))),
        ("Data total", format_bytes(info.get("data_total"))),
        ("Data processed", format_bytes(info.get("data_processed"))),
        ("Data remaining", format_bytes(info.get("data_remaining"))),
        ("Memory total", format_bytes(info.get("memory_total"))),
        ("Memory processed", format_bytes(info.get("memory_processed"))),
        ("Memory remaining", format_bytes(info.get("memory_remaining"))),
        ("Memory bandwidth", _rate(info.get("rate_bytes_per_s"))),
        ("Dirty rate", _rate(info.get("dirty_rate_bytes_per_s"))),
        ("Page size", format_bytes(info.get("page_size"))),
        ("Constant pages", str(info["constant_pages"]) if info.get("constant_pages") is not None else "-"),
        ("Normal pages", str(info["normal_pages"]) if info.get("normal_pages") is not None else "-"),
        ("Normal data", format_bytes(info.get("normal_bytes"))),
        ("Iteration", str(info.get("iteration") or "-")),
        ("Expected downtime", format_duration(info.get("expected_downtime_ms"))),
        ("Total downtime", format_duration(info.get("downtime_ms"))),
        ("Bandwidth limit", _rate(info.get("bandwidth_limit_bytes_per_s")) if info.get("bandwidth_limit_bytes_per_s") else "none"),
        ("Auto-converge", _yes(info.get("auto_converge")) + (f" (vCPUs throttled {info['cpu_throttle_percent']}%)"
                                                             if info.get("cpu_throttle_percent") else "")),
        ("Compression", ", ".join(info.get("compression") or []) or "none"),
    ]
    if info.get("postcopy"):
        rows.insert(4, ("Phase", info.get("phase") or "-"))
        rows.extend(_postcopy_rows(info, incoming))
    if info.get("compression_saved_bytes") is not None:
        rows.append(("Compression saved", format_bytes(info["compression_saved_bytes"])))
    if info.get("timeout_suspended"):
        rows.append(("Suspended by timeout", "yes"))
    if info.get("tunnel_bytes_sent") is not None:
        rows.append(("Tunnel bytes sent", format_bytes(info["tunnel_bytes_sent"])))
        rows.append(("Tunnel bytes received", format_bytes(info.get("tunnel_bytes_received"))))
    if info.get("error"):
        rows.append(("Error", info["error"]))
    return "\n".join(f"{key + ':':<24}{value}" for key, value in rows)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value} ms"


def _postcopy_rows(info: dict[str, Any], incoming: bool) -> list[tuple[str, str]]:
    """Post-copy's figures: QEMU's blocktime (how long the destination's vCPUs waited for pages, known once it
    completed; the source shows the destination's), the page requests the source served, breaks and resumes."""
    key = "" if incoming else "destination_"
    vcpus = info.get(f"{key}postcopy_vcpu_blocktime_ms")
    rows = [
        ("Blocktime" if incoming else "Destination blocktime", _ms(info.get(f"{key}postcopy_blocktime_ms"))),
        ("vCPU blocktime" if incoming else "Dest. vCPU blocktime", ", ".join(_ms(v) for v in vcpus) if vcpus else "-"),
    ]
    if info.get("postcopy_preempt") is not None:  # where the pages the destination asked for travelled
        where = "their own stream (postcopy-preempt)" if info["postcopy_preempt"] else "the migration's one stream"
        if info["postcopy_preempt"] and not incoming:
            where += f", {info.get('postcopy_preempt_bytes') or 0} bytes"
        rows.append(("Requested pages on", where))
    if not incoming:
        rows.append(("Post-copy requests", str(info["postcopy_requests"]) if info.get("postcopy_requests") is not None else "-"))
        if info.get("postcopy_breaks"):
            rows.append(("Post-copy breaks", f"{info['postcopy_breaks']} (resumed {info.get('postcopy_resumes') or 0})"))
        if info.get("timeout_postcopy"):
            rows.append(("Post-copy by timeout", "yes"))
    return rows


def _fraction(info: dict[str, Any]) -> float:
    total = info.get("data_total") or 0
    remaining = info.get("data_remaining")
    if total and remaining is not None:
        return min(1.0, max(0.0, 1 - float(remaining) / total))
    return 0.0


class ProgressLines:
    """``--verbose`` without a terminal: one plain line per update, at most one a second (virsh's "Migration: [ 45 %]")."""

    def __init__(self, out: TextIO = sys.stderr, interval: float = 1.0) -> None:
        self.out = out
        self.interval = interval
        self.last = 0.0

    def update(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self.out.write(f"Migration: [{_fraction(info) * 100:3.0f} %] {format_bytes(info.get('data_processed'))} sent, "
                       f"{_rate(info.get('rate_bytes_per_s'))}, iteration {info.get('iteration') or 1}\n")
        self.out.flush()

    def close(self) -> None:
        pass


class ProgressBar:
    """One line redrawn in place: percentage, bytes, rate, ETA, iteration."""

    def __init__(self, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.shown = False

    def update(self, info: dict[str, Any]) -> None:
        processed = info.get("data_processed") or 0
        fraction = _fraction(info)
        filled = int(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        rate = info.get("rate_bytes_per_s") or 0
        eta = format_duration(info.get("time_remaining_ms")) if rate else "-"
        line = (
            f"\r[{bar}] {fraction * 100:5.1f}%  {format_bytes(processed)} sent  "
            f"{format_bytes(rate)}/s  ETA {eta}  iteration {info.get('iteration') or 1}  "
        )
        self.out.write(line)
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()
