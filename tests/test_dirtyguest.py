"""The self-checking guest under real QEMU (TCG): it runs, it survives a migration, it catches corruption."""

from __future__ import annotations

import mmap
import os
import socket

import trio
from dirtyguest import (
    GUEST_LOG,
    WS_ADDR,
    dirty_kernel,
    expected_static_sha256,
    guest_args,
    guest_mib,
    read_report,
    requires_toolchain,
    wait_progress,
)
from qemu_fixtures import base_args, memory_digest, requires_qemu, run_dir

from tunnel.qemu import QemuProcess, start_incoming_fd, start_outgoing_fd, wait_migration, wait_run_state

__all__ = ["dirty_kernel", "run_dir"]  # fixtures, imported for pytest

pytestmark = [requires_qemu, requires_toolchain]
FAST = 10 * 1024**3
WS_MIB = 32


async def test_guest_reports_progress_and_no_corruption(run_dir: str, dirty_kernel: str) -> None:
    args = base_args(guest_mib(WS_MIB)) + guest_args(dirty_kernel, mib=WS_MIB, rate=0)
    with trio.fail_after(60):
        async with await QemuProcess.start(args, guest_dir=f"{run_dir}/g", name="g") as guest:
            report = await wait_progress(os.path.join(guest.guest_dir, GUEST_LOG), lines=3)
            assert report.started and report.ready
            first, last = report.progress[0], report.progress[-1]
            assert last[1] > first[1] and last[2] > first[2]  # rewrites and verifications go on


async def test_static_working_set_has_the_expected_content(run_dir: str, dirty_kernel: str) -> None:
    args = base_args(guest_mib(WS_MIB)) + guest_args(dirty_kernel, mib=WS_MIB, write=False)
    with trio.fail_after(60):
        async with await QemuProcess.start(args, guest_dir=f"{run_dir}/g", name="g") as guest:
            report = await wait_progress(os.path.join(guest.guest_dir, GUEST_LOG), lines=1)
            assert report.progress[-1][1] == 0  # write=0: no rewrites
            digest = await memory_digest(guest.qmp, run_dir, addr=WS_ADDR, size=WS_MIB << 20)
            assert digest == await trio.to_thread.run_sync(expected_static_sha256, WS_MIB)


async def test_native_migration_keeps_the_guest_checking_itself(run_dir: str, dirty_kernel: str) -> None:
    """Pre-copy of a guest that rewrites 2000 pages/s: the destination goes on verifying and rewriting."""
    args = base_args(guest_mib(WS_MIB)) + guest_args(dirty_kernel, mib=WS_MIB, rate=2000)
    caps = {"return-path": True}
    with trio.fail_after(90):
        async with (
            await QemuProcess.start(args, guest_dir=f"{run_dir}/src", name="src") as src,
            await QemuProcess.start(args, guest_dir=f"{run_dir}/dst", name="dst", incoming=True) as dst,
        ):
            before = await wait_progress(os.path.join(src.guest_dir, GUEST_LOG), lines=2)
            a, b = socket.socketpair()
            with a, b:
                await start_incoming_fd(dst.qmp, b.fileno(), capabilities=caps)
                await start_outgoing_fd(src.qmp, a.fileno(), capabilities=caps, max_bandwidth=FAST)
            await wait_migration(src.qmp, poll=0.02)
            await wait_migration(dst.qmp, poll=0.02)
            await wait_run_state(dst.qmp, "paused")
            await dst.qmp.execute("cont")
            after = await wait_progress(os.path.join(dst.guest_dir, GUEST_LOG), lines=3)
            assert not after.started  # it resumed mid-loop: its counters came with its memory
            assert after.progress[0][1] >= before.progress[-1][1]
            assert after.progress[-1][1] > after.progress[0][1]


async def test_corruption_is_detected(run_dir: str, dirty_kernel: str) -> None:
    """Guest RAM in a shared file: a byte flipped behind the guest's back is reported with its address."""
    mem_mib = guest_mib(WS_MIB)
    path = os.path.join(run_dir, "ram")
    args = base_args(mem_mib) + [
        "-object", f"memory-backend-file,id=ram0,size={mem_mib}M,mem-path={path},share=on",
        "-machine", "memory-backend=ram0",
    ] + guest_args(dirty_kernel, mib=WS_MIB, write=False)  # fmt: skip
    victim = WS_ADDR + 5 * 4096 + 12
    with trio.fail_after(60):
        async with await QemuProcess.start(args, guest_dir=f"{run_dir}/g", name="g") as guest:
            log = os.path.join(guest.guest_dir, GUEST_LOG)
            await wait_progress(log, lines=1)
            await trio.to_thread.run_sync(_flip, path, victim)
            while not read_report(log).corrupt:
                await trio.sleep(0.05)
            report = read_report(log)
            address, expected, found = report.corrupt[0]
            assert address == victim & ~3
            assert expected ^ found == 0xFF << (8 * (victim & 3))


def _flip(path: str, offset: int) -> None:
    """Invert one byte of guest RAM (low RAM maps 1:1 onto the backend file's offsets)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
        ram[offset] ^= 0xFF
