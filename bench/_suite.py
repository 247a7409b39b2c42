"""Which benchmark scripts the suite runs, and with which arguments at each level.

Three levels:

* ``dry``: every script at its smallest size, to prove that it runs and
  prints its keys (the test runs this); the figures mean nothing;
* ``quick``: a few minutes in all, sizes that show the shape of the figures;
* ``full``: the sizes the issues name; what the README's figures come from.

A script runs ``rounds`` times in one suite invocation (each round one
subprocess).  Scripts that repeat and interleave their own modes inside one
invocation (``qemu.py``, ``relay.py``, ``scaling.py``, ...) run once and
report their own runs; the others run several rounds, so that every figure
has a median, a minimum and a maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LEVELS", "SUITE", "Bench", "by_name"]

LEVELS = ("dry", "quick", "full")


@dataclass(frozen=True, slots=True, kw_only=True)
class Bench:
    """One script of the suite."""

    #: The result file's name (``NAME.json``) and how the summary refers to it.
    name: str
    #: The script, relative to ``bench/``.
    script: str
    #: What it measures, one line.
    what: str
    #: Command-line arguments at each level.
    args: dict[str, list[str]]
    #: Subprocess runs at each level (each one a round).
    rounds: dict[str, int] = field(default_factory=lambda: {"dry": 1, "quick": 1, "full": 1})
    #: Keys the last JSON object must carry (dotted for nested ones; ``a|b``: either).
    keys: tuple[str, ...] = ()
    #: Programs without which the script cannot run at all (it is then skipped, the reason recorded).
    needs: tuple[str, ...] = ()
    #: Why a dry run leaves this script out unless it is named with ``--only`` (None: it runs).
    dry_skip: str | None = None
    #: Seconds one round may take at each level before it is killed.
    timeout: dict[str, float] = field(default_factory=lambda: {"dry": 300.0, "quick": 1200.0, "full": 7200.0})


SUITE: tuple[Bench, ...] = (
    Bench(
        name="codec",
        script="codec.py",
        what="encode + decode through the sans-I/O core alone",
        args={"dry": ["--total", str(4 << 20), "--repeat", "1"], "quick": ["--quick"], "full": []},
        keys=("data_MBps", "pages_MBps", "pages_us_per_frame", "data_runs_MBps", "pages_runs_MBps"),
    ),
    Bench(
        name="throughput",
        script="throughput.py",
        what="tunnel stream vs raw trio TCP copy, plain and TLS; splice path vs a copying relay",
        args={"dry": ["--size", "8", "--repeat", "1"], "quick": ["--quick", "--repeat", "1"], "full": ["--repeat", "1"]},
        rounds={"dry": 1, "quick": 3, "full": 5},
        keys=(
            "raw_MBps",
            "tunnel_MBps",
            "ratio",
            "tls_raw_MBps",
            "tls_tunnel_MBps",
            "tls_ratio",
            "tls_crypto_MBps",
            "tls_tunnel_over_crypto",
            "fd_raw_MBps",
            "fd_tunnel_MBps",
            "fd_ratio",
            "tunnel_cpu_s_per_GiB",
        ),
    ),
    Bench(
        name="baselines",
        script="baselines.py",
        what="iperf3 over loopback (the physical limit) and a plain blocking-socket copy",
        args={"dry": ["--size", "8", "--repeat", "1"], "quick": ["--size", "512", "--repeat", "3"], "full": ["--repeat", "5"]},
        keys=("blocking_MBps", "blocking_runs_MBps", "iperf3_MBps|iperf3_skipped"),
    ),
    Bench(
        name="relay",
        script="relay.py",
        what="a tunnel without a protocol: raw copy vs a socat relay vs the tunnel between the same two processes",
        args={"dry": ["--size", "8", "--repeat", "1"], "quick": ["--size", "512", "--repeat", "3"], "full": ["--repeat", "5"]},
        keys=(
            "raw_MBps",
            "tunnel_MBps",
            "tunnel_runs_MBps",
            "tunnel_over_raw",
            "tunnel_relay_cpu_s_per_GiB",
            "socat_MBps|socat_skipped",
        ),
    ),
    Bench(
        name="rpc_latency",
        script="rpc_latency.py",
        what="RPC round trips on an idle connection and on one a stream saturates",
        args={"dry": ["--idle", "20", "--loaded", "20"], "quick": ["--quick"], "full": []},
        rounds={"dry": 1, "quick": 3, "full": 5},
        keys=("idle_p50_ms", "idle_p99_ms", "loaded_p50_ms", "loaded_p99_ms", "loaded_stream_MBps"),
    ),
    Bench(
        name="fairness",
        script="fairness.py",
        what="16 streams at once on one connection",
        args={"dry": ["--streams", "2", "--size", "1"], "quick": ["--quick"], "full": []},
        rounds={"dry": 1, "quick": 3, "full": 5},
        keys=("streams", "min_over_max", "aggregate_MBps", "single_stream_MBps"),
    ),
    Bench(
        name="memory",
        script="memory.py",
        what="peak RSS of each side at two transfer sizes",
        args={"dry": ["--sizes", "4,8"], "quick": ["--quick"], "full": []},
        rounds={"dry": 1, "quick": 3, "full": 3},
        keys=("growth", "peak_rss_mib"),
    ),
    Bench(
        name="pages",
        script="pages.py",
        what="a sparse memory image (10% random) in page mode, with and without a dirtying guest",
        args={"dry": ["--size", "0.0625", "--dirty-rate", "500"], "quick": ["--quick"], "full": []},
        keys=(
            "image_GiB",
            "bytes_on_wire",
            "payload_bytes",
            "wire_over_payload",
            "seconds",
            "iterations",
            "effective_MBps",
            "dirtying.converged",
        ),
    ),
    Bench(
        name="scaling",
        script="scaling.py",
        what="throughput and RSS against data moved, frame size, window size, streams; RPC latency CDF",
        args={"dry": ["--dry-run"], "quick": ["--quick"], "full": []},
        keys=("data", "frame", "window", "streams", "latency", "rss_growth"),
    ),
    Bench(
        name="concurrency",
        script="concurrency.py",
        what="1 to 16 memory-image guests migrated at once over one daemon pair",
        args={
            "dry": ["--guests", "1,2", "--size", "8", "--repeat", "1"],
            "quick": ["--guests", "1,2,4,8", "--size", "64", "--repeat", "2"],
            "full": [],
        },
        keys=("guests", "points"),
    ),
    Bench(
        name="connections",
        script="connections.py",
        what="what connections cost a daemon: idle unauthenticated and authenticated, LIST p99, a PING flood",
        args={"dry": ["--flood-seconds", "1"], "quick": ["--flood-seconds", "5"], "full": []},
        keys=("rss_per_idle_conn_kib", "rss_growth_1000_mb", "list_p99_ms", "flood_rss_growth_mb"),
    ),
    Bench(
        name="qemu",
        script="qemu.py",
        what="real QEMU, random guest RAM: native unix vs the daemons (tunnelled, p2p), plain and TLS, and QEMU's own TLS",
        args={"dry": ["--size", "16", "--repeat", "1"], "quick": ["--quick", "--repeat", "3"], "full": ["--repeat", "5"]},
        keys=(
            "native_s",
            "tunnelled_s",
            "ratio",
            "tls_tunnelled_s",
            "tls_ratio",
            "daemon_cpu_s_per_GiB",
            "qemu_tls_s",
            "tls_vs_qemu_tls",
            "tls_daemon_cpu_s_per_GiB",
            "p2p_s",
            "p2p_tls_s",
            "qemu_tcp_s",
            "relay2_s",
            "relay2_ratio",
            "tunnelled_vs_relay2",
            "native_runs_s",
            "tunnelled_runs_s",
        ),
        needs=("qemu",),
    ),
    Bench(
        name="abort",
        script="abort.py",
        what="time from abort to the source guest running again",
        args={"dry": ["--runs", "1", "--random-mib", "64"], "quick": ["--runs", "3"], "full": []},
        keys=("abort_ms", "abort_ms_min", "abort_ms_max", "destination_clean_ms"),
        needs=("qemu",),
    ),
    Bench(
        name="faults",
        script="faults.py",
        what="a randomized fault campaign with real QEMU: the guest on exactly one host, nothing left over",
        args={"dry": ["--cases", "1", "--seed", "1"], "quick": ["--cases", "5"], "full": []},
        keys=("cases", "clean", "lost", "doubled", "leaked", "errors"),
        needs=("qemu",),
    ),
    Bench(
        name="postcopy",
        script="postcopy.py",
        what="a guest dirtying faster than pre-copy sends: post-copy tunnelled vs native, resume after a cut",
        args={
            # Its smallest useful size: on a working set as small as 16 MiB pre-copy completes before the switch.
            "dry": ["--size", "256", "--rounds", "1", "--precopy-wait", "5"],
            "quick": ["--size", "256", "--rounds", "1"],
            "full": [],
        },
        keys=("precopy_converged", "postcopy_tunnelled_s", "postcopy_native_s", "postcopy_ratio", "blocktime_ratio", "resume_s"),
        needs=("qemu", "as", "ld"),
        dry_skip="dry run: bench/postcopy.py needs a working set pre-copy cannot converge on (256 MiB: about a minute "
        "under TCG, longer than the rest of the dry run); run it with --only postcopy",
    ),
)


def by_name(names: list[str]) -> list[Bench]:
    """The suite's entries named in *names*, in suite order (ValueError for an unknown name)."""
    known = {b.name: b for b in SUITE}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown benchmarks {', '.join(unknown)} (known: {', '.join(known)})")
    return [b for b in SUITE if b.name in names]
