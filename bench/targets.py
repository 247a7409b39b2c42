"""The figures the summary shows, what each is compared with, and the targets the issues set.

A row names a figure by ``script.key`` (the key in that script's JSON,
dotted when nested).  With a ``baseline`` the row is a comparison: the
ratio figure / baseline, taken per round (both from the same round of one
suite invocation), or per run where the script lists its runs
(``figure_runs`` / ``baseline_runs``, paired by index).  Without one, the
row is the figure itself against its target.  ``ratio_key`` names a ratio
the script already computed within one round from interleaved runs; it is
used instead of dividing the medians.  ``target`` is ``(op, value)`` with
op ``<=``, ``>=`` or ``==``; None means "shown for comparison, no target".

Targets come from the issues (``issues show N``): 2 (codec), 3 (transport),
4 (pages), 5 and 11 (QEMU), 9 (connections), 10 (abort, faults), 14
(post-copy), and the brief (scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MISSING_BASELINES", "ROWS", "Row"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    #: What the figure is, for a reader.
    label: str
    #: ``script.key`` of the figure.
    figure: str
    unit: str = ""
    #: What it is compared with, for a reader, and its ``script.key``.
    baseline_label: str | None = None
    baseline: str | None = None
    #: A ratio the script computed itself (``script.key``), one per round.
    ratio_key: str | None = None
    #: Per-run lists (``script.key``) to pair, where the script repeats inside one invocation.
    figure_runs: str | None = None
    baseline_runs: str | None = None
    #: ``(script.key_min, script.key_max)``: the script's own range, where it repeats inside one round without listing its runs.
    figure_range: tuple[str, str] | None = None
    #: ``(op, value)`` on the ratio for comparisons, on the figure otherwise.
    target: tuple[str, float] | None = None
    issue: str = ""


ROWS: tuple[Row, ...] = (
    # The transport between two processes (issue 3, and issue 11 for the TLS figures).
    Row(label="tunnel stream goodput", figure="throughput.tunnel_MBps", unit="MB/s",
        baseline_label="raw trio TCP copy", baseline="throughput.raw_MBps", ratio_key="throughput.ratio",
        target=(">=", 0.95), issue="3"),
    Row(label="tunnel stream goodput", figure="throughput.tunnel_MBps", unit="MB/s",
        baseline_label="blocking-socket copy", baseline="baselines.blocking_MBps",
        baseline_runs="baselines.blocking_runs_MBps"),
    Row(label="tunnel stream goodput", figure="throughput.tunnel_MBps", unit="MB/s",
        baseline_label="iperf3 over loopback (physical limit)", baseline="baselines.iperf3_MBps",
        baseline_runs="baselines.iperf3_runs_MBps"),
    Row(label="tunnel stream over TLS", figure="throughput.tls_tunnel_MBps", unit="MB/s",
        baseline_label="raw trio copy over TLS", baseline="throughput.tls_raw_MBps", ratio_key="throughput.tls_ratio",
        target=(">=", 0.95), issue="3"),
    Row(label="tunnel stream over TLS", figure="throughput.tls_tunnel_MBps", unit="MB/s",
        baseline_label="one core's SSLObject encrypt + decrypt", baseline="throughput.tls_crypto_MBps",
        ratio_key="throughput.tls_tunnel_over_crypto", target=(">=", 0.8), issue="11"),
    Row(label="pipe to pipe, spliced tunnel", figure="throughput.fd_tunnel_MBps", unit="MB/s",
        baseline_label="copying relay over TCP", baseline="throughput.fd_raw_MBps", ratio_key="throughput.fd_ratio",
        target=(">=", 1.2), issue="3"),
    Row(label="tunnel as a relay (two daemons)", figure="relay.tunnel_MBps", unit="MB/s",
        baseline_label="socat relay (a tunnel without a protocol)", baseline="relay.socat_MBps",
        figure_runs="relay.tunnel_runs_MBps", baseline_runs="relay.socat_runs_MBps"),
    Row(label="tunnel as a relay (two daemons)", figure="relay.tunnel_MBps", unit="MB/s",
        baseline_label="direct blocking-socket copy", baseline="relay.raw_MBps",
        figure_runs="relay.tunnel_runs_MBps", baseline_runs="relay.raw_runs_MBps"),
    Row(label="relay CPU, tunnel (both ends)", figure="relay.tunnel_relay_cpu_s_per_GiB", unit="CPU s/GiB",
        baseline_label="socat relay CPU", baseline="relay.socat_relay_cpu_s_per_GiB"),
    Row(label="RPC round trip p99 under a saturating stream", figure="rpc_latency.loaded_p99_ms", unit="ms",
        baseline_label="idle p99", baseline="rpc_latency.idle_p99_ms"),
    Row(label="RPC round trip p99 under a saturating stream", figure="rpc_latency.loaded_p99_ms", unit="ms",
        target=("<=", 5.0), issue="3"),
    Row(label="16 streams: slowest over fastest", figure="fairness.min_over_max", target=(">=", 0.9), issue="3"),
    Row(label="16 streams: aggregate", figure="fairness.aggregate_MBps", unit="MB/s",
        baseline_label="one stream, same total", baseline="fairness.single_stream_MBps", target=(">=", 0.9), issue="3"),
    Row(label="peak RSS, largest over smallest transfer", figure="memory.growth", target=("<=", 1.10), issue="3"),
    Row(label="peak RSS growth, 256 MiB to 8 GiB moved", figure="scaling.rss_growth", target=("<=", 1.10), issue="brief"),
    Row(label="16 streams (scaling): slowest over fastest", figure="scaling.streams16_min_over_max", target=(">=", 0.9),
        issue="brief"),
    Row(label="codec: page batches", figure="codec.pages_MBps", unit="MB/s", figure_runs="codec.pages_runs_MBps",
        target=(">=", 2000.0), issue="2"),
    Row(label="page mode: bytes on the wire over payload", figure="pages.wire_over_payload", target=("<=", 1.05), issue="4"),
    # Real QEMU (issues 5 and 11).
    Row(label="QEMU guest, PEER2PEER + TUNNELLED over unix", figure="qemu.tunnelled_s", unit="s",
        baseline_label="QEMU native over a unix socket", baseline="qemu.native_s",
        figure_runs="qemu.tunnelled_runs_s", baseline_runs="qemu.native_runs_s", target=("<=", 1.3), issue="11"),
    Row(label="QEMU guest, daemons' CPU per GiB (plain)", figure="qemu.daemon_cpu_s_per_GiB", unit="CPU s/GiB",
        target=("<=", 0.3), issue="11"),
    Row(label="QEMU guest, PEER2PEER native data path", figure="qemu.p2p_s", unit="s",
        baseline_label="QEMU native over a unix socket", baseline="qemu.native_s",
        figure_runs="qemu.p2p_runs_s", baseline_runs="qemu.native_runs_s"),
    Row(label="QEMU native through two bare splice relays (the floor under the tunnel)", figure="qemu.relay2_s", unit="s",
        baseline_label="QEMU native over a unix socket", baseline="qemu.native_s",
        figure_runs="qemu.relay2_runs_s", baseline_runs="qemu.native_runs_s"),
    Row(label="QEMU guest, PEER2PEER + TUNNELLED over unix", figure="qemu.tunnelled_s", unit="s",
        baseline_label="QEMU native through two bare splice relays", baseline="qemu.relay2_s",
        figure_runs="qemu.tunnelled_runs_s", baseline_runs="qemu.relay2_runs_s"),
    Row(label="QEMU native over plain TCP", figure="qemu.qemu_tcp_s", unit="s",
        baseline_label="QEMU native over a unix socket", baseline="qemu.native_s",
        figure_runs="qemu.qemu_tcp_runs_s", baseline_runs="qemu.native_runs_s"),
    Row(label="QEMU guest, PEER2PEER + TUNNELLED over unix", figure="qemu.tunnelled_s", unit="s",
        baseline_label="QEMU native over plain TCP", baseline="qemu.qemu_tcp_s",
        figure_runs="qemu.tunnelled_runs_s", baseline_runs="qemu.qemu_tcp_runs_s"),
    Row(label="QEMU guest, TUNNELLED over mutual TLS", figure="qemu.tls_tunnelled_s", unit="s",
        baseline_label="QEMU's own TLS migration", baseline="qemu.qemu_tls_s",
        figure_runs="qemu.tls_tunnelled_runs_s", baseline_runs="qemu.qemu_tls_runs_s", target=("<=", 0.75), issue="11"),
    Row(label="QEMU guest, TUNNELLED over TLS", figure="qemu.tls_tunnelled_s", unit="s",
        baseline_label="QEMU native over a unix socket", baseline="qemu.native_s",
        figure_runs="qemu.tls_tunnelled_runs_s", baseline_runs="qemu.native_runs_s"),
    Row(label="QEMU guest, daemons' CPU per GiB (TLS)", figure="qemu.tls_daemon_cpu_s_per_GiB", unit="CPU s/GiB",
        target=("<=", 3.0), issue="11"),
    Row(label="QEMU guest, PEER2PEER native over TLS", figure="qemu.p2p_tls_s", unit="s",
        baseline_label="QEMU's own TLS migration", baseline="qemu.qemu_tls_s",
        figure_runs="qemu.p2p_tls_runs_s", baseline_runs="qemu.qemu_tls_runs_s"),
    # The daemon (issues 9 and 10).
    Row(label="daemon RSS per idle unauthenticated connection", figure="connections.rss_per_idle_conn_kib", unit="KiB",
        target=("<=", 64.0), issue="9"),
    Row(label="daemon RSS growth, 1000 idle connections", figure="connections.rss_growth_1000_mb", unit="MB",
        target=("<=", 100.0), issue="9"),
    Row(label="LIST p99 while 1000 connections are held", figure="connections.list_p99_ms", unit="ms", target=("<=", 50.0), issue="9"),
    Row(label="daemon RSS growth under a PING flood", figure="connections.flood_rss_growth_mb", unit="MB", target=("<=", 16.0),
        issue="9"),
    Row(label="abort until the source guest runs", figure="abort.abort_ms", unit="ms",
        figure_range=("abort.abort_ms_min", "abort.abort_ms_max"), target=("<=", 1000.0), issue="10"),
    Row(label="fault campaign: clean cases", figure="faults.clean", baseline_label="cases", baseline="faults.cases",
        target=("==", 1.0), issue="10"),
    Row(label="concurrent migrations, most guests", figure="concurrency.aggregate_MBps_max_guests", unit="MB/s",
        baseline_label="one guest alone", baseline="concurrency.aggregate_MBps_one_guest"),
    # Post-copy (issue 14).
    Row(label="post-copy tunnelled, switch to done", figure="postcopy.postcopy_tunnelled_s", unit="s",
        baseline_label="post-copy native", baseline="postcopy.postcopy_native_s", ratio_key="postcopy.postcopy_ratio",
        target=("<=", 1.3), issue="14"),
    Row(label="post-copy blocktime, tunnelled", figure="postcopy.blocktime_tunnelled_ms", unit="ms",
        baseline_label="blocktime native", baseline="postcopy.blocktime_native_ms", ratio_key="postcopy.blocktime_ratio",
        target=("<=", 2.0), issue="14"),
    Row(label="post-copy resume after a cut", figure="postcopy.resume_s", unit="s", target=("<=", 2.0), issue="14"),
)  # fmt: skip

#: Baselines the issues ask for that no script measures yet; the summary lists them as not measured.
MISSING_BASELINES: tuple[tuple[str, str], ...] = ()
