"""Human-readable figures and the terminal progress bar of ``tunnel migrate``."""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["ProgressBar", "format_bytes", "format_duration", "format_jobinfo"]


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


def format_jobinfo(info: dict[str, Any]) -> str:
    """The job statistics as aligned lines, in the spirit of ``virsh domjobinfo``."""
    rows = [
        ("Job status", info.get("status", "none")),
        ("Destination", info.get("destination", "-")),
        ("Mode", ("tunnelled" if info.get("tunnelled") else "native") + (", live" if info.get("live") else "")),
        ("Time elapsed", format_duration(info.get("time_elapsed_ms"))),
        ("Time remaining", format_duration(info.get("time_remaining_ms"))),
        ("Data total", format_bytes(info.get("data_total"))),
        ("Data processed", format_bytes(info.get("data_processed"))),
        ("Data remaining", format_bytes(info.get("data_remaining"))),
        ("Rate", format_bytes(info.get("rate_bytes_per_s")) + "/s" if info.get("rate_bytes_per_s") else "-"),
        ("Iteration", str(info.get("iteration", "-"))),
        ("Expected downtime", format_duration(info.get("expected_downtime_ms"))),
        ("Bandwidth limit", f"{info['bandwidth_mib']} MiB/s" if info.get("bandwidth_mib") else "none"),
    ]
    if "tunnel_bytes_sent" in info:
        rows.append(("Tunnel bytes sent", format_bytes(info["tunnel_bytes_sent"])))
        rows.append(("Tunnel bytes received", format_bytes(info["tunnel_bytes_received"])))
    if info.get("error"):
        rows.append(("Error", info["error"]))
    if info.get("status") == "none":
        rows = rows[:1]
    return "\n".join(f"{key + ':':<22} {value}" for key, value in rows)


class ProgressBar:
    """One line redrawn in place: percentage, bytes, rate, ETA, iteration."""

    def __init__(self, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.shown = False

    def update(self, info: dict[str, Any]) -> None:
        total = info.get("data_total") or 0
        processed = info.get("data_processed") or 0
        remaining = info.get("data_remaining")
        if total and remaining is not None:
            fraction = min(1.0, max(0.0, 1 - remaining / total))
        else:
            fraction = 0.0
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
