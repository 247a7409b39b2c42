"""RPC round-trip latency on a tunnel connection, idle and under stream load.

Two OS processes over loopback TCP, one tunnel connection.  The client
(sender) first makes N sequential echo calls on the idle connection, then
opens a stream and sends random data as fast as it can while making M more
sequential echo calls; the server reads the stream with ``receive_view`` and
discards it.

Usage: python bench/rpc_latency.py [--quick] [--idle N] [--loaded M] [--body BYTES]
The last line printed is one JSON object (MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio
from _common import emit, now, random_block
from _pair import accept, connect, percentile, spawn_pair

PROGRAM, ECHO = 0x4242, 1
CHUNK = 1024 * 1024


async def sender(port: int, idle: int, loaded: int, body_size: int) -> dict:
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    body = os.urandom(body_size)
    stream = await connect(port)
    async with open_connection(stream, client=True, keepalive_interval=None) as conn:
        for _ in range(50):  # warm-up
            await conn.call(PROGRAM, ECHO, body)
        idle_lat = []
        for _ in range(idle):
            t = now()
            reply = await conn.call(PROGRAM, ECHO, body)
            idle_lat.append(now() - t)
            assert reply == body
        s = await conn.open_stream(label="load", digest=DigestAlgorithm.NONE)
        block = memoryview(random_block(CHUNK * 16))
        stop = trio.Event()
        sent = [0]

        async def pump() -> None:
            i = 0
            while not stop.is_set():
                off = (i % 16) * CHUNK
                await s.send_all(block[off : off + CHUNK])
                sent[0] += CHUNK
                i += 1

        loaded_lat = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            await trio.sleep(0.3)  # let the stream fill the pipe
            t0, b0 = now(), sent[0]
            for _ in range(loaded):
                t = now()
                reply = await conn.call(PROGRAM, ECHO, body)
                loaded_lat.append(now() - t)
                assert reply == body
            t1, b1 = now(), sent[0]
            stop.set()
        await s.send_eof()
        assert await s.receive_some() == b""
    return {
        "idle": idle_lat,
        "loaded": loaded_lat,
        "loaded_stream_MBps": (b1 - b0) / (t1 - t0) / 1e6,
        "loaded_seconds": t1 - t0,
    }


async def receiver(fd: int) -> dict:
    from tunnel.transport import open_connection

    stream = await accept(fd)
    async with open_connection(stream, client=False, keepalive_interval=None) as conn:

        async def echo(body: bytes) -> bytes:
            return body

        conn.register(PROGRAM, ECHO, echo)
        s = await conn.accept_stream()
        got = 0
        while True:
            data = await s.receive_view(CHUNK)
            if not data:
                break
            got += len(data)
        await s.send_eof()
    return {"received": got}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer calls")
    p.add_argument("--idle", type=int, help="idle calls (default 2000, quick 1000)")
    p.add_argument("--loaded", type=int, help="calls under load (default 2000, quick 500)")
    p.add_argument("--body", type=int, default=64, help="call body bytes (default 64)")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    idle = args.idle or (1000 if args.quick else 2000)
    loaded = args.loaded or (500 if args.quick else 2000)
    if args.role == "send":
        emit(trio.run(sender, args.port, idle, loaded, args.body))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args.fd))
        return
    extra = ["--idle", str(idle), "--loaded", str(loaded), "--body", str(args.body)]
    s, r = spawn_pair(__file__, extra)
    ms = lambda v: round(v * 1000, 3)
    out = {
        "body_bytes": args.body,
        "idle_calls": len(s["idle"]),
        "loaded_calls": len(s["loaded"]),
        "idle_p50_ms": ms(percentile(s["idle"], 50)),
        "idle_p99_ms": ms(percentile(s["idle"], 99)),
        "idle_max_ms": ms(max(s["idle"])),
        "loaded_p50_ms": ms(percentile(s["loaded"], 50)),
        "loaded_p99_ms": ms(percentile(s["loaded"], 99)),
        "loaded_max_ms": ms(max(s["loaded"])),
        "loaded_stream_MBps": round(s["loaded_stream_MBps"], 1),
    }
    print(f"idle   p50 {out['idle_p50_ms']} ms  p99 {out['idle_p99_ms']} ms  max {out['idle_max_ms']} ms")
    print(
        f"loaded p50 {out['loaded_p50_ms']} ms  p99 {out['loaded_p99_ms']} ms  max {out['loaded_max_ms']} ms"
        f"  stream {out['loaded_stream_MBps']} MB/s over {s['loaded_seconds']:.2f} s ({r['received']} bytes received)"
    )
    emit(out)


if __name__ == "__main__":
    main()
