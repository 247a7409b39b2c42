"""``tunnel demo`` with a memory-image guest, for machines without QEMU.

The guest's memory is a sparse image file with random data, dirtied by a
simulated guest while the migration runs; the source daemon does pre-copy
passes until what is left fits the downtime budget, then pauses the guest
and sends the rest.  Success means the destination committed an image whose
content digest equals the source's final image.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..client import connect
from ..control import DaemonError
from ._demokit import Clock, Daemons, migrate_with_progress, say
from ._progress import format_bytes

__all__ = ["image_demo"]


async def image_demo(args: argparse.Namespace, root: str, daemons: Daemons, clock: Clock) -> dict[str, Any]:
    size_mib = max(2 * args.memory_mib, 16)
    definition = {
        "name": "demo-vm",
        "description": "tunnel demo guest: a memory image dirtied by a simulated guest",
        "image": {"size_mib": size_mib, "random_mib": args.memory_mib, "dirty_pages_per_s": 2000},
    }
    why = "as asked" if args.guest == "image" else "QEMU is not installed"
    say(args, f"Using a memory-image guest ({why}): a sparse image with random data, dirtied by a simulated guest.")
    say(args, "Starting two daemons (source and destination) on unix sockets ...")
    src = await daemons.start("source")
    dst = await daemons.start("destination")
    clock.lap("starting the daemons")
    async with connect(src) as source, connect(dst) as destination:
        await source.define(definition)
        say(args, f"Creating the guest's {size_mib} MiB image with {args.memory_mib} MiB of random data and starting it ...")
        await source.start("demo-vm")
        clock.lap("creating the image and starting the guest")
        say(args, f"Migrating demo-vm ({size_mib} MiB image, {args.memory_mib} MiB of it data) PEER2PEER + TUNNELLED: {src} -> {dst}")
        started = time.monotonic()
        result = await migrate_with_progress(source, "demo-vm", dst, tunnelled=True, show=not args.json, verify=True)
        seconds = time.monotonic() - started
        clock.lap("migrating (both daemons also took the image's sha256 at the switch-over)")
        state = (await destination.domain_info("demo-vm"))["state"]
        await destination.destroy("demo-vm")
    # Digests taken by the daemons at the switch-over: the destination guest runs (and dirties pages) after it.
    want, got = result.get("source_image_sha256"), result.get("destination_image_sha256")
    if not want or got != want:
        raise DaemonError(f"the destination's memory image differs from the source's ({got} != {want})")
    processed = result.get("data_processed") or 0
    passes = result.get("iteration") or 0
    say(args, f"  Done in {seconds:.2f} s: {format_bytes(processed)} of pages at {format_bytes(processed / seconds)}/s in {passes} passes"
               " (the first sends every page that holds data; each later one sends what the guest dirtied meanwhile;"
               " the last runs with the guest paused).")
    say(args, f"  {format_bytes(result.get('tunnel_bytes_sent'))} went through the tunnel: the pages plus their addresses and framing;"
               f" {result.get('constant_pages') or 0} pages that were all zeros went as short runs instead of 4 KiB each.")
    say(args, f"  The destination guest is {state}; its image has the same sha256 as the source's at the switch-over.")
    return {
        "guest": "memory-image",
        "image_mib": size_mib,
        "tunnelled": {
            "seconds": round(seconds, 3),
            "bytes_on_wire": result.get("tunnel_bytes_sent"),
            "page_bytes": result.get("data_processed"),
            "iterations": result.get("iteration"),
            "destination_state": state,
            "memory_verified": True,
        },
    }
