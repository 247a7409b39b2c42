"""``tunnel demo``: the main job on an embedded default, with no set-up.

Two daemons start as separate processes on unix sockets in a temporary
directory; a guest is defined on the first with random bytes loaded into its
RAM (QEMU's ``loader`` device, on the source only), started, and migrated
PEER2PEER + TUNNELLED to the second.  The destination QEMU never saw the
random file, so when its memory holds those bytes they came through the
tunnel.  Everything started is stopped and the directory removed, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import trio

from ..client import connect
from ..control import DaemonError
from ..qemu import qemu_binary
from ._demokit import Clock, Daemons, migrate_with_progress, say
from ._image_demo import image_demo
from ._progress import format_bytes

__all__ = ["run_demo"]

MiB = 1024 * 1024
#: Where the random bytes go in guest RAM: above what firmware touches.
LOAD_ADDRESS = 16 * MiB


def _random_file(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


async def _qemu_demo(args: argparse.Namespace, root: str, daemons: Daemons, clock: Clock) -> dict[str, Any]:
    size = args.memory_mib * MiB
    rand = os.path.join(root, "guest-ram.bin")
    say(args, f"Writing {args.memory_mib} MiB of random data for the guest's RAM (the bytes the destination must end up with) ...")
    expected = await trio.to_thread.run_sync(_random_file, rand, size)
    clock.lap("writing random data")
    ram_mib = args.memory_mib + 64
    definition = {
        "name": "demo-vm",
        "description": "tunnel demo guest: random bytes loaded into RAM on the source only",
        "qemu": [
            "-machine", "q35", "-accel", "tcg", "-m", str(ram_mib), "-nodefaults", "-display", "none",
            "-device", f"loader,file={rand},addr={LOAD_ADDRESS:#x},force-raw=on",
        ],
    }
    say(args, "Starting two daemons (source and destination) on unix sockets ...")
    src = await daemons.start("source")
    dst = await daemons.start("destination")
    clock.lap("starting the daemons")
    summary: dict[str, Any] = {"guest": "qemu", "guest_ram_mib": ram_mib, "random_mib": args.memory_mib}
    runs = [("tunnelled", True)] + ([("native", False)] if args.native else [])
    for label, tunnelled in runs:
        async with connect(src) as source, connect(dst) as destination:
            await source.define(definition)
            await source.start("demo-vm")
            clock.lap(f"starting QEMU ({label})")
            say(args, f"Migrating demo-vm ({ram_mib} MiB RAM) PEER2PEER{' + TUNNELLED' if tunnelled else ''}: {src} -> {dst}")
            started = time.monotonic()
            result = await migrate_with_progress(source, "demo-vm", dst, tunnelled=tunnelled, show=not args.json)
            seconds = time.monotonic() - started
            clock.lap(f"migrating ({label})")
            # pmemsave writes into the guest's own directory on the destination
            dump = os.path.join(root, "destination", "run", "demo-vm", "dump.bin")
            reply = await destination.monitor(
                "demo-vm", {"execute": "pmemsave", "arguments": {"val": LOAD_ADDRESS, "size": size, "filename": "dump.bin"}}
            )
            if "error" in reply:
                raise DaemonError(f"pmemsave on the destination failed: {reply['error'].get('desc')}")
            got = await trio.to_thread.run_sync(_file_digest, dump)
            os.unlink(dump)
            state = (await destination.domain_info("demo-vm"))["state"]
            await destination.destroy("demo-vm")  # transient there: it goes with its QEMU
            clock.lap(f"verifying the destination's memory ({label})")
        if got != expected:
            raise DaemonError(f"{label} migration: the destination's memory differs from the source's (sha256 {got} != {expected})")
        summary[label] = {
            "seconds": round(seconds, 3),
            "ram_bytes_sent": result.get("data_processed"),
            "bytes_on_wire": result.get("tunnel_bytes_sent") or result.get("data_processed"),
            "return_path_bytes": result.get("tunnel_bytes_received"),
            "MBps": round((result.get("data_processed") or 0) / seconds / 1e6, 1),
            "destination_state": state,
            "memory_verified": True,
        }
        processed = result.get("data_processed") or 0
        say(args, f"  Done in {seconds:.2f} s: QEMU sent {format_bytes(processed)} of guest RAM at {format_bytes(processed / seconds)}/s"
                   " (pages that were all zeros cost a few bytes each, so this is about the random data).")
        if tunnelled:
            say(args, f"  The tunnel stream carried {format_bytes(result.get('tunnel_bytes_sent'))} forward (RAM plus QEMU's device state"
                       f" and framing) and {result.get('tunnel_bytes_received') or 0} bytes back: QEMU's return path, the destination's"
                       " acknowledgements, which need a two-way stream.")
        say(args, f"  The destination guest is {state}; its memory holds the {args.memory_mib} MiB of random data it never saw"
                   " except through the migration (sha256 equal).")
    return summary


async def run_demo(args: argparse.Namespace) -> int:
    if args.memory_mib < 1:
        raise DaemonError("--memory-mib must be at least 1")
    clock = Clock()
    root = tempfile.mkdtemp(prefix="tunnel-demo-")
    os.chmod(root, 0o700)
    daemons = Daemons(root)
    interrupted: list[bool] = []
    summary: dict[str, Any] = {}
    # Ctrl-C cancels the demo; more of them while it cleans up are ignored, so the clean-up always finishes.
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def cancel_on_ctrl_c() -> None:
                    async for _ in signals:
                        if not interrupted:
                            interrupted.append(True)
                            print("Interrupted: stopping the daemons and removing the temporary files ...", file=sys.stderr, flush=True)
                            nursery.cancel_scope.cancel()

                nursery.start_soon(cancel_on_ctrl_c)
                if args.guest == "image" or (args.guest == "auto" and qemu_binary() is None):
                    summary = await image_demo(args, root, daemons, clock)
                elif qemu_binary() is None:
                    raise DaemonError("--guest qemu: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
                else:
                    summary = await _qemu_demo(args, root, daemons, clock)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await daemons.stop()
                await trio.to_thread.run_sync(shutil.rmtree, root, True)
            clock.lap("stopping the daemons and cleaning up")
    if interrupted:
        return 130
    if args.json:
        summary["seconds"] = {what: round(seconds, 3) for what, seconds in clock.phases}
        print(json.dumps(summary, sort_keys=True))
    else:
        print(clock.summary())
        print("Demo complete; daemons stopped and temporary files removed.")
    return 0
