"""What connections cost a running daemon, and whether it stays responsive.

Starts a real daemon process on a unix socket and reads its VmRSS from
/proc/PID/status:

* ``rss_per_idle_conn_kib``: 500 connections that each sent 3 bytes of a
  preface and nothing more (unauthenticated).  The default
  max_anonymous_clients (20) would refuse all but 20 of them and so hide
  their cost, so this phase runs the daemon through a small wrapper that
  constructs ``Daemon(..., max_anonymous_clients=1000)``; the figure is
  taken within the 10 s handshake timeout.  ``rss_after_close_mb``: the
  daemon's growth over its start once they are closed.
* ``rss_growth_1000_mb``: 1000 idle *authenticated* connections (tunnel
  handshake done, opened one after the other, so the default limits
  admit them), against ``python -m tunnel daemon`` with its defaults.
* ``list_p99_ms``: p99 of 200 LIST calls (``tunnel.client.connect().list()``)
  on a new connection while those 1000 are held.
* ``flood_rss_growth_mb``: one peer completes the handshake, then sends
  PING frames for 20 s and never reads; the daemon's peak RSS over its RSS
  before the flood.

Usage: python bench/connections.py [--flood-seconds S]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import trio
from _common import emit, now

_WRAPPER = """
import sys, trio
from tunnel.daemon import Daemon
root, anonymous = sys.argv[1], int(sys.argv[2])
daemon = Daemon(state_dir=root + "/state", listen=["unix://" + root + "/d.sock"],
                max_clients=5000, max_anonymous_clients=anonymous, log=lambda line: print(line, flush=True))
trio.run(daemon.run)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_daemon(root: str, *, anonymous: int | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = f"{root}/d.sock"
    if anonymous is None:
        args = ["-m", "tunnel", "daemon", "--listen", f"unix://{path}", "--state-dir", f"{root}/state"]
    else:
        args = ["-c", _WRAPPER, root, str(anonymous)]
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the daemon did not start")
        time.sleep(0.05)
    time.sleep(0.5)  # settle: imports done, listening
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unauthenticated(root: str) -> tuple[float, float]:
    proc = start_daemon(root, anonymous=1000)
    try:
        base = rss_kib(proc.pid)
        socks = []
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{root}/d.sock")
            s.sendall(b"TUN")
            socks.append(s)
        time.sleep(1.5)
        per_conn = (rss_kib(proc.pid) - base) / 500
        for s in socks:
            s.close()
        time.sleep(1.5)
        after_close = (rss_kib(proc.pid) - base) / 1024
        return per_conn, after_close
    finally:
        stop(proc)


async def authenticated(root: str, pid: int, flood_seconds: float) -> dict[str, float]:
    from tunnel import Connection
    from tunnel._frames import Ping, encode
    from tunnel.client import connect
    from tunnel.transport import open_connection

    path = f"{root}/d.sock"
    result: dict[str, float] = {}
    base = rss_kib(pid)
    async with trio.open_nursery() as nursery:
        held = trio.Event()
        ready = 0

        async def hold() -> None:
            nonlocal ready
            stream = await trio.open_unix_socket(path)
            async with open_connection(stream, client=True, keepalive_interval=None):
                ready += 1
                if ready == 1000:
                    held.set()
                await trio.sleep_forever()

        for _ in range(1000):
            n = ready
            nursery.start_soon(hold)
            while ready == n:  # one handshake at a time: the anonymous limit never bites
                await trio.sleep(0.001)
        await held.wait()
        await trio.sleep(2)
        result["rss_growth_1000_mb"] = (rss_kib(pid) - base) / 1024

        latencies = []
        async with connect(f"unix://{path}") as client:
            await client.list()
            for _ in range(200):
                start = now()
                await client.list()
                latencies.append(now() - start)
        latencies.sort()
        result["list_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
        result["list_median_ms"] = latencies[len(latencies) // 2] * 1000

        # The flood: handshake with a raw core, then PINGs, never reading.
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        stream = trio.SocketStream(sock)
        core = Connection(client=True)
        await stream.send_all(core.bytes_to_send())
        while core.peer_settings is None:
            core.receive_data(await stream.receive_some(65536))
        before = rss_kib(pid)
        peak = before
        pings = b"".join(encode(Ping(opaque=i.to_bytes(8, "big"))) for i in range(3000))
        sent = 0
        end = trio.current_time() + flood_seconds
        next_sample = 0.0
        with trio.move_on_at(end):
            while True:
                await stream.send_all(pings)
                sent += len(pings)
                if trio.current_time() >= next_sample:
                    peak = max(peak, rss_kib(pid))
                    next_sample = trio.current_time() + 0.25
        peak = max(peak, rss_kib(pid))
        result["flood_rss_growth_mb"] = (peak - before) / 1024
        result["flood_mb_sent"] = sent / 1e6
        await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flood-seconds", type=float, default=20.0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the daemon
    with tempfile.TemporaryDirectory() as root:
        per_conn, after_close = unauthenticated(root)
        print(
            f"500 unauthenticated connections: {per_conn:.1f} KiB each; {after_close:.1f} MB above start once closed", flush=True
        )
    with tempfile.TemporaryDirectory() as root:
        proc = start_daemon(root, anonymous=None)
        try:
            figures = trio.run(authenticated, root, proc.pid, args.flood_seconds)
        finally:
            stop(proc)
    print(
        f"1000 authenticated idle connections: +{figures['rss_growth_1000_mb']:.1f} MB; "
        f"LIST p99 {figures['list_p99_ms']:.2f} ms (median {figures['list_median_ms']:.2f}); "
        f"PING flood ({figures['flood_mb_sent']:.0f} MB in {args.flood_seconds:.0f} s): +{figures['flood_rss_growth_mb']:.1f} MB",
        flush=True,
    )
    emit(
        {
            "rss_per_idle_conn_kib": round(per_conn, 1),
            "rss_after_close_mb": round(after_close, 1),
            "rss_growth_1000_mb": round(figures["rss_growth_1000_mb"], 1),
            "list_p99_ms": round(figures["list_p99_ms"], 2),
            "flood_rss_growth_mb": round(figures["flood_rss_growth_mb"], 1),
        }
    )


if __name__ == "__main__":
    main()
