"""What evacuating a host costs: N memory-image guests migrated at once over one daemon pair.

Two ``python3 -m tunnel daemon`` processes on unix sockets.  For each N
(``--guests``, 1 to 16 by default), N memory-image guests of ``--size`` MiB
(``--random-mib`` of it random data, the rest zero pages; no dirtying
unless ``--dirty-rate``) are defined and started on the source, then all
migrated at once, PEER2PEER + TUNNELLED, each by its own client connection
(as N ``tunnel migrate`` commands would be), so their streams share the
daemons' one connection.  Measured per point:

* ``aggregate_MBps``: the bytes the tunnel carried for all guests over the
  wall time from the first ``migrate`` to the last one returning;
* ``slowest_s`` / ``fastest_s``: the longest and shortest single migration
  (the client's ``migrate`` call, prepare to confirm);
* ``source_rss_mib`` / ``destination_rss_mib``: each daemon's peak VmRSS
  while they ran (sampled every 20 ms), and ``*_rss_idle_mib`` before.

Each point is repeated ``--repeat`` times with fresh guests (median, min,
max); the guests are removed from both daemons between points.
``aggregate_MBps_one_guest`` and ``aggregate_MBps_max_guests`` are the
medians at the smallest and largest N.

Usage: python bench/concurrency.py [--guests 1,2,4,8,16] [--size MiB] [--random-mib MiB] [--repeat N]
The last line printed is one JSON object (MB = 10**6 bytes, RSS in MiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import trio
from _common import emit

from tunnel.client import connect

MiB = 2**20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Daemon:
    """One ``tunnel daemon`` process on a unix socket; its log is in its root."""

    def __init__(self, root: str, name: str) -> None:
        self.socket = os.path.join(root, f"{name}.sock")
        self.uri = f"unix://{self.socket}"
        self.log_path = os.path.join(root, f"{name}.log")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunnel", "daemon", "--listen", self.uri, "--state-dir", os.path.join(root, name),
                 "--shutdown-guests-on-exit"],
                stdout=log, stderr=log, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {name} daemon did not start: see {self.log_path}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def definition(name: str, size: int, random_mib: int, dirty: int) -> dict[str, Any]:
    return {"name": name, "image": {"size_mib": size, "random_mib": random_mib, "dirty_pages_per_s": dirty}}


async def one_point(src: Daemon, dst: Daemon, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Define, start and migrate *names* at once; the point's figures; then remove them from both daemons."""
    async with connect(src.uri) as client:
        for name in names:
            await client.define(definition(name, args.size, args.random_mib, args.dirty_rate))
            await client.start(name)
    idle = {"source": rss_mib(src.proc.pid), "destination": rss_mib(dst.proc.pid)}
    peak = dict(idle)
    times: dict[str, float] = {}
    carried: dict[str, int] = {}
    finished = trio.Event()

    async def sample() -> None:
        while not finished.is_set():
            peak["source"] = max(peak["source"], rss_mib(src.proc.pid))
            peak["destination"] = max(peak["destination"], rss_mib(dst.proc.pid))
            with trio.move_on_after(0.02):
                await finished.wait()

    async def migrate(name: str) -> None:
        async with connect(src.uri) as client:
            started = time.perf_counter()
            result = await client.migrate(name, dst.uri, live=True, p2p=True, tunnelled=True)
            times[name] = time.perf_counter() - started
            carried[name] = int(result.get("tunnel_bytes_sent") or result.get("data_processed") or 0)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        async with trio.open_nursery() as migrations:
            for name in names:
                migrations.start_soon(migrate, name)
        wall = time.perf_counter() - started
        finished.set()
    async with connect(dst.uri) as dest, connect(src.uri) as client:
        for name in names:
            await dest.destroy(name)
            if any(d["name"] == name for d in await dest.list()):
                await dest.undefine(name)
            await client.undefine(name)
    return {
        "wall_s": wall,
        "aggregate_MBps": sum(carried.values()) / wall / 1e6,
        "slowest_s": max(times.values()),
        "fastest_s": min(times.values()),
        "bytes": sum(carried.values()),
        "source_rss_mib": peak["source"],
        "destination_rss_mib": peak["destination"],
        "source_rss_idle_mib": idle["source"],
        "destination_rss_idle_mib": idle["destination"],
    }


def _spread(values: list[float], digits: int = 2) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


async def run(args: argparse.Namespace, root: str) -> dict[str, Any]:
    src, dst = Daemon(root, "src"), Daemon(root, "dst")
    points = []
    try:
        serial = 0
        for n in args.guests:
            runs = []
            for _ in range(args.repeat):
                serial += 1
                runs.append(await one_point(src, dst, [f"p{serial}g{i}" for i in range(n)], args))
            point: dict[str, Any] = {"guests": n, "bytes": int(statistics.median([r["bytes"] for r in runs]))}
            for key in ("aggregate_MBps", "slowest_s", "fastest_s", "wall_s", "source_rss_mib", "destination_rss_mib",
                        "source_rss_idle_mib", "destination_rss_idle_mib"):  # fmt: skip
                point[key] = _spread([r[key] for r in runs])
            points.append(point)
            print(
                f"{n:3d} guests: {point['aggregate_MBps']['median']:8.1f} MB/s aggregate, slowest {point['slowest_s']['median']:.2f} s,"
                f" daemon RSS {point['source_rss_mib']['median']:.0f} / {point['destination_rss_mib']['median']:.0f} MiB",
                flush=True,
            )
    except BaseException:
        for daemon in (src, dst):
            print(f"--- {daemon.log_path} (tail) ---\n{daemon.log_tail()}", file=sys.stderr)
        raise
    finally:
        src.stop()
        dst.stop()
    return {
        "guests": args.guests,
        "size_mib": args.size,
        "random_mib": args.random_mib,
        "dirty_pages_per_s": args.dirty_rate,
        "repeat": args.repeat,
        "points": points,
        "aggregate_MBps_one_guest": points[0]["aggregate_MBps"]["median"],
        "aggregate_MBps_max_guests": points[-1]["aggregate_MBps"]["median"],
        "slowest_s_max_guests": points[-1]["slowest_s"]["median"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guests", default="1,2,4,8,16", help="guest counts, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--size", type=int, default=256, help="MiB of memory per guest (default 256)")
    p.add_argument("--random-mib", type=int, help="MiB of it random (default a quarter)")
    p.add_argument("--dirty-rate", type=int, default=0, help="pages/s each guest dirties while it runs (default 0)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point (default 3)")
    args = p.parse_args()
    args.guests = [int(x) for x in args.guests.split(",") if x]
    if args.random_mib is None:
        args.random_mib = args.size // 4
    root = tempfile.mkdtemp(prefix="tunnel-bench-conc-")
    try:
        result = trio.run(run, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
