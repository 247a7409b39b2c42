"""Post-copy of a guest that dirties memory faster than pre-copy can send it: tunnelled against native.

The guest is the self-checking guest of the tests (``tests/guest/dirtyguest.S``),
rewriting pages flat out (hundreds of MB/s under TCG) over a working set of
``--size`` MiB.  Pre-copy is capped at ``--link`` MiB/s (QEMU's
max-bandwidth, standing in for a link slower than the dirtying), so:

* ``precopy``: QEMU to QEMU over a unix socket, pre-copy only, given
  ``--precopy-wait`` seconds: ``precopy_converged`` says whether it completed;
* ``native`` / ``tunnelled``: two ``tunnel daemon`` processes, PEER2PEER
  live migration with ``postcopy_after_precopy`` (the switch after the first
  pass), native (QEMU to QEMU over a unix socket the destination daemon
  opens) or TUNNELLED.  Post-copy itself is not capped.  Measured: the time
  from the switch (the job's phase turning ``post-copy``, polled every
  10 ms) to the job completing, the destination's ``postcopy-blocktime``
  (total time its vCPU waited for pages; also per page it asked for, as the
  number of requests varies from run to run) and the source's downtime.
  ``tunnelled`` carries the pages the destination asks for on a stream of
  their own (QEMU's ``postcopy-preempt`` channel), the daemons' default;
* ``single`` (not in the default modes): ``tunnelled`` with the source
  daemon started ``--no-postcopy-preempt``, so those pages wait behind the
  background copy on QEMU's one channel, as before the preempt channel;
* ``direct`` (not in the default modes): QEMU to QEMU over a unix socket,
  without the daemons, switched the same way (after the first pass) and
  the destination continued at ``postcopy-active`` as the daemons do; it
  tells whether something seen through the daemons is QEMU's own, and on a
  stuck guest it also records QEMU's view of the vCPU (``info registers``);
* ``relay2`` (not in the default modes): ``direct`` through two bare splice
  relays in a chain (``_splicerelay.py``), the least two processes carrying
  QEMU's stream can cost: ``postcopy_relay2_ratio`` and
  ``blocktime_per_request_relay2_ratio`` (against ``direct``) are the floor
  under ``tunnelled`` on this machine;
* ``resume``: tunnelled again, through a relay between the daemons, with
  post-copy capped at 8 MiB/s so that the cut lands in it; the relay cuts
  the connection, both QEMUs pause, and ``resume_s`` is the time from the
  client's ``migrate --postcopy-resume`` to the job transferring again.

Every run checks the guest on the destination: a CORRUPT line stops the
benchmark; a guest that shows no progress within 20 s is counted in
``guest_stuck_runs`` and left out of the blocktime medians (its vCPU stopped,
so it waited for nothing: 0 ms, where a running guest waits about 100 ms),
and what it was doing is kept in ``stuck`` (on stderr
as it happens): the destination's run state, whether the program's code
is still the ELF's bytes, whether its counters in memory still advance
(then only its output stopped), and the top frames of QEMU's threads (gdb,
if installed).  Rounds alternate the modes; figures are medians.

What the stuck guests showed so far (QEMU 7.2, TCG, a loaded 2-core
machine): 4 of 27 runs through the daemons (native and tunnelled alike),
in bursts; QEMU to QEMU without the daemons 1 of 17 (the one in a script
that continued the destination only after completion).  Each time QEMU
reports the guest running, the program's code is
intact, its counters in memory are frozen, and the vCPU thread sits in
TCG's tb_gen_code: ``info registers`` (QEMU to QEMU) gave EIP=0xe7442aa6,
far outside the program (0x100000-0x100497), a value shaped like the
working set's pattern, with ESP one slot below the stack's top.  So the
vCPU returned through a stack slot holding data, not a return address,
and then ran through unassigned memory one instruction per translation.
The program's pushes and pops balance on every path, and the runs through
the daemons that stuck had made exactly one page request (the others
hundreds, or none): what points to a page outside the working set (most
likely the stack's) arriving stale at the destination, in QEMU, not in
the tunnel.  ``stack_top`` in the diagnosis records that page's last dwords.

Usage: python bench/postcopy.py [--size MiB[,MiB...]] [--rounds N] [--link MiB/s] [--modes precopy,native,tunnelled,resume,single,direct,relay2]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import trio
from _common import emit, median
from _splicerelay import start_relays, stop_relays
from daemon_proc import daemon_process, kill_guests
from dirtyguest import GUEST_LOG, build_kernel, guest_args, guest_mib, read_report, wait_progress
from fault_tools import Relay
from qemu_fixtures import base_args

from tunnel.client import Client, connect
from tunnel.qemu import (
    QemuProcess,
    cancel,
    postcopy_capabilities,
    query_migration,
    start_incoming_fd,
    start_incoming_uri,
    start_outgoing_fd,
    start_outgoing_uri,
    start_postcopy,
)

MiB = 1024 * 1024
MODES = ["precopy", "native", "tunnelled", "resume"]
TOO_SMALL = ("pre-copy completed before the switch to post-copy ({size} MiB at --link {link} MiB/s): use a bigger "
             "--size (256 MiB is enough under TCG) or a lower --link")
#: Runs a QMP command on the destination QEMU, returns its ``return`` value.
Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
#: How long the destination's guest gets to show progress after the migration.
PROGRESS_WAIT = 20.0


def definition(kernel: str, size: int) -> dict[str, Any]:
    return {"name": "vm", "qemu": base_args(guest_mib(size)) + guest_args(kernel, mib=size)}


async def precopy_only(root: str, kernel: str, size: int, link: int, wait: float) -> bool:
    """Pre-copy alone, QEMU to QEMU, capped at *link* MiB/s: did it complete within *wait* seconds?"""
    args = base_args(guest_mib(size)) + guest_args(kernel, mib=size)
    async with (
        await QemuProcess.start(args, guest_dir=f"{root}/pre-src", name="src") as src,
        await QemuProcess.start(args, guest_dir=f"{root}/pre-dst", name="dst", incoming=True) as dst,
    ):
        await wait_progress(os.path.join(src.guest_dir, GUEST_LOG), lines=1)
        a, b = socket.socketpair()
        with a, b:
            await start_incoming_fd(dst.qmp, b.fileno(), capabilities={"return-path": True})
            await start_outgoing_fd(src.qmp, a.fileno(), capabilities={"return-path": True}, max_bandwidth=link * MiB)
        with trio.move_on_after(wait):
            while (await query_migration(src.qmp)).status != "completed":
                await trio.sleep(0.1)
            return True
        await cancel(src.qmp)
        return False


async def poll_job(client: Client, until: Any, poll: float = 0.01) -> tuple[dict[str, Any], float]:
    while True:
        info = await client.jobinfo("vm")
        if until(info):
            return info, time.perf_counter()
        if info["status"] in ("failed", "cancelled"):
            raise SystemExit(f"migration {info['status']}: {info.get('error')}")
        await trio.sleep(poll)


def program_image(kernel: str) -> tuple[bytes, dict[str, int]]:
    """The guest program's code and read-only data as loaded at its link address, and its symbols (nm)."""
    flat = kernel + ".text.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", "--only-section=.rodata", kernel, flat], check=True)
    with open(flat, "rb") as f:
        image = f.read()
    symbols = {}
    for line in subprocess.run(["nm", kernel], check=True, capture_output=True, text=True).stdout.splitlines():
        value, _, name = line.split()
        symbols[name] = int(value, 16)
    return image, symbols


