"""How long ``abort`` takes: from the ABORT call to the source guest running again.

Two ``python3 -m tunnel daemon`` processes on unix sockets; a QEMU guest
(TCG) with random RAM migrates PEER2PEER + TUNNELLED under a bandwidth cap,
so it is mid-transfer when ``abort`` is called.  For each run the script
records the time the ABORT call took (it returns once the source guest
runs again), checks that QEMU reports ``running`` with the same pid, and
measures how long the destination then takes to discard its copy (in the
background, never delaying the source).  Prints one JSON object last:
``abort_ms`` (median, min, max over the runs) and ``destination_clean_ms``.
Target: abort within 1 s.

    python3 bench/abort.py [--runs 5] [--random-mib 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, median

from tunnel.client import connect

MiB = 1024 * 1024
LOAD_ADDRESS = 0x1000000


async def start_daemon(root: str, name: str) -> tuple[trio.Process, str]:
    sock = os.path.join(root, f"{name}.sock")
    log = open(os.path.join(root, f"{name}.log"), "ab")  # noqa: SIM115, ASYNC230 - owned by the daemon process
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tunnel", "daemon", "--listen", f"unix://{sock}", "--state-dir", os.path.join(root, name),
         "--allow-path", root, "--shutdown-guests-on-exit"],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    with trio.fail_after(30):
        while not os.path.exists(sock):
            await trio.sleep(0.05)
    return proc, f"unix://{sock}"


async def main(runs: int, random_mib: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="tunnel-abort-")
    rand = os.path.join(root, "ram.bin")
    with open(rand, "wb") as f:  # noqa: ASYNC230 - set-up, before anything is timed
        f.writelines(os.urandom(MiB) for _ in range(random_mib))
    definition = {
        "name": "vm1",
        "qemu": ["-machine", "q35", "-accel", "tcg", "-m", str(random_mib + 64), "-nodefaults", "-display", "none",
                 "-device", f"loader,file={rand},addr={LOAD_ADDRESS:#x},force-raw=on"],
    }  # fmt: skip
    src_proc, src = await start_daemon(root, "src")
    dst_proc, dst = await start_daemon(root, "dst")
    abort_ms: list[float] = []
    clean_ms: list[float] = []
    try:
        async with connect(src) as client, connect(dst) as dest:
            await client.define(definition)
            await client.start("vm1")
            pid = (await client.list())[0]["pid"]
            for index in range(runs):
                async with trio.open_nursery() as nursery:

                    async def migrate() -> None:
                        try:
                            await client.migrate("vm1", dst, live=True, p2p=True, tunnelled=True, bandwidth_mib=32)
                        except Exception:  # noqa: BLE001, S110 - the abort makes it fail, as it should
                            pass

                    nursery.start_soon(migrate)
                    with trio.fail_after(60):
                        while True:  # this run's job, mid-transfer (jobinfo shows the last job until it starts)
                            info = await client.jobinfo("vm1")
                            if info.get("status") == "active" and (info.get("data_processed") or 0) >= 16 * MiB:
                                break
                            await trio.sleep(0.02)
                    started = time.perf_counter()
                    reply = await client.abort("vm1")
                    took = time.perf_counter() - started
                    state = await client.monitor("vm1", {"execute": "query-status"})
                    rows = await client.list()
                    if reply["status"] != "cancelled" or state["return"]["status"] != "running" or rows[0]["pid"] != pid:
                        raise SystemExit(f"run {index}: after abort: {reply}, {state}, {rows}")
                    with trio.fail_after(30):
                        while await dest.list():
                            await trio.sleep(0.005)
                    cleaned = time.perf_counter() - started
                abort_ms.append(took * 1000)
                clean_ms.append(cleaned * 1000)
                print(f"run {index + 1}: abort {took * 1000:.0f} ms, destination clean after {cleaned * 1000:.0f} ms", flush=True)
    finally:
        for proc in (src_proc, dst_proc):
            proc.send_signal(signal.SIGTERM)
        for proc in (src_proc, dst_proc):
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "runs": runs,
        "random_mib": random_mib,
        "accel": "tcg",
        "abort_ms": round(median(abort_ms), 1),
        "abort_ms_min": round(min(abort_ms), 1),
        "abort_ms_max": round(max(abort_ms), 1),
        "destination_clean_ms": round(median(clean_ms), 1),
        "target_abort_ms": 1000,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-mib", type=int, default=128)
    args = parser.parse_args()
    emit(trio.run(main, args.runs, args.random_mib))
