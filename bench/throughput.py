"""Tunnel stream goodput against a raw trio stream copy, two OS processes.

Each run moves the same number of random bytes from a sender process to a
receiver process over loopback TCP, alternating in one invocation between:

* ``raw``: trio TCP stream, ``send_all`` / ``receive_some`` of 1 MiB;
* ``tunnel``: one tunnel stream over a tunnel connection on the same kind
  of socket (``send_all`` of 1 MiB, ``receive_view``);
* the same two over mutual TLS (``tls_raw``, ``tls_tunnel``), with the
  daemons' TLS stream (``tunnel.transport.TLSStream``);
* ``tls_crypto``: no sockets, no second process: one core encrypts every
  byte with ``ssl.SSLObject`` over memory BIOs and decrypts it again, with
  the same contexts (so the same cipher) and the same 1 MiB writes (full
  16 KiB records).  ``tls_tunnel_over_crypto`` is ``tls_tunnel`` over this:
  how close the tunnel comes to what the cipher allows one core;
* ``fd_raw``: data read from a pipe in the sender and written to a pipe in
  the receiver, copied through a 1 MiB buffer over TCP (a plain relay);
* ``fd_tunnel``: the same pipes, through a tunnel stream using its splice
  path (``send_fd`` / ``receive_fd``).

Usage: python bench/throughput.py [--quick] [--size MiB] [--repeat N]
The last line printed is one JSON object (MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio
from _common import child_result, cpu_seconds, emit, median, now, random_block, run_child

CHUNK = int(os.environ.get("BENCH_CHUNK", 1024 * 1024))
MODES = ["raw", "tunnel", "tls_raw", "tls_tunnel", "tls_crypto", "fd_raw", "fd_tunnel"]


def _contexts(certdir: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Mutual TLS as between daemons (each side shows the one certificate), tuned as the daemons' contexts."""
    from tunnel.transport import tune_context

    cert, key, ca = (os.path.join(certdir, name) for name in ("cert.pem", "key.pem", "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    server.load_cert_chain(cert, key)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=ca)
    client.load_cert_chain(cert, key)
    return tune_context(server), tune_context(client)


def _tls_stream(stream: trio.abc.Stream, certdir: str, *, server: bool) -> trio.abc.Stream:
    from tunnel.transport import TLSStream

    server_ctx, client_ctx = _contexts(certdir)
    if server:
        return TLSStream(stream, server_ctx, server_side=True)
    return TLSStream(stream, client_ctx, server_hostname="localhost")


def crypto_once(total: int, certdir: str) -> dict[str, float | str]:
    """One core encrypts *total* bytes in CHUNK writes and decrypts them again, over memory BIOs."""
    from tunnel.transport._tls import WRITE_CHUNK

    server_ctx, client_ctx = _contexts(certdir)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="localhost")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(8):  # the handshake, a flight at a time
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    cipher = client.cipher()
    block = memoryview(random_block(WRITE_CHUNK))
    out = bytearray(WRITE_CHUNK)
    view = memoryview(out)
    start_cpu = cpu_seconds()
    start = now()
    left = total
    while left:
        n = min(len(block), left)
        client.write(block[:n])
        bios[2].write(bios[1].read())
        got = 0
        while got < n:
            got += server.read(n - got, view[got:])
        left -= n
    elapsed = now() - start
    return {"seconds": elapsed, "cpu": cpu_seconds() - start_cpu, "MBps": total / elapsed / 1e6, "cipher": cipher[0] if cipher else ""}


def make_certs(certdir: str) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(os.path.join(certdir, "ca.pem"))
    cert.private_key_pem.write_to_path(os.path.join(certdir, "key.pem"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(certdir, "cert.pem"))


_PRODUCER = """
import os, sys
total = int(sys.argv[1]); block = memoryview(os.urandom(4 << 20))
while total:
    total -= os.write(1, block[: min(len(block), total)])
"""
_CONSUMER = """
import os
buf = bytearray(1 << 20); got = 0
while True:
    n = os.readv(0, [buf])
    if not n:
        break
    got += n
print(got)
"""


def _producer(total: int) -> tuple[subprocess.Popen[bytes], int]:
    """A separate process (the 'hypervisor' on the source) writing *total* random bytes into a pipe."""
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(total)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.fileno()


def _consumer() -> tuple[subprocess.Popen[bytes], int]:
    """A separate process (the destination 'hypervisor') reading a pipe and counting bytes."""
    proc = subprocess.Popen([sys.executable, "-c", _CONSUMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    return proc, proc.stdin.fileno()


def _consumer_count(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait()
    return int(out)


async def sender(mode: str, port: int, total: int, certdir: str) -> dict[str, float]:
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if mode.startswith("tls"):
        stream = _tls_stream(stream, certdir, server=False)
    block = memoryview(random_block(CHUNK * 16))
    start_cpu = cpu_seconds()
    if mode in ("raw", "tls_raw"):
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            off = sent % len(block)
            await stream.send_all(block[off : off + n] if off + n <= len(block) else block[:n])
            sent += n
        await stream.receive_some(1)
        await stream.aclose()
    elif mode == "fd_raw":
        proc, r = _producer(total)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        os.set_blocking(r, False)
        while True:
            try:
                n = os.readv(r, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(r)
                continue
            if not n:
                break
            await stream.send_all(view[:n])
        proc.wait()
        await stream.receive_some(1)
        await stream.aclose()
    else:
        async with open_connection(stream, client=True, keepalive_interval=None) as conn:
            s = await conn.open_stream(label="bench", digest=DigestAlgorithm.NONE)
            if mode == "fd_tunnel":
                proc, r = _producer(total)
                await s.send_fd(r)
                proc.wait()
            else:
                sent = 0
                while sent < total:
                    n = min(CHUNK, total - sent)
                    off = sent % len(block)
                    await s.send_all(block[off : off + n] if off + n <= len(block) else block[:n])
                    sent += n
            await s.send_eof()
            if os.environ.get("BENCH_STATS"):
                print(s.statistics(), conn.statistics().frames_sent, file=sys.stderr)
            assert await s.receive_some() == b""
    return {"cpu": cpu_seconds() - start_cpu}


async def receiver(mode: str, listener_fd: int, total: int, certdir: str) -> dict[str, float]:
    import socket as stdsocket

    from tunnel.transport import open_connection

    lsock = trio.socket.from_stdlib_socket(stdsocket.socket(fileno=listener_fd))
    listener = trio.SocketListener(lsock)
    stream: trio.abc.Stream = await listener.accept()
    if mode.startswith("tls"):
        stream = _tls_stream(stream, certdir, server=True)
    start = now()
    start_cpu = cpu_seconds()
    got = 0
    if mode in ("raw", "tls_raw"):
        while got < total:
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            got += len(data)
        await stream.send_all(b"k")
        await stream.aclose()
    elif mode == "fd_raw":
        proc, w = _consumer()
        os.set_blocking(w, False)
        while got < total:
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                try:
                    n = os.write(w, view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(w)
                    continue
                view = view[n:]
            got += len(data)
        got = await trio.to_thread.run_sync(_consumer_count, proc)
        await stream.send_all(b"k")
        await stream.aclose()
    else:
        async with open_connection(stream, client=False, keepalive_interval=None) as conn:
            s = await conn.accept_stream()
            if mode == "fd_tunnel":
                proc, w = _consumer()
                await s.receive_fd(w)
                got = await trio.to_thread.run_sync(_consumer_count, proc)
            else:
                while True:
                    data = await s.receive_view(CHUNK)
                    if not data:
                        break
                    got += len(data)
            await s.send_eof()
    elapsed = now() - start
    if got != total:
        raise SystemExit(f"{mode}: received {got} of {total} bytes")
    return {"seconds": elapsed, "cpu": cpu_seconds() - start_cpu}


def run_once(mode: str, total: int, certdir: str) -> dict[str, float]:
    import socket

    if mode == "tls_crypto":
        result = crypto_once(total, certdir)
        print(f"  cipher {result.pop('cipher')}", flush=True)
        return result  # type: ignore[return-value]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    recv = _spawn("recv", mode, total, certdir, fd=lsock.fileno())
    send = _spawn("send", mode, total, certdir, port=port)
    lsock.close()
    r = child_result(recv)
    s = child_result(send)
    return {"seconds": r["seconds"], "cpu": r["cpu"] + s["cpu"], "MBps": total / r["seconds"] / 1e6}


def _spawn(role: str, mode: str, total: int, certdir: str, port: int = 0, fd: int = -1):  # type: ignore[no-untyped-def]
    import subprocess

    args = [os.path.abspath(__file__), "--role", role, "--mode", mode, "--bytes", str(total), "--certdir", certdir]
    if role == "recv":
        args += ["--fd", str(fd)]
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True, pass_fds=(fd,))
    args += ["--port", str(port)]
    return run_child(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512 MiB per run instead of 2 GiB")
    p.add_argument("--size", type=int, help="MiB per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--certdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "send":
        emit(trio.run(sender, args.mode, args.port, args.bytes, args.certdir))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args.mode, args.fd, args.bytes, args.certdir))
        return
    total = (args.size or (512 if args.quick else 2048)) * 1024 * 1024
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as certdir:
        make_certs(certdir)
        for i in range(args.repeat):
            for mode in modes:
                r = run_once(mode, total, certdir)
                results[mode].append(r)
                print(f"run {i + 1} {mode:11s} {r['MBps']:8.1f} MB/s  cpu {r['cpu']:.2f} s", flush=True)
    out: dict[str, float | int] = {"bytes_per_run": total, "repeat": args.repeat}
    for mode in modes:
        out[f"{mode}_MBps"] = round(median([r["MBps"] for r in results[mode]]), 1)
    gib = total / 2**30
    if "tunnel" in modes:
        out["tunnel_cpu_s_per_GiB"] = round(median([r["cpu"] for r in results["tunnel"]]) / gib, 3)
    if "raw" in modes:
        out["raw_cpu_s_per_GiB"] = round(median([r["cpu"] for r in results["raw"]]) / gib, 3)
    for prefix, a, b in (("", "tunnel", "raw"), ("tls_", "tls_tunnel", "tls_raw"), ("fd_", "fd_tunnel", "fd_raw")):
        if a in modes and b in modes:
            out[f"{prefix}ratio"] = round(out[f"{a}_MBps"] / out[f"{b}_MBps"], 3)
    if "tls_tunnel" in modes and "tls_crypto" in modes:
        out["tls_tunnel_over_crypto"] = round(out["tls_tunnel_MBps"] / out["tls_crypto_MBps"], 3)
    if "tls_tunnel" in modes:
        out["tls_tunnel_cpu_s_per_GiB"] = round(median([r["cpu"] for r in results["tls_tunnel"]]) / gib, 3)
    emit(out)


if __name__ == "__main__":
    main()
