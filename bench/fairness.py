"""Fairness between concurrent streams on one tunnel connection.

Two OS processes over loopback TCP.  The sender opens K streams (default 16)
at once and sends the same number of random bytes on each; the receiver
reads every stream with ``receive_view`` and records, per stream, the bytes
divided by the time from the first accepted stream to that stream's EOF.
A second run moves the same total through one stream for comparison.

Usage: python bench/fairness.py [--quick] [--streams K] [--size MiB-per-stream]
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
from _pair import accept, connect, spawn_pair

CHUNK = 1024 * 1024


async def sender(port: int, streams: int, per_stream: int) -> dict:
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    block = memoryview(random_block(CHUNK * 16))
    stream = await connect(port)
    async with open_connection(stream, client=True, keepalive_interval=None) as conn:
        opened = [await conn.open_stream(label=f"s{i}", digest=DigestAlgorithm.NONE) for i in range(streams)]

        async def pump(i: int, s) -> None:  # type: ignore[no-untyped-def]
            sent = 0
            j = i
            while sent < per_stream:
                n = min(CHUNK, per_stream - sent)
                off = (j % 16) * CHUNK
                await s.send_all(block[off : off + n])
                sent += n
                j += 1
            await s.send_eof()
            assert await s.receive_some() == b""

        async with trio.open_nursery() as nursery:
            for i, s in enumerate(opened):
                nursery.start_soon(pump, i, s)
    return {}


async def receiver(fd: int, streams: int, per_stream: int) -> dict:
    from tunnel.transport import open_connection

    stream = await accept(fd)
    results: dict[str, float] = {}
    async with open_connection(stream, client=False, keepalive_interval=None) as conn:
        first = await conn.accept_stream()
        start = now()

        async def drain(s) -> None:  # type: ignore[no-untyped-def]
            got = 0
            while True:
                data = await s.receive_view(CHUNK)
                if not data:
                    break
                got += len(data)
            elapsed = now() - start
            if got != per_stream:
                raise SystemExit(f"stream {s.label}: received {got} of {per_stream} bytes")
            results[s.label] = elapsed
            await s.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, first)
            for _ in range(streams - 1):
                nursery.start_soon(drain, await conn.accept_stream())
    return {"seconds": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 MiB per stream instead of 64")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--size", type=int, help="MiB per stream")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "send":
        emit(trio.run(sender, args.port, args.streams, args.bytes))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args.fd, args.streams, args.bytes))
        return
    per_stream = (args.size or (16 if args.quick else 64)) * 1024 * 1024
    k = args.streams
    _, r = spawn_pair(__file__, ["--streams", str(k), "--bytes", str(per_stream)])
    secs = r["seconds"]
    mbps = {label: per_stream / t / 1e6 for label, t in secs.items()}
    for label in sorted(mbps, key=lambda x: int(x[1:])):
        print(f"{label:4s} done at {secs[label]:.3f} s  {mbps[label]:8.1f} MB/s", flush=True)
    aggregate = per_stream * k / max(secs.values()) / 1e6
    _, r1 = spawn_pair(__file__, ["--streams", "1", "--bytes", str(per_stream * k)])
    single = per_stream * k / max(r1["seconds"].values()) / 1e6
    print(f"aggregate {aggregate:.1f} MB/s over {k} streams; one stream, same total: {single:.1f} MB/s")
    emit(
        {
            "streams": k,
            "bytes_per_stream": per_stream,
            "min_over_max": round(min(mbps.values()) / max(mbps.values()), 3),
            "min_stream_MBps": round(min(mbps.values()), 1),
            "max_stream_MBps": round(max(mbps.values()), 1),
            "aggregate_MBps": round(aggregate, 1),
            "single_stream_MBps": round(single, 1),
        }
    )


if __name__ == "__main__":
    main()
