"""A tunnel without a protocol: the same bytes copied directly, through socat, and through the tunnel.

The same two plain processes (``_sockcopy.py``: a blocking sender and a
blocking receiver, 1 MiB ``sendall`` / ``recv_into``) move random bytes over
loopback TCP, alternating in one invocation between three paths:

* ``raw``: the sender connects to the receiver directly (no relay);
* ``socat``: through ``socat -b 262144 TCP-LISTEN:... TCP:...``, one relay
  process with a 256 KiB buffer: what an operator gets from a relay that
  knows nothing of streams, windows or RPC;
* ``tunnel``: through two relay processes, as two daemons would be: the
  entry accepts the sender's connection and sends it on a tunnel stream
  (``send_fd``) over one tunnel connection on loopback TCP; the exit writes
  the stream into its connection to the receiver (``receive_fd``).  This is
  the daemons' data path, spliced where the kernel allows.

Each run is timed from the sender's first byte to the receiver's EOF.  The
relays' CPU (user + system, from ``wait4``) is given per GiB moved.  Rounds
alternate the paths; figures are medians, with the minimum, the maximum and
every run.

Usage: python bench/relay.py [--size MiB] [--repeat N] [--modes raw,socat,tunnel]
The last line printed is one JSON object (MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import trio
from _common import cpu_seconds, emit

MODES = ["raw", "socat", "tunnel"]
SOCAT_BUFFER = 256 * 1024
GiB = 2**30


# --------------------------------------------------------------------------- the tunnel's two ends


async def entry(listen_fd: int, tunnel_port: int) -> None:
    """Accept the sender's connection and send what it carries on one tunnel stream."""
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd)))
    peer = await trio.open_tcp_stream("127.0.0.1", tunnel_port)
    async with open_connection(peer, client=True, keepalive_interval=None) as conn:
        print("ready", flush=True)  # the tunnel is up: the parent may start the sender
        started = cpu_seconds()
        source = await listener.accept()
        await listener.aclose()
        async with source:
            s = await conn.open_stream(label="relay", digest=DigestAlgorithm.NONE)
            await s.send_fd(source.socket.fileno())
            await s.send_eof()
            assert await s.receive_some() == b""
    emit({"cpu": cpu_seconds() - started})


async def exit_end(listen_fd: int, target_port: int) -> None:
    """Accept the tunnel connection and write its one stream into a connection to the receiver."""
    from tunnel.transport import open_connection

    lsock = trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd))
    listener = trio.SocketListener(lsock)
    peer = await listener.accept()
    await listener.aclose()
    async with open_connection(peer, client=False, keepalive_interval=None) as conn:
        s = await conn.accept_stream()
        started = cpu_seconds()
        with socket.create_connection(("127.0.0.1", target_port)) as sock:
            await s.receive_fd(sock.fileno())
            sock.shutdown(socket.SHUT_WR)
            await trio.lowlevel.wait_readable(
                sock
            )  # the receiver closes once it has everything (receive_fd made sock non-blocking)
            sock.recv(1)
        await s.send_eof()
    emit({"cpu": cpu_seconds() - started})


# --------------------------------------------------------------------------- one run


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock


def _free_port() -> int:
    with _listener() as sock:
        return int(sock.getsockname()[1])


def _spawn(args: list[str], pass_fds: tuple[int, ...] = (), capture: bool = True) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, text=True, pass_fds=pass_fds)


def _relay_cpu(out: str, waited_cpu: float) -> float:
    """A tunnel end reports its CPU from the moment it was ready (its imports left out); socat's start costs nothing."""
    lines = out.strip().splitlines()
    return float(json.loads(lines[-1])["cpu"]) if lines else waited_cpu


def _wait_cpu(proc: subprocess.Popen[str]) -> tuple[str, float]:
    """Read *proc*'s output to EOF, then reap it with wait4 for its CPU seconds."""
    out = ""
    if proc.stdout is not None:
        out = proc.stdout.read()
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{proc.args!r} failed with exit status {proc.returncode}")
    return out, usage.ru_utime + usage.ru_stime


