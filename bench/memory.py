"""Peak RSS of the sender and receiver while moving data through one stream.

For each size, fresh sender and receiver processes move that many random
bytes through one tunnel stream over loopback TCP (``send_all`` of 1 MiB,
``receive_view``) and report ``ru_maxrss``.  ``growth`` is the largest ratio,
over both sides, of the peak at the biggest size to the peak at the smallest:
close to 1.0 means memory does not grow with the amount transferred.

Usage: python bench/memory.py [--quick] [--sizes MiB,MiB,...]
The last line printed is one JSON object (RSS in MiB).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio
from _common import emit, now, random_block
from _pair import accept, connect, spawn_pair

CHUNK = 1024 * 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


async def sender(port: int, total: int) -> dict:
    from tunnel import DigestAlgorithm
    from tunnel.transport import open_connection

    block = memoryview(random_block(CHUNK * 16))
    baseline = peak_rss_mib()
    stream = await connect(port)
    async with open_connection(stream, client=True, keepalive_interval=None) as conn:
        s = await conn.open_stream(label="mem", digest=DigestAlgorithm.NONE)
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            off = sent % len(block)
            await s.send_all(block[off : off + n])
            sent += n
        await s.send_eof()
        assert await s.receive_some() == b""
    return {"peak_rss_mib": peak_rss_mib(), "baseline_mib": baseline}


async def receiver(fd: int, total: int) -> dict:
    from tunnel.transport import open_connection

    baseline = peak_rss_mib()
    stream = await accept(fd)
    start = now()
    got = 0
    async with open_connection(stream, client=False, keepalive_interval=None) as conn:
        s = await conn.accept_stream()
        while True:
            data = await s.receive_view(CHUNK)
            if not data:
                break
            got += len(data)
        await s.send_eof()
    if got != total:
        raise SystemExit(f"received {got} of {total} bytes")
    return {"peak_rss_mib": peak_rss_mib(), "baseline_mib": baseline, "seconds": now() - start}


def _label(mib: int) -> str:
    return f"{mib // 1024}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB instead of 1 GiB and 4 GiB")
    p.add_argument("--sizes", help="comma-separated MiB per run")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "send":
        emit(trio.run(sender, args.port, args.bytes))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args.fd, args.bytes))
        return
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([256, 1024] if args.quick else [1024, 4096])
    peaks: dict[str, dict[str, float]] = {}
    for mib in sizes:
        s, r = spawn_pair(__file__, ["--bytes", str(mib * 1024 * 1024)])
        label = _label(mib)
        peaks[label] = {"sender": round(s["peak_rss_mib"], 1), "receiver": round(r["peak_rss_mib"], 1)}
        print(
            f"{label:7s} sender peak {s['peak_rss_mib']:7.1f} MiB (before connecting {s['baseline_mib']:.1f})"
            f"  receiver peak {r['peak_rss_mib']:7.1f} MiB (before {r['baseline_mib']:.1f})"
            f"  {mib * 1024 * 1024 / r['seconds'] / 1e6:.0f} MB/s",
            flush=True,
        )
    small, big = peaks[_label(sizes[0])], peaks[_label(sizes[-1])]
    growth = max(big[side] / small[side] for side in ("sender", "receiver"))
    emit({"peak_rss_mib": peaks, "growth": round(growth, 3)})


if __name__ == "__main__":
    main()
