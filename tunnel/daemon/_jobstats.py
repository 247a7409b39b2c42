"""The keys of a job's statistics (JOBINFO), the same for every guest kind and both directions.

Units are fixed by the key's suffix or kind: sizes in bytes, times in
milliseconds (``*_ms``), rates in bytes per second (``*_bytes_per_s``).
A figure a guest kind or direction cannot know is ``None``.  ``data_*``
equals ``memory_*`` (no storage is migrated).
"""

from __future__ import annotations

from typing import Any

__all__ = ["JOB_KEYS", "complete_jobinfo"]

JOB_KEYS = (
    "domain",
    "operation",  # outgoing, incoming, or None when there is no job
    "status",  # none, setup, active, completed, failed, cancelled, unconfirmed (outgoing: also performed)
    "destination",
    "source",
    "tunnelled",
    "live",
    "time_elapsed_ms",
    "time_remaining_ms",
    "setup_time_ms",
    "downtime_ms",
    "expected_downtime_ms",
    "transfer_ms",
    "data_total",
    "data_processed",
    "data_remaining",
    "memory_total",
    "memory_processed",
    "memory_remaining",
    "rate_bytes_per_s",
    "dirty_rate_bytes_per_s",
    "bandwidth_limit_bytes_per_s",
    "page_size",
    "constant_pages",
    "normal_pages",
    "normal_bytes",
    "iteration",
    "converged",
    "auto_converge",
    "cpu_throttle_percent",
    "compression",
    "compression_saved_bytes",
    "timeout_suspended",
    "tunnel_bytes_sent",
    "tunnel_bytes_received",
    "error",
)


def complete_jobinfo(info: dict[str, Any]) -> dict[str, Any]:
    """*info* with every key of :data:`JOB_KEYS` (missing ones None), in that order, then any extra keys."""
    out = {key: info.get(key) for key in JOB_KEYS}
    out.update((k, v) for k, v in info.items() if k not in out)
    return out
