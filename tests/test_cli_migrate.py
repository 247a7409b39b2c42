"""``tunnel migrate`` as an operator runs it: Ctrl-C cancels, --detach leaves it running, one live copy.

Two daemon processes on unix sockets and the CLI as a process; the guest is a
real QEMU with random RAM, migrated slowly (a bandwidth cap) so that the
signal reliably lands mid-transfer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from daemon_proc import daemon_process
from qemu_fixtures import RandomRam, base_args, loader_args, random_ram, requires_qemu, run_dir

from tunnel.client import connect

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

MiB = 1024 * 1024
pytestmark = requires_qemu


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunnel", *args]


async def wait_for(predicate: Callable[[], Any], what: str) -> None:
    """Poll *predicate* (another process's state: there is no event to wait on) for up to 30 s."""
    with trio.move_on_after(30):
        while not await predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def two_daemons_and_a_guest(run_dir: str, ram: RandomRam) -> AsyncIterator[tuple[str, str]]:
    """Source and destination daemons on unix sockets, guest vm1 (random RAM) running on the source; yields their sockets."""
    src, dst = f"{run_dir}/src.sock", f"{run_dir}/dst.sock"
    allow = ("--allow-path", os.path.dirname(ram.path))
    async with (
        daemon_process(run_dir, "src", "--listen", f"unix://{src}", *allow),
        daemon_process(run_dir, "dst", "--listen", f"unix://{dst}", *allow),
    ):
        async with connect(f"unix://{src}") as client:
            await client.define({"name": "vm1", "qemu": base_args() + loader_args(ram)})
            await client.start("vm1")
        yield src, dst


@pytest.mark.parametrize("p2p", [True, False], ids=["p2p", "client-driven"])
async def test_ctrl_c_cancels_the_migration_and_says_where_the_guest_runs(
    run_dir: str, random_ram: Callable[[int], RandomRam], p2p: bool
) -> None:
    with trio.fail_after(120):
        async with two_daemons_and_a_guest(run_dir, random_ram(64 * MiB)) as (src, dst):
            async with connect(f"unix://{src}") as client:
                pid = (await client.list())[0]["pid"]
                flags = ["--p2p", "--tunnelled"] if p2p else []
                proc = await trio.lowlevel.open_process(
                    cli("--connect", f"unix://{src}", "migrate", "--live", *flags, "--bandwidth", "8", "vm1", f"unix://{dst}"),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )

                async def transferring() -> bool:
                    info = await client.jobinfo("vm1")
                    return info.get("status") == "active" and (info.get("data_processed") or 0) > 4 * MiB

                await wait_for(transferring, "the transfer")
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 130
                assert proc.stderr is not None
                err = (await proc.stderr.receive_some(65536)).decode()
                assert err.count("\n") == 1 and "cancelled (Ctrl-C)" in err and "the guest runs here" in err, err
                rows = await client.list()
                assert rows[0]["state"] == "running" and rows[0]["pid"] == pid
                info = await client.jobinfo("vm1")
                assert info["status"] == "cancelled" and info["data_processed"] > 4 * MiB, info
            async with connect(f"unix://{dst}") as dest:

                async def discarded() -> bool:
                    return await dest.list() == []

                await wait_for(discarded, "the destination to discard its copy")


async def test_detach_and_one_live_copy_after_the_migration(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    with trio.fail_after(120):
        async with two_daemons_and_a_guest(run_dir, random_ram(32 * MiB)) as (src, dst):
            done = await trio.run_process(
                cli("--connect", f"unix://{src}", "migrate", "--live", "--p2p", "--tunnelled", "--detach", "--json", "vm1", f"unix://{dst}"),
                capture_stdout=True,
            )
            assert json.loads(done.stdout)["status"] == "started"
            async with connect(f"unix://{src}") as client:

                async def completed() -> bool:
                    return (await client.jobinfo("vm1"))["status"] == "completed"

                await wait_for(completed, "the detached migration")
                rows = await client.list()
                assert rows[0]["state"] == "shut off" and rows[0]["migrated_to"] == f"unix://{dst}"
            refused = await trio.run_process(
                cli("--connect", f"unix://{src}", "start", "vm1"), capture_stderr=True, check=False
            )
            assert refused.returncode == 1 and b"runs there" in refused.stderr and b"--force" in refused.stderr
            async with connect(f"unix://{dst}") as dest:
                rows = await dest.list()
                assert rows[0]["state"] == "running" and rows[0]["persistent"] is False  # transient without --persistent
                # and back, --persistent --undefinesource: the destination keeps it, the source forgets it
                result = await dest.migrate("vm1", f"unix://{src}", live=True, p2p=True, tunnelled=True, persistent=True,
                                            undefine_source=True)
                assert result["status"] == "completed"
                assert await dest.list() == []  # a transient guest goes with its QEMU; nothing marks it here
            async with connect(f"unix://{src}") as client:
                rows = await client.list()
                assert (rows[0]["state"], rows[0]["persistent"], "migrated_to" in rows[0]) == ("running", True, False)
                await client.destroy("vm1")
