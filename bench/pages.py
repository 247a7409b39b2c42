"""Migrating a sparse memory image in page mode between two processes.

The source process reads an image of ``--size`` GiB (default 8; ``--quick``:
1 GiB) of which ``--data`` (default 10%) is random data in 2 MiB extents and
the rest holes, and sends it with the ``memory-image`` reader over a tunnel
connection on loopback TCP; the destination process applies it with the
``memory-image`` writer (temporary file, fsync, rename).  Runs:

* ``plain``: the image as it is, no guest running;
* ``dirtying``: a simulated guest dirties ``--dirty-rate`` pages per second
  of the source image during the migration (pre-copy passes until the rest
  fits ``--downtime``, then the guest pauses for the final pass);
* with ``--compress``, a compressible image (10% of pages are English-like
  text) sent without and with zstd, to show what compression buys.

After each run the destination image is checked against the source by a
sparse-aware content digest (outside the timing).  ``bytes_on_wire`` is
every byte the sender's connection wrote (frame headers, addresses, zero
runs included); ``payload_bytes`` is the image's non-zero content.  MB =
10**6 bytes.  The last line printed is one JSON object.

Usage: python bench/pages.py [--quick] [--size GiB] [--compress] [--dirty-rate N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trio
from _common import cpu_seconds, emit, now
from _pair import accept, connect, spawn_pair

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
EXTENT = 2 * MiB
_TEXT = b"Migrating a guest moves its memory page by page; most pages repeat what others hold. "


def make_image(path: str, size: int, fraction: float, *, text: bool = False, seed: int = 1) -> None:
    """A sparse image of *size* bytes with *fraction* of it in data extents (random or text)."""
    rng = random.Random(seed)
    slots = size // EXTENT
    chosen = sorted(rng.sample(range(slots), round(slots * fraction)))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        filler = (_TEXT * (EXTENT // len(_TEXT) + 1))[:EXTENT] if text else b""
        for slot in chosen:
            os.pwrite(fd, filler if text else os.urandom(EXTENT), slot * EXTENT)
    finally:
        os.close(fd)


def content(path: str) -> tuple[str, int]:
    """(content digest, bytes in non-zero pages) of an image."""
    from tunnel.endpoints import image_digest
    from tunnel.endpoints._imagefile import page_extents, read_into

    digest = image_digest(path, PAGE)
    zero = bytes(PAGE)
    buf = bytearray(256 * PAGE)
    view = memoryview(buf)
    nonzero = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for first, count in page_extents(fd, size, PAGE):
            end = (first + count) * PAGE
            for offset in range(first * PAGE, end, len(buf)):
                length = min(len(buf), end - offset)
                read_into(fd, view[:length], offset)
                nonzero += sum(1 for at in range(0, length, PAGE) if not buf.startswith(zero, at))
    finally:
        os.close(fd)
    return digest, nonzero * PAGE


# ---------------------------------------------------------------------------
# The two processes


async def sender(args: argparse.Namespace) -> dict[str, Any]:
    from tunnel.endpoints import DirtyTracker, MemoryImageReader, PrecopyPolicy, SimulatedGuest, send_source
    from tunnel.transport import open_connection

    stream = await connect(args.port)
    size = os.stat(args.image).st_size
    result: dict[str, Any] = {}
    async with open_connection(stream, client=True, keepalive_interval=None) as conn, trio.open_nursery() as nursery:
        tracker = guest = None
        if args.dirty_rate:
            tracker = DirtyTracker(size // PAGE)
            guest = SimulatedGuest(args.image, tracker, pages_per_second=args.dirty_rate, seed=2)
            await nursery.start(guest.run)
        policy = PrecopyPolicy(downtime_s=args.downtime)
        reader = MemoryImageReader(args.image, tracker=tracker, guest=guest, policy=policy)
        start, start_cpu = now(), cpu_seconds()
        sent = await send_source(conn, reader, label="memory", compress=args.compress_stream)
        result["seconds"] = now() - start
        result["cpu"] = cpu_seconds() - start_cpu
        if guest is not None:
            result["guest_pages_dirtied"] = guest.pages_dirtied
            guest.stop()
        stats = sent.statistics
        progress = sent.progress
        assert progress is not None
        result.update(
            bytes_on_wire=conn.statistics().bytes_sent,
            stream_payload_bytes=stats.bytes_sent,
            pages_raw_bytes=stats.pages_raw_bytes,
            pages_wire_bytes=stats.pages_wire_bytes,
            iterations=progress.iteration + 1,
            pages_sent=progress.pages_sent,
            zero_pages=progress.zero_pages,
            converged=progress.converged,
            dirty_pages_per_s=round(progress.dirty_pages_per_s, 1),
            expected_downtime_s=progress.expected_downtime_s,
            rate_MBps=None if progress.rate_bytes_per_s is None else round(progress.rate_bytes_per_s / 1e6, 1),
            compression=conn.compression,
        )
    return result


async def receiver(args: argparse.Namespace) -> dict[str, Any]:
    from tunnel.endpoints import MemoryImageWriter, receive_into
    from tunnel.transport import open_connection

    class TimedWriter(MemoryImageWriter):
        commit_s = 0.0

        async def commit(self) -> None:
            start = now()
            await super().commit()
            self.commit_s = now() - start

    stream = await accept(args.fd)
    async with open_connection(stream, client=False, keepalive_interval=None) as conn:
        s = await conn.accept_stream()
        start, start_cpu = now(), cpu_seconds()
        writer = TimedWriter(args.target)
        await receive_into(s, writer)
        return {
            "seconds": now() - start,
            "cpu": cpu_seconds() - start_cpu,
            "commit_s": writer.commit_s,
            "pages_written": writer.pages_written,
            "pages_zeroed": writer.pages_zeroed,
        }


# ---------------------------------------------------------------------------
# The parent


def run(image: str, target: str, *, dirty_rate: int = 0, downtime: float, compress: bool = False) -> dict[str, Any]:
    extra = ["--image", image, "--target", target, "--dirty-rate", str(dirty_rate), "--downtime", str(downtime)]
    if compress:
        extra.append("--compress-stream")
    s, r = spawn_pair(__file__, extra, timeout=1800)
    digest_src, payload = content(image)
    digest_dst, _ = content(target)
    if digest_src != digest_dst:
        raise SystemExit(f"destination image differs from the source ({image} vs {target})")
    size = os.stat(image).st_size
    out: dict[str, Any] = {
        "image_GiB": round(size / GiB, 3),
        "payload_bytes": payload,
        "bytes_on_wire": s["bytes_on_wire"],
        "wire_over_payload": round(s["bytes_on_wire"] / payload, 4) if payload else None,
        "seconds": round(s["seconds"], 3),
        "effective_MBps": round(size / s["seconds"] / 1e6, 1),
        "iterations": s["iterations"],
        "commit_s": round(r["commit_s"], 3),
        "cpu_s": round(s["cpu"] + r["cpu"], 3),
        "pages_raw_bytes": s["pages_raw_bytes"],
        "pages_wire_bytes": s["pages_wire_bytes"],
        "verified": True,
    }
    if dirty_rate:
        out.update(
            dirty_rate_pages_per_s=dirty_rate,
            measured_dirty_pages_per_s=s["dirty_pages_per_s"],
            guest_pages_dirtied=s["guest_pages_dirtied"],
            converged=s["converged"],
            expected_downtime_s=None if s["expected_downtime_s"] is None else round(s["expected_downtime_s"], 4),
            downtime_budget_s=downtime,
            measured_rate_MBps=s["rate_MBps"],
            pages_zeroed=r["pages_zeroed"],
        )
    os.unlink(target)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1 GiB image instead of 8 GiB")
    p.add_argument("--size", type=float, help="image size in GiB")
    p.add_argument("--data", type=float, default=0.1, help="fraction of the image that holds data (default 0.1)")
    p.add_argument("--dirty-rate", type=int, default=5_000, help="pages/s the simulated guest dirties (default 5000)")
    p.add_argument("--downtime", type=float, default=0.05, help="pre-copy downtime budget, seconds (default 0.05)")
    p.add_argument("--compress", action="store_true", help="also migrate a compressible image without and with zstd")
    p.add_argument("--dir", help="where the images go (default: the temporary directory)")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--compress-stream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "send":
        emit(trio.run(sender, args))
        return
    if args.role == "recv":
        emit(trio.run(receiver, args))
        return

    size = int((args.size or (1 if args.quick else 8)) * GiB) // EXTENT * EXTENT
    base = args.dir or tempfile.gettempdir()
    need = 3 * size * args.data + GiB  # source data, destination data, dirtied pages, slack
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"{base}: {free / GiB:.1f} GiB free, the benchmark needs {need / GiB:.1f} GiB")
    work = tempfile.mkdtemp(prefix="tunnel-pages-", dir=base)
    try:
        image, target = os.path.join(work, "guest.mem"), os.path.join(work, "incoming.mem")
        print(f"creating a {size / GiB:.1f} GiB image ({args.data:.0%} random data) in {work}", flush=True)
        make_image(image, size, args.data)
        result = run(image, target, downtime=args.downtime)
        print(
            f"plain     {result['effective_MBps']:9.1f} MB/s  {result['seconds']:.2f} s  wire/payload {result['wire_over_payload']}"
        )
        dirtying = run(image, target, dirty_rate=args.dirty_rate, downtime=args.downtime)
        print(
            f"dirtying  {dirtying['effective_MBps']:9.1f} MB/s  {dirtying['seconds']:.2f} s  "
            f"{dirtying['iterations']} passes, converged {dirtying['converged']}",
            flush=True,
        )
        result["dirtying"] = dirtying
        if args.compress:
            os.unlink(image)
            text = os.path.join(work, "text.mem")
            make_image(text, size, args.data, text=True)
            plain = run(text, target, downtime=args.downtime)
            packed = run(text, target, downtime=args.downtime, compress=True)
            result["compress"] = {
                "image": "text pages",
                "payload_bytes": plain["payload_bytes"],
                "plain_bytes_on_wire": plain["bytes_on_wire"],
                "plain_seconds": plain["seconds"],
                "zstd_bytes_on_wire": packed["bytes_on_wire"],
                "zstd_seconds": packed["seconds"],
                "zstd_pages_raw_bytes": packed["pages_raw_bytes"],
                "zstd_pages_wire_bytes": packed["pages_wire_bytes"],
                "wire_ratio": round(packed["bytes_on_wire"] / plain["bytes_on_wire"], 4),
                "cpu_s_plain": plain["cpu_s"],
                "cpu_s_zstd": packed["cpu_s"],
            }
            print(f"compress  wire {plain['bytes_on_wire']} -> {packed['bytes_on_wire']} bytes", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