async def diagnose_stuck(execute: Execute, pid: int | None, guest_dir: str, kernel: str) -> dict[str, Any]:
    """What a destination guest without progress is doing: its run state, code, counters in memory, QEMU's threads.

    *execute* runs a QMP command on the destination QEMU and returns its ``return`` value.
    """
    image, symbols = program_image(kernel)
    base = symbols["mb_header"]  # where .text (and the image) begins; the counters (.bss) lie in the next page
    out: dict[str, Any] = {"run_state": (await execute("query-status", None)).get("status")}
    dumps = []
    for n in range(2):
        name = f"diag{n}.bin"
        await execute("pmemsave", {"val": base, "size": 0x2000, "filename": name})  # QEMU runs in guest_dir
        dumps.append(await trio.Path(guest_dir, name).read_bytes())
        await trio.sleep(1.0)
    out["code_intact"] = dumps[0][: len(image)] == image
    counters = [int.from_bytes(d[symbols["verified"] - base :][:4], "little") for d in dumps]
    out["verified_pages"] = counters
    # The last dwords below the top of the stack: return addresses (the code's) and saved registers.
    top = symbols["STACK_TOP"]
    await execute("pmemsave", {"val": top - 32, "size": 32, "filename": "diag-stack.bin"})
    stack = await trio.Path(guest_dir, "diag-stack.bin").read_bytes()
    out["stack_top"] = [f"{int.from_bytes(stack[i : i + 4], 'little'):#010x}" for i in range(0, 32, 4)]
    out["counters_advance"] = counters[1] != counters[0]  # the program runs, only its output stopped
    if pid and shutil.which("gdb"):
        done = await trio.run_process(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 3"],
                                      capture_stdout=True, capture_stderr=True, check=False)
        out["qemu_threads"] = [line for line in done.stdout.decode(errors="replace").splitlines()
                               if line.startswith(("Thread ", "#0", "#1", "#2"))][:60]
    return out