def run_once(mode: str, total: int) -> dict[str, float]:
    me = os.path.abspath(__file__)
    copy = os.path.join(HERE, "_sockcopy.py")
    relays: list[subprocess.Popen[str]] = []
    receiver_sock = _listener()
    target = receiver_sock.getsockname()[1]
    receiver = _spawn([sys.executable, copy, "recv", str(receiver_sock.fileno())], pass_fds=(receiver_sock.fileno(),))
    receiver_sock.close()
    if mode == "raw":
        front = target
    elif mode == "socat":
        front = _free_port()
        relays.append(_spawn(["socat", "-b", str(SOCAT_BUFFER), f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr", f"TCP:127.0.0.1:{target}"],
                             capture=False))  # fmt: skip
    else:
        tunnel_sock, front_sock = _listener(), _listener()
        front = front_sock.getsockname()[1]
        relays.append(_spawn([sys.executable, me, "--role", "exit", "--fd", str(tunnel_sock.fileno()), "--port", str(target)],
                             pass_fds=(tunnel_sock.fileno(),)))  # fmt: skip
        relays.append(_spawn([sys.executable, me, "--role", "entry", "--fd", str(front_sock.fileno()),
                              "--port", str(tunnel_sock.getsockname()[1])], pass_fds=(front_sock.fileno(),)))  # fmt: skip
        tunnel_sock.close()
        front_sock.close()
    for proc in (receiver, *relays[1:]):  # nothing is timed until every process is up (the exit is, once the entry is)
        if proc.stdout is not None and proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{mode}: {proc.args!r} did not start")
    sender = _spawn([sys.executable, copy, "send", str(front), str(total)])
    try:
        sent = json.loads(sender.communicate(timeout=600)[0])
        got = json.loads(receiver.communicate(timeout=600)[0])
        relay_cpu = sum(_relay_cpu(*_wait_cpu(p)) for p in relays)
    finally:
        for proc in (sender, receiver, *relays):
            if proc.returncode is None and proc.poll() is None:
                proc.kill()
                proc.wait()
    if got["bytes"] != total:
        raise SystemExit(f"{mode}: the receiver got {got['bytes']} of {total} bytes")
    seconds = got["end"] - sent["start"]
    return {"seconds": seconds, "MBps": total / seconds / 1e6, "relay_cpu_s": relay_cpu}


# --------------------------------------------------------------------------- the driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="MiB per run (default 2048)")
    p.add_argument("--repeat", type=int, default=5, help="rounds; each runs every mode once (default 5)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "entry":
        trio.run(entry, args.fd, args.port)
        return
    if args.role == "exit":
        trio.run(exit_end, args.fd, args.port)
        return
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        p.error(f"unknown modes: choose from {','.join(MODES)}")
    out: dict[str, Any] = {"bytes_per_run": args.size * 2**20, "repeat": args.repeat}
    if "socat" in modes and shutil.which("socat") is None:
        modes.remove("socat")
        out["socat_skipped"] = "socat is not installed"
    total = args.size * 2**20
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for index in range(args.repeat):
        for mode in modes:
            r = run_once(mode, total)
            runs[mode].append(r)
            print(f"round {index + 1} {mode:6s} {r['MBps']:8.1f} MB/s  relay cpu {r['relay_cpu_s']:.2f} s", flush=True)
    for mode, results in runs.items():
        rates = [r["MBps"] for r in results]
        out[f"{mode}_MBps"] = round(statistics.median(rates), 1)
        out[f"{mode}_min_MBps"] = round(min(rates), 1)
        out[f"{mode}_max_MBps"] = round(max(rates), 1)
        out[f"{mode}_runs_MBps"] = [round(x, 1) for x in rates]
        if mode != "raw":
            out[f"{mode}_relay_cpu_s_per_GiB"] = round(statistics.median([r["relay_cpu_s"] for r in results]) / (total / GiB), 3)
    for a, b in (("tunnel", "raw"), ("tunnel", "socat"), ("socat", "raw")):
        if a in runs and b in runs:
            ratios = [x["MBps"] / y["MBps"] for x, y in zip(runs[a], runs[b], strict=True)]
            out[f"{a}_over_{b}"] = round(statistics.median(ratios), 3)
            out[f"{a}_over_{b}_min"] = round(min(ratios), 3)
            out[f"{a}_over_{b}_max"] = round(max(ratios), 3)
    emit(out)


if __name__ == "__main__":
    main()
