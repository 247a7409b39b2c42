"""Post-copy at the QEMU layer, QEMU to QEMU over socketpairs, with the self-checking guest.

The guest rewrites pages flat out (hundreds of MB/s under TCG) while
pre-copy is capped at 32 MiB/s, so pre-copy alone would never converge; the
switch to post-copy moves it, and the guest itself checks every page it
reads on the destination.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio
from dirtyguest import GUEST_LOG, dirty_kernel, guest_args, guest_mib, requires_toolchain, wait_progress
from qemu_fixtures import base_args, requires_qemu, run_dir

from tunnel.qemu import (
    MigrationStatus,
    PostcopyError,
    QemuProcess,
    QMPClient,
    cancel,
    postcopy_capabilities,
    query_migration,
    recover_incoming_fd,
    resume_outgoing_fd,
    run_state,
    set_parameters,
    start_incoming_fd,
    start_outgoing_fd,
    start_postcopy,
    wait_migration,
    wait_status,
)

__all__ = ["dirty_kernel", "run_dir"]  # fixtures, imported for pytest

pytestmark = [requires_qemu, requires_toolchain]
MiB = 1024 * 1024
WS_MIB = 48
PRECOPY_BANDWIDTH = 32 * MiB


class CuttableRelay:
    """Forwards bytes both ways between two sockets until :meth:`cut` closes both (a broken connection)."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = [trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)]
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, self.socks[0], self.socks[1])
                nursery.start_soon(self._copy, self.socks[1], self.socks[0])

    @staticmethod
    async def _copy(src: trio.socket.SocketType, dst: trio.socket.SocketType) -> None:
        with contextlib.suppress(OSError):
            while data := await src.recv(1 << 16):
                view = memoryview(data)
                while view:
                    view = view[await dst.send(view) :]

    def cut(self) -> None:
        self.scope.cancel()
        for s in self.socks:
            s.close()


async def _start(run_dir: str, kernel: str) -> tuple[QemuProcess, QemuProcess]:
    args = base_args(guest_mib(WS_MIB)) + guest_args(kernel, mib=WS_MIB, rate=0)
    src = await QemuProcess.start(args, guest_dir=f"{run_dir}/src", name="src")
    try:
        dst = await QemuProcess.start(args, guest_dir=f"{run_dir}/dst", name="dst", incoming=True)
    except BaseException:
        await src.stop()
        raise
    await wait_progress(os.path.join(src.guest_dir, GUEST_LOG), lines=1)
    return src, dst


async def _switch(src: QMPClient, dst: QMPClient) -> MigrationStatus:
    """After some pre-copy, switch to post-copy and run the guest on the destination (started with -S)."""
    while (await query_migration(src)).transferred < 8 * MiB:
        await trio.sleep(0.02)
    await start_postcopy(src)
    status = await wait_status(dst, "postcopy-active", "completed", poll=0.01)
    await dst.execute("cont")
    return status


async def test_postcopy_over_a_socketpair(run_dir: str, dirty_kernel: str) -> None:
    with trio.fail_after(120):
        src, dst = await _start(run_dir, dirty_kernel)
        async with src, dst:
            a, b = socket.socketpair()
            with a, b:
                await start_incoming_fd(dst.qmp, b.fileno(), capabilities=postcopy_capabilities(blocktime=True))
                await start_outgoing_fd(src.qmp, a.fileno(), capabilities=postcopy_capabilities(), max_bandwidth=PRECOPY_BANDWIDTH)
            status = await _switch(src.qmp, dst.qmp)
            assert status.status == "postcopy-active"
            assert (await query_migration(src.qmp)).postcopy
            # Past the switch there is no going back: QEMU 7.2 would take migrate_cancel and lose the guest.
            with pytest.raises(PostcopyError, match="cannot come back"):
                await cancel(src.qmp)
            done = await wait_migration(src.qmp, poll=0.02)
            assert done.status == "completed"
            loaded = await wait_migration(dst.qmp, poll=0.02)
            assert await run_state(dst.qmp) == "running"
            assert await run_state(src.qmp) == "postmigrate"
            report = await wait_progress(os.path.join(dst.guest_dir, GUEST_LOG), lines=3)
            assert report.progress[-1][1] > report.progress[0][1]  # it rewrites pages on the destination
            assert loaded.blocktime_ms is not None and len(loaded.vcpu_blocktime_ms) == 1, loaded.raw


async def test_postcopy_recovers_twice_after_the_channel_breaks(run_dir: str, dirty_kernel: str) -> None:
    """Cut the channel during post-copy: both pause; a new socketpair (migrate-recover, resume) goes on; twice."""
    with trio.fail_after(120):
        src, dst = await _start(run_dir, dirty_kernel)
        async with src, dst, trio.open_nursery() as nursery:
            # Slow post-copy, so that the cuts land while pages are still missing on the destination.
            await set_parameters(src.qmp, {"max-postcopy-bandwidth": 4 * MiB})
            src_q, src_r = socket.socketpair()
            dst_q, dst_r = socket.socketpair()
            with src_q, dst_q:
                await start_incoming_fd(dst.qmp, dst_q.fileno(), capabilities=postcopy_capabilities(blocktime=True))
                await start_outgoing_fd(src.qmp, src_q.fileno(), capabilities=postcopy_capabilities(), max_bandwidth=PRECOPY_BANDWIDTH)
            relay = CuttableRelay(src_r, dst_r)
            nursery.start_soon(relay.run)
            await _switch(src.qmp, dst.qmp)
            for _ in range(2):
                await trio.sleep(0.5)
                relay.cut()
                await wait_status(src.qmp, "postcopy-paused", poll=0.02)
                await wait_status(dst.qmp, "postcopy-paused", poll=0.02)
                assert await run_state(dst.qmp) == "running"  # vCPUs wait for pages; the guest is not stopped
                src_q, src_r = socket.socketpair()
                dst_q, dst_r = socket.socketpair()
                with src_q, dst_q:
                    await recover_incoming_fd(dst.qmp, dst_q.fileno())  # it waits for the source's first bytes
                    relay = CuttableRelay(src_r, dst_r)
                    nursery.start_soon(relay.run)
                    await resume_outgoing_fd(src.qmp, src_q.fileno())
                await wait_status(src.qmp, "postcopy-active", "completed", poll=0.01)
            await set_parameters(src.qmp, {"max-postcopy-bandwidth": 0})
            assert (await wait_migration(src.qmp, poll=0.02)).status == "completed"
            await wait_migration(dst.qmp, poll=0.02)
            await wait_progress(os.path.join(dst.guest_dir, GUEST_LOG), lines=3)
            relay.cut()
