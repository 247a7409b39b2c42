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
from typing import TYPE_CHECKING, Any

from ..client import connect
from ..daemon import DaemonError
from ._progress import format_bytes

if TYPE_CHECKING:
    from ._demo import _Daemons

__all__ = ["image_demo"]


async def image_demo(args: argparse.Namespace, root: str, daemons: _Daemons) -> dict[str, Any]:
    from ._demo import _migrate_with_progress, _say

    size_mib = max(2 * args.memory_mib, 16)
    definition = {
        "name": "demo-vm",
        "description": "tunnel demo guest: a memory image dirtied by a simulated guest",
        "image": {"size_mib": size_mib, "random_mib": args.memory_mib, "dirty_pages_per_s": 2000},
    }
    why = "as asked" if args.guest == "image" else "QEMU is not installed"
    _say(args, f"Using a memory-image guest ({why}): a sparse image with random data, dirtied by a simulated guest.")
    _say(args, "Starting two daemons on unix sockets ...")
    src = await daemons.start("source")
    dst = await daemons.start("destination")
    async with connect(src) as source, connect(dst) as destination:
        await source.define(definition)
        await source.start("demo-vm")
        _say(args, f"Migrating demo-vm ({size_mib} MiB image, {args.memory_mib} MiB of it data) PEER2PEER + TUNNELLED: {src} -> {dst}")
        started = time.monotonic()
        result = await _migrate_with_progress(source, "demo-vm", dst, tunnelled=True, show=not args.json, verify=True)
        seconds = time.monotonic() - started
        state = (await destination.domain_info("demo-vm"))["state"]
        await destination.destroy("demo-vm")
    # Digests taken by the daemons at the switch-over: the destination guest runs (and dirties pages) after it.
    want, got = result.get("source_image_sha256"), result.get("destination_image_sha256")
    if not want or got != want:
        raise DaemonError(f"the destination's memory image differs from the source's ({got} != {want})")
    _say(
        args,
        f"  done in {seconds:.2f} s: {format_bytes(result.get('data_processed'))} of pages in {result.get('iteration')} passes"
        f" at {format_bytes((result.get('data_processed') or 0) / seconds)}/s, {format_bytes(result.get('tunnel_bytes_sent'))} on the wire"
        f" ({result.get('zero_pages', 0)} zero pages sent as runs); destination {state}; image digests equal",
    )
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
