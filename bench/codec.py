"""Encode + decode throughput of the sans-I/O core alone (no sockets, no trio).

Two ``tunnel.Connection`` objects in one process, with windows as large as
the protocol allows.  The sender queues records, the receiver is fed the
sender's buffers one by one (as a trio driver writing them with
``send_all`` and a peer reading them would see them) and acknowledges every
record as soon as it arrives, passing its WINDOW_UPDATEs back.

Scenarios:

* ``data``: ``send_data`` of one 256 KiB buffer per frame.
* ``pages``: ``send_record`` of a ``PagesRecord`` of 64 pages of 4 KiB per frame (256 KiB + 528
  bytes of header and addresses), each of the three buffers fed separately:
  the reader must assemble the frame (one copy), as it does whenever a PAGES
  frame spans several reads.
* ``pages_joined``: the same frames, header and payload first copied into
  one reusable buffer and fed whole, so the reader decodes in place.

MB = 1e6 bytes; only payload bytes are counted.  Each scenario moves
``--total`` bytes, is repeated ``--repeat`` times and the median is
reported.  The last line of output is one JSON object.

    python3 bench/codec.py            # 2 GiB per run
    python3 bench/codec.py --quick    # 256 MiB per run
    python3 bench/codec.py --profile pages   # cProfile one run instead
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tunnel

FRAME = 256 * 1024
PAGE = 4096
PAGES_PER_FRAME = FRAME // PAGE
BIG = 2**31 - 1


def make_pair() -> tuple[tunnel.Connection, tunnel.Connection, int]:
    settings = tunnel.Settings(initial_stream_window=BIG, connection_window=BIG, max_frame_size=1024 * 1024)
    a = tunnel.Connection(client=True, settings=settings)
    b = tunnel.Connection(client=False, settings=settings)
    b.receive_data(a.bytes_to_send())
    a.receive_data(b.bytes_to_send())
    sid = a.open_stream(kind=tunnel.StreamKind.MEMORY)
    (opened,) = b.receive_data(a.bytes_to_send())
    assert isinstance(opened, tunnel.StreamOpened)
    return a, b, sid


def run_data(total: int) -> tuple[float, int, int]:
    """Seconds, payload bytes and frames for *total* bytes of DATA."""
    a, b, sid = make_pair()
    payload = bytes(range(256)) * (FRAME // 256)
    frames = total // FRAME
    moved = 0
    send_data, data_to_send = a.send_data, a.data_to_send
    receive, ack, b_out = b.receive_data, b.acknowledge_received, b.data_to_send
    start = time.perf_counter()
    for _ in range(frames):
        send_data(sid, payload)
        for buf in data_to_send():
            for event in receive(buf):
                n = event.flow_controlled_length  # type: ignore[attr-defined]
                moved += n
                ack(sid, n)
        back = b_out()
        if back:
            for buf in back:
                a.receive_data(buf)
    elapsed = time.perf_counter() - start
    assert moved == frames * FRAME, (moved, frames * FRAME)
    return elapsed, moved, frames


def run_pages(total: int, joined: bool) -> tuple[float, int, int]:
    """Seconds, page bytes and frames for *total* bytes of PAGES."""
    a, b, sid = make_pair()
    data = bytes(range(256)) * (FRAME // 256)
    frames = total // FRAME
    moved = 0
    # Each frame covers the next 64 pages of a notional guest RAM.
    address_sets = [tuple((i * PAGES_PER_FRAME + k) * PAGE for k in range(PAGES_PER_FRAME)) for i in range(256)]
    scratch = bytearray(FRAME + 4096)
    view = memoryview(scratch)
    send_record, data_to_send, record = a.send_record, a.data_to_send, tunnel.PagesRecord
    receive, ack, b_out = b.receive_data, b.acknowledge_received, b.data_to_send
    start = time.perf_counter()
    for i in range(frames):
        # A new record per batch, as a source reader yields them.
        send_record(sid, record(region=0, page_size=PAGE, addresses=address_sets[i & 255], data=data))
        parts = data_to_send()
        if joined:
            pos = 0
            for part in parts:
                n = len(part)
                view[pos : pos + n] = part
                pos += n
            feeds = [view[:pos]]
        else:
            feeds = parts
        for buf in feeds:
            for event in receive(buf):
                moved += len(event.record.data)  # type: ignore[attr-defined]
                ack(sid, event.flow_controlled_length)  # type: ignore[attr-defined]
        back = b_out()
        if back:
            for buf in back:
                a.receive_data(buf)
    elapsed = time.perf_counter() - start
    assert moved == frames * FRAME, (moved, frames * FRAME)
    return elapsed, moved, frames


SCENARIOS: dict[str, Callable[[int], tuple[float, int, int]]] = {
    "data": run_data,
    "pages": lambda total: run_pages(total, joined=False),
    "pages_joined": lambda total: run_pages(total, joined=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB per run instead of 2 GiB")
    parser.add_argument("--total", type=int, default=None, help="payload bytes per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", choices=sorted(SCENARIOS), help="cProfile one run of this scenario and exit")
    args = parser.parse_args()
    total = args.total or (256 * 2**20 if args.quick else 2 * 2**30)

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(SCENARIOS[args.profile], total)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    print(f"tunnel codec benchmark: {total / 2**20:.0f} MiB per run, {args.repeat} runs, frames of {FRAME // 1024} KiB")
    print(f"python {platform.python_version()} on {platform.machine()}")
    result: dict[str, object] = {"total_bytes": total, "repeat": args.repeat, "frame_bytes": FRAME, "page_size": PAGE}
    for name, fn in SCENARIOS.items():
        fn(min(total, 32 * 2**20))  # warm up
        rates, per_frame = [], []
        for _ in range(args.repeat):
            elapsed, moved, frames = fn(total)
            rates.append(moved / elapsed / 1e6)
            per_frame.append(elapsed / frames * 1e6)
        rate, us = statistics.median(rates), statistics.median(per_frame)
        print(
            f"{name:13s} median {rate:9.0f} MB/s  {us:7.2f} us/frame  "
            f"(runs: {', '.join(f'{r:.0f}' for r in rates)} MB/s)"
        )
        result[f"{name}_MBps"] = round(rate, 1)
        result[f"{name}_us_per_frame"] = round(us, 3)
        result[f"{name}_runs_MBps"] = [round(r, 1) for r in rates]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
