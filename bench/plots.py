"""The scaling curves as PNG files, from the results of ``scaling.py`` and ``concurrency.py``.

``python -m bench`` calls :func:`make_plots` at the end of a run; on its own::

    python -m bench.plots RESULTS_DIR      # reads scaling.json, concurrency.json there

Each point is drawn at its median with a bar from its minimum to its
maximum.  Without matplotlib (``pip install -e '.[bench]'``) nothing is
drawn, and the reason is returned and printed instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

__all__ = ["make_plots"]

MISSING = "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"


def _last_round(results_dir: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    rounds = record.get("rounds") or []
    return rounds[-1] if rounds else None


def _errorbar(ax: Any, xs: list[float], spreads: list[dict[str, float]], label: str | None = None, **kw: Any) -> None:
    med = [s["median"] for s in spreads]
    low = [s["median"] - s["min"] for s in spreads]
    high = [s["max"] - s["median"] for s in spreads]
    ax.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=label, **kw)


def _log2_axis(ax: Any, xs: list[float]) -> None:
    """A log2 x axis labelled with the points' own values (16, 256, 4096), not powers of two."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()


def _save(plt: Any, fig: Any, out: str, machine: str) -> str:
    """Caption *fig* with the machine, write it to *out* and close it; returns *out*."""
    fig.text(0.01, 0.005, machine, fontsize=7, color="gray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _sweep(plt: Any, points: list[dict[str, Any]], x: str, xlabel: str, title: str, out: str, machine: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _errorbar(ax, [p[x] for p in points], [p["MBps"] for p in points])
    _log2_axis(ax, [p[x] for p in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("throughput (MB/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, out, machine)


def _data(plt: Any, points: list[dict[str, Any]], out: str, machine: str) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    xs = [p["MiB"] for p in points]
    _errorbar(top, xs, [p["MBps"] for p in points])
    top.set_ylabel("throughput (MB/s)")
    top.set_ylim(bottom=0)
    top.set_title("One stream: throughput and peak RSS against data moved")
    _errorbar(bottom, xs, [p["sender_rss_mib"] for p in points], label="sender")
    _errorbar(bottom, xs, [p["receiver_rss_mib"] for p in points], label="receiver")
    bottom.set_ylabel("peak RSS (MiB)")
    bottom.set_ylim(bottom=0)
    _log2_axis(bottom, xs)
    bottom.set_xlabel("data moved (MiB)")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, out, machine)


def _streams(plt: Any, points: list[dict[str, Any]], out: str, machine: str) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    xs = [p["streams"] for p in points]
    _errorbar(top, xs, [p["MBps"] for p in points])
    top.set_ylabel("aggregate (MB/s)")
    top.set_ylim(bottom=0)
    top.set_title("Concurrent streams on one connection")
    _errorbar(bottom, xs, [p["min_over_max"] for p in points])
    bottom.axhline(0.9, color="gray", linestyle="--", linewidth=1, label="target 0.9")
    bottom.set_ylabel("slowest / fastest stream")
    bottom.set_ylim(0, 1.05)
    _log2_axis(bottom, xs)
    bottom.set_xlabel("streams")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, out, machine)


def _latency(plt: Any, latency: dict[str, Any], out: str, machine: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (("idle_ms", "idle"), ("loaded_ms", "under a saturating stream")):
        values = latency[key]
        n = len(values)
        ax.plot(values, [(i + 1) / n for i in range(n)], label=label, drawstyle="steps-post")
    ax.axvline(5.0, color="gray", linestyle="--", linewidth=1, label="target p99 5 ms")
    ax.set_xscale("log")
    ax.set_xlabel("RPC round trip (ms)")
    ax.set_ylabel("fraction of calls")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"RPC latency CDF ({latency['calls']} calls each)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, out, machine)


def _concurrency(plt: Any, result: dict[str, Any], out: str, machine: str) -> str:
    points = result["points"]
    xs = [p["guests"] for p in points]
    fig, axes = plt.subplots(3, 1, figsize=(6.4, 8.0), sharex=True)
    _errorbar(axes[0], xs, [p["aggregate_MBps"] for p in points])
    axes[0].set_ylabel("aggregate (MB/s)")
    axes[0].set_title(
        f"Guests migrated at once, one daemon pair\n({result['size_mib']} MiB each, {result['random_mib']} MiB of it random)"
    )
    _errorbar(axes[1], xs, [p["slowest_s"] for p in points], label="slowest")
    _errorbar(axes[1], xs, [p["fastest_s"] for p in points], label="fastest")
    axes[1].set_ylabel("one migration (s)")
    axes[1].legend()
    _errorbar(axes[2], xs, [p["source_rss_mib"] for p in points], label="source daemon")
    _errorbar(axes[2], xs, [p["destination_rss_mib"] for p in points], label="destination daemon")
    axes[2].set_ylabel("peak RSS (MiB)")
    axes[2].set_xlabel("guests")
    _log2_axis(axes[2], xs)
    axes[2].legend()
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    return _save(plt, fig, out, machine)


def _machine_line(results_dir: str) -> str:
    path = os.path.join(results_dir, "summary.json")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    m = summary.get("machine", {})
    return (f"{summary.get('date', '')[:16]} · {summary.get('level', '')} · {m.get('cores')} cores, {m.get('memory_GiB')} GiB,"
            f" {m.get('kernel')}, Python {m.get('python')}, trio {m.get('trio')} · tunnel {m.get('tunnel_commit')}")  # fmt: skip


def make_plots(results_dir: str) -> tuple[list[str], str | None]:
    """Draw every plot the results in *results_dir* allow; (PNG paths, why something was skipped or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], MISSING
    machine = _machine_line(results_dir)
    made: list[str] = []
    missing: list[str] = []
    scaling = _last_round(results_dir, "scaling")
    if scaling is None:
        missing.append("scaling.py gave no result")
    else:
        if scaling.get("data"):
            made.append(_data(plt, scaling["data"], os.path.join(results_dir, "scaling_data.png"), machine))
        if scaling.get("frame"):
            made.append(_sweep(plt, scaling["frame"], "KiB", "frame size (KiB)", "One stream: throughput against frame size",
                               os.path.join(results_dir, "scaling_frame.png"), machine))  # fmt: skip
        if scaling.get("window"):
            made.append(_sweep(plt, scaling["window"], "KiB", "stream window (KiB)", "One stream: throughput against window size",
                               os.path.join(results_dir, "scaling_window.png"), machine))  # fmt: skip
        if scaling.get("streams"):
            made.append(_streams(plt, scaling["streams"], os.path.join(results_dir, "scaling_streams.png"), machine))
        if scaling.get("latency"):
            made.append(_latency(plt, scaling["latency"], os.path.join(results_dir, "latency_cdf.png"), machine))
    concurrency = _last_round(results_dir, "concurrency")
    if concurrency is None:
        missing.append("concurrency.py gave no result")
    elif concurrency.get("points"):
        made.append(_concurrency(plt, concurrency, os.path.join(results_dir, "concurrency.png"), machine))
    return made, ("; ".join(missing) or None)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.plots RESULTS_DIR")
    paths, why = make_plots(sys.argv[1])
    for p in paths:
        print(p)
    if why:
        print(why, file=sys.stderr)
