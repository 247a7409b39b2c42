"""How the tunnel's cost grows with the work: the scaling curves.

Two OS processes over loopback TCP, one tunnel connection, random bytes
(``send_all`` of 1 MiB or one frame, ``receive_view``), for each point of
five sweeps:

* ``data``: one stream moving 256 MiB to 8 GiB: throughput, and the peak
  RSS (``ru_maxrss``) of each side; ``rss_growth`` is the largest ratio,
  over both sides, of the peak at the largest size to the peak at the
  smallest;
* ``frame``: the frame size (the receiver's ``max_frame_size`` and the
  sender's chunk), 16 KiB to 16 MiB;
* ``window``: the stream window (``initial_stream_window``; the connection
  window at least as large), 64 KiB to 64 MiB;
* ``streams``: 1 to 64 streams at once sharing one total: aggregate
  throughput, and fairness (slowest stream's rate over the fastest's);
  ``streams16_min_over_max`` is the point at 16;
* ``latency``: RPC round trips, idle and under a saturating stream (the
  pair of ``rpc_latency.py``), kept whole as a CDF (up to 200 quantiles, ms).

Every point is repeated ``--repeat`` times (fresh processes each time) and
given as median, min and max.  ``plots.py`` turns the result into PNGs.

Usage: python bench/scaling.py [--quick | --dry-run] [--repeat N] [--sweeps data,frame,window,streams,latency]
The last line printed is one JSON object (MB = 10**6 bytes, RSS in MiB).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import trio
from _common import emit, now, random_block
from _pair import accept, connect, spawn_pair

MiB = 2**20
KiB = 2**10
CHUNK = MiB
SWEEPS = ["data", "frame", "window", "streams", "latency"]

#: Per level: data sizes (MiB); frame and window sizes (KiB) and the MiB each of their runs moves;
#: stream counts and the MiB they share; RPC calls idle and loaded; repeats.
PLANS: dict[str, dict[str, Any]] = {
    "full": {"data": [256, 512, 1024, 2048, 4096, 8192], "frame": [16, 64, 256, 1024, 4096, 16384],
             "window": [64, 256, 1024, 4096, 16384, 65536], "sweep_mib": 1024, "streams": [1, 2, 4, 8, 16, 32, 64],
             "streams_mib": 1024, "calls": 2000, "repeat": 3},
    "quick": {"data": [256, 512, 1024], "frame": [16, 256, 1024, 4096], "window": [256, 1024, 4096, 16384], "sweep_mib": 256,
              "streams": [1, 4, 16, 64], "streams_mib": 256, "calls": 1000, "repeat": 2},
    "dry": {"data": [4, 8], "frame": [16, 1024], "window": [64, 4096], "sweep_mib": 4, "streams": [1, 2], "streams_mib": 4,
            "calls": 20, "repeat": 1},
}  # fmt: skip


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _settings(frame: int, window: int, streams: int) -> Any:
    from tunnel import Settings

    defaults = Settings()
    return Settings(
        max_frame_size=frame,
        initial_stream_window=window,
        connection_window=min(2**31 - 1, max(defaults.connection_window, window)),
        max_concurrent_streams=max(defaults.max_concurrent_streams, streams),
    )


# --------------------------------------------------------------------------- the two processes


async def sender(port: int, streams: int, per_stream: int, frame: int, window: int) -> dict[str, Any]:
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    write = max(CHUNK, frame)
    block = memoryview(random_block(max(16 * CHUNK, 2 * write)))
    stream = await connect(port)
    settings = _settings(frame, window, streams)
    async with open_connection(stream, client=True, keepalive_interval=None, settings=settings, chunk_size=frame) as conn:
        opened = [await conn.open_stream(label=f"s{i}", digest=DigestAlgorithm.NONE) for i in range(streams)]

        async def pump(i: int, s: Any) -> None:
            sent = 0
            off = (i * write) % (len(block) - write + 1)
            while sent < per_stream:
                n = min(write, per_stream - sent)
                await s.send_all(block[off : off + n])
                sent += n
                off = (off + write) % (len(block) - write + 1)
            await s.send_eof()
            assert await s.receive_some() == b""

        async with trio.open_nursery() as nursery:
            for i, s in enumerate(opened):
                nursery.start_soon(pump, i, s)
    return {"peak_rss_mib": peak_rss_mib()}


async def receiver(fd: int, streams: int, per_stream: int, frame: int, window: int) -> dict[str, Any]:
    from tunnel.transport import open_connection

    stream = await accept(fd)
    done: dict[str, float] = {}
    settings = _settings(frame, window, streams)
    async with open_connection(stream, client=False, keepalive_interval=None, settings=settings, chunk_size=frame) as conn:
        first = await conn.accept_stream()
        start = now()

        async def drain(s: Any) -> None:
            got = 0
            while True:
                data = await s.receive_view(max(CHUNK, frame))
                if not data:
                    break
                got += len(data)
            if got != per_stream:
                raise SystemExit(f"stream {s.label}: received {got} of {per_stream} bytes")
            done[s.label] = now() - start
            await s.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, first)
            for _ in range(streams - 1):
                nursery.start_soon(drain, await conn.accept_stream())
    return {"seconds": done, "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- one point, repeated


def _spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def point(*, total_mib: int, streams: int = 1, frame: int = MiB, window: int = 4 * MiB, repeat: int) -> dict[str, Any]:
    """Move *total_mib* split over *streams*; the figures of *repeat* runs."""
    per_stream = total_mib * MiB // streams
    extra = ["--streams", str(streams), "--bytes", str(per_stream), "--frame", str(frame), "--window", str(window)]
    rates, fairness, send_rss, recv_rss = [], [], [], []
    for _ in range(repeat):
        s, r = spawn_pair(__file__, extra, timeout=3600)
        secs = r["seconds"]
        rates.append(per_stream * streams / max(secs.values()) / 1e6)
        each = [per_stream / t for t in secs.values()]
        fairness.append(min(each) / max(each))
        send_rss.append(s["peak_rss_mib"])
        recv_rss.append(r["peak_rss_mib"])
    return {
        "MBps": _spread(rates),
        "min_over_max": _spread(fairness, 3),
        "sender_rss_mib": _spread(send_rss),
        "receiver_rss_mib": _spread(recv_rss),
    }


def cdf(values_s: list[float], points: int = 200) -> list[float]:
    """Up to *points* evenly spaced quantiles of *values_s*, in ms (the i-th is quantile i/(n-1))."""
    s = sorted(values_s)
    if len(s) <= points:
        return [round(v * 1000, 4) for v in s]
    return [round(s[round(i * (len(s) - 1) / (points - 1))] * 1000, 4) for i in range(points)]


def latency(calls: int, repeat: int) -> dict[str, Any]:
    """The idle and loaded RPC round trips of ``rpc_latency.py``'s pair, all runs pooled."""
    idle: list[float] = []
    loaded: list[float] = []
    stream = []
    for _ in range(repeat):
        s, _ = spawn_pair(os.path.join(HERE, "rpc_latency.py"), ["--idle", str(calls), "--loaded", str(calls), "--body", "64"])
        idle += s["idle"]
        loaded += s["loaded"]
        stream.append(s["loaded_stream_MBps"])
    return {"calls": len(idle), "idle_ms": cdf(idle), "loaded_ms": cdf(loaded), "loaded_stream_MBps": _spread(stream)}