async def direct_run(root: str, kernel: str, size: int, link: int, *, relays: bool = False) -> dict[str, Any]:
    """Post-copy QEMU to QEMU, without the daemons, switched and continued as the daemons do.

    With *relays* (mode ``relay2``), through two bare splice relays in a chain.
    """
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    args = base_args(guest_mib(size)) + guest_args(kernel, mib=size)
    relay_procs: list[subprocess.Popen[bytes]] = []
    async with (
        await QemuProcess.start(args, guest_dir=f"{root}/src", name="src") as src,
        await QemuProcess.start(args, guest_dir=f"{root}/dst", name="dst", incoming=True) as dst,
    ):
        try:
            await wait_progress(os.path.join(src.guest_dir, GUEST_LOG), lines=1)
            uri = f"unix:{root}/migrate.sock"
            await start_incoming_uri(dst.qmp, uri, capabilities=postcopy_capabilities(blocktime=True))
            if relays:
                uri = f"unix:{await start_relays(root, f'{root}/migrate.sock', relay_procs)}"
            await start_outgoing_uri(src.qmp, uri, max_bandwidth=link * MiB, capabilities=postcopy_capabilities())
            while (status := await query_migration(src.qmp)).dirty_sync_count < 2:  # the first pass is done
                if status.status == "completed":
                    raise SystemExit(TOO_SMALL.format(size=size, link=link))
                await trio.sleep(0.01)
            await start_postcopy(src.qmp)
            switched = time.perf_counter()
            running = False
            while (status := await query_migration(dst.qmp)).status != "completed":
                if status.status in ("failed", "cancelled"):
                    raise SystemExit(f"direct post-copy {status.status}: {status.error_desc}")
                if status.status == "postcopy-active" and not running:
                    await dst.qmp.execute("cont")
                    running = True
                await trio.sleep(0.01)
            with trio.fail_after(60):  # the destination completed: the source follows at once
                while (source := await query_migration(src.qmp)).status != "completed":
                    if source.status in ("failed", "cancelled"):
                        raise SystemExit(f"direct post-copy, source side {source.status}: {source.error_desc}")
                    await trio.sleep(0.01)
            result: dict[str, Any] = {"postcopy_s": time.perf_counter() - switched, "blocktime_ms": status.blocktime_ms,
                                      "postcopy_requests": source.postcopy_requests, "downtime_ms": source.downtime_ms}
            if status.blocktime_ms is not None and source.postcopy_requests:
                result["blocktime_per_request_ms"] = status.blocktime_ms / source.postcopy_requests
            if not running:
                await dst.qmp.execute("cont")
            result["guest_progress"] = False
            with trio.move_on_after(PROGRESS_WAIT):
                result["guest_progress"] = (await wait_progress(os.path.join(dst.guest_dir, GUEST_LOG), lines=2)).ok
            if not result["guest_progress"]:

                async def execute(command: str, arguments: dict[str, Any] | None) -> Any:
                    return await dst.qmp.execute(command, arguments)

                result["stuck"] = await diagnose_stuck(execute, dst.pid, dst.guest_dir, kernel)
                registers = await dst.qmp.execute("human-monitor-command", {"command-line": "info registers"})
                result["stuck"]["registers"] = " ".join(line for line in registers.splitlines() if line.startswith(("E", "CR0")))
                print(f"the destination guest makes no progress (direct): {result['stuck']}", file=sys.stderr)
            log = os.path.join(dst.guest_dir, GUEST_LOG)
            if not read_report(log).ok:
                raise SystemExit(f"the guest found corrupt memory on the destination (direct): {read_report(log).corrupt[:4]}")
        finally:
            stop_relays(relay_procs)
    return result