# --------------------------------------------------------------------------- the driver


def run(plan: dict[str, Any], sweeps: list[str], repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"repeat": repeat, "data": [], "frame": [], "window": [], "streams": [], "latency": {}}
    if "data" in sweeps:
        for mib in plan["data"]:
            out["data"].append({"MiB": mib, **point(total_mib=mib, repeat=repeat)})
            say("data", f"{mib} MiB", out["data"][-1])
        first, last = out["data"][0], out["data"][-1]
        out["rss_growth"] = round(
            max(last[f"{side}_rss_mib"]["median"] / first[f"{side}_rss_mib"]["median"] for side in ("sender", "receiver")), 3
        )
    if "frame" in sweeps:
        for kib in plan["frame"]:
            out["frame"].append(
                {"KiB": kib, "MiB_moved": plan["sweep_mib"], **point(total_mib=plan["sweep_mib"], frame=kib * KiB, repeat=repeat)}
            )
            say("frame", f"{kib} KiB", out["frame"][-1])
    if "window" in sweeps:
        for kib in plan["window"]:
            out["window"].append(
                {
                    "KiB": kib,
                    "MiB_moved": plan["sweep_mib"],
                    **point(total_mib=plan["sweep_mib"], window=kib * KiB, repeat=repeat),
                }
            )
            say("window", f"{kib} KiB", out["window"][-1])
    if "streams" in sweeps:
        for k in plan["streams"]:
            out["streams"].append(
                {"streams": k, "MiB_moved": plan["streams_mib"], **point(total_mib=plan["streams_mib"], streams=k, repeat=repeat)}
            )
            say("streams", str(k), out["streams"][-1])
        at16 = [p for p in out["streams"] if p["streams"] == 16]
        out["streams16_min_over_max"] = at16[0]["min_over_max"]["median"] if at16 else None
    if "latency" in sweeps:
        out["latency"] = latency(plan["calls"], repeat)
        lat = out["latency"]
        print(f"latency: {lat['calls']} calls; idle median {lat['idle_ms'][len(lat['idle_ms']) // 2]} ms, "
              f"loaded median {lat['loaded_ms'][len(lat['loaded_ms']) // 2]} ms", flush=True)  # fmt: skip
    out.setdefault("rss_growth", None)
    out.setdefault("streams16_min_over_max", None)
    return out


def say(sweep: str, at: str, p: dict[str, Any]) -> None:
    print(
        f"{sweep:8s} {at:>9s}: {p['MBps']['median']:8.1f} MB/s [{p['MBps']['min']}-{p['MBps']['max']}]"
        f"  fairness {p['min_over_max']['median']}  rss send {p['sender_rss_mib']['median']} recv {p['receiver_rss_mib']['median']} MiB",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="fewer and smaller points (a minute or so)")
    level.add_argument("--dry-run", action="store_true", help="the smallest points, to check that it runs")
    p.add_argument("--repeat", type=int, help="runs per point (default 3; quick 2; dry run 1)")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {','.join(SWEEPS)}")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--frame", type=int, default=MiB, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=4 * MiB, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "send":
        emit(trio.run(sender, args.port, args.streams, args.bytes, args.frame, args.window))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args.fd, args.streams, args.bytes, args.frame, args.window))
        return
    plan = PLANS["dry" if args.dry_run else "quick" if args.quick else "full"]
    sweeps = [s for s in args.sweeps.split(",") if s]
    if set(sweeps) - set(SWEEPS):
        p.error(f"unknown sweeps: choose from {','.join(SWEEPS)}")
    emit(run(plan, sweeps, args.repeat or plan["repeat"]))


if __name__ == "__main__":
    main()