async def postcopy_run(root: str, kernel: str, size: int, link: int, mode: str) -> dict[str, Any]:
    """One daemon migration in *mode* (native, tunnelled, resume); the figures of the post-copy part."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    src_sock, dst_sock = f"{root}/src.sock", f"{root}/dst.sock"
    allow = ("--allow-path", os.path.dirname(kernel))
    relay = Relay(f"{root}/relay.sock", dst_sock)
    try:
        async with (
            trio.open_nursery() as nursery,
            daemon_process(root, "src", "--listen", f"unix://{src_sock}", *allow,
                           *(("--no-postcopy-preempt",) if mode == "single" else ())),
            daemon_process(root, "dst", "--listen", f"unix://{dst_sock}", *allow),
        ):
            await nursery.start(relay.run)
            dest = relay.uri if mode == "resume" else f"unix://{dst_sock}"
            async with connect(f"unix://{src_sock}") as client:
                await client.define(definition(kernel, size))
                await client.start("vm")
                await wait_progress(os.path.join(root, "src", "run", "vm", GUEST_LOG), lines=1)
                await client.migrate("vm", dest, live=True, p2p=True, tunnelled=mode != "native", bandwidth_mib=link,
                                     postcopy_after_precopy=True, postcopy_bandwidth_mib=8 if mode == "resume" else 0, detach=True)
                info, switched = await poll_job(client, lambda i: i.get("phase") == "post-copy" or i["status"] == "completed")
                if info.get("phase") != "post-copy":
                    raise SystemExit(TOO_SMALL.format(size=size, link=link))
                result: dict[str, Any] = {}
                if mode == "resume":
                    await trio.sleep(0.3)
                    relay.cut("fin")
                    await poll_job(client, lambda i: i["status"] == "postcopy-paused")
                    async with connect(f"unix://{src_sock}") as other:
                        while True:  # both QEMUs must have paused before the resume can pair them
                            reply = await other.monitor("vm", {"execute": "query-migrate"})
                            if reply["return"]["status"] == "postcopy-paused":
                                break
                            await trio.sleep(0.01)
                    started = time.perf_counter()
                    async with trio.open_nursery() as inner:
                        inner.start_soon(client.postcopy_resume, "vm", dest)
                        _, resumed = await poll_job(client, lambda i: i["status"] == "active" and i.get("postcopy_resumes", 0) >= 1)
                        result["resume_s"] = resumed - started
                        done, ended = await poll_job(client, lambda i: i["status"] == "completed")
                else:
                    done, ended = await poll_job(client, lambda i: i["status"] == "completed")
                    result["postcopy_s"] = ended - switched
                    result["blocktime_ms"] = done.get("destination_postcopy_blocktime_ms")
                    result["downtime_ms"] = done.get("downtime_ms")
                    result["postcopy_requests"] = done.get("postcopy_requests")
                    result["preempt_bytes"] = done.get("postcopy_preempt_bytes")
                    if result["blocktime_ms"] is not None and result["postcopy_requests"]:
                        # blocktime grows with the number of pages the guest asked for, which varies from run to run
                        result["blocktime_per_request_ms"] = result["blocktime_ms"] / result["postcopy_requests"]
                result["guest_progress"] = False
                with trio.move_on_after(PROGRESS_WAIT):
                    report = await wait_progress(os.path.join(root, "dst", "run", "vm", GUEST_LOG), lines=2)
                    result["guest_progress"] = report.ok
                if not result["guest_progress"]:
                    async with connect(f"unix://{dst_sock}") as dest:

                        async def execute(command: str, arguments: dict[str, Any] | None) -> Any:
                            reply = await dest.monitor("vm", {"execute": command, **({"arguments": arguments} if arguments else {})})
                            return reply["return"]

                        pid = next((d["pid"] for d in await dest.list() if d["name"] == "vm"), None)
                        result["stuck"] = await diagnose_stuck(execute, pid, os.path.join(root, "dst", "run", "vm"), kernel)
                    print(f"the destination guest makes no progress ({mode}): {result['stuck']}", file=sys.stderr)
            nursery.cancel_scope.cancel()
    finally:
        log = os.path.join(root, "dst", "run", "vm", GUEST_LOG)
        if os.path.exists(log) and not read_report(log).ok:
            raise SystemExit(f"the guest found corrupt memory on the destination ({mode}): {read_report(log).corrupt[:4]}")
        kill_guests(root)
    return result


async def main(sizes: list[int], rounds: int, link: int, modes: list[str], wait: float) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="bpc-", dir="/tmp")
    try:
        kernel = build_kernel(root)
        out: dict[str, Any] = {"link_mib_per_s": link, "rounds": rounds, "sizes_mib": sizes}
        for size in sizes:
            key = f"{size}mib"
            if "precopy" in modes:
                converged = await precopy_only(f"{root}/p", kernel, size, link, wait)
                out[f"precopy_converged_{key}"] = converged
                out.setdefault("precopy_converged", False)
                out["precopy_converged"] = out["precopy_converged"] or converged
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes if m != "precopy"}
            for r in range(rounds):
                for mode, results in runs.items():
                    if mode in ("direct", "relay2"):
                        results.append(await direct_run(f"{root}/d", kernel, size, link, relays=mode == "relay2"))
                    else:
                        results.append(await postcopy_run(f"{root}/r", kernel, size, link, mode))
                    print(f"{size} MiB round {r + 1} {mode}: {results[-1]}", file=sys.stderr)

            def med(mode: str, field: str, runs: dict[str, list[dict[str, Any]]] = runs) -> float | None:
                # A guest that stopped running on the destination waits for no page: its blocktime
                # (0, or the one request it made) says nothing about the path, so it is left out.
                values = [x[field] for x in runs.get(mode, [])
                          if x.get(field) is not None and (x["guest_progress"] or not field.startswith("blocktime"))]
                return round(median(values), 4) if values else None

            for mode in ("native", "tunnelled", "single", "direct", "relay2"):
                if mode in runs:
                    out[f"postcopy_{mode}_s_{key}"] = med(mode, "postcopy_s")
                    out[f"blocktime_{mode}_ms_{key}"] = med(mode, "blocktime_ms")
                    out[f"downtime_{mode}_ms_{key}"] = med(mode, "downtime_ms")
                    out[f"blocktime_per_request_{mode}_ms_{key}"] = med(mode, "blocktime_per_request_ms")
            if "native" in runs and "tunnelled" in runs:
                n, t = out[f"postcopy_native_s_{key}"], out[f"postcopy_tunnelled_s_{key}"]
                out[f"postcopy_ratio_{key}"] = round(t / n, 3) if n else None
                bn, bt = out[f"blocktime_native_ms_{key}"], out[f"blocktime_tunnelled_ms_{key}"]
                out[f"blocktime_ratio_{key}"] = round(bt / bn, 3) if bn else None
            if "native" in runs and "single" in runs:
                n, bn = out[f"postcopy_native_s_{key}"], out[f"blocktime_native_ms_{key}"]
                t, bt = out[f"postcopy_single_s_{key}"], out[f"blocktime_single_ms_{key}"]
                out[f"postcopy_single_ratio_{key}"] = round(t / n, 3) if n else None
                out[f"blocktime_single_ratio_{key}"] = round(bt / bn, 3) if bn and bt is not None else None
            if "direct" in runs and "relay2" in runs:
                # The floor: what two bare relays cost QEMU to QEMU, measured as direct is.
                d, r2 = out[f"postcopy_direct_s_{key}"], out[f"postcopy_relay2_s_{key}"]
                out[f"postcopy_relay2_ratio_{key}"] = round(r2 / d, 3) if d else None
                bd, br = out[f"blocktime_per_request_direct_ms_{key}"], out[f"blocktime_per_request_relay2_ms_{key}"]
                out[f"blocktime_per_request_relay2_ratio_{key}"] = round(br / bd, 3) if bd and br is not None else None
            if "resume" in runs:
                out[f"resume_s_{key}"] = med("resume", "resume_s")
            out[f"guest_stuck_runs_{key}"] = sum(not x["guest_progress"] for results in runs.values() for x in results)
            stuck = [{"mode": mode, **x["stuck"]} for mode, results in runs.items() for x in results if "stuck" in x]
            if stuck:
                out[f"stuck_{key}"] = stuck
        first = f"{sizes[0]}mib"  # the headline figures: the first size
        for name in ("postcopy_tunnelled_s", "postcopy_native_s", "postcopy_ratio", "blocktime_tunnelled_ms", "blocktime_native_ms",
                     "blocktime_ratio", "downtime_tunnelled_ms", "downtime_native_ms", "resume_s"):
            if f"{name}_{first}" in out:
                out[name] = out[f"{name}_{first}"]
        return out
    finally:
        kill_guests(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256,1024", help="working sets in MiB, comma-separated (default 256,1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--link", type=int, default=64, help="pre-copy cap in MiB/s, below the guest's dirty rate (default 64)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--precopy-wait", type=float, default=15.0, help="seconds pre-copy alone gets to converge (default 15)")
    a = parser.parse_args()
    try:
        result = trio.run(main, [int(s) for s in a.size.split(",")], a.rounds, a.link, a.modes.split(","), a.precopy_wait)
    except BaseExceptionGroup as group:  # a SystemExit raised inside a nursery: its one line, not the group's traceback
        exits = group.subgroup(SystemExit)
        if exits is None:
            raise
        first: BaseException = exits
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    emit(result)
